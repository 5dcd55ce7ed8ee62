//! The server: accept, handshake, read frames, dispatch concurrently, answer by correlation_id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tracing::{debug, info, warn};

use super::{response_frame, CatchUnwind, Handler, HandlerFuture, Request};
use crate::authz::truncate;
use crate::error::{codes, Error, Side, Verdict};
use crate::telemetry::{self, Role};
use crate::tls::identity::PeerIdentity;
use crate::tls::policy::Policy;
use crate::tls::tracker::TrackGuard;
use crate::tls::ServerTls;
use crate::wire::{DecodeError, Decoder, Frame, COMPRESS_NONE, DEFAULT_MAX_BODY};

/// Called with the remote address and the error when a handshake is refused or fails.
pub type HandshakeHook = Arc<dyn Fn(SocketAddr, &Error) + Send + Sync>;

/// Server limits. The defaults suit a service on a shared host.
#[derive(Clone)]
pub struct ServerOptions {
    /// Largest frame body accepted (brpc's default: 64 MiB).
    pub max_body: usize,
    /// A connection with no call in flight and nothing received for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Calls running at once on one connection; reading pauses when it is reached.
    pub max_in_flight_per_connection: usize,
    /// How long a graceful shutdown waits for calls in flight.
    pub shutdown_grace: Duration,
    /// Told about every refused or failed handshake (they are also logged).
    pub on_handshake_error: Option<HandshakeHook>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_body", &self.max_body)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_in_flight_per_connection", &self.max_in_flight_per_connection)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body: DEFAULT_MAX_BODY,
            idle_timeout: Some(Duration::from_secs(300)),
            max_connections: 10_000,
            max_in_flight_per_connection: 1024,
            shutdown_grace: Duration::from_secs(30),
            on_handshake_error: None,
        }
    }
}

type MethodMap = HashMap<String, Arc<dyn Handler>>;

/// Handlers by full service name, and the short-name index brpc uses for unqualified names.
#[derive(Default)]
struct Registry {
    services: HashMap<String, MethodMap>,
    /// Short name → full name; None when two services share the short name.
    short: HashMap<String, Option<String>>,
}

enum Resolved<'a> {
    Found(&'a str, &'a Arc<dyn Handler>),
    NoService(String),
    NoMethod(String),
}

impl Registry {
    fn insert(&mut self, service: &str, method: &str, handler: Arc<dyn Handler>) {
        self.services.entry(service.to_string()).or_default().insert(method.to_string(), handler);
        let short = service.rsplit('.').next().unwrap_or(service).to_string();
        let full = service.to_string();
        self.short
            .entry(short)
            .and_modify(|e| {
                if e.as_deref() != Some(full.as_str()) {
                    *e = None;
                }
            })
            .or_insert(Some(full));
    }

    /// brpc's rules: a full name that is unknown, or a known service without the method, is
    /// ENOMETHOD; an unqualified name resolves through the short names, else ENOSERVICE.
    fn resolve<'a>(&'a self, service: &str, method: &str) -> Resolved<'a> {
        let (full, methods) = match self.services.get_key_value(service) {
            Some((k, m)) => (k.as_str(), m),
            None if !service.contains('.') => match self.short.get(service).and_then(|f| f.as_deref()) {
                Some(full) => (full, &self.services[full]),
                None => return Resolved::NoService(format!("Fail to find service={}", truncate(service))),
            },
            None => {
                return Resolved::NoMethod(format!("Fail to find method={}/{}", truncate(service), truncate(method)))
            }
        };
        match methods.get_key_value(method) {
            Some((_, h)) => Resolved::Found(full, h),
            None => Resolved::NoMethod(format!("Fail to find method={full}/{}", truncate(method))),
        }
    }
}

/// A server being configured: register handlers, then [`Server::bind`].
pub struct Server {
    tls: Option<ServerTls>,
    registry: Registry,
    options: ServerOptions,
}

impl Server {
    /// A server that requires and verifies client certificates with `tls`.
    pub fn new(tls: ServerTls) -> Self {
        Server { tls: Some(tls), registry: Registry::default(), options: ServerOptions::default() }
    }

