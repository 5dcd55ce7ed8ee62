//! The server: accept, handshake, read frames, dispatch concurrently, answer by correlation_id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::queue::{self, Receiver, Sender};
use super::{response_frame, CancellationToken, CatchUnwind, Handler, HandlerFuture, Request};
use crate::authz::truncate;
use crate::error::{codes, Error, Side, Verdict};
use crate::limits::{Admission, ConnectionLimits, Established, Handshaking};
use crate::telemetry::{self, Role};
use crate::tls::identity::PeerIdentity;
use crate::tls::policy::Policy;
use crate::tls::tracker::TrackGuard;
use crate::tls::ServerTls;
use crate::transport::ServerStream;
use crate::wire::{DecodeError, Decoder, Encoded, Frame, COMPRESS_NONE, DEFAULT_MAX_BODY};

/// Called with the remote address and the error when a handshake is refused or fails.
pub type HandshakeHook = Arc<dyn Fn(SocketAddr, &Error) + Send + Sync>;

/// Default [`ServerOptions::max_unwritten_bytes`]: brpc's `socket_max_unwritten_bytes`.
pub const DEFAULT_MAX_UNWRITTEN_BYTES: usize = 64 << 20;
/// Default [`ServerOptions::frame_timeout`].
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Server limits. The defaults suit a service on a shared host; every limit that is hit is
/// counted (see the README's Limits table).
#[derive(Clone)]
pub struct ServerOptions {
    /// Largest frame body accepted (brpc's default: 64 MiB).
    pub max_body: usize,
    /// A connection on which no complete frame arrived, nothing was written and no call ran for
    /// this long is closed. Bytes of a frame that never completes do not count as activity.
    pub idle_timeout: Option<Duration>,
    /// A frame must arrive whole within this long of its first byte (while we are reading), so a
    /// peer cannot hold a connection, and the buffer for its frame, by dribbling bytes.
    pub frame_timeout: Option<Duration>,
    /// Verified connections served at once; further ones are closed at once.
    pub max_connections: usize,
    /// Connections whose TLS handshake is in progress, in total; further ones are closed at once.
    pub max_handshakes: usize,
    /// Connections whose TLS handshake is in progress from one source address (an IPv6 /64
    /// counts as one); further ones from that source are closed at once.
    pub max_handshakes_per_source: usize,
    /// Calls running or waiting to be written at once on one connection; reading pauses when it
    /// is reached.
    pub max_in_flight_per_connection: usize,
    /// Bytes one connection may make us hold: requests read but not yet answered, plus answers
    /// queued but not yet written. Reading from the connection pauses while it holds this much
    /// (a frame is always read when nothing is held, so a single frame or answer larger than
    /// this still goes through).
    pub max_unwritten_bytes: usize,
    /// How long a graceful shutdown waits for calls in flight, and how long a closing
    /// connection waits for its last answers to be written.
    pub shutdown_grace: Duration,
    /// Told about every refused or failed handshake (they are also logged).
    pub on_handshake_error: Option<HandshakeHook>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_body", &self.max_body)
            .field("idle_timeout", &self.idle_timeout)
            .field("frame_timeout", &self.frame_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_handshakes", &self.max_handshakes)
            .field("max_handshakes_per_source", &self.max_handshakes_per_source)
            .field("max_in_flight_per_connection", &self.max_in_flight_per_connection)
            .field("max_unwritten_bytes", &self.max_unwritten_bytes)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        let limits = ConnectionLimits::default();
        ServerOptions {
            max_body: DEFAULT_MAX_BODY,
            idle_timeout: Some(Duration::from_secs(300)),
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
            max_connections: limits.max_connections,
            max_handshakes: limits.max_handshakes,
            max_handshakes_per_source: limits.max_handshakes_per_source,
            max_in_flight_per_connection: 1024,
            max_unwritten_bytes: DEFAULT_MAX_UNWRITTEN_BYTES,
            shutdown_grace: Duration::from_secs(30),
            on_handshake_error: None,
        }
    }
}

