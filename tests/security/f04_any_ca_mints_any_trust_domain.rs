//! Finding 4: Any CA in the bundle can mint any trust domain's identity.