    /// A server WITHOUT TLS. It exists only so benchmarks can measure what TLS costs.
    #[cfg(feature = "insecure-plaintext-bench")]
    pub fn insecure_plaintext_for_benchmarks() -> Self {
        Server { tls: None, registry: Registry::default(), options: ServerOptions::default() }
    }

    /// Registers `handler` for `service` (full protobuf name, e.g. `example.EchoService`) and
    /// `method`.
    pub fn register(&mut self, service: &str, method: &str, handler: impl Handler) -> &mut Self {
        self.registry.insert(service, method, Arc::new(handler));
        self
    }

    pub fn options_mut(&mut self) -> &mut ServerOptions {
        &mut self.options
    }

    /// Binds `addr` (port 0 for any) and starts serving on the shared runtime's tasks.
    pub async fn bind(self, addr: &str) -> Result<RunningServer, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            // Only an address that does not parse is a configuration error; one in use or not
            // on this host is the machine's state, and retrying later may work.
            let message = format!("cannot listen on {addr}: {e}");
            match e.kind() {
                std::io::ErrorKind::InvalidInput => Error::config(message),
                _ => Error::transport(message),
            }
        })?;
        let local_addr = listener.local_addr().map_err(|e| Error::config(format!("cannot read bound address: {e}")))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let policy = self.tls.as_ref().map(|t| t.policy.clone()).unwrap_or_default();
        let connections = Arc::new(Semaphore::new(self.options.max_connections));
        let shared = Arc::new(Shared {
            registry: self.registry,
            policy,
            options: self.options,
            local_addr,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            stop_rx,
            connections,
        });
        let accept = tokio::spawn(accept_loop(listener, self.tls, shared.clone()));
        Ok(RunningServer { local_addr, shared, stop_tx, accept: Some(accept) })
    }
}

struct Shared {
    registry: Registry,
    policy: Arc<Policy>,
    options: ServerOptions,
    local_addr: SocketAddr,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    drained: Notify,
    /// Becomes true when connections must close (after the drain).
    stop_rx: watch::Receiver<bool>,
    /// One permit per open (or handshaking) connection, up to `max_connections`.
    connections: Arc<Semaphore>,
}

impl Shared {
    /// brpc's error_text shape: `[ip:port][E<code>]text`.
    fn error_text(&self, code: i32, text: &str) -> String {
        format!("[{}][E{code}]{text}", self.local_addr)
    }
}

/// A server that is accepting connections.
pub struct RunningServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// The bound address (read the port here after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Calls running now, across all connections.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Graceful stop: stop accepting, answer new calls with ELOGOFF, let calls in flight finish
    /// (up to the shutdown grace), then close every connection. When it returns, the port and
    /// the connections are closed, so a client's next call fails to connect instead of finding a
    /// connection that is still closing (unless a handler outlived the grace: then it waits at
    /// most one more second for the connections).
    pub async fn shutdown(mut self) {
        if let Some(accept) = self.stop_accepting() {
            // Aborted: the listener is closed once the task is gone.
            let _ = accept.await;
        }
        let deadline = Instant::now() + self.shared.options.shutdown_grace;
        loop {
            let notified = self.shared.drained.notified();
            if self.shared.in_flight.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                warn!(
                    in_flight = self.shared.in_flight.load(Ordering::Acquire),
                    "shutdown grace expired with calls still running"
                );
                break;
            }
        }
        let _ = self.stop_tx.send(true);
        let all = u32::try_from(self.shared.options.max_connections).unwrap_or(u32::MAX);
        let close_by = deadline.max(Instant::now() + Duration::from_secs(1));
        let closed = tokio::time::timeout_at(close_by.into(), self.shared.connections.acquire_many(all)).await;
        if closed.is_err() {
            warn!("shutdown: connections still closing");
        }
    }

    /// Marks the server stopping and aborts the accept loop; returns its handle to await.
    fn stop_accepting(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.shared.stopping.store(true, Ordering::Release);
        let accept = self.accept.take();
        if let Some(a) = &accept {
            a.abort();
        }
        accept
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop_accepting();
        let _ = self.stop_tx.send(true);
    }
}