impl ServerOptions {
    fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
        }
    }
}

/// The scope this server's limits are counted under in metrics.
const SCOPE: &str = "server";

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
    call_hook: Option<Arc<dyn crate::authz::CallHook>>,
}

impl Server {
    /// A server that requires and verifies client certificates with `tls`.
    pub fn new(tls: ServerTls) -> Self {
        Server { tls: Some(tls), registry: Registry::default(), options: ServerOptions::default(), call_hook: None }
    }

    /// Runs `hook` on every call the method rules allow, before its handler: it replaces the
    /// profile's call hook (`Policy::hooks`) for this server. See [`crate::authz::CallHook`].
    pub fn authorize_calls(&mut self, hook: impl crate::authz::CallHook) -> &mut Self {
        self.call_hook = Some(Arc::new(hook));
        self
    }

    /// A server WITHOUT TLS. It exists only so benchmarks can measure what TLS costs.
    #[cfg(feature = "insecure-plaintext-bench")]
    pub fn insecure_plaintext_for_benchmarks() -> Self {
        Server { tls: None, registry: Registry::default(), options: ServerOptions::default(), call_hook: None }
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
        let mut policy = self.tls.as_ref().map(|t| t.policy.clone()).unwrap_or_default();
        if let Some(hook) = self.call_hook {
            Arc::make_mut(&mut policy).hooks.call = Some(hook);
        }
        let admission = Admission::new(SCOPE, self.options.connection_limits());
        let shared = Arc::new(Shared {
            registry: self.registry,
            policy,
            options: self.options,
            local_addr,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            stop_rx,
            admission,
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
    /// Handshake and connection slots.
    admission: Arc<Admission>,
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
        let close_by = deadline.max(Instant::now() + Duration::from_secs(1));
        let closed = tokio::time::timeout_at(close_by.into(), self.shared.admission.all_closed()).await;
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
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Accepted and closed at once when a budget is full, rather than left in the backlog
        // where it would hold up the sockets behind it.
        let slot = match shared.admission.admit(Some(remote.ip())) {
            Ok(slot) => slot,
            Err(full) => {
                debug!(%remote, limit = full.name(), "connection refused: {full} reached");
                continue;
            }
        };
        let tls = tls.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            match tls {
                Some(tls) => {
                    // Boxed, so the handshake's state (a whole TLS stream, its timeout) is freed
                    // when the handshake ends instead of sizing this task for as long as the
                    // connection lives.
                    let Some((stream, peer, guard, slot)) = Box::pin(handshake(tls, tcp, remote, &shared, slot)).await
                    else {
                        return;
                    };
                    serve_connection(tokio::io::split(stream), peer, remote, shared, Some(guard), slot).await
                }
                None => {
                    let Ok(slot) = slot.established() else { return };
                    let _ = tcp.set_nodelay(true);
                    serve_connection(tokio::io::split(tcp), plaintext_peer(), remote, shared, None, slot).await
                }
            }
        });
    }
}

