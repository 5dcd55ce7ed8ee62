//! Server and Client.
//!
//! Python handlers never run on the runtime's worker threads: each call is handed to a handler
//! thread (`crate::pool`), which takes the GIL there, so a slow handler (or one waiting for the
//! GIL) cannot stall the connections the workers drive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use trustwire::authz::{Call, CallDecision};
use trustwire::rpc::blocking::{BlockingClient, Failure, ThreadConnections};
use trustwire::rpc::{CancellationToken, RunningServer};
use trustwire::{CallOptions, Client, ClientOptions, PeerIdentity, Request, Response, Server, Status};

use crate::errors::{base_error, rpc_status, to_pyerr, transport_error};
use crate::rt::{block_on, checked_runtime, forked};
use crate::tls::{unix, PyTlsConfig};

/// The verified identity of the peer.
#[pyclass(module = "trustwire._native", name = "PeerIdentity", frozen, get_all)]
pub struct PyPeerIdentity {
    spiffe_id: Option<String>,
    dns_sans: Vec<String>,
    ip_sans: Vec<String>,
    uri_sans: Vec<String>,
    common_name: Option<String>,
    /// SHA-256 of the certificate (hex).
    fingerprint: String,
    /// Serial number (hex).
    serial: String,
    /// Unix timestamps.
    not_before: f64,
    not_after: f64,
    subject: String,
    issuer: String,
}

impl From<&PeerIdentity> for PyPeerIdentity {
    fn from(p: &PeerIdentity) -> Self {
        PyPeerIdentity {
            spiffe_id: p.spiffe_id.clone(),
            dns_sans: p.dns_sans.clone(),
            ip_sans: p.ip_sans.iter().map(|i| i.to_string()).collect(),
            uri_sans: p.uri_sans.clone(),
            common_name: p.common_name.clone(),
            fingerprint: p.fingerprint_sha256.clone(),
            serial: p.serial.clone(),
            not_before: unix(p.not_before),
            not_after: unix(p.not_after),
            subject: p.subject.clone(),
            issuer: p.issuer.clone(),
        }
    }
}

#[pymethods]
impl PyPeerIdentity {
    fn __repr__(&self) -> String {
        format!("PeerIdentity(spiffe_id={:?}, dns_sans={:?}, serial={:?})", self.spiffe_id, self.dns_sans, self.serial)
    }
}

/// What a handler knows about the call besides its payload.
#[pyclass(module = "trustwire._native", name = "CallContext", frozen)]
pub struct PyCallContext {
    #[pyo3(get)]
    service: String,
    #[pyo3(get)]
    method: String,
    #[pyo3(get)]
    peer: Py<PyPeerIdentity>,
    #[pyo3(get)]
    attachment: Py<PyBytes>,
    #[pyo3(get)]
    log_id: Option<i64>,
    #[pyo3(get)]
    request_id: Option<String>,
    #[pyo3(get)]
    timeout_ms: Option<i32>,
    /// When the caller gives up, as a Unix timestamp (comparable with time.time()).
    #[pyo3(get)]
    deadline: Option<f64>,
    /// The request's authentication_data, raw (a trustwire proxy's identity token, when one
    /// forwarded the call: `trustwire.verify_identity_token` checks it).
    #[pyo3(get)]
    authentication_data: Option<Py<PyBytes>>,
    cancel: Arc<CallCancel>,
}

/// The caller's connection closing while its call runs: the answer then reaches nobody.
struct CallCancel {
    token: CancellationToken,
    /// Cancelled when the handler returns: callbacks run only while it runs.
    finished: CancellationToken,
    /// Callbacks still to run; None once they have run (later ones run at once).
    callbacks: Mutex<Option<Vec<Py<PyAny>>>>,
}

impl CallCancel {
    fn new(token: CancellationToken) -> Arc<Self> {
        Arc::new(CallCancel { token, finished: CancellationToken::new(), callbacks: Mutex::new(Some(Vec::new())) })
    }

    /// Waits, on the shared runtime, for the caller to go or the handler to return; only a call
    /// that registered a callback pays for it.
    fn watch(self: &Arc<Self>) {
        let this = self.clone();
        trustwire::runtime::runtime().spawn(async move {
            tokio::select! {
                _ = this.token.cancelled() => {
                    crate::pool::run(move |py| this.fire(py)).await;
                }
                _ = this.finished.cancelled() => {}
            }
        });
    }

