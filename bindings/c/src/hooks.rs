//! The application's authorization hooks as C callbacks ([`tw::authz`]): a connection hook after
//! a peer's certificate verified, and a call hook after the method rules allowed a call.

use std::ffi::{c_char, c_void, CStr, CString};

use tw::authz::{Call, CallDecision, CallHook, PeerDecision, PeerHook};
use tw::PeerIdentity;

use crate::ffi::UserData;
use crate::server::tw_peer;

/// Longest reason or error text a hook may write, with its NUL.
pub const TW_HOOK_TEXT_MAX: usize = 512;

/// A connection hook: return true to admit `peer`, false to refuse it (the handshake fails with
/// an access_denied alert; the peer is told nothing more). To say why in trustwire's logs,
/// write a NUL-terminated reason into `reason` (room for `reason_cap` bytes, NUL included).
/// `peer` and `reason` are valid only during the call.
///
/// Called on trustwire's threads, during handshakes, possibly on several threads at once: it
/// must be thread-safe, return quickly, and not unwind (C++: catch exceptions).
pub type tw_connection_hook_fn = Option<
    unsafe extern "C" fn(user_data: *mut c_void, peer: *const tw_peer, reason: *mut c_char, reason_cap: usize) -> bool,
>;

/// What a call carries besides its payload, for a call hook. Valid only during the call.
#[repr(C)]
pub struct tw_call_metadata {
    /// The request's log_id, when `has_log_id`.
    pub log_id: i64,
    pub has_log_id: bool,
    /// The caller's timeout in milliseconds, when `has_timeout_ms`.
    pub timeout_ms: i32,
    pub has_timeout_ms: bool,
    /// The request_id, or NULL when absent.
    pub request_id: *const c_char,
    /// The request's authentication_data (raw bytes; NULL when absent).
    pub authentication_data: *const u8,
    pub authentication_data_len: usize,
}

/// A call hook: return 0 to let the call reach its handler, or the brpc error code the caller
/// gets (1004, ERPCAUTH, is reported as method_not_allowed) with a NUL-terminated text written
/// into `text` (room for `text_cap` bytes), which is sent to the caller. `service` is the full
/// name the call is dispatched to. Every pointer is valid only during the call.
///
/// Called on trustwire's threads, for every call the method rules allow, possibly on several
/// threads at once: it must be thread-safe, return quickly, and not unwind.
pub type tw_call_hook_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        peer: *const tw_peer,
        service: *const c_char,
        method: *const c_char,
        metadata: *const tw_call_metadata,
        text: *mut c_char,
        text_cap: usize,
    ) -> i32,
>;

/// Releases a hook's `user_data` once no profile, server, client or proxy uses the hook any
/// more (from any thread). May be NULL.
pub type tw_free_fn = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// A C callback and the user data it is called with, released with `free` when dropped.
pub(crate) struct CHook<F> {
    f: F,
    user_data: UserData,
    free: tw_free_fn,
}

impl<F> CHook<F> {
    pub(crate) fn new(f: F, user_data: *mut c_void, free: tw_free_fn) -> Self {
        CHook { f, user_data: UserData(user_data), free }
    }
}

impl<F> Drop for CHook<F> {
    fn drop(&mut self) {
        if let Some(free) = self.free {
            unsafe { free(self.user_data.0) };
        }
    }
}

/// The NUL-terminated text a callback wrote into `buf` (empty when it wrote none).
fn text_of(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

type PeerFn =
    unsafe extern "C" fn(user_data: *mut c_void, peer: *const tw_peer, reason: *mut c_char, reason_cap: usize) -> bool;

impl PeerHook for CHook<PeerFn> {
    fn check(&self, peer: &PeerIdentity) -> PeerDecision {
        let p = tw_peer::new(peer);
        let mut reason = [0u8; TW_HOOK_TEXT_MAX];
        let allowed = unsafe { (self.f)(self.user_data.0, &p, reason.as_mut_ptr().cast(), reason.len()) };
        reason[TW_HOOK_TEXT_MAX - 1] = 0;
        match allowed {
            true => PeerDecision::Allow,
            false => PeerDecision::Deny(match text_of(&reason) {
                r if r.is_empty() => "refused by the C connection hook".into(),
                r => r,
            }),
        }
    }
}

type CallFn = unsafe extern "C" fn(
    user_data: *mut c_void,
    peer: *const tw_peer,
    service: *const c_char,
    method: *const c_char,
    metadata: *const tw_call_metadata,
    text: *mut c_char,
    text_cap: usize,
) -> i32;

impl CallHook for CHook<CallFn> {
    fn check(&self, call: &Call<'_>) -> CallDecision {
        // Names from the wire may hold a NUL, which a C string cannot: such a call is denied.
        let (Ok(service), Ok(method)) = (CString::new(call.service), CString::new(call.method)) else {
            return CallDecision::deny("the service or method name holds a NUL byte");
        };
        let request_id = call.metadata.request_id.and_then(|r| CString::new(r).ok());
        let auth = call.metadata.authentication_data;
        let metadata = tw_call_metadata {
            log_id: call.metadata.log_id.unwrap_or(0),
            has_log_id: call.metadata.log_id.is_some(),
            timeout_ms: call.metadata.timeout_ms.unwrap_or(0),
            has_timeout_ms: call.metadata.timeout_ms.is_some(),
            request_id: request_id.as_ref().map_or(std::ptr::null(), |r| r.as_ptr()),
            authentication_data: auth.map_or(std::ptr::null(), |a| a.as_ptr()),
            authentication_data_len: auth.map_or(0, |a| a.len()),
        };
        let p = tw_peer::new(call.peer);
        let mut text = [0u8; TW_HOOK_TEXT_MAX];
        let code = unsafe {
            (self.f)(
                self.user_data.0,
                &p,
                service.as_ptr(),
                method.as_ptr(),
                &metadata,
                text.as_mut_ptr().cast(),
                text.len(),
            )
        };
        text[TW_HOOK_TEXT_MAX - 1] = 0;
        match code {
            0 => CallDecision::Allow,
            code => CallDecision::Deny { code, text: text_of(&text) },
        }
    }
}
