//! Clients: synchronous calls, and asynchronous calls with a completion callback.

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tw::rpc::blocking::{Failure as BlockingFailure, ThreadConnections};
use tw::rpc::{CallOptions, Client, ClientOptions, Response};

use crate::ffi::{self, arg, bytes_arg, guard, guard_value, lend_bytes, lend_str, out_box, str_arg, Failure, UserData};
use crate::profile::tw_profile;
use crate::tw_result;

/// A client for one server address. Connects on the first call, reconnects after a failure.
/// Any thread may use it at the same time as others. Asynchronous calls, and synchronous calls
/// from threads past the first 8, are multiplexed over its shared connection. Up to 8 live
/// threads at a time that make synchronous calls each get a connection of their own, which the
/// thread writes, waits on and reads itself with blocking system calls; it closes when the
/// thread exits or the client is closed or freed, and costs each such thread a handshake.
pub struct tw_client {
    client: Client,
    closed: AtomicBool,
    own: ThreadConnections,
}

/// Threads of one client that get a connection of their own for synchronous calls.
const THREADS_WITH_OWN_CONNECTION: usize = 8;

/// Sets this thread's pthread cancelability state (PTHREAD_CANCEL_DISABLE is 1 in glibc and
/// musl) and returns the one before.
fn set_cancel_state(state: std::ffi::c_int) -> std::ffi::c_int {
    // POSIX; the libc crate does not bind it. Declared here, not at the top level, so the
    // header generator does not take it for part of our API.
    extern "C" {
        fn pthread_setcancelstate(state: std::ffi::c_int, oldstate: *mut std::ffi::c_int) -> std::ffi::c_int;
    }
    let mut previous = 0;
    // SAFETY: sets the calling thread's state and writes the old one to a local.
    unsafe { pthread_setcancelstate(state, &mut previous) };
    previous
}

/// Per-call settings: timeout, attachment, log_id. Set once and reuse for many calls (calls
/// copy what they need); change it only while no call is being started with it.
pub struct tw_call_options {
    options: CallOptions,
}

/// The outcome of a call: the answer's payload and attachment, or the error.
pub struct tw_response {
    result: tw_result,
    payload: Bytes,
    attachment: Bytes,
    message: CString,
    rpc_code: i32,
}

impl tw_response {
    fn from(result: Result<Response, tw::Error>) -> Self {
        match result {
            Ok(r) => tw_response {
                result: tw_result::TW_OK,
                payload: r.payload,
                attachment: r.attachment,
                message: CString::default(),
                rpc_code: 0,
            },
            Err(e) => {
                let f = Failure::from(e);
                tw_response {
                    result: f.code,
                    payload: Bytes::new(),
                    attachment: Bytes::new(),
                    message: ffi::owned_cstring(format!("{}: {}", ffi::result_name(f.code), f.message)),
                    rpc_code: f.rpc_code,
                }
            }
        }
    }
}

/// Called once when an asynchronous call ends, on one of trustwire's runtime threads: keep it
/// short and do not block (hand the work to your own thread). `response` is never NULL and is
/// valid until the callback returns: on TW_OK it holds the answer, otherwise the error
/// (`tw_response_error_message`, `tw_response_rpc_code`). The callback may start new
/// asynchronous calls; synchronous ones return TW_WOULD_BLOCK there.
pub type tw_call_done_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, result: tw_result, response: *const tw_response)>;

/// A client for `address` ("host:port") using `profile`'s identity, trust and server-name
/// checks. No connection is made until the first call. On TW_OK `*client_out` is owned by the
/// caller (`tw_client_free`). TW_INVALID_CONFIG when the profile cannot act as a client.
#[no_mangle]
pub unsafe extern "C" fn tw_client_new(
    profile: *const tw_profile,
    address: *const c_char,
    client_out: *mut *mut tw_client,
) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        let address = unsafe { str_arg(address, "address") }?.to_string();
        let tls = p.client_tls()?;
        ffi::ignore_sigpipe();
        let client = Client::new(address.clone(), tls.clone(), ClientOptions::default());
        let own = ThreadConnections::new(address, tls, ClientOptions::default(), THREADS_WITH_OWN_CONNECTION);
        unsafe { out_box(client_out, tw_client { client, closed: AtomicBool::new(false), own }) }
    })
}

/// Closes the connections. Calls in flight fail; later calls return TW_STOPPED. Any thread.
#[no_mangle]
pub unsafe extern "C" fn tw_client_close(client: *const tw_client) -> tw_result {
    guard(|| {
        let c = unsafe { arg(client, "client") }?;
        c.closed.store(true, Ordering::Release);
        c.own.close();
        c.client.close();
        Ok(())
    })
}

