//! Finding 7: Unauthenticated sockets hold connection slots.
