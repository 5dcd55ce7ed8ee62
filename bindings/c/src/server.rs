//! Servers whose handlers are C callbacks, answering inline or later through a responder.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tw::rpc::{Request, Response, RunningServer, Server, Status};
use tw::tls::identity::PeerIdentity;
use tw::tls::ServerTls;

use crate::ffi::{
    self, arg, bytes_arg, guard, guard_value, lend_bytes, lend_str, out, out_box, str_arg, Failure, UserData,
};
use crate::profile::tw_profile;
use crate::tw_result;

/// Answers calls to one method. Called on one of trustwire's runtime threads for each call,
/// with `call` (the request, valid until the responder is consumed) and `responder` (owned by
/// the handler). The handler must consume the responder exactly once, with
/// `tw_responder_send`, `tw_responder_fail` or `tw_responder_free`, either before it returns or
/// later from any thread (to finish the call asynchronously). It should return quickly: a
/// handler that blocks holds up the other connections served by that thread; for slow work,
/// hand the responder to a thread of your own. It must not unwind (C++: catch exceptions;
/// trustwire.hpp does).
pub type tw_handler_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, call: *const tw_call, responder: *mut tw_responder)>;

/// A call being answered: accessors give the request and the verified caller.
pub struct tw_call {
    request: Request,
    service: OnceLock<CString>,
    method: OnceLock<CString>,
    peer: OnceLock<tw_peer>,
}

/// The verified identity of a peer, as its certificate states it. Borrowed from the call; its
/// strings live as long as the call.
pub struct tw_peer {
    spiffe_id: Option<CString>,
    fingerprint: CString,
    serial: CString,
    subject: CString,
    issuer: CString,
    sans: Vec<CString>,
    not_before: i64,
    not_after: i64,
}

impl tw_peer {
    pub(crate) fn new(p: &PeerIdentity) -> Self {
        let c = ffi::owned_cstring;
        tw_peer {
            spiffe_id: p.spiffe_id.clone().map(c),
            fingerprint: c(p.fingerprint_sha256.clone()),
            serial: c(p.serial.clone()),
            subject: c(p.subject.clone()),
            issuer: c(p.issuer.clone()),
            sans: p.names().into_iter().map(c).collect(),
            not_before: p.not_before.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0),
            not_after: p.not_after_unix(),
        }
    }
}

/// The right and duty to answer one call. Owned by the handler until consumed by
/// `tw_responder_send`, `tw_responder_fail` or `tw_responder_free`; any thread may consume it.
pub struct tw_responder {
    call: tw_call,
    tx: oneshot::Sender<Result<Response, Status>>,
}

struct Registered {
    service: String,
    method: String,
    handler: unsafe extern "C" fn(*mut c_void, *const tw_call, *mut tw_responder),
    user_data: UserData,
}

enum State {
    Configuring(Vec<Registered>),
    Running(RunningServer),
    Stopped,
}

/// A baidu_std server over mTLS. Register handlers, start, stop, free. Functions may be called
/// from any thread; the blocking ones (start, stop, free of a running server) not from a
/// handler or callback.
pub struct tw_server {
    tls: ServerTls,
    state: Mutex<State>,
    port: Mutex<u16>,
    grace: Mutex<Option<Duration>>,
    handlers: Arc<Handlers>,
}

/// The C handlers of one server that are running now. Stop and free close it and wait until
/// none runs, so that no handler uses `user_data` after they return: the runtime has several
/// threads, and a call can be past the "stopping?" check on one of them while another stops
/// the server.
#[derive(Default)]
struct Handlers {
    state: Mutex<HandlersState>,
    idle: Condvar,
}

#[derive(Default)]
struct HandlersState {
    closed: bool,
    running: usize,
}

thread_local! {
    /// The `Handlers` whose C handler this thread is running (its address), so that a handler
    /// freeing its own server does not wait for itself.
    static RUNNING_HANDLER_OF: Cell<usize> = const { Cell::new(0) };
}

/// One C handler call in progress; dropping it ends the call.
struct Running<'a> {
    handlers: &'a Handlers,
    outer: usize,
}