    /// Runs the callbacks once, with the GIL, on the calling (handler) thread.
    fn fire(&self, py: Python<'_>) {
        let callbacks = self.callbacks.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        for cb in callbacks {
            if let Err(e) = cb.call0(py) {
                e.write_unraisable(py, Some(cb.bind(py)));
            }
        }
    }
}

#[pymethods]
impl PyCallContext {
    /// True once the caller's connection has closed: its answer will reach nobody.
    fn cancelled(&self) -> bool {
        self.cancel.token.is_cancelled()
    }

    /// Calls `callback()` once the caller's connection closes while this call runs (at once
    /// when it already has). It runs on a trustwire thread: keep it short (e.g. set an event,
    /// cancel a future).
    fn add_cancel_callback(&self, py: Python<'_>, callback: Py<PyAny>) -> PyResult<()> {
        let mut callbacks = self.cancel.callbacks.lock().unwrap_or_else(|p| p.into_inner());
        match callbacks.as_mut() {
            Some(list) => {
                list.push(callback);
                if list.len() == 1 {
                    self.cancel.watch();
                }
                Ok(())
            }
            None => {
                drop(callbacks);
                callback.call0(py).map(drop)
            }
        }
    }

    fn __repr__(&self) -> String {
        format!("CallContext(service={:?}, method={:?}, log_id={:?})", self.service, self.method, self.log_id)
    }
}

fn run_handler(py: Python<'_>, handler: &Py<PyAny>, req: Request, cancel: Arc<CallCancel>) -> Result<Response, Status> {
    let build = || -> PyResult<(Py<PyBytes>, Py<PyCallContext>)> {
        let deadline = req.deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            unix(SystemTime::now() + left)
        });
        let ctx = PyCallContext {
            service: req.service.clone(),
            method: req.method.clone(),
            peer: Py::new(py, PyPeerIdentity::from(&*req.peer))?,
            attachment: PyBytes::new(py, &req.attachment).unbind(),
            log_id: req.log_id,
            request_id: req.request_id.clone(),
            timeout_ms: req.timeout_ms,
            deadline,
            authentication_data: req.authentication_data.as_ref().map(|a| PyBytes::new(py, a).unbind()),
            cancel,
        };
        Ok((PyBytes::new(py, &req.payload).unbind(), Py::new(py, ctx)?))
    };
    let outcome = build().and_then(|(payload, ctx)| {
        let value = handler.call1(py, (payload, ctx))?;
        let (payload, attachment): (Bound<'_, PyAny>, Bound<'_, PyAny>) = value.bind(py).extract()?;
        Ok(Response::new(to_bytes(&payload)?).with_attachment(to_bytes(&attachment)?))
    });
    outcome.map_err(|e| match rpc_status(py, &e) {
        Some((code, text)) => Status::new(code, text),
        // The Python side has logged the traceback; the caller learns only the exception type.
        None => Status::internal(format!(
            "handler raised {}",
            e.get_type(py).name().map(|n| n.to_string()).unwrap_or_else(|_| "an exception".into())
        )),
    })
}

/// Bytes from a Python `bytes` or `bytearray` (anything else that converts to a list of ints is
/// accepted too, the slow way). pyo3's own `Vec<u8>` conversion walks a `bytes` object one int
/// at a time, which for a 1 MiB payload costs a million Python calls.
pub(crate) fn to_bytes(value: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = value.downcast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(b.as_bytes()));
    }
    if let Ok(b) = value.downcast::<pyo3::types::PyByteArray>() {
        return Ok(Bytes::from(b.to_vec()));
    }
    Ok(Bytes::from(value.extract::<Vec<u8>>()?))
}

/// What a call carries besides its payload, for an authorization hook.
#[pyclass(module = "trustwire._native", name = "CallMetadata", frozen, get_all)]
pub struct PyCallMetadata {
    log_id: Option<i64>,
    request_id: Option<String>,
    timeout_ms: Option<i32>,
    /// The request's authentication_data, raw (a trustwire proxy's identity token, when one
    /// forwarded the call).
    authentication_data: Option<Py<PyBytes>>,
}