async fn accept_loop(listener: TcpListener, tls: Option<ServerTls>, shared: Arc<Shared>) {
    loop {
        let Ok(permit) = shared.connections.clone().acquire_owned().await else { return };
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tls = tls.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(tls) => match crate::transport::accept(&tls, tcp).await {
                    Ok((stream, info)) => {
                        debug!(%remote, peer = %info.peer, generation = info.generation, "handshake accepted");
                        let guard = tls.tracker.register(info.peer_chain, None, info.peer.clone(), info.our_not_after);
                        serve_connection(stream, info.peer, remote, shared, Some(guard)).await
                    }
                    Err(e) => {
                        let verdict = e.verdict().unwrap_or(Verdict::Io);
                        info!(%remote, verdict = verdict.name(), side = e.side().map(Side::name).unwrap_or("-"), "handshake refused: {e}");
                        if let Some(hook) = &shared.options.on_handshake_error {
                            hook(remote, &e);
                        }
                    }
                },
                None => {
                    let _ = tcp.set_nodelay(true);
                    serve_connection(tcp, plaintext_peer(), remote, shared, None).await
                }
            }
        });
    }
}

fn plaintext_peer() -> Arc<PeerIdentity> {
    Arc::new(PeerIdentity {
        spiffe_id: None,
        dns_sans: vec![],
        ip_sans: vec![],
        uri_sans: vec![],
        common_name: Some("insecure-plaintext-benchmark".into()),
        fingerprint_sha256: String::new(),
        serial: String::new(),
        not_before: std::time::UNIX_EPOCH,
        not_after: std::time::UNIX_EPOCH,
        subject: String::new(),
        issuer: String::new(),
    })
}

/// Serves one connection until the peer closes, it idles out, a fatal frame error, or stop.
async fn serve_connection<S>(
    stream: S,
    peer: Arc<PeerIdentity>,
    remote: SocketAddr,
    shared: Arc<Shared>,
    guard: Option<TrackGuard>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(write_loop(wr, rx));
    let limit = Arc::new(Semaphore::new(shared.options.max_in_flight_per_connection));
    let mut decoder = Decoder::new(shared.options.max_body);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut stop_rx = shared.stop_rx.clone();
    let mut close_signal = guard.as_ref().map(|g| g.close_signal());
    'conn: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let Ok(permit) = limit.clone().acquire_owned().await else { break 'conn };
                    dispatch(frame, &peer, &shared, &tx, permit);
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(%remote, peer = %peer, error = e.name(), "bad frame: {e}");
                    if let DecodeError::BadAttachmentSize { correlation_id: Some(id), .. } = &e {
                        let text = shared.error_text(codes::EREQUEST, &e.to_string());
                        send(&tx, response_frame(*id, Err((codes::EREQUEST, text))));
                    }
                    if e.stream_in_sync() {
                        continue;
                    }
                    break 'conn;
                }
            }
        }
        let idle = shared.options.idle_timeout;
        let read = rd.read_buf(&mut buf);
        let n = tokio::select! {
            r = read => r,
            _ = stop_rx.wait_for(|s| *s) => break 'conn,
            d = must_close(&mut close_signal) => {
                info!(%remote, peer = %peer, verdict = d.verdict.name(), "closing: {}", d.message);
                break 'conn;
            }
            _ = sleep_opt(idle) => {
                if limit.available_permits() == shared.options.max_in_flight_per_connection {
                    debug!(%remote, "closing idle connection");
                    break 'conn;
                }
                continue;
            }
        };
        match n {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                debug!(%remote, "read failed: {e}");
                break;
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(decoder.wanted(&buf).max(16 * 1024));
        }
    }
    // Let calls already dispatched answer before the write side closes.
    let _ = limit.acquire_many(shared.options.max_in_flight_per_connection as u32).await;
    drop(tx);
    let _ = writer.await;
}