impl Handlers {
    /// Registers a handler call about to start, or None once the server is closed.
    fn enter(&self) -> Option<Running<'_>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return None;
        }
        state.running += 1;
        let outer = RUNNING_HANDLER_OF.with(|c| c.replace(self as *const Handlers as usize));
        Some(Running { handlers: self, outer })
    }

    /// No handler call starts after this; returns once none is running, except the one this
    /// thread is in (when a handler closes its own server).
    fn close_and_wait(&self) {
        let mine = usize::from(RUNNING_HANDLER_OF.with(Cell::get) == self as *const Handlers as usize);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        while state.running > mine {
            state = self.idle.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        RUNNING_HANDLER_OF.with(|c| c.set(self.outer));
        let mut state = self.handlers.state.lock().unwrap_or_else(|p| p.into_inner());
        state.running -= 1;
        // A waiter may be a handler of this server, waiting for all but itself.
        if state.closed {
            self.handlers.idle.notify_all();
        }
    }
}

/// A new server using `profile`'s certificate, trust and policy (clients must present a
/// certificate the trust verifies and the allow-list admits). The server keeps its own
/// reference to the profile's credentials. On TW_OK `*server_out` is owned by the caller
/// (`tw_server_free`). TW_INVALID_CONFIG when the profile cannot serve.
#[no_mangle]
pub unsafe extern "C" fn tw_server_new(profile: *const tw_profile, server_out: *mut *mut tw_server) -> tw_result {
    guard(|| {
        let p = unsafe { arg(profile, "profile") }?;
        ffi::ignore_sigpipe();
        let s = tw_server {
            tls: p.server_tls()?,
            state: Mutex::new(State::Configuring(Vec::new())),
            port: Mutex::new(0),
            grace: Mutex::new(None),
            handlers: Arc::default(),
        };
        unsafe { out_box(server_out, s) }
    })
}

/// Registers `handler` for `service` (the full protobuf name, e.g. "example.EchoService"; brpc
/// clients that send the short name are resolved to it) and `method`. `user_data` is passed
/// back unchanged, from runtime threads, and must stay valid until the server is stopped or
/// freed. TW_ALREADY_USED once the server has started.
#[no_mangle]
pub unsafe extern "C" fn tw_server_register(
    server: *mut tw_server,
    service: *const c_char,
    method: *const c_char,
    handler: tw_handler_fn,
    user_data: *mut c_void,
) -> tw_result {
    guard(|| {
        let s = unsafe { arg(server, "server") }?;
        let service = unsafe { str_arg(service, "service") }?.to_string();
        let method = unsafe { str_arg(method, "method") }?.to_string();
        let handler = handler.ok_or_else(|| Failure::null("handler"))?;
        match &mut *s.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Configuring(list) => {
                list.push(Registered { service, method, handler, user_data: UserData(user_data) });
                Ok(())
            }
            State::Running(_) => {
                Err(Failure::new(tw_result::TW_ALREADY_USED, "handlers must be registered before tw_server_start"))
            }
            State::Stopped => Err(Failure::new(tw_result::TW_STOPPED, "the server was stopped")),
        }
    })
}

/// How long `tw_server_stop` waits for calls in flight (default 30000 ms). Before start only.
#[no_mangle]
pub unsafe extern "C" fn tw_server_set_shutdown_grace_ms(server: *mut tw_server, ms: u64) -> tw_result {
    guard(|| {
        let s = unsafe { arg(server, "server") }?;
        *s.grace.lock().unwrap_or_else(|p| p.into_inner()) = Some(Duration::from_millis(ms));
        Ok(())
    })
}

fn dispatch(reg: &Registered, handlers: &Handlers, request: Request) -> tw::rpc::HandlerFuture {
    let Some(running) = handlers.enter() else {
        return Box::pin(async { Err(Status::new(tw::error::codes::ELOGOFF, "server is stopping")) });
    };
    let (tx, rx) = oneshot::channel();
    let responder = Box::into_raw(Box::new(tw_responder {
        call: tw_call { request, service: OnceLock::new(), method: OnceLock::new(), peer: OnceLock::new() },
        tx,
    }));
    let call: *const tw_call = unsafe { &(*responder).call };
    unsafe { (reg.handler)(reg.user_data.0, call, responder) };
    drop(running);
    Box::pin(async move {
        rx.await.unwrap_or_else(|_| Err(Status::internal("the handler released the call without answering")))
    })
}

