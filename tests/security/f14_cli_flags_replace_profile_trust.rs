//! Finding 14: CLI flags replace a profile's whole trust bundle and drop its CRLs.
