//! The only code that touches raw pointers: argument checks, out-parameters, the panic
//! boundary and the per-thread last error.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tw::{Error, Verdict};

use crate::tw_result;

/// A failed call: the result code, the message and (for server answers) the brpc code.
#[derive(Debug)]
pub struct Failure {
    pub code: tw_result,
    pub message: String,
    pub rpc_code: i32,
}

impl Failure {
    pub fn new(code: tw_result, message: impl Into<String>) -> Self {
        Failure { code, message: message.into(), rpc_code: 0 }
    }

    pub fn null(what: &str) -> Self {
        Failure::new(tw_result::TW_NULL_ARGUMENT, format!("{what} is NULL"))
    }
}

pub fn verdict_result(v: Verdict) -> tw_result {
    use tw_result::*;
    match v {
        Verdict::UnknownIssuer => TW_UNKNOWN_ISSUER,
        Verdict::BadSignature => TW_BAD_SIGNATURE,
        Verdict::Expired => TW_EXPIRED,
        Verdict::NotYetValid => TW_NOT_YET_VALID,
        Verdict::Revoked => TW_REVOKED,
        Verdict::CrlStale => TW_CRL_STALE,
        Verdict::NameMismatch => TW_NAME_MISMATCH,
        Verdict::BadKeyUsage => TW_BAD_KEY_USAGE,
        Verdict::UnsupportedCertificate => TW_UNSUPPORTED_CERTIFICATE,
        Verdict::NoPeerCertificate => TW_NO_PEER_CERTIFICATE,
        Verdict::PeerNotAllowed => TW_PEER_NOT_ALLOWED,
        Verdict::MethodNotAllowed => TW_METHOD_NOT_ALLOWED,
        Verdict::ProtocolVersion => TW_PROTOCOL_VERSION,
        Verdict::NoSharedCipher => TW_NO_SHARED_CIPHER,
        Verdict::HandshakeTimeout => TW_HANDSHAKE_TIMEOUT,
        Verdict::PeerAlert => TW_PEER_ALERT,
        Verdict::NotTls => TW_NOT_TLS,
        Verdict::Io => TW_IO,
        Verdict::KeyMismatch => TW_KEY_MISMATCH,
        Verdict::BadPem => TW_BAD_PEM,
        Verdict::IdentityChanged => TW_IDENTITY_CHANGED,
        Verdict::KeyUnavailable => TW_KEY_UNAVAILABLE,
        // The catalogue only grows; a verdict this table does not know yet is still a
        // credentials failure, and its name is in the message.
        _ => TW_CREDENTIALS,
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        use tw_result::*;
        let code = match (&e, e.verdict()) {
            (_, Some(v)) => verdict_result(v),
            (Error::Rpc { .. }, None) => TW_RPC_ERROR,
            (Error::Timeout { .. }, None) => TW_TIMEOUT,
            (Error::Transport { .. }, None) => TW_TRANSPORT,
            (Error::Protocol { .. }, None) => TW_PROTOCOL,
            (Error::Credentials { .. }, None) => TW_CREDENTIALS,
            (Error::Config { .. }, None) => TW_INVALID_CONFIG,
            (Error::Shutdown { .. }, None) => TW_STOPPED,
            (_, None) => TW_TRANSPORT,
        };
        Failure { code, rpc_code: e.rpc_code().unwrap_or(0), message: e.to_string() }
    }
}

impl From<tw::proxy::token::TokenError> for Failure {
    fn from(e: tw::proxy::token::TokenError) -> Self {
        use tw::proxy::token::TokenError::*;
        let code = match e {
            BadFormat(_) => tw_result::TW_TOKEN_BAD_FORMAT,
            UnknownKey(_) => tw_result::TW_TOKEN_UNKNOWN_KEY,
            BadMac => tw_result::TW_TOKEN_BAD_MAC,
            Expired(_) => tw_result::TW_TOKEN_EXPIRED,
            WrongAudience { .. } => tw_result::TW_TOKEN_WRONG_AUDIENCE,
            TooOld { .. } => tw_result::TW_TOKEN_TOO_OLD,
            UnsupportedVersion(_) => tw_result::TW_TOKEN_UNSUPPORTED_VERSION,
            IssuedInFuture { .. } => tw_result::TW_TOKEN_ISSUED_IN_FUTURE,
        };
        Failure::new(code, e.to_string())
    }
}