/// Binds `address` ("host:port"; port 0 picks a free port) and starts serving. On TW_OK
/// `*port_out` (may be NULL) is the bound port. TW_ALREADY_USED if started before,
/// TW_STOPPED after stop, TW_TRANSPORT if the address is in use or not on this host,
/// TW_INVALID_CONFIG if it is not an address.
#[no_mangle]
pub unsafe extern "C" fn tw_server_start(
    server: *mut tw_server,
    address: *const c_char,
    port_out: *mut u16,
) -> tw_result {
    guard(|| {
        let s = unsafe { arg(server, "server") }?;
        let address = unsafe { str_arg(address, "address") }?.to_string();
        if ffi::on_runtime_thread() {
            return Err(ffi::would_block("tw_server_start"));
        }
        let mut state = s.state.lock().unwrap_or_else(|p| p.into_inner());
        let handlers = match &mut *state {
            State::Configuring(list) => std::mem::take(list),
            State::Running(_) => return Err(Failure::new(tw_result::TW_ALREADY_USED, "the server is already running")),
            State::Stopped => {
                return Err(Failure::new(tw_result::TW_STOPPED, "the server was stopped; make a new one"))
            }
        };
        let mut core = Server::new(s.tls.clone());
        if let Some(g) = *s.grace.lock().unwrap_or_else(|p| p.into_inner()) {
            core.options_mut().shutdown_grace = g;
        }
        for reg in handlers {
            let (service, method) = (reg.service.clone(), reg.method.clone());
            let handlers = s.handlers.clone();
            core.register(&service, &method, move |req: Request| dispatch(&reg, &handlers, req));
        }
        let running = tw::runtime::runtime().block_on(core.bind(&address)).map_err(|e| {
            // Failing to bind leaves nothing to serve; the server cannot be started again.
            Failure::from(e)
        });
        match running {
            Ok(r) => {
                let port = r.local_addr().port();
                *s.port.lock().unwrap_or_else(|p| p.into_inner()) = port;
                *state = State::Running(r);
                if !port_out.is_null() {
                    unsafe { port_out.write(port) };
                }
                Ok(())
            }
            Err(f) => {
                *state = State::Stopped;
                Err(f)
            }
        }
    })
}

/// The bound port, or 0 when not running.
#[no_mangle]
pub unsafe extern "C" fn tw_server_port(server: *const tw_server) -> u16 {
    guard_value(0, || {
        let s = unsafe { arg(server, "server") }?;
        Ok(match &*s.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Running(_) => *s.port.lock().unwrap_or_else(|p| p.into_inner()),
            _ => 0,
        })
    })
}

/// Graceful stop: stops accepting, answers new calls with ELOGOFF, waits for calls in flight
/// (answered responders) up to the shutdown grace, then closes every connection. After it
/// returns no handler of this server is running or called again. Stopping twice, or a server
/// never started, is TW_OK. Blocks; TW_WOULD_BLOCK from a handler or callback.
#[no_mangle]
pub unsafe extern "C" fn tw_server_stop(server: *mut tw_server) -> tw_result {
    guard(|| {
        let s = unsafe { arg(server, "server") }?;
        stop(s)
    })
}

fn stop(s: &tw_server) -> Result<(), Failure> {
    if ffi::on_runtime_thread() {
        return Err(ffi::would_block("tw_server_stop"));
    }
    let previous = std::mem::replace(&mut *s.state.lock().unwrap_or_else(|p| p.into_inner()), State::Stopped);
    if let State::Running(r) = previous {
        tw::runtime::runtime().block_on(r.shutdown());
    }
    // The grace may have passed with a handler still inside C.
    s.handlers.close_and_wait();
    Ok(())
}

/// Stops the server if it is running and frees it. When it returns, no handler of this server
/// is running or will be called again, so their `user_data` may be freed. NULL does nothing.
///
/// From your own thread it stops as `tw_server_stop` does (it may block up to the grace).
/// From a handler or callback (a trustwire thread) it cannot wait for calls in flight: new
/// calls are refused, it waits only until this server's handlers running on other threads
/// have returned (never for the handler calling it, which may go on to answer its own call),
/// then closes the connections at once. A handler that frees its server must therefore not
/// wait for anything another of the server's handlers holds.
#[no_mangle]
pub unsafe extern "C" fn tw_server_free(server: *mut tw_server) {
    if server.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let s = unsafe { Box::from_raw(server) };
        if ffi::on_runtime_thread() {
            s.handlers.close_and_wait();
        } else {
            let _ = stop(&s);
        }
        // Dropping a running server stops accepting and closes its connections.
        drop(s);
    }));
}

