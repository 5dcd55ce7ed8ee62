//! The trustwire C ABI. It converts types, errors and ownership and calls the core; no TLS,
//! policy or protocol logic lives here.
//!
//! Conventions (they are what `include/trustwire.h` promises):
//! - every function returning `tw_result` checks its pointer arguments, so a NULL gives
//!   `TW_NULL_ARGUMENT` instead of a crash;
//! - every body runs inside a panic boundary (`guard`), so a panic becomes `TW_PANIC`;
//! - a failure's message is kept per thread (`tw_last_error_message`);
//! - handles are opaque boxes; `_free(NULL)` does nothing.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

mod client;
mod ffi;
mod hooks;
mod log;
mod pki;
mod profile;
mod proxy;
mod server;

use std::ffi::{c_char, CStr};

pub use client::*;
pub use ffi::{tw_last_error_message, tw_last_error_rpc_code, tw_result_name, tw_string_free};
pub use hooks::*;
pub use log::*;
pub use pki::*;
pub use profile::*;
pub use proxy::*;
pub use server::*;

use ffi::guard;
#[cfg(test)]
use ffi::Failure;

/// Library major version; `tw_version()` gives the version of the library actually loaded.
pub const TW_VERSION_MAJOR: u32 = 0;
/// Library minor version.
pub const TW_VERSION_MINOR: u32 = 1;
/// Library patch version.
pub const TW_VERSION_PATCH: u32 = 0;
/// The version this header belongs to, "MAJOR.MINOR.PATCH" (cbindgen does not export string
/// constants, so cbindgen.toml writes the same text; a test checks both).
pub const TW_VERSION_STRING: &str = "0.1.0";

/// Result of every fallible call. Numbers are stable and never reused: 1–999 are the failure
/// catalogue's verdicts (the same names as the Python exceptions and the metric labels),
/// 1000 and up are API and call errors. `tw_result_name()` gives the stable name.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tw_result {
    TW_OK = 0,
    /// The chain does not lead to a trusted CA.
    TW_UNKNOWN_ISSUER = 1,
    /// A signature in the chain or the handshake does not verify.
    TW_BAD_SIGNATURE = 2,
    /// The certificate's not-after is in the past.
    TW_EXPIRED = 3,
    /// The certificate's not-before is in the future.
    TW_NOT_YET_VALID = 4,
    /// Listed in a CRL in force.
    TW_REVOKED = 5,
    /// A CRL needed for the decision is past its next-update time.
    TW_CRL_STALE = 6,
    /// The server certificate does not cover the name the client asked for.
    TW_NAME_MISMATCH = 7,
    /// The certificate is not valid for this role.
    TW_BAD_KEY_USAGE = 8,
    /// Algorithm or encoding not accepted.
    TW_UNSUPPORTED_CERTIFICATE = 9,
    /// The peer presented no certificate.
    TW_NO_PEER_CERTIFICATE = 10,
    /// Verified, but the peer's identity is not in the allow-list.
    TW_PEER_NOT_ALLOWED = 11,
    /// Verified and allowed to connect, but not to call this service/method.
    TW_METHOD_NOT_ALLOWED = 12,
    /// No protocol version in common.
    TW_PROTOCOL_VERSION = 13,
    /// No cipher suite or key exchange group in common.
    TW_NO_SHARED_CIPHER = 14,
    /// The handshake did not finish in time.
    TW_HANDSHAKE_TIMEOUT = 15,
    /// The peer rejected us with a TLS alert.
    TW_PEER_ALERT = 16,
    /// The peer did not speak TLS.
    TW_NOT_TLS = 17,
    /// The connection broke, or a credential file could not be read.
    TW_IO = 18,
    /// The new private key does not belong to the new certificate.
    TW_KEY_MISMATCH = 19,
    /// Credential material is not valid PEM, or is empty or cut short.
    TW_BAD_PEM = 20,
    /// A reload would change our own SPIFFE ID; refused unless allow_identity_change is set.
    TW_IDENTITY_CHANGED = 21,
    /// Our private key's PKCS#11 token is absent, refuses login, lacks the key object, or
    /// failed while signing.
    TW_KEY_UNAVAILABLE = 22,
    /// A required pointer argument was NULL.
    TW_NULL_ARGUMENT = 1000,
    /// An argument is out of range or not valid UTF-8.
    TW_INVALID_ARGUMENT = 1001,
    /// A setting is invalid (a bad pattern, a profile file with an unknown key, …).
    TW_INVALID_CONFIG = 1002,
    /// The object was already used for this (a server already started, a handler registered
    /// after start).
    TW_ALREADY_USED = 1003,
    /// The object was stopped or closed.
    TW_STOPPED = 1004,
    /// trustwire panicked; the message says where. The object may be unusable.
    TW_PANIC = 1005,
    /// The output buffer is too small.
    TW_BUFFER_TOO_SMALL = 1006,
    /// The value asked for is not there (no log_id, no identity).
    TW_NOT_FOUND = 1007,
    /// A blocking call was made on a trustwire thread (from a handler or callback), where it
    /// would stall the runtime; use the asynchronous variant.
    TW_WOULD_BLOCK = 1008,
    /// The server answered the call with an error code (see `tw_last_error_rpc_code`).
    TW_RPC_ERROR = 1100,
    /// The call did not complete in time.
    TW_TIMEOUT = 1101,
    /// The connection could not be opened or broke after the handshake.
    TW_TRANSPORT = 1102,
    /// The peer sent bytes that are not valid baidu_std.
    TW_PROTOCOL = 1103,
    /// Credentials could not be used (no verdict applies; the message says why).
    TW_CREDENTIALS = 1104,
    /// Identity token: not a trustwire token (bad format).
    TW_TOKEN_BAD_FORMAT = 1200,
    /// Identity token: signed with a key id the verifier does not hold.
    TW_TOKEN_UNKNOWN_KEY = 1201,
    /// Identity token: the MAC does not verify (wrong key or tampered fields).
    TW_TOKEN_BAD_MAC = 1202,
    /// Identity token: the caller's certificate has expired.
    TW_TOKEN_EXPIRED = 1203,
    /// Identity token: issued for another proxy route (its audience is not the one expected).
    TW_TOKEN_WRONG_AUDIENCE = 1204,
    /// Identity token: issued longer ago than the maximum age.
    TW_TOKEN_TOO_OLD = 1205,
    /// Identity token: a trustwire token of a format version this library does not read (`tw1`).
    TW_TOKEN_UNSUPPORTED_VERSION = 1206,
    /// Identity token: issued in the future (beyond the allowed clock skew).
    TW_TOKEN_ISSUED_IN_FUTURE = 1207,
    /// Identity token: `tw_identity_token_verify` was called, which cannot check a token's
    /// audience and age and so accepts none; use `tw_identity_token_verify_for`.
    TW_TOKEN_AUDIENCE_NOT_CHECKED = 1208,
}