struct LastError {
    message: CString,
    rpc_code: i32,
}

thread_local! {
    static LAST_ERROR: RefCell<LastError> = RefCell::new(LastError { message: CString::default(), rpc_code: 0 });
}

pub fn set_last_error(f: &Failure) {
    let message = owned_cstring(format!("{}: {}", result_name(f.code), f.message));
    let _ = LAST_ERROR.try_with(|slot| {
        *slot.borrow_mut() = LastError { message, rpc_code: f.rpc_code };
    });
}

/// A CString from text that may contain NUL bytes (they become U+FFFD).
pub fn owned_cstring(s: impl Into<String>) -> CString {
    let s = s.into();
    CString::new(s).unwrap_or_else(|e| {
        let cleaned = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\u{fffd}");
        CString::new(cleaned).unwrap_or_default()
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Runs `f` inside the panic boundary; a failure is recorded as this thread's last error.
pub fn guard(f: impl FnOnce() -> Result<(), Failure>) -> tw_result {
    crate::log::init();
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return tw_result::TW_OK,
        Ok(Err(f)) => f,
        Err(payload) => Failure::new(
            tw_result::TW_PANIC,
            format!("trustwire panicked (a bug; please report it): {}", panic_message(&*payload)),
        ),
    };
    set_last_error(&failure);
    failure.code
}

/// Like `guard`, for functions that return a value instead of a result: a panic or failure
/// gives `fallback` (and sets the last error).
pub fn guard_value<T>(fallback: T, f: impl FnOnce() -> Result<T, Failure>) -> T {
    crate::log::init();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(failure)) => {
            set_last_error(&failure);
            fallback
        }
        Err(payload) => {
            set_last_error(&Failure::new(tw_result::TW_PANIC, panic_message(&*payload)));
            fallback
        }
    }
}

/// Borrows `*p`, or fails with TW_NULL_ARGUMENT naming `what`.
pub unsafe fn arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// A NUL-terminated UTF-8 string argument.
pub unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Failure::new(tw_result::TW_INVALID_ARGUMENT, format!("{what} is not valid UTF-8")))
}

/// An optional string argument: NULL is None.
pub unsafe fn opt_str_arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        Ok(None)
    } else {
        unsafe { str_arg(p, what) }.map(Some)
    }
}

/// `len` bytes at `p`; NULL is allowed only when `len` is 0.
pub unsafe fn bytes_arg<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(what));
    }
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// An array of `n` strings.
pub unsafe fn str_array_arg<'a>(p: *const *const c_char, n: usize, what: &str) -> Result<Vec<&'a str>, Failure> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(Failure::null(what));
    }
    let items = unsafe { std::slice::from_raw_parts(p, n) };
    items.iter().map(|s| unsafe { str_arg(*s, what) }).collect()
}

/// Writes `value` to the out-parameter `p`.
pub unsafe fn out<T>(p: *mut T, value: T) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::null("the output pointer"));
    }
    unsafe { p.write(value) };
    Ok(())
}

/// Lends C the bytes `pick` chooses inside `*handle`: their length goes to `*len_out` and their
/// start is returned (null on a null argument). They live as long as the handle.
///
/// # Safety
/// `handle` is null or a live handle; `len_out` is null or writable.
pub unsafe fn lend_bytes<T>(
    handle: *const T,
    what: &str,
    len_out: *mut usize,
    pick: impl FnOnce(&T) -> &[u8],
) -> *const u8 {
    guard_value(std::ptr::null(), || {
        let bytes = pick(unsafe { arg(handle, what) }?);
        unsafe { out(len_out, bytes.len()) }?;
        Ok(bytes.as_ptr())
    })
}

/// Lends C the string `pick` chooses inside `*handle`, or NULL when it picks none (or on a null
/// argument). The string lives as long as the handle.
///
/// # Safety
/// `handle` is null or a live handle.
pub unsafe fn lend_str<T>(handle: *const T, what: &str, pick: impl FnOnce(&T) -> Option<&CString>) -> *const c_char {
    guard_value(std::ptr::null(), || Ok(pick(unsafe { arg(handle, what) }?).map_or(std::ptr::null(), |s| s.as_ptr())))
}

/// Hands ownership of a CString to C.
pub fn give_string(s: CString) -> *mut c_char {
    s.into_raw()
}