#[pymethods]
impl PyCallMetadata {
    fn __repr__(&self) -> String {
        format!(
            "CallMetadata(log_id={:?}, request_id={:?}, timeout_ms={:?})",
            self.log_id, self.request_id, self.timeout_ms
        )
    }
}

/// Runs a Python call hook `hook(peer, service, method, metadata)`: True allows, False denies
/// with ERPCAUTH, an `RpcError` denies with its code and text, anything else (another
/// exception, another value) denies with ERPCAUTH and is logged.
fn run_call_hook(py: Python<'_>, hook: &Py<PyAny>, call: &Call<'_>) -> CallDecision {
    let outcome = (|| -> PyResult<bool> {
        let peer = Py::new(py, PyPeerIdentity::from(call.peer))?;
        let metadata = PyCallMetadata {
            log_id: call.metadata.log_id,
            request_id: call.metadata.request_id.map(str::to_string),
            timeout_ms: call.metadata.timeout_ms,
            authentication_data: call.metadata.authentication_data.map(|a| PyBytes::new(py, a).unbind()),
        };
        hook.call1(py, (peer, call.service, call.method, Py::new(py, metadata)?))?.extract::<bool>(py)
    })();
    match outcome {
        Ok(true) => CallDecision::Allow,
        Ok(false) => CallDecision::deny(""),
        Err(e) => match rpc_status(py, &e) {
            Some((code, text)) => CallDecision::Deny { code, text },
            None => {
                crate::errors::log_exception(py, e, "the authorize hook failed; the call is refused");
                CallDecision::deny("")
            }
        },
    }
}

/// A handler and the service and method it answers.
type Registered = (String, String, Arc<Py<PyAny>>);

/// A server; register handlers, then `start`.
#[pyclass(module = "trustwire._native", name = "Server", frozen)]
pub struct PyServer {
    tls: Py<PyTlsConfig>,
    handlers: Mutex<Vec<Registered>>,
    authorize: Mutex<Option<Arc<Py<PyAny>>>>,
    running: Mutex<Option<RunningServer>>,
    port: Mutex<Option<(String, u16)>>,
}

#[pymethods]
impl PyServer {
    #[new]
    fn new(tls: Py<PyTlsConfig>) -> Self {
        PyServer {
            tls,
            handlers: Mutex::new(Vec::new()),
            authorize: Mutex::new(None),
            running: Mutex::new(None),
            port: Mutex::new(None),
        }
    }

    /// Registers `handler(payload: bytes, ctx: CallContext) -> tuple[bytes, bytes]` (payload,
    /// attachment). Runs on one of trustwire's handler threads.
    fn register(&self, service: String, method: String, handler: Py<PyAny>) {
        self.handlers.lock().unwrap_or_else(|p| p.into_inner()).push((service, method, Arc::new(handler)));
    }

    /// Sets the call hook `hook(peer, service, method, metadata) -> bool` (None removes it),
    /// run before every handler the method rules allow. It runs on a runtime thread with the
    /// GIL: keep it quick.
    fn set_authorize(&self, hook: Option<Py<PyAny>>) {
        *self.authorize.lock().unwrap_or_else(|p| p.into_inner()) = hook.map(Arc::new);
    }

    /// Binds `address` ("host:port", port 0 for any) and starts serving.
    fn start(&self, py: Python<'_>, address: String) -> PyResult<u16> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.is_some() {
            return Err(transport_error(py, "the server is already running"));
        }
        let tls = self.tls.get().server_tls(py)?;
        let mut server = Server::new(tls);
        if let Some(hook) = self.authorize.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            server
                .authorize_calls(move |call: &Call<'_>| crate::rt::with_gil_kept(|py| run_call_hook(py, &hook, call)));
        }
        for (service, method, handler) in self.handlers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let handler = handler.clone();
            server.register(service, method, move |req: Request| {
                let handler = handler.clone();
                async move {
                    let cancel = CallCancel::new(req.cancelled.clone());
                    let call = cancel.clone();
                    let result = crate::pool::run(move |py| run_handler(py, &handler, req, cancel))
                        .await
                        .unwrap_or_else(|| Err(Status::internal("handler thread failed")));
                    call.finished.cancel();
                    result
                }
            });
        }
        let addr = address.clone();
        let bound = block_on(py, async move { server.bind(&addr).await })?;
        let local = bound.local_addr();
        *self.port.lock().unwrap_or_else(|p| p.into_inner()) = Some((local.ip().to_string(), local.port()));
        *running = Some(bound);
        Ok(local.port())
    }

    /// The bound port, or None before `start`.
    #[getter]
    fn port(&self) -> Option<u16> {
        self.port.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, p)| *p)
    }

    /// The bound host, or None before `start`.
    #[getter]
    fn host(&self) -> Option<String> {
        self.port.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(h, _)| h.clone())
    }

    /// Stops accepting, lets calls in flight finish, then closes connections. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(running) = running {
            block_on(py, async move {
                running.shutdown().await;
                Ok(())
            })?;
        }
        Ok(())
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// An asynchronous call's answer, on its way to the Python callback.
struct Completion {
    done: Py<PyAny>,
    result: Result<Response, trustwire::Error>,
}