/// The request's service name, as resolved (NUL-terminated; valid as long as the call).
#[no_mangle]
pub unsafe extern "C" fn tw_call_service(call: *const tw_call) -> *const c_char {
    guard_value(std::ptr::null(), || {
        let c = unsafe { arg(call, "call") }?;
        Ok(c.service.get_or_init(|| ffi::owned_cstring(c.request.service.clone())).as_ptr())
    })
}

/// The request's method name (valid as long as the call).
#[no_mangle]
pub unsafe extern "C" fn tw_call_method(call: *const tw_call) -> *const c_char {
    guard_value(std::ptr::null(), || {
        let c = unsafe { arg(call, "call") }?;
        Ok(c.method.get_or_init(|| ffi::owned_cstring(c.request.method.clone())).as_ptr())
    })
}

/// The request payload (serialized protobuf), `*len_out` bytes; valid as long as the call.
/// Never NULL for a valid call (an empty payload gives a non-NULL pointer and length 0).
#[no_mangle]
pub unsafe extern "C" fn tw_call_payload(call: *const tw_call, len_out: *mut usize) -> *const u8 {
    unsafe { lend_bytes(call, "call", len_out, |c| &c.request.payload[..]) }
}

/// The request attachment, `*len_out` bytes; valid as long as the call.
#[no_mangle]
pub unsafe extern "C" fn tw_call_attachment(call: *const tw_call, len_out: *mut usize) -> *const u8 {
    unsafe { lend_bytes(call, "call", len_out, |c| &c.request.attachment[..]) }
}

/// The caller's log_id in `*log_id_out`; TW_NOT_FOUND when the request has none.
#[no_mangle]
pub unsafe extern "C" fn tw_call_log_id(call: *const tw_call, log_id_out: *mut i64) -> tw_result {
    guard(|| {
        let c = unsafe { arg(call, "call") }?;
        let id = c.request.log_id.ok_or_else(|| Failure::new(tw_result::TW_NOT_FOUND, "the request has no log_id"))?;
        unsafe { out(log_id_out, id) }
    })
}

/// The caller's timeout as it sent it (ms), or 0 when it sent none.
#[no_mangle]
pub unsafe extern "C" fn tw_call_timeout_ms(call: *const tw_call) -> i32 {
    guard_value(0, || Ok(unsafe { arg(call, "call") }?.request.timeout_ms.unwrap_or(0)))
}

/// The verified caller (valid as long as the call).
#[no_mangle]
pub unsafe extern "C" fn tw_call_peer(call: *const tw_call) -> *const tw_peer {
    guard_value(std::ptr::null(), || {
        let c = unsafe { arg(call, "call") }?;
        Ok(c.peer.get_or_init(|| tw_peer::new(&c.request.peer)) as *const tw_peer)
    })
}

/// The peer's SPIFFE ID (its one `spiffe://` URI SAN), or NULL when it has none.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_spiffe_id(peer: *const tw_peer) -> *const c_char {
    unsafe { lend_str(peer, "peer", |p| p.spiffe_id.as_ref()) }
}

/// SHA-256 of the peer's DER certificate, 64 lowercase hex digits.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_fingerprint_sha256(peer: *const tw_peer) -> *const c_char {
    unsafe { lend_str(peer, "peer", |x| Some(&x.fingerprint)) }
}

/// The certificate's serial number, lowercase hex.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_serial(peer: *const tw_peer) -> *const c_char {
    unsafe { lend_str(peer, "peer", |x| Some(&x.serial)) }
}

/// The certificate's subject, e.g. "CN=web".
#[no_mangle]
pub unsafe extern "C" fn tw_peer_subject(peer: *const tw_peer) -> *const c_char {
    unsafe { lend_str(peer, "peer", |x| Some(&x.subject)) }
}