/// The caller's `void *user_data`, passed back unchanged to its callbacks on whatever thread
/// calls them (the header tells users so).
#[derive(Clone, Copy)]
pub struct UserData(pub *mut c_void);
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

/// Whether this thread belongs to the shared runtime (a handler or a callback), where blocking
/// on the runtime would stall or deadlock it.
pub fn on_runtime_thread() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

pub fn would_block(what: &str) -> Failure {
    Failure::new(
        tw_result::TW_WOULD_BLOCK,
        format!("{what} blocks, and this is a trustwire thread (a handler or callback); use the asynchronous variant or call from your own thread"),
    )
}

pub fn result_name(r: tw_result) -> &'static str {
    result_cname(r).to_str().unwrap_or("?")
}

pub fn result_cname(r: tw_result) -> &'static CStr {
    use tw_result::*;
    match r {
        TW_OK => c"ok",
        TW_UNKNOWN_ISSUER => c"unknown_issuer",
        TW_BAD_SIGNATURE => c"bad_signature",
        TW_EXPIRED => c"expired",
        TW_NOT_YET_VALID => c"not_yet_valid",
        TW_REVOKED => c"revoked",
        TW_CRL_STALE => c"crl_stale",
        TW_NAME_MISMATCH => c"name_mismatch",
        TW_BAD_KEY_USAGE => c"bad_key_usage",
        TW_UNSUPPORTED_CERTIFICATE => c"unsupported_certificate",
        TW_NO_PEER_CERTIFICATE => c"no_peer_certificate",
        TW_PEER_NOT_ALLOWED => c"peer_not_allowed",
        TW_METHOD_NOT_ALLOWED => c"method_not_allowed",
        TW_PROTOCOL_VERSION => c"protocol_version",
        TW_NO_SHARED_CIPHER => c"no_shared_cipher",
        TW_HANDSHAKE_TIMEOUT => c"handshake_timeout",
        TW_PEER_ALERT => c"peer_alert",
        TW_NOT_TLS => c"not_tls",
        TW_IO => c"io",
        TW_KEY_MISMATCH => c"key_mismatch",
        TW_BAD_PEM => c"bad_pem",
        TW_IDENTITY_CHANGED => c"identity_changed",
        TW_KEY_UNAVAILABLE => c"key_unavailable",
        TW_NULL_ARGUMENT => c"null_argument",
        TW_INVALID_ARGUMENT => c"invalid_argument",
        TW_INVALID_CONFIG => c"invalid_config",
        TW_ALREADY_USED => c"already_used",
        TW_STOPPED => c"stopped",
        TW_PANIC => c"panic",
        TW_BUFFER_TOO_SMALL => c"buffer_too_small",
        TW_NOT_FOUND => c"not_found",
        TW_WOULD_BLOCK => c"would_block",
        TW_RPC_ERROR => c"rpc_error",
        TW_TIMEOUT => c"timeout",
        TW_TRANSPORT => c"transport",
        TW_PROTOCOL => c"protocol",
        TW_CREDENTIALS => c"credentials",
        TW_TOKEN_BAD_FORMAT => c"token_bad_format",
        TW_TOKEN_UNKNOWN_KEY => c"token_unknown_key",
        TW_TOKEN_BAD_MAC => c"token_bad_mac",
        TW_TOKEN_EXPIRED => c"token_expired",
        TW_TOKEN_WRONG_AUDIENCE => c"token_wrong_audience",
        TW_TOKEN_TOO_OLD => c"token_too_old",
        TW_TOKEN_UNSUPPORTED_VERSION => c"token_unsupported_version",
        TW_TOKEN_ISSUED_IN_FUTURE => c"token_issued_in_future",
        TW_TOKEN_AUDIENCE_NOT_CHECKED => c"token_audience_not_checked",
    }
}

/// The stable snake_case name of a result ("ok", "unknown_issuer", "null_argument", …), or
/// "unknown" for a number this library does not define. Static storage; never free it. Any
/// thread.
#[no_mangle]
pub extern "C" fn tw_result_name(result: u32) -> *const c_char {
    // A plain integer: C lets any number through, and an undefined one must not become a
    // Rust enum value.
    let known = KNOWN.iter().copied().find(|r| *r as u32 == result);
    known.map(result_cname).unwrap_or(c"unknown").as_ptr()
}

