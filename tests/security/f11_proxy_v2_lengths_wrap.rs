//! Finding 11: PROXY v2 TLV and total lengths can wrap.
//!
//! Still open: the fix and its regression test land together, in this file.