/// Resolves when this connection must close (its peer is no longer trusted, or a certificate
/// it was verified with expired); never while it may stay open.
async fn must_close(signal: &mut Option<crate::tls::tracker::CloseSignal>) -> crate::tls::verify::Diagnosis {
    match signal {
        Some(s) => s.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn send(tx: &mpsc::UnboundedSender<Bytes>, frame: Frame) {
    match frame.to_bytes() {
        Ok(b) => {
            let _ = tx.send(b);
        }
        Err(e) => warn!("cannot encode response: {e}"),
    }
}

/// Writes queued responses; the write side is closed (close_notify) once the queue ends.
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    if super::write_queued(&mut wr, &mut rx).await.is_ok() {
        let _ = wr.shutdown().await;
    }
}

fn dispatch(
    frame: Frame,
    peer: &Arc<PeerIdentity>,
    shared: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Bytes>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let cid = frame.meta.correlation_id.unwrap_or(0);
    // Calls refused before their method is resolved are counted without the names the peer
    // sent, which a peer could vary without limit.
    let fail = |code: i32, text: &str| {
        telemetry::call(Role::Server, "(unknown)", "(unknown)", code);
        send(tx, response_frame(cid, Err((code, shared.error_text(code, text)))));
    };
    if shared.stopping.load(Ordering::Acquire) {
        return fail(codes::ELOGOFF, "Server is stopping");
    }
    let Some(req) = frame.meta.request.as_ref() else {
        return fail(codes::EREQUEST, "frame carries no request meta (is this a response?)");
    };
    if let Some(ct) = frame.meta.compress_type.filter(|c| *c != COMPRESS_NONE) {
        let name = match ct {
            1 => "snappy",
            2 => "gzip",
            3 => "zlib",
            4 => "lz4",
            _ => "unknown",
        };
        return fail(
            codes::EREQUEST,
            &format!("compress_type {ct} ({name}) is not supported; send uncompressed payloads (compress_type 0)"),
        );
    }
    if let Err(e) = frame.verify_checksum() {
        return fail(codes::EREQUEST, &format!("request checksum rejected: {e}"));
    }
    let service = req.service_name.as_deref().unwrap_or("");
    let method = req.method_name.as_deref().unwrap_or("");
    let (full, handler) = match shared.registry.resolve(service, method) {
        Resolved::Found(full, h) => (full, h.clone()),
        Resolved::NoService(t) => return fail(codes::ENOSERVICE, &t),
        Resolved::NoMethod(t) => return fail(codes::ENOMETHOD, &t),
    };
    if let Err(r) = crate::authz::authorize_call(&shared.policy, peer, full, &[], method, "server") {
        telemetry::call(Role::Server, full, method, r.code);
        send(tx, response_frame(cid, Err((r.code, shared.error_text(r.code, &r.text)))));
        return;
    }
    let checksum = frame.meta.checksum_type == Some(crate::wire::CHECKSUM_CRC32C);
    let with_attachment = frame.meta.checksum_with_attachment.unwrap_or(false);
    let timeout_ms = req.timeout_ms;
    let request = Request {
        service: full.to_string(),
        method: method.to_string(),
        log_id: req.log_id,
        timeout_ms,
        deadline: timeout_ms.filter(|t| *t > 0).map(|t| Instant::now() + Duration::from_millis(t as u64)),
        request_id: req.request_id.clone(),
        user_fields: frame.meta.user_fields,
        payload: frame.payload,
        attachment: frame.attachment,
        peer: peer.clone(),
    };
    let (service_name, method_name) = (request.service.clone(), request.method.clone());
    let shared = shared.clone();
    let tx = tx.clone();
    shared.in_flight.fetch_add(1, Ordering::AcqRel);
    tokio::spawn(async move {
        // The handler is called inside the caught future, so a panic while it builds its
        // future (before any await) is caught too.
        let call: HandlerFuture = Box::pin(async move { handler.call(request).await });
        let result = match CatchUnwind(call).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) => Err((status.code, shared.error_text(status.code, &status.text))),
            Err(panic) => {
                warn!(service = %shared.local_addr, "handler panicked: {panic}");
                Err((codes::EINTERNAL, shared.error_text(codes::EINTERNAL, "handler panicked")))
            }
        };
        let code = result.as_ref().err().map_or(0, |(code, _)| *code);
        telemetry::call(Role::Server, &service_name, &method_name, code);
        let mut frame = response_frame(cid, result);
        if checksum {
            frame.set_checksum(with_attachment);
        }
        send(&tx, frame);
        drop(permit);
        if shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.drained.notify_waiters();
        }
    });
}