const KNOWN: [tw_result; 46] = {
    use tw_result::*;
    [
        TW_OK,
        TW_UNKNOWN_ISSUER,
        TW_BAD_SIGNATURE,
        TW_EXPIRED,
        TW_NOT_YET_VALID,
        TW_REVOKED,
        TW_CRL_STALE,
        TW_NAME_MISMATCH,
        TW_BAD_KEY_USAGE,
        TW_UNSUPPORTED_CERTIFICATE,
        TW_NO_PEER_CERTIFICATE,
        TW_PEER_NOT_ALLOWED,
        TW_METHOD_NOT_ALLOWED,
        TW_PROTOCOL_VERSION,
        TW_NO_SHARED_CIPHER,
        TW_HANDSHAKE_TIMEOUT,
        TW_PEER_ALERT,
        TW_NOT_TLS,
        TW_IO,
        TW_KEY_MISMATCH,
        TW_BAD_PEM,
        TW_IDENTITY_CHANGED,
        TW_KEY_UNAVAILABLE,
        TW_NULL_ARGUMENT,
        TW_INVALID_ARGUMENT,
        TW_INVALID_CONFIG,
        TW_ALREADY_USED,
        TW_STOPPED,
        TW_PANIC,
        TW_BUFFER_TOO_SMALL,
        TW_NOT_FOUND,
        TW_WOULD_BLOCK,
        TW_RPC_ERROR,
        TW_TIMEOUT,
        TW_TRANSPORT,
        TW_PROTOCOL,
        TW_CREDENTIALS,
        TW_TOKEN_BAD_FORMAT,
        TW_TOKEN_UNKNOWN_KEY,
        TW_TOKEN_BAD_MAC,
        TW_TOKEN_EXPIRED,
        TW_TOKEN_WRONG_AUDIENCE,
        TW_TOKEN_TOO_OLD,
        TW_TOKEN_UNSUPPORTED_VERSION,
        TW_TOKEN_ISSUED_IN_FUTURE,
        TW_TOKEN_AUDIENCE_NOT_CHECKED,
    ]
};

/// The message of the most recent failed call on this thread, starting with the result's name
/// ("peer_not_allowed: handshake failed …"); "" when none failed yet. Calls that succeed leave
/// it unchanged. The pointer stays valid until the next trustwire call on this thread; copy
/// the text to keep it.
#[no_mangle]
pub extern "C" fn tw_last_error_message() -> *const c_char {
    LAST_ERROR.try_with(|slot| slot.borrow().message.as_ptr()).unwrap_or(c"".as_ptr())
}

/// The brpc error code the server answered with, when the most recent failed call on this
/// thread was TW_RPC_ERROR or a method refusal (e.g. 1002 ENOMETHOD, 1004 ERPCAUTH); 0
/// otherwise.
#[no_mangle]
pub extern "C" fn tw_last_error_rpc_code() -> i32 {
    LAST_ERROR.try_with(|slot| slot.borrow().rpc_code).unwrap_or(0)
}

/// Frees a string trustwire returned as `char *` (PEM, metrics text). NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Frees a handle made by `Box::into_raw`; NULL does nothing and a panic in a destructor is
/// contained.
pub unsafe fn free_box<T>(p: *mut T) {
    if !p.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(p) })));
    }
}

/// A peer that closes while we write must give an error, not kill the process: Rust programs
/// ignore SIGPIPE from the start, C programs do not. Leaves a handler the program installed
/// itself alone.
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_DFL
        {
            let mut ignore: libc::sigaction = std::mem::zeroed();
            ignore.sa_sigaction = libc::SIG_IGN;
            libc::sigemptyset(&mut ignore.sa_mask);
            libc::sigaction(libc::SIGPIPE, &ignore, std::ptr::null_mut());
        }
    });
}

/// Boxes `value` and gives it to C through `p`, checking `p` first so nothing leaks on NULL.
pub unsafe fn out_box<T>(p: *mut *mut T, value: T) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::null("the output pointer"));
    }
    unsafe { p.write(Box::into_raw(Box::new(value))) };
    Ok(())
}

/// Gives a string to C through `p` (freed with tw_string_free), checking `p` first.
pub unsafe fn out_string(p: *mut *mut c_char, s: CString) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::null("the output pointer"));
    }
    unsafe { p.write(s.into_raw()) };
    Ok(())
}