/// Frees the client. Asynchronous calls already started still complete and call back. NULL
/// does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_client_free(client: *mut tw_client) {
    unsafe { ffi::free_box(client) }
}

/// New call options: no timeout beyond the client's default (30 s), no attachment, no log_id.
/// On TW_OK `*options_out` is owned by the caller (`tw_call_options_free`).
#[no_mangle]
pub unsafe extern "C" fn tw_call_options_new(options_out: *mut *mut tw_call_options) -> tw_result {
    guard(|| unsafe { out_box(options_out, tw_call_options { options: CallOptions::default() }) })
}

/// Frees call options. NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_call_options_free(options: *mut tw_call_options) {
    unsafe { ffi::free_box(options) }
}

/// The call fails with TW_TIMEOUT after `timeout_ms` (also sent to the server); 0 restores the
/// client default.
#[no_mangle]
pub unsafe extern "C" fn tw_call_options_set_timeout_ms(options: *mut tw_call_options, timeout_ms: u32) -> tw_result {
    guard(|| {
        let o = unsafe { options.as_mut() }.ok_or_else(|| Failure::null("options"))?;
        o.options.timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()));
        Ok(())
    })
}

/// Sends `len` bytes (copied) as the request attachment; length 0 for none.
#[no_mangle]
pub unsafe extern "C" fn tw_call_options_set_attachment(
    options: *mut tw_call_options,
    attachment: *const u8,
    len: usize,
) -> tw_result {
    guard(|| {
        let o = unsafe { options.as_mut() }.ok_or_else(|| Failure::null("options"))?;
        o.options.attachment = Bytes::copy_from_slice(unsafe { bytes_arg(attachment, len, "attachment") }?);
        Ok(())
    })
}

/// Sends `log_id` with the request (brpc logs it on the server).
#[no_mangle]
pub unsafe extern "C" fn tw_call_options_set_log_id(options: *mut tw_call_options, log_id: i64) -> tw_result {
    guard(|| {
        let o = unsafe { options.as_mut() }.ok_or_else(|| Failure::null("options"))?;
        o.options.log_id = Some(log_id);
        Ok(())
    })
}

struct CallArgs<'a> {
    owner: &'a tw_client,
    client: Client,
    service: String,
    method: String,
    payload: Bytes,
    options: CallOptions,
}

unsafe fn call_args<'a>(
    client: *const tw_client,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    options: *const tw_call_options,
) -> Result<CallArgs<'a>, Failure> {
    let c = unsafe { arg(client, "client") }?;
    let service = unsafe { str_arg(service, "service") }?.to_string();
    let method = unsafe { str_arg(method, "method") }?.to_string();
    let payload = Bytes::copy_from_slice(unsafe { bytes_arg(payload, payload_len, "payload") }?);
    let options = unsafe { options.as_ref() }.map(|o| o.options.clone()).unwrap_or_default();
    if c.closed.load(Ordering::Acquire) {
        return Err(Failure::new(tw_result::TW_STOPPED, "the client is closed"));
    }
    Ok(CallArgs { owner: c, client: c.client.clone(), service, method, payload, options })
}

