//! Finding 12, first part: group/world-readable private key files go unnoticed.