static COMPLETIONS: OnceLock<mpsc::Sender<Completion>> = OnceLock::new();

/// Answers are handed to Python by one thread of their own, which takes the GIL once for all
/// the answers waiting (under load, many): runtime workers never wait for the GIL.
fn completions() -> mpsc::Sender<Completion> {
    COMPLETIONS
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Completion>();
            let _ = std::thread::Builder::new()
                .name("trustwire-completions".into())
                .spawn(move || crate::pool::serve(rx, deliver));
            tx
        })
        .clone()
}

fn deliver(py: Python<'_>, c: Completion) {
    let outcome = match c.result {
        Ok(r) => c.done.call1(py, (Some((PyBytes::new(py, &r.payload), PyBytes::new(py, &r.attachment))), py.None())),
        Err(e) => c.done.call1(py, (py.None(), to_pyerr(py, e).into_value(py))),
    };
    if let Err(e) = outcome {
        e.write_unraisable(py, Some(c.done.bind(py)));
    }
}

/// A call started by `Client.call_async`.
#[pyclass(module = "trustwire._native", name = "PendingCall", frozen)]
pub struct PendingCall {
    task: tokio::task::AbortHandle,
}

#[pymethods]
impl PendingCall {
    /// Abandons the call: its answer, if one comes, is dropped. Safe to call at any time.
    fn cancel(&self) {
        self.task.abort();
    }
}

/// A client for one endpoint; connects on the first call.
///
/// Asynchronous calls share the client's multiplexed connections on trustwire's runtime.
/// Blocking calls go over a connection of the calling thread's own, which that thread writes,
/// waits on and reads itself with blocking system calls (`trustwire::rpc::blocking`): no
/// hand-off between threads per call. Up to [`THREADS_WITH_OWN_CONNECTION`] live threads at a
/// time get one; calls from further threads share the multiplexed connections.
#[pyclass(module = "trustwire._native", name = "Client", frozen)]
pub struct PyClient {
    client: Client,
    closed: AtomicBool,
    /// The calling threads' own connections.
    own: ThreadConnections,
}

/// Dropping a client closes its connections as `close()` does.
impl Drop for PyClient {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Threads of one Client that get a connection of their own for blocking calls.
pub const THREADS_WITH_OWN_CONNECTION: usize = 8;

fn call_options(
    timeout: Option<f64>,
    attachment: Option<&Bound<'_, PyAny>>,
    log_id: Option<i64>,
) -> PyResult<CallOptions> {
    let timeout = match timeout {
        None => None,
        Some(t) if t > 0.0 && t.is_finite() => Some(Duration::from_secs_f64(t)),
        Some(_) => return Err(pyo3::exceptions::PyValueError::new_err("timeout must be a positive number of seconds")),
    };
    let attachment = attachment.map(to_bytes).transpose()?.unwrap_or_default();
    Ok(CallOptions { timeout, attachment, log_id, request_id: None })
}

impl PyClient {
    fn live(&self, py: Python<'_>) -> PyResult<Client> {
        if self.closed.load(Ordering::Acquire) {
            return Err(transport_error(py, "the client is closed"));
        }
        Ok(self.client.clone())
    }

