//! Finding 11: PROXY v2 TLV and total lengths can wrap.