/// Calls `service`/`method` with `payload` (copied) and waits for the answer. `options` may be
/// NULL. On TW_OK `*response_out` holds the answer and is owned by the caller
/// (`tw_response_free`). Otherwise `*response_out` is untouched and the result says why:
/// a verdict when the handshake or the server's policy refused us (TW_UNKNOWN_ISSUER,
/// TW_PEER_NOT_ALLOWED, TW_METHOD_NOT_ALLOWED…), TW_RPC_ERROR when the server answered with an
/// error (`tw_last_error_rpc_code()`), TW_TIMEOUT, TW_TRANSPORT; `tw_last_error_message()`
/// has the details. Blocks the calling thread; TW_WOULD_BLOCK from a handler or callback.
#[no_mangle]
pub unsafe extern "C" fn tw_client_call(
    client: *const tw_client,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    options: *const tw_call_options,
    response_out: *mut *mut tw_response,
) -> tw_result {
    guard(|| {
        let a = unsafe { call_args(client, service, method, payload, payload_len, options) }?;
        if response_out.is_null() {
            return Err(Failure::null("response_out"));
        }
        if ffi::on_runtime_thread() {
            return Err(ffi::would_block("tw_client_call"));
        }
        let on_own = a.owner.own.with(|own| {
            // A thread cancelled while it waits in recv or poll (cancellation points) would
            // unwind through these frames: cancellation waits until the call is over.
            let previous = set_cancel_state(1);
            // A signal handler that forked: the child must not go on with the parent's call.
            let mut go_on = || if tw::runtime::forked() { Err(()) } else { Ok(()) };
            let r = own.call(&a.service, &a.method, a.payload.clone(), a.options.clone(), &mut go_on);
            set_cancel_state(previous);
            r
        });
        let r = match on_own {
            Some(Ok(r)) => r,
            Some(Err(BlockingFailure::Error(e))) => return Err(e.into()),
            Some(Err(BlockingFailure::Interrupted(()))) => {
                return Err(Failure::new(tw_result::TW_STOPPED, "the process forked during the call"))
            }
            // The client was closed since call_args looked: the shared client would connect
            // again.
            None if a.owner.closed.load(Ordering::Acquire) => {
                return Err(Failure::new(tw_result::TW_STOPPED, "the client is closed"))
            }
            // Polled on this thread (the I/O runs on the runtime's threads): one thread hop
            // fewer per call than spawning a task and waiting for it.
            None => tw::runtime::runtime().block_on(a.client.call(&a.service, &a.method, a.payload, a.options))?,
        };
        unsafe { out_box(response_out, tw_response::from(Ok(r))) }
    })
}

/// Starts a call and returns at once. On TW_OK, `done(user_data, result, response)` is called
/// exactly once when the call ends (see `tw_call_done_fn`), even if the client is freed
/// first; `user_data` must stay valid until then. On any other result `done` is never called.
/// Any thread, including handlers and callbacks.
#[no_mangle]
pub unsafe extern "C" fn tw_client_call_async(
    client: *const tw_client,
    service: *const c_char,
    method: *const c_char,
    payload: *const u8,
    payload_len: usize,
    options: *const tw_call_options,
    done: tw_call_done_fn,
    user_data: *mut c_void,
) -> tw_result {
    guard(|| {
        // The task outlives the tw_client (it may be freed first): it takes only what it owns.
        let CallArgs { client, service, method, payload, options, .. } =
            unsafe { call_args(client, service, method, payload, payload_len, options) }?;
        let done = done.ok_or_else(|| Failure::null("done"))?;
        let user_data = UserData(user_data);
        // The call's future is large; boxed, the task spawned per call stays small and cheap
        // to move into the runtime.
        let call = Box::pin(async move { client.call(&service, &method, payload, options).await });
        tw::runtime::runtime().spawn(async move {
            let result = call.await;
            let response = tw_response::from(result);
            let user_data = user_data;
            unsafe { done(user_data.0, response.result, &response) };
        });
        Ok(())
    })
}

/// The answer's payload, `*len_out` bytes, valid until the response is freed (or the callback
/// returns); empty for a failed call.
#[no_mangle]
pub unsafe extern "C" fn tw_response_payload(response: *const tw_response, len_out: *mut usize) -> *const u8 {
    unsafe { lend_bytes(response, "response", len_out, |r| &r.payload[..]) }
}

/// The answer's attachment, `*len_out` bytes, valid as long as the response.
#[no_mangle]
pub unsafe extern "C" fn tw_response_attachment(response: *const tw_response, len_out: *mut usize) -> *const u8 {
    unsafe { lend_bytes(response, "response", len_out, |r| &r.attachment[..]) }
}

/// The call's result (TW_OK, or why it failed).
#[no_mangle]
pub unsafe extern "C" fn tw_response_result(response: *const tw_response) -> tw_result {
    guard_value(tw_result::TW_NULL_ARGUMENT, || Ok(unsafe { arg(response, "response") }?.result))
}

/// Why the call failed, starting with the result's name; "" on success. Valid as long as the
/// response.
#[no_mangle]
pub unsafe extern "C" fn tw_response_error_message(response: *const tw_response) -> *const c_char {
    unsafe { lend_str(response, "response", |x| Some(&x.message)) }
}

/// The brpc error code the server answered with (TW_RPC_ERROR, TW_METHOD_NOT_ALLOWED); 0
/// otherwise.
#[no_mangle]
pub unsafe extern "C" fn tw_response_rpc_code(response: *const tw_response) -> i32 {
    guard_value(0, || Ok(unsafe { arg(response, "response") }?.rpc_code))
}

/// Frees a response from `tw_client_call`. Never free the one passed to a callback. NULL does
/// nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_response_free(response: *mut tw_response) {
    unsafe { ffi::free_box(response) }
}