    /// Closes every connection, the shared ones and every thread's own one; calls in flight on
    /// them fail with a transport error.
    fn shut(&self) {
        self.closed.store(true, Ordering::Release);
        self.own.close();
        self.client.close();
    }
}

/// A blocking call on this thread's own connection, with the GIL released; Ctrl-C (any
/// exception from Python's signal handlers) abandons it.
fn call_on_own(
    py: Python<'_>,
    client: &mut BlockingClient,
    service: &str,
    method: &str,
    payload: Bytes,
    opts: CallOptions,
) -> PyResult<Response> {
    let result = py.allow_threads(|| {
        let mut check = || {
            Python::with_gil(|py| {
                py.check_signals()?;
                // A signal handler that forked: the child must not go on with the parent's call.
                if forked() {
                    return Err(base_error(py, "the process forked during a blocking call"));
                }
                Ok(())
            })
        };
        client.call(service, method, payload, opts, &mut check)
    });
    result.map_err(|f| match f {
        Failure::Error(e) => to_pyerr(py, e),
        Failure::Interrupted(e) => e,
    })
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (address, tls, *, connect_timeout=5.0, pool_size=1))]
    fn new(
        py: Python<'_>,
        address: String,
        tls: &PyTlsConfig,
        connect_timeout: f64,
        pool_size: usize,
    ) -> PyResult<Self> {
        let tls = tls.client_tls(py)?;
        let options = ClientOptions {
            connect_timeout: Duration::from_secs_f64(connect_timeout.max(0.001)),
            pool_size: pool_size.max(1),
            ..ClientOptions::default()
        };
        Ok(PyClient {
            client: Client::new(address.clone(), tls.clone(), options.clone()),
            closed: AtomicBool::new(false),
            own: ThreadConnections::new(address, tls, options, THREADS_WITH_OWN_CONNECTION),
        })
    }

    /// Calls and waits (GIL released); returns (payload, attachment).
    #[pyo3(signature = (service, method, payload, *, timeout=None, attachment=None, log_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn call<'py>(
        &self,
        py: Python<'py>,
        service: String,
        method: String,
        payload: &Bound<'py, PyAny>,
        timeout: Option<f64>,
        attachment: Option<&Bound<'py, PyAny>>,
        log_id: Option<i64>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let client = self.live(py)?;
        let opts = call_options(timeout, attachment, log_id)?;
        let payload = to_bytes(payload)?;
        checked_runtime(py)?;
        // None when this thread gets no connection of its own (see ThreadConnections::with),
        // e.g. for a call made from a Python signal handler while this thread's call waits.
        let on_own = self.own.with(|own| call_on_own(py, own, &service, &method, payload.clone(), opts.clone()));
        let r = match on_own {
            Some(r) => r?,
            None => {
                // close() may have come since live(): the shared client would connect again.
                if self.closed.load(Ordering::Acquire) {
                    return Err(transport_error(py, "the client is closed"));
                }
                block_on(py, async move { client.call(&service, &method, payload, opts).await })?
            }
        };
        Ok((PyBytes::new(py, &r.payload), PyBytes::new(py, &r.attachment)))
    }

    /// Starts a call and returns at once; `done(result, error)` is called later from a thread
    /// of trustwire's with `((payload, attachment), None)` or `(None, exception)`, unless the
    /// returned handle's `cancel()` comes first (then `done` is never called).
    #[pyo3(signature = (service, method, payload, done, *, timeout=None, attachment=None, log_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn call_async<'py>(
        &self,
        py: Python<'py>,
        service: String,
        method: String,
        payload: &Bound<'py, PyAny>,
        done: Py<PyAny>,
        timeout: Option<f64>,
        attachment: Option<&Bound<'py, PyAny>>,
        log_id: Option<i64>,
    ) -> PyResult<PendingCall> {
        let client = self.live(py)?;
        let opts = call_options(timeout, attachment, log_id)?;
        let payload = to_bytes(payload)?;
        let rt = checked_runtime(py)?;
        let completions = completions();
        let task = rt.spawn(async move {
            let result = client.call(&service, &method, payload, opts).await;
            let _ = completions.send(Completion { done, result });
        });
        Ok(PendingCall { task: task.abort_handle() })
    }

    /// Closes the connections; later calls raise TransportError.
    fn close(&self) {
        self.shut();
    }

    #[getter]
    fn address(&self) -> String {
        self.client.addr().to_string()
    }
}
