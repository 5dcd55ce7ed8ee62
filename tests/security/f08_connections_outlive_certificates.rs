//! Finding 8: Connections outlive their certificate.
