//! Finding 5: A non-CA certificate in a trust bundle becomes a trust anchor.