/// Runs the TLS handshake of an accepted socket and trades its handshake slot for a
/// connection's; returns what the connection keeps (the stream, the verified peer, its place
/// in the tracker), or None when the socket is closed (refused, failed, or the server stops).
async fn handshake(
    tls: ServerTls,
    tcp: TcpStream,
    remote: SocketAddr,
    shared: &Shared,
    slot: Handshaking,
) -> Option<(ServerStream<TcpStream>, Arc<PeerIdentity>, TrackGuard, Established)> {
    let mut stop_rx = shared.stop_rx.clone();
    let handshake = tokio::select! {
        r = crate::transport::accept(&tls, tcp) => r,
        _ = stop_rx.wait_for(|s| *s) => return None,
    };
    match handshake {
        Ok((stream, info)) => {
            let Ok(slot) = slot.established() else {
                info!(%remote, peer = %info.peer, "connection closed: max_connections reached");
                return None;
            };
            debug!(%remote, peer = %info.peer, generation = info.generation, "handshake accepted");
            match tls.tracker.register(info.generation, info.peer_chain, None, info.peer.clone(), info.our_not_after) {
                Ok(guard) => Some((stream, info.peer, guard, slot)),
                Err(d) => {
                    // Trust changed while the handshake finished: no call is read. A clean
                    // close makes the client try again, and hear the new trust's verdict.
                    info!(%remote, peer = %info.peer, verdict = d.verdict.name(), "closing at once: {}", d.message);
                    let mut stream = stream;
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
                    None
                }
            }
        }
        Err(e) => {
            drop(slot);
            let verdict = e.verdict().unwrap_or(Verdict::Io);
            info!(%remote, verdict = verdict.name(), side = e.side().map(Side::name).unwrap_or("-"), "handshake refused: {e}");
            if let Some(hook) = &shared.options.on_handshake_error {
                hook(remote, &e);
            }
            None
        }
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

/// Reasons a connection stops reading for a while, as counted in `trustwire_reads_paused_total`.
const MAX_UNWRITTEN: &str = "max_unwritten_bytes";
const MAX_IN_FLIGHT: &str = "max_in_flight_per_connection";

/// What one connection makes us hold, shared by its reader, its calls and its writer.
struct Held {
    /// Bytes of requests read but not yet answered, plus answers queued but not yet written.
    bytes: AtomicUsize,
    cap: usize,
    /// Woken when `bytes` falls back under the cap.
    room: Notify,
    /// Handlers running now.
    running: AtomicUsize,
    /// Bumped after every write; the idle check looks for a change.
    progress: AtomicU64,
}

impl Held {
    fn new(cap: usize) -> Held {
        Held {
            bytes: AtomicUsize::new(0),
            cap,
            room: Notify::new(),
            running: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
        }
    }

    /// Over the cap. Nothing held is never over it, so one frame larger than the cap still
    /// gets read and answered.
    fn over(&self, bytes: usize) -> bool {
        bytes > 0 && bytes >= self.cap
    }

    fn is_over(&self) -> bool {
        self.over(self.bytes.load(Ordering::Acquire))
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn sub(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, Ordering::AcqRel);
        if self.over(before) && !self.over(before - n) {
            // Stored when the reader is not waiting yet, so a release between its check and its
            // wait is not lost.
            self.room.notify_one();
        }
    }

    /// Resolves once the connection is under its cap.
    async fn room(&self) {
        while self.is_over() {
            self.room.notified().await;
        }
    }

    fn progress(&self) -> u64 {
        self.progress.load(Ordering::Acquire)
    }
}

/// One call's share of its connection's budgets: the bytes it makes us hold (its request until
/// it is answered, then its answer) and its in-flight permit. Released when the answer has been
/// written (or dropped, when the connection is gone).
struct Charge {
    held: Arc<Held>,
    bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl Charge {
    fn new(held: &Arc<Held>, bytes: usize, permit: OwnedSemaphorePermit) -> Charge {
        held.add(bytes);
        Charge { held: held.clone(), bytes, _permit: permit }
    }

    /// The request is answered: from now on the call holds its answer's bytes instead.
    fn answered(&mut self, bytes: usize) {
        self.held.add(bytes);
        self.held.sub(self.bytes);
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.sub(self.bytes);
    }
}

/// An answer waiting to be written, with the charge its writing releases.
struct Outgoing {
    bytes: Encoded,
    _charge: Charge,
}

impl AsRef<Encoded> for Outgoing {
    fn as_ref(&self) -> &Encoded {
        &self.bytes
    }
}

/// Serves one connection until the peer closes, it idles out, a frame takes too long, a fatal
/// frame error, it must close (trust or a certificate), or stop. It takes the stream split
/// already, so the future (which lives as long as the connection) holds two pointers rather
/// than room for a whole TLS stream.
async fn serve_connection<S>(
    (mut rd, wr): (ReadHalf<S>, WriteHalf<S>),
    peer: Arc<PeerIdentity>,
    remote: SocketAddr,
    shared: Arc<Shared>,
    guard: Option<TrackGuard>,
    _slot: Established,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let opts = &shared.options;
    let (tx, rx) = queue::queue::<Outgoing>();
    let held = Arc::new(Held::new(opts.max_unwritten_bytes));
    let mut writer = tokio::spawn(write_loop(wr, rx, held.clone()));
    let max_in_flight = opts.max_in_flight_per_connection.clamp(1, u32::MAX as usize);
    let limit = Arc::new(Semaphore::new(max_in_flight));
    let mut decoder = Decoder::new(opts.max_body);
    // Empty until bytes arrive, and again whenever a frame boundary empties it (read_frames).
    let mut buf = BytesMut::new();
    let mut stop_rx = shared.stop_rx.clone();
    let stopped = stop_rx.wait_for(|s| *s);
    tokio::pin!(stopped);
    let mut close_signal = guard.as_ref().map(|g| g.close_signal());
    let closing = must_close(&mut close_signal);
    tokio::pin!(closing);
    // The in-flight permit for the next frame, taken before it is decoded.
    let mut permit: Option<OwnedSemaphorePermit> = None;
    // Idle time counts from the last complete frame (or the last time the idle check saw calls
    // running or answers being written), never from a stray byte.
    let mut quiet_since = Instant::now();
    let mut progress_then = held.progress();
    // When the first byte of the frame being received arrived (while we were reading).
    let mut frame_since: Option<Instant> = None;
    let deadline = |quiet_since: Instant, frame_since: Option<Instant>| {
        let idle = opts.idle_timeout.map(|d| quiet_since + d);
        let frame = opts.frame_timeout.zip(frame_since).map(|(d, since)| since + d);
        idle.into_iter().chain(frame).min()
    };
    // One timer for both limits, reset only when it fires or must fire earlier: frames on a busy
    // connection cost no timer work.
    let timer = tokio::time::sleep_until(deadline(quiet_since, None).unwrap_or_else(Instant::now).into());
    tokio::pin!(timer);
    let mut paused: Option<&'static str> = None;
    // Cancelled once nobody can receive this connection's answers, for handlers that stop then.
    let gone = CancellationToken::new();
    'conn: loop {
        let blocked = loop {
            if held.is_over() {
                break Some(MAX_UNWRITTEN);
            }
            if permit.is_none() {
                match limit.clone().try_acquire_owned() {
                    Ok(p) => permit = Some(p),
                    Err(_) => break Some(MAX_IN_FLIGHT),
                }
            }
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    quiet_since = Instant::now();
                    progress_then = held.progress();
                    frame_since = None;
                    let Some(p) = permit.take() else { break 'conn };
                    dispatch(frame, &peer, &shared, &tx, &gone, Charge::new(&held, before - buf.len(), p));
                }
                Ok(None) => break None,
                Err(e) => {
                    warn!(%remote, peer = %peer, error = e.name(), "bad frame: {e}");
                    frame_since = None;
                    if let DecodeError::BadAttachmentSize { correlation_id: Some(id), .. } = &e {
                        if let Some(p) = permit.take() {
                            let text = shared.error_text(codes::EREQUEST, &e.to_string());
                            send(&tx, response_frame(*id, Err((codes::EREQUEST, text))), Charge::new(&held, 0, p));
                        }
                    }
                    if e.stream_in_sync() {
                        continue;
                    }
                    if matches!(e, DecodeError::BodyTooLarge { .. }) {
                        telemetry::connection_closed_by_limit(SCOPE, "max_body");
                    }
                    break 'conn;
                }
            }
        };
        if blocked.is_some() && paused != blocked {
            debug!(%remote, limit = blocked, "pausing reads until answers are written");
            telemetry::reads_paused(SCOPE, blocked.unwrap_or_default());
        }
        paused = blocked;
        if blocked.is_some() {
            // The peer cannot finish a frame while we are not reading.
            frame_since = None;
        } else if !buf.is_empty() && frame_since.is_none() {
            let since = Instant::now();
            frame_since = Some(since);
            if let Some(d) = deadline(quiet_since, frame_since) {
                if d < timer.deadline().into_std() {
                    timer.as_mut().reset(d.into());
                }
            }
        }
        let timed = opts.idle_timeout.is_some() || opts.frame_timeout.is_some();
        tokio::select! {
            r = super::read_frames(&mut rd, &mut buf, &decoder), if blocked.is_none() => match r {
                Ok(0) => {
                    gone.cancel();
                    break 'conn;
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(%remote, "read failed: {e}");
                    gone.cancel();
                    break 'conn;
                }
            },
            _ = held.room(), if blocked == Some(MAX_UNWRITTEN) => {}
            // Waits for a permit without taking it; the decode loop takes it.
            _ = limit.acquire(), if blocked == Some(MAX_IN_FLIGHT) => {}
            _ = &mut stopped => break 'conn,
            d = &mut closing => {
                info!(%remote, peer = %peer, verdict = d.verdict.name(), "closing: {}", d.message);
                gone.cancel();
                break 'conn;
            }
            _ = &mut timer, if timed => {
                let now = Instant::now();
                if opts.frame_timeout.zip(frame_since).is_some_and(|(d, since)| now >= since + d) {
                    info!(%remote, peer = %peer, "closing: a frame did not arrive whole within the frame timeout");
                    telemetry::connection_closed_by_limit(SCOPE, "frame_timeout");
                    break 'conn;
                }
                if opts.idle_timeout.is_some_and(|d| now >= quiet_since + d) {
                    let progress = held.progress();
                    if held.running.load(Ordering::Acquire) == 0 && progress == progress_then {
                        debug!(%remote, "closing idle connection");
                        telemetry::connection_closed_by_limit(SCOPE, "idle_timeout");
                        break 'conn;
                    }
                    quiet_since = now;
                    progress_then = progress;
                }
                let next = deadline(quiet_since, frame_since).unwrap_or(now + Duration::from_secs(3600));
                timer.as_mut().reset(next.into());
            }
        }
    }
    // Let calls already dispatched answer, and their answers be written, before the write side
    // closes; a peer that stopped reading gets no longer than the grace.
    drop(permit);
    let drain_by = tokio::time::Instant::now() + opts.shutdown_grace;
    let drained = tokio::time::timeout_at(drain_by, limit.acquire_many(max_in_flight as u32)).await.is_ok();
    drop(tx);
    if !drained || tokio::time::timeout_at(drain_by, &mut writer).await.is_err() {
        debug!(%remote, "closing with answers unwritten");
        writer.abort();
    }
    gone.cancel();
}

/// Resolves when this connection must close (its peer is no longer trusted, or a certificate
/// it was verified with expired); never while it may stay open.
async fn must_close(signal: &mut Option<crate::tls::tracker::CloseSignal>) -> crate::tls::verify::Diagnosis {
    match signal {
        Some(s) => s.wait().await,
        None => std::future::pending().await,
    }
}

/// An answer as it waits to be written: in one buffer of its own. A handler's payload may be
/// a slice of the connection's read buffer (an echo's is), and an answer waits for as long as
/// its peer does not read; kept as a piece it would hold that whole buffer, which the
/// unwritten-bytes budget, counting the answer's own bytes, does not see.
fn encode_answer(frame: &Frame) -> Result<Encoded, crate::wire::EncodeError> {
    frame.to_bytes().map(Encoded::from)
}

fn send(tx: &Sender<Outgoing>, frame: Frame, mut charge: Charge) {
    match encode_answer(&frame) {
        Ok(bytes) => {
            charge.answered(bytes.len());
            // When the writer is gone the answer comes back here and its charge is released.
            let _ = tx.send(Outgoing { bytes, _charge: charge });
        }
        Err(e) => warn!("cannot encode response: {e}"),
    }
}

/// Writes queued responses; the write side is closed (close_notify) once the queue ends.
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: Receiver<Outgoing>, held: Arc<Held>) {
    let progressed = || {
        held.progress.fetch_add(1, Ordering::Release);
    };
    if super::write_queued(&mut wr, &mut rx, progressed).await.is_ok() {
        let _ = wr.shutdown().await;
    }
}