/// The certificate's issuer.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_issuer(peer: *const tw_peer) -> *const c_char {
    unsafe { lend_str(peer, "peer", |x| Some(&x.issuer)) }
}

/// How many subject alternative names the certificate has.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_san_count(peer: *const tw_peer) -> usize {
    guard_value(0, || Ok(unsafe { arg(peer, "peer") }?.sans.len()))
}

/// SAN number `index` as "dns:NAME", "ip:ADDRESS" or "uri:URI"; NULL past the end.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_san(peer: *const tw_peer, index: usize) -> *const c_char {
    unsafe { lend_str(peer, "peer", |p| p.sans.get(index)) }
}

/// The certificate's not-before, Unix seconds.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_not_before(peer: *const tw_peer) -> i64 {
    guard_value(0, || Ok(unsafe { arg(peer, "peer") }?.not_before))
}

/// The certificate's not-after, Unix seconds.
#[no_mangle]
pub unsafe extern "C" fn tw_peer_not_after(peer: *const tw_peer) -> i64 {
    guard_value(0, || Ok(unsafe { arg(peer, "peer") }?.not_after))
}

/// True once the caller can no longer receive this call's answer: its connection closed (it
/// went away, or lost our trust). A handler doing long work on a thread of its own can poll
/// this and stop early, then consume the responder as usual. Any thread; false for NULL.
#[no_mangle]
pub unsafe extern "C" fn tw_responder_cancelled(responder: *const tw_responder) -> bool {
    guard_value(false, || Ok(unsafe { arg(responder, "responder") }?.call.request.cancelled.is_cancelled()))
}

/// Answers the call with `payload` and `attachment` (copied; NULL with length 0 for none) and
/// consumes the responder (and the call). Any thread. An answer for a caller that has gone
/// (timed out, disconnected) is dropped; that is still TW_OK.
#[no_mangle]
pub unsafe extern "C" fn tw_responder_send(
    responder: *mut tw_responder,
    payload: *const u8,
    payload_len: usize,
    attachment: *const u8,
    attachment_len: usize,
) -> tw_result {
    guard(|| {
        if responder.is_null() {
            return Err(Failure::null("responder"));
        }
        let r = unsafe { Box::from_raw(responder) };
        // On a bad argument the responder is consumed all the same, answering EINTERNAL, so
        // the caller never waits for an answer that cannot come.
        let result = (|| {
            let p = unsafe { bytes_arg(payload, payload_len, "payload") }?;
            let a = unsafe { bytes_arg(attachment, attachment_len, "attachment") }?;
            Ok(Response::new(bytes::Bytes::copy_from_slice(p)).with_attachment(bytes::Bytes::copy_from_slice(a)))
        })();
        match result {
            Ok(resp) => {
                let _ = r.tx.send(Ok(resp));
                Ok(())
            }
            Err(f) => {
                let _ = r.tx.send(Err(Status::internal("the handler's answer was invalid")));
                Err(f)
            }
        }
    })
}

/// Answers the call with an error: `code` (a brpc code such as 1003 EREQUEST or 2001
/// EINTERNAL, or your own) and `text` (NULL for none), and consumes the responder. Any thread.
#[no_mangle]
pub unsafe extern "C" fn tw_responder_fail(responder: *mut tw_responder, code: i32, text: *const c_char) -> tw_result {
    guard(|| {
        if responder.is_null() {
            return Err(Failure::null("responder"));
        }
        let r = unsafe { Box::from_raw(responder) };
        let text = match unsafe { ffi::opt_str_arg(text, "text") } {
            Ok(t) => t.unwrap_or("").to_string(),
            Err(_) => "(text was not UTF-8)".to_string(),
        };
        if code == 0 {
            let _ = r.tx.send(Err(Status::internal(text)));
            return Err(Failure::new(tw_result::TW_INVALID_ARGUMENT, "code 0 means success; the caller got EINTERNAL"));
        }
        let _ = r.tx.send(Err(Status::new(code, text)));
        Ok(())
    })
}

/// Consumes the responder without answering: the caller gets EINTERNAL ("the handler released
/// the call without answering"). NULL does nothing.
#[no_mangle]
pub unsafe extern "C" fn tw_responder_free(responder: *mut tw_responder) {
    unsafe { ffi::free_box(responder) }
}
