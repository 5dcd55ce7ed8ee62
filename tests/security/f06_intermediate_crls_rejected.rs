//! Finding 6: Leaves issued by an intermediate cannot be revoked.