fn dispatch(
    frame: Frame,
    peer: &Arc<PeerIdentity>,
    shared: &Arc<Shared>,
    tx: &Sender<Outgoing>,
    gone: &CancellationToken,
    charge: Charge,
) {
    let cid = frame.meta.correlation_id.unwrap_or(0);
    // Calls refused before their method is resolved are counted without the names the peer
    // sent, which a peer could vary without limit.
    let fail = |code: i32, text: &str, charge: Charge| {
        telemetry::call(Role::Server, "(unknown)", "(unknown)", code);
        send(tx, response_frame(cid, Err((code, shared.error_text(code, text)))), charge);
    };
    if shared.stopping.load(Ordering::Acquire) {
        return fail(codes::ELOGOFF, "Server is stopping", charge);
    }
    let Some(req) = frame.meta.request.as_ref() else {
        return fail(codes::EREQUEST, "frame carries no request meta (is this a response?)", charge);
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
            charge,
        );
    }
    if let Err(e) = frame.verify_checksum() {
        return fail(codes::EREQUEST, &format!("request checksum rejected: {e}"), charge);
    }
    let service = req.service_name.as_deref().unwrap_or("");
    let method = req.method_name.as_deref().unwrap_or("");
    let (full, handler) = match shared.registry.resolve(service, method) {
        Resolved::Found(full, h) => (full, h.clone()),
        Resolved::NoService(t) => return fail(codes::ENOSERVICE, &t, charge),
        Resolved::NoMethod(t) => return fail(codes::ENOMETHOD, &t, charge),
    };
    let metadata = crate::authz::CallMetadata {
        log_id: req.log_id,
        request_id: req.request_id.as_deref(),
        timeout_ms: req.timeout_ms,
        authentication_data: frame.meta.authentication_data.as_deref(),
    };
    if let Err(r) = crate::authz::authorize_call(&shared.policy, peer, full, &[], method, metadata, "server") {
        telemetry::call(Role::Server, full, method, r.code);
        send(tx, response_frame(cid, Err((r.code, shared.error_text(r.code, &r.text)))), charge);
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
        authentication_data: frame.meta.authentication_data,
        payload: frame.payload,
        attachment: frame.attachment,
        peer: peer.clone(),
        cancelled: gone.clone(),
    };
    let (service_name, method_name) = (request.service.clone(), request.method.clone());
    let shared = shared.clone();
    let tx = tx.clone();
    shared.in_flight.fetch_add(1, Ordering::AcqRel);
    charge.held.running.fetch_add(1, Ordering::AcqRel);
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
        let held = charge.held.clone();
        send(&tx, frame, charge);
        held.running.fetch_sub(1, Ordering::AcqRel);
        if shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.drained.notify_waiters();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// An answer whose payload is a slice of a large buffer keeps none of that buffer: the
    /// budget charges an answer its own length, so that must be all it holds.
    #[test]
    fn an_answer_holds_only_its_own_bytes() {
        let big = Bytes::from(vec![7u8; 4 << 20]);
        let payload = big.slice(1 << 20..(1 << 20) + (64 << 10));
        let frame = crate::rpc::response_frame(1, Ok(crate::rpc::Response { payload, attachment: Bytes::new() }));
        let encoded = encode_answer(&frame).unwrap();
        assert_eq!(encoded.len(), frame.encoded_len());
        let range = big.as_ptr() as usize..big.as_ptr() as usize + big.len();
        for piece in encoded.pieces() {
            assert!(!range.contains(&(piece.as_ptr() as usize)), "an answer piece points into the handler's buffer");
        }
    }
}