/// A sensible `max_age_seconds` for `tw_identity_token_verify_for`: the age a proxy route
/// assumes its verifiers allow unless `identity_token_max_age_seconds` says otherwise (it
/// re-issues a connection's token at a fifth of that age).
pub const TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS: u64 = 300;

/// The version of the loaded library, "MAJOR.MINOR.PATCH". Static storage; never free it.
/// Any thread.
#[no_mangle]
pub extern "C" fn tw_version() -> *const c_char {
    static VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"?",
    };
    VERSION.as_ptr()
}

/// The Prometheus text exposition of this process's trustwire metrics (handshakes, calls,
/// reloads, proxy streams). On TW_OK `*text_out` is a NUL-terminated string the caller owns
/// and frees with `tw_string_free`. Any thread.
#[no_mangle]
pub unsafe extern "C" fn tw_metrics_text(text_out: *mut *mut c_char) -> tw_result {
    guard(|| {
        let text = ffi::owned_cstring(tw::telemetry::metrics_text());
        unsafe { ffi::out_string(text_out, text) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_macros_match_the_crate() {
        assert_eq!(TW_VERSION_STRING, env!("CARGO_PKG_VERSION"));
        assert_eq!(TW_VERSION_MAJOR.to_string(), env!("CARGO_PKG_VERSION_MAJOR"));
        assert_eq!(TW_IDENTITY_TOKEN_DEFAULT_MAX_AGE_SECONDS, tw::proxy::token::DEFAULT_MAX_AGE.as_secs());
        assert_eq!(TW_VERSION_MINOR.to_string(), env!("CARGO_PKG_VERSION_MINOR"));
        assert_eq!(TW_VERSION_PATCH.to_string(), env!("CARGO_PKG_VERSION_PATCH"));
        let config = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/cbindgen.toml")).unwrap();
        let define = format!("#define TW_VERSION_STRING \\\"{}\\\"", env!("CARGO_PKG_VERSION"));
        assert!(config.contains(&define), "cbindgen.toml must define TW_VERSION_STRING as {define}");
    }

    #[test]
    fn every_verdict_is_a_result_with_the_same_number_and_name() {
        for v in tw::Verdict::ALL {
            let r = ffi::verdict_result(v);
            assert_eq!(r as u32, v.code());
            let name = unsafe { CStr::from_ptr(tw_result_name(r as u32)) };
            assert_eq!(name.to_str().unwrap(), v.name());
        }
    }

    #[test]
    fn error_kinds_map_to_results() {
        let f = Failure::from(tw::Error::Rpc { code: 1002, text: "no method".into() });
        assert_eq!((f.code, f.rpc_code), (tw_result::TW_RPC_ERROR, 1002));
        let f = Failure::from(tw::Error::Rpc { code: 1004, text: "[method_not_allowed] no".into() });
        assert_eq!((f.code, f.rpc_code), (tw_result::TW_METHOD_NOT_ALLOWED, 1004));
        let f =
            Failure::from(tw::Error::Timeout { after: std::time::Duration::from_millis(5), message: String::new() });
        assert_eq!(f.code, tw_result::TW_TIMEOUT);
        let f = Failure::from(tw::Error::Credentials { verdict: None, message: "x".into() });
        assert_eq!(f.code, tw_result::TW_CREDENTIALS);
    }
}
