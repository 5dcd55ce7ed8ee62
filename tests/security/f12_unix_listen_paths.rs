//! Finding 12, second part: a Unix listen path is removed whatever it is, and the socket's mode is the umask's.
//!
//! Still open: the fix and its regression test land together, in this file.
