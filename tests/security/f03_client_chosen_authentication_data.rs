//! Finding 3: Client-chosen authentication_data reaches brpc.
//!
//! Still open: the fix and its regression test land together, in this file.
