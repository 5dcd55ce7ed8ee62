//! Finding 10: A reload that changes our SPIFFE ID or trust domain, or publishes a revoked certificate, goes live silently.
