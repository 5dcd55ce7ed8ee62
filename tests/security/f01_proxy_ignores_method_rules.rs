//! Finding 1: The proxy's baidu_std routes ignore [[policy.rules]].
//!
//! Still open: the fix and its regression test land together, in this file.
