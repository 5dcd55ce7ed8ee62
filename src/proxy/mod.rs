//! Proxy mode: mTLS for services that cannot change their code.
//!
//! - **Server side** ([`Mode::Server`]): accept mTLS, verify and authorize the peer with the
//!   route's profile, forward the plaintext stream to a local upstream (TCP or Unix socket).
//!   With `protocol = baidu_std`, every frame from the client must be a request: its call is
//!   authorized by the profile's method rules ([`crate::authz::authorize_call`], scope = the
//!   route's name) and a refused call is answered by the route itself (ERPCAUTH) without
//!   reaching the upstream; an allowed one goes on with its `authentication_data` replaced by an
//!   identity token ([`token`]) naming the verified caller, so a brpc service learns it through
//!   its Authenticator. A frame without request meta closes the connection, so the first frame
//!   the upstream sees on a connection always carries our token. If the upstream cannot be
//!   reached, the requests are answered with EFAILEDSOCKET. A `tcp` route cannot read calls, so
//!   it refuses to start when its profile has method rules. With `proxy_protocol`, a PROXY
//!   protocol v2 header carrying the peer identity in TLVs goes first (for go-micro, HTTP and
//!   other upstreams).
//! - **Client side** ([`Mode::Client`]): accept plaintext on loopback or a Unix socket, originate
//!   mTLS to the remote upstream (its name and, optionally, SPIFFE ID verified).
//!
//! Credentials come from a [`crate::credentials::CredentialStore`], so rotation applies.
//!
//! A Unix listen path is replaced only when it is a stale socket (nobody accepts on it); the
//! socket gets the route's `listen_mode` (owner and group read/write by default) before anyone
//! can connect to it.

pub mod config;
pub mod token;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::error::{codes, Error, Verdict};
use crate::limits::{Admission, ConnectionLimits, Handshaking};
use crate::telemetry;
use crate::tls::identity::PeerIdentity;
use crate::tls::policy::Policy;
use crate::tls::{ClientTls, ServerTls};
use crate::wire::{Decoder, Frame, DEFAULT_MAX_BODY, HEADER_LEN, MAGIC};

/// Which way a route carries TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// mTLS in, plaintext to the upstream.
    Server,
    /// Plaintext in (loopback or Unix socket only), mTLS to the upstream.
    Client,
}

/// What flows through a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Bytes, untouched.
    Tcp,
    /// brpc's baidu_std: request frames get the identity token (server side).
    BaiduStd,
}

/// A TCP address or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    pub fn parse(s: &str) -> Endpoint {
        match s.strip_prefix("unix:") {
            Some(p) => Endpoint::Unix(PathBuf::from(p)),
            None => Endpoint::Tcp(s.to_string()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The TLS side of a route.
#[derive(Clone, Debug)]
pub enum RouteTls {
    Server(ServerTls),
    Client(ClientTls),
}

/// One route: where to listen, where to forward, and how.
#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub listen: Endpoint,
    pub upstream: Endpoint,
    pub tls: RouteTls,
    pub protocol: Protocol,
    /// Server side, baidu_std: (key id, secret) for identity tokens.
    pub token_key: Option<(String, Vec<u8>)>,
    /// Server side: send a PROXY protocol v2 header with the peer identity first.
    pub proxy_protocol: bool,
    pub connect_timeout: Duration,
    /// Server side, baidu_std: the maximum token age the upstream's verifier is given; a
    /// connection's token is re-issued once it is a fifth of this old.
    pub token_max_age: Duration,
    /// Permission bits of a Unix listen socket (owner and group read/write by default).
    pub listen_mode: u32,
}

/// A Unix listen socket's default mode: owner and group may connect, others may not.
pub const DEFAULT_LISTEN_MODE: u32 = 0o660;

impl Route {
    /// A plain TCP route (no identity token, no PROXY header, 5 s upstream connect timeout,
    /// tokens for verifiers with [`token::DEFAULT_MAX_AGE`], Unix sockets [`DEFAULT_LISTEN_MODE`]).
    pub fn new(name: impl Into<String>, listen: Endpoint, upstream: Endpoint, tls: RouteTls) -> Route {
        Route {
            name: name.into(),
            listen,
            upstream,
            tls,
            protocol: Protocol::Tcp,
            token_key: None,
            proxy_protocol: false,
            connect_timeout: Duration::from_secs(5),
            token_max_age: token::DEFAULT_MAX_AGE,
            listen_mode: DEFAULT_LISTEN_MODE,
        }
    }

    /// Refuses settings the route could not honour, before it listens: a route must never look
    /// as if it enforced something it does not.
    fn check(&self) -> Result<(), Error> {
        let err = |m: &str| Err(Error::config(format!("route {}: {m}", self.name)));
        match (&self.tls, self.protocol) {
            (RouteTls::Server(tls), Protocol::Tcp) if !tls.policy().rules.is_empty() => {
                return err(
                    "the profile has [[policy.rules]], which a tcp route cannot enforce (it does not read calls); \
                     use protocol = \"baidu_std\" in front of a brpc upstream, or remove the rules",
                )
            }
            (RouteTls::Server(tls), Protocol::Tcp) if tls.policy().hooks.call.is_some() => {
                return err(
                    "a call hook is set, which a tcp route cannot run (it does not read calls); use protocol = \
                     \"baidu_std\" in front of a brpc upstream",
                )
            }
            (RouteTls::Server(_), Protocol::BaiduStd) if self.token_key.is_none() => {
                return err("a server-side baidu_std route needs identity_key_id and identity_key_file")
            }
            (RouteTls::Client(_), _) if matches!(self.upstream, Endpoint::Unix(_)) => {
                return err("a client-side route's upstream is a TCP address (host:port), not a unix: path")
            }
            _ => {}
        }
        if self.token_max_age < Duration::from_secs(5) {
            return err("the identity token max age must be at least 5 seconds");
        }
        if self.listen_mode & !0o777 != 0 {
            return err(&format!("listen_mode {:o} has bits beyond the permission bits (0777)", self.listen_mode));
        }
        Ok(())
    }

    fn mode(&self) -> Mode {
        match self.tls {
            RouteTls::Server(_) => Mode::Server,
            RouteTls::Client(_) => Mode::Client,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Pin<Box<dyn Io>>;

enum Listener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(BoxIo, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::pin(s), a.to_string()))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                Ok((Box::pin(s), format!("unix:{}", p.display())))
            }
        }
    }
}

/// A running route.
pub struct RunningProxy {
    name: String,
    local: Endpoint,
    stop: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    accept: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    /// Where the route listens (with the bound port when port 0 was asked for).
    pub fn local(&self) -> &Endpoint {
        &self.local
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Streams open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Graceful drain: stop accepting, let open streams finish until `deadline` passes, then
    /// close what remains.
    pub async fn shutdown(self, deadline: Duration) {
        self.accept.abort();
        let until = Instant::now() + deadline;
        while self.active.load(Ordering::Acquire) > 0 {
            let idle = self.idle.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(until.into(), idle).await.is_err() {
                warn!(route = %self.name, open = self.active(), "drain deadline passed; closing open streams");
                break;
            }
        }
        let _ = self.stop.send(true);
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = self.stop.send(true);
    }
}

/// Starts a route with the default [`ConnectionLimits`].
pub async fn start(route: Route) -> Result<RunningProxy, Error> {
    start_with_limits(route, ConnectionLimits::default()).await
}

/// Starts a route whose accepted sockets are held to `limits` (counted under the route's name).
pub async fn start_with_limits(route: Route, limits: ConnectionLimits) -> Result<RunningProxy, Error> {
    route.check()?;
    let listener = match &route.listen {
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::config(format!("route {}: cannot listen on {addr}: {e}", route.name)))?;
            let local = l.local_addr().map_err(|e| Error::config(format!("route {}: {e}", route.name)))?;
            if route.mode() == Mode::Client && !local.ip().is_loopback() {
                return Err(Error::config(format!(
                    "route {}: a client-side route accepts plaintext, so it listens on loopback or a Unix \
                     socket only, not {addr}",
                    route.name
                )));
            }
            Listener::Tcp(l)
        }
        Endpoint::Unix(path) => Listener::Unix(bind_unix(&route, path)?, path.clone()),
    };
    let local = match &listener {
        Listener::Tcp(l) => {
            Endpoint::Tcp(l.local_addr().map_err(|e| Error::config(format!("route {}: {e}", route.name)))?.to_string())
        }
        Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
    };
    // The bound address, as the route's own answers name it (`[addr][E1004]…`).
    let mut route = route;
    route.listen = local.clone();
    let (stop, stop_rx) = watch::channel(false);
    let active = Arc::new(AtomicUsize::new(0));
    let idle = Arc::new(Notify::new());
    let route = Arc::new(route);
    let admission = Admission::new(route.name.clone(), limits);
    let accept = {
        let (active, idle, route) = (active.clone(), idle.clone(), route.clone());
        tokio::spawn(async move {
            loop {
                let (io, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(route = %route.name, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Unix-socket peers have no address: they count toward the totals only.
                let source = remote.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
                let slot = match admission.admit(source) {
                    Ok(slot) => slot,
                    Err(full) => {
                        // Closed at once, so it does not hold up the sockets behind it.
                        debug!(route = %route.name, %remote, limit = full.name(), "connection refused: {full} reached");
                        continue;
                    }
                };
                active.fetch_add(1, Ordering::AcqRel);
                let (active, idle, route, mut stop_rx) = (active.clone(), idle.clone(), route.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(&route, io, &remote, slot) => {}
                        _ = stop_rx.wait_for(|s| *s) => debug!(route = %route.name, %remote, "closed by shutdown"),
                    }
                    if active.fetch_sub(1, Ordering::AcqRel) == 1 {
                        idle.notify_waiters();
                    }
                });
            }
        })
    };
    info!(route = %route.name, listen = %local, upstream = %route.upstream, "proxy route started");
    Ok(RunningProxy { name: route.name.clone(), local, stop, active, idle, accept })
}

/// Binds a Unix listen socket at `path` with the route's mode. Only a stale socket (one nobody
/// accepts on) is replaced; anything else there is refused, so a typo cannot delete a file or
/// steal another process's socket. The socket is bound in a private directory beside `path`,
/// given its mode, and only then linked into place, so nobody can connect to it while it still
/// has the umask's mode.
fn bind_unix(route: &Route, path: &Path) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let err = |m: String| Error::config(format!("route {}: unix:{}: {m}", route.name, path.display()));
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(err("a live socket: another process accepts on it (is the proxy running already?)".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
                info!(route = %route.name, path = %path.display(), "removed a stale socket nobody accepted on");
            }
            Err(e) => return Err(err(format!("a socket that cannot be probed ({e}); remove it if it is stale"))),
        },
        Ok(meta) => {
            let what = if meta.is_dir() {
                "a directory"
            } else if meta.file_type().is_symlink() {
                "a symbolic link"
            } else if meta.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            return Err(err(format!("the path exists and is {what}; remove it or choose another listen path")));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(format!("cannot inspect the path: {e}"))),
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    static STAGING: AtomicUsize = AtomicUsize::new(0);
    let staging = parent.join(format!(".tw-{}-{}", std::process::id(), STAGING.fetch_add(1, Ordering::Relaxed)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", parent.display())))?;
    let bind = || -> Result<std::os::unix::net::UnixListener, String> {
        let tmp = staging.join("s");
        let l = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| format!("cannot listen: {e}"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(route.listen_mode))
            .map_err(|e| format!("cannot set mode {:o}: {e}", route.listen_mode))?;
        // A link, not a rename: it fails instead of replacing what appeared at the path since.
        std::fs::hard_link(&tmp, path).map_err(|e| format!("cannot listen: {e}"))?;
        l.set_nonblocking(true).map_err(|e| format!("cannot listen: {e}"))?;
        Ok(l)
    };
    let bound = bind();
    let _ = std::fs::remove_dir_all(&staging);
    let l = bound.map_err(err)?;
    tokio::net::UnixListener::from_std(l).map_err(|e| err(format!("cannot listen: {e}")))
}

async fn connect_upstream(route: &Route) -> Result<BoxIo, Error> {
    let fail = |e: std::io::Error| {
        Error::transport(format!("route {}: upstream {} unreachable: {e}", route.name, route.upstream))
    };
    let timeout = |_| Error::Timeout {
        after: route.connect_timeout,
        message: format!("route {}: connecting to upstream {}", route.name, route.upstream),
    };
    match &route.upstream {
        Endpoint::Tcp(a) => {
            let s = tokio::time::timeout(route.connect_timeout, TcpStream::connect(a))
                .await
                .map_err(timeout)?
                .map_err(fail)?;
            let _ = s.set_nodelay(true);
            Ok(Box::pin(s))
        }
        Endpoint::Unix(p) => Ok(Box::pin(
            tokio::time::timeout(route.connect_timeout, tokio::net::UnixStream::connect(p))
                .await
                .map_err(timeout)?
                .map_err(fail)?,
        )),
    }
}

/// Connects to the upstream and writes the PROXY v2 header when the route sends one. The header
/// is built first, so a peer it cannot describe never opens an upstream connection.
async fn open_upstream(route: &Route, peer: &PeerIdentity, remote: &str) -> Result<BoxIo, (&'static str, Error)> {
    let header = match route.proxy_protocol {
        true => Some(proxy_v2_header(peer, remote).map_err(|e| ("proxy_header", in_route(route, e)))?),
        false => None,
    };
    let mut upstream = connect_upstream(route).await.map_err(|e| ("upstream_error", e))?;
    if let Some(header) = header {
        upstream.write_all(&header).await.map_err(|e| {
            (
                "upstream_error",
                Error::transport(format!("route {}: writing the PROXY header upstream: {e}", route.name)),
            )
        })?;
    }
    Ok(upstream)
}

/// `e` with the route's name in front of its message, so whoever reads it knows which route.
fn in_route(route: &Route, e: Error) -> Error {
    in_route_name(&route.name, e)
}

fn in_route_name(route: &str, e: Error) -> Error {
    let named = |m: String| format!("route {route}: {m}");
    match e {
        Error::Config { message } => Error::Config { message: named(message) },
        Error::Transport { message } => Error::Transport { message: named(message) },
        Error::Protocol { message } => Error::Protocol { message: named(message) },
        Error::Timeout { after, message } => Error::Timeout { after, message: named(message) },
        Error::Credentials { verdict, message } => Error::Credentials { verdict, message: named(message) },
        other => other,
    }
}

async fn serve(route: &Route, downstream: BoxIo, remote: &str, slot: Handshaking) {
    let result = match &route.tls {
        RouteTls::Server(tls) => serve_server_side(route, tls, downstream, remote, slot).await,
        RouteTls::Client(tls) => serve_client_side(route, tls, downstream, slot).await,
    };
    match result {
        Ok(()) => telemetry::proxy_stream(&route.name, "completed"),
        Err((stage, e)) => {
            telemetry::proxy_stream(&route.name, stage);
            let verdict = e.verdict().map(Verdict::name).unwrap_or("");
            if stage == "upstream_error" {
                warn!(route = %route.name, %remote, stage, verdict, "{e}");
            } else {
                info!(route = %route.name, %remote, stage, verdict, "{e}");
            }
        }
    }
}

type Outcome = Result<(), (&'static str, Error)>;

/// A verified stream that found the route's `max_connections` full (counted by the admission).
fn refused(full: crate::limits::Refused) -> (&'static str, Error) {
    ("refused", Error::transport(format!("connection closed: {full} reached")))
}

async fn serve_server_side(
    route: &Route,
    tls: &ServerTls,
    downstream: BoxIo,
    remote: &str,
    slot: Handshaking,
) -> Outcome {
    let (stream, info) =
        crate::transport::accept_on(tls, downstream, remote).await.map_err(|e| ("handshake_refused", e))?;
    let _slot = slot.established().map_err(refused)?;
    let guard = match tls.tracker.register(
        info.generation,
        info.peer_chain.clone(),
        None,
        info.peer.clone(),
        info.our_not_after,
    ) {
        Ok(guard) => guard,
        Err(d) => {
            // Trust changed while the handshake finished: nothing is forwarded.
            info!(route = %route.name, %remote, peer = %info.peer, verdict = d.verdict.name(), "closing the stream: {}", d.message);
            return Ok(());
        }
    };
    let mut close_signal = guard.close_signal();
    let forward = async {
        match (route.protocol, &route.token_key) {
            (Protocol::BaiduStd, Some((kid, secret))) => {
                let signer = token::Signer::new(&info.peer, kid, secret, &route.name, route.token_max_age);
                let calls = Calls { route, policy: tls.policy(), peer: &info.peer, remote };
                serve_baidu_std(&calls, signer, stream).await
            }
            _ => {
                let mut stream = stream;
                match open_upstream(route, &info.peer, remote).await {
                    Ok(upstream) => splice(stream, upstream).await,
                    Err(e) => {
                        // A clean close for the client, not a hang.
                        let _ = stream.shutdown().await;
                        Err(e)
                    }
                }
            }
        }
    };
    tokio::select! {
        r = forward => r,
        d = close_signal.wait() => {
            info!(route = %route.name, %remote, peer = %info.peer, verdict = d.verdict.name(), "closing the stream: {}", d.message);
            Ok(())
        }
    }
}

async fn serve_client_side(route: &Route, tls: &ClientTls, downstream: BoxIo, slot: Handshaking) -> Outcome {
    let addr = match &route.upstream {
        Endpoint::Tcp(a) => a.clone(),
        // Route::check refuses this before the route listens.
        Endpoint::Unix(_) => return Err(("config", in_route(route, Error::config("the upstream must be host:port")))),
    };
    let (stream, info) = crate::transport::connect(tls, &addr, route.connect_timeout)
        .await
        .map_err(|e| ("upstream_error", in_route(route, e)))?;
    let _slot = slot.established().map_err(refused)?;
    // Tracked like every verified connection: closed when trust refuses the server, or when
    // its certificate (or ours) expires.
    let guard =
        crate::transport::track_client(tls, &addr, &info).map_err(|e| ("upstream_error", in_route(route, e)))?;
    let mut close_signal = guard.close_signal();
    tokio::select! {
        r = splice(downstream, stream) => r,
        d = close_signal.wait() => {
            info!(route = %route.name, peer = %info.peer, verdict = d.verdict.name(), "closing the stream: {}", d.message);
            Ok(())
        }
    }
}

/// Copies both ways until both sides have finished (half-closes are passed on).
async fn splice(a: impl AsyncRead + AsyncWrite + Unpin, b: impl AsyncRead + AsyncWrite + Unpin) -> Outcome {
    let (mut a, mut b) = (a, b);
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 * 1024, 64 * 1024)
        .await
        .map(|_| ())
        .map_err(|e| ("io", Error::transport(e.to_string())))
}

/// What a baidu_std route needs to decide about one connection's calls.
struct Calls<'a> {
    route: &'a Route,
    policy: &'a Policy,
    peer: &'a PeerIdentity,
    remote: &'a str,
}

impl Calls<'_> {
    /// A response the route writes itself, in brpc's error_text shape (`[addr][E<code>]text`).
    fn answer(&self, correlation_id: i64, code: i32, text: &str) -> ToClient {
        let text = format!("[{}][E{code}]{text}", self.route.listen);
        let frame = crate::rpc::response_frame(correlation_id, Err((code, text)));
        // A response frame with a short text always fits the 32-bit size fields.
        ToClient::Frame(frame.to_bytes().unwrap_or_default())
    }
}

/// What the client-bound writer is handed: a frame the route answers itself, or the upstream's
/// read half once the upstream is connected.
enum ToClient {
    Frame(Bytes),
    Upstream(ReadHalf<BoxIo>),
}

/// Answers the route writes itself that may wait for the client to read. Each is small (a
/// response with a text cut to a bounded size), so this bounds what a client that never reads
/// can make the route hold; when it is full the route stops reading the client.
const LOCAL_ANSWERS_QUEUED: usize = 64;

/// Client to upstream, baidu_std: every frame must be a request; each call is authorized, then
/// forwarded with its `authentication_data` replaced by our token, or answered by the route.
/// Upstream to client: whole frames, so a local answer never lands inside an upstream frame.
async fn serve_baidu_std<S>(calls: &Calls<'_>, signer: token::Signer<'_>, client: S) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (crd, cwr) = tokio::io::split(client);
    let (tx, rx) = mpsc::channel(LOCAL_ANSWERS_QUEUED);
    let up = from_client(calls, signer, crd, tx);
    let down = to_client(&calls.route.name, cwr, rx);
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => match r {
            Err(e) => Err(e),
            // The answers queued for the client still go out before the connection closes.
            Ok(ended) => {
                let d = down.await;
                match ended {
                    Some(e) => Err(e),
                    None => d,
                }
            }
        },
        r = &mut down => {
            r?;
            up.await.map(|_| ())
        }
    }
}

/// Reads the client's frames until it half-closes. `Ok(Some(e))` ends the connection with that
/// outcome after the answers already queued are delivered (the upstream could not be reached);
/// `Err` ends it at once (the client broke the protocol).
async fn from_client<R: AsyncRead + Unpin>(
    calls: &Calls<'_>,
    mut signer: token::Signer<'_>,
    mut crd: R,
    tx: mpsc::Sender<ToClient>,
) -> Result<Option<(&'static str, Error)>, (&'static str, Error)> {
    let route = calls.route;
    let protocol = |m: String| ("protocol", Error::Protocol { message: format!("route {}: {m}", route.name) });
    let io = |e: std::io::Error| ("io", Error::transport(format!("route {}: upstream: {e}", route.name)));
    let mut decoder = Decoder::new(DEFAULT_MAX_BODY);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = Outbox::default();
    let mut upstream: Option<WriteHalf<BoxIo>> = None;
    let mut unreachable: Option<(&'static str, Error)> = None;
    loop {
        loop {
            let mut frame = match decoder.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(protocol(format!("client sent {e}"))),
            };
            let Some(req) = frame.meta.request.as_ref() else {
                // brpc authenticates a connection by its first message, whatever it holds, so a
                // frame we would not put our token into must not reach it.
                return Err(protocol(format!(
                    "the client sent a frame without request meta (correlation_id {}); closed so the upstream never \
                     sees it",
                    frame.meta.correlation_id.unwrap_or(0)
                )));
            };
            let cid = frame.meta.correlation_id.unwrap_or(0);
            let (service, method) =
                (req.service_name.as_deref().unwrap_or(""), req.method_name.as_deref().unwrap_or(""));
            // brpc resolves an unqualified service name itself; the call must pass under every
            // name the rules know it might resolve to.
            let aliases = match service.contains('.') || calls.policy.rules.is_empty() {
                true => Vec::new(),
                false => calls.policy.rule_services_named(service),
            };
            let metadata = crate::authz::CallMetadata {
                log_id: req.log_id,
                request_id: req.request_id.as_deref(),
                timeout_ms: req.timeout_ms,
                authentication_data: frame.meta.authentication_data.as_deref(),
            };
            if let Err(r) =
                crate::authz::authorize_call(calls.policy, calls.peer, service, &aliases, method, metadata, &route.name)
            {
                if tx.send(calls.answer(cid, r.code, &r.text)).await.is_err() {
                    return Ok(None);
                }
                continue;
            }
            if upstream.is_none() && unreachable.is_none() {
                match open_upstream(route, calls.peer, calls.remote).await {
                    Ok(io) => {
                        let (urd, uwr) = tokio::io::split(io);
                        if tx.send(ToClient::Upstream(urd)).await.is_err() {
                            return Ok(None);
                        }
                        upstream = Some(uwr);
                    }
                    Err(e) => unreachable = Some(e),
                }
            }
            if let Some((stage, e)) = &unreachable {
                let code = if *stage == "upstream_error" { codes::EFAILEDSOCKET } else { codes::EINTERNAL };
                if tx.send(calls.answer(cid, code, &e.to_string())).await.is_err() {
                    return Ok(None);
                }
                continue;
            }
            frame.meta.authentication_data = Some(signer.current());
            out.push(&frame).map_err(|e| protocol(format!("cannot forward a request: {e}")))?;
        }
        if let Some(uwr) = upstream.as_mut() {
            out.flush(uwr).await.map_err(io)?;
        }
        if unreachable.is_some() {
            // The requests received so far are answered; the client learns why and may retry.
            return Ok(unreachable);
        }
        match crd.read_buf(&mut buf).await {
            Ok(0) => {
                if let Some(uwr) = upstream.as_mut() {
                    let _ = uwr.shutdown().await;
                }
                return Ok(None);
            }
            Ok(_) => {}
            Err(e) => return Err(("io", Error::transport(format!("route {}: client: {e}", route.name)))),
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(decoder.wanted(&buf).max(16 * 1024));
        }
    }
}

/// Frames bound for the upstream. Small ones are gathered into one buffer (one write for many);
/// a large body is queued as it is, after its header and meta, never copied.
#[derive(Default)]
struct Outbox {
    small: BytesMut,
    parts: Vec<Bytes>,
}

impl Outbox {
    fn push(&mut self, frame: &Frame) -> Result<(), crate::wire::EncodeError> {
        frame.encode_head(&mut self.small)?;
        if frame.payload.len() + frame.attachment.len() < crate::wire::COPY_BODIES_BELOW {
            self.small.extend_from_slice(&frame.payload);
            self.small.extend_from_slice(&frame.attachment);
        } else {
            self.parts.push(self.small.split().freeze());
            self.parts.push(frame.payload.clone());
            if !frame.attachment.is_empty() {
                self.parts.push(frame.attachment.clone());
            }
        }
        Ok(())
    }

    async fn flush(&mut self, w: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        for part in self.parts.drain(..) {
            w.write_all(&part).await?;
        }
        if !self.small.is_empty() {
            w.write_all(&self.small).await?;
            self.small.clear();
        }
        // Upstreams are plain sockets today, where this does nothing; it is here because a
        // writer only promises its bytes are sent once flushed (a TLS stream holds back the
        // records its socket had no room for).
        w.flush().await
    }
}

/// Where the upstream's frames end in its byte stream, from their 12-byte headers alone (the
/// meta is not decoded, and a large frame is passed on as it arrives, never held whole).
#[derive(Default)]
struct FrameCut {
    /// Bytes of the current frame not yet passed on.
    left: usize,
}

impl FrameCut {
    /// True when everything passed on so far ends at a frame boundary.
    fn at_boundary(&self) -> bool {
        self.left == 0
    }

    /// How many bytes at the front of `buf` may be passed on now: whole frames and the part of
    /// a frame already begun, but not a header still incomplete.
    fn advance(&mut self, buf: &[u8]) -> Result<usize, String> {
        let mut at = 0;
        loop {
            let take = self.left.min(buf.len() - at);
            at += take;
            self.left -= take;
            if self.left > 0 {
                return Ok(at);
            }
            let rest = &buf[at..];
            if rest.len() < HEADER_LEN {
                return Ok(at);
            }
            if rest[..4] != MAGIC {
                return Err(format!("the upstream sent bytes that are not baidu_std (bad magic {:02x?})", &rest[..4]));
            }
            self.left = HEADER_LEN + u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        }
    }
}

/// The client's write side: the route's own answers and the upstream's frames, each written
/// whole. Ends when the upstream closes, or when no upstream came and no answer is left.
async fn to_client<W: AsyncWrite + Unpin>(
    route: &str,
    mut cwr: W,
    mut rx: mpsc::Receiver<ToClient>,
) -> Result<(), (&'static str, Error)> {
    let io = |e: std::io::Error| ("io", Error::transport(format!("route {}: client: {e}", route)));
    let mut upstream: Option<ReadHalf<BoxIo>> = None;
    let mut open = true;
    let mut cut = FrameCut::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            biased;
            m = rx.recv(), if open && cut.at_boundary() => match m {
                Some(ToClient::Frame(f)) => write_out(&mut cwr, &f).await.map_err(io)?,
                Some(ToClient::Upstream(u)) => upstream = Some(u),
                None if upstream.is_none() => break,
                None => open = false,
            },
            n = read_upstream(&mut upstream, &mut buf) => {
                let n = n.map_err(|e| ("io", Error::transport(format!("route {}: upstream: {e}", route))))?;
                if n == 0 {
                    break;
                }
                let ready = cut.advance(&buf).map_err(|m| ("protocol", Error::Protocol { message: format!("route {}: {m}", route) }))?;
                if ready > 0 {
                    write_out(&mut cwr, &buf[..ready]).await.map_err(io)?;
                    buf.advance(ready);
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(64 * 1024);
                }
            }
        }
    }
    let _ = cwr.shutdown().await;
    Ok(())
}

/// Writes `bytes` and flushes them. The client's stream is TLS: a write the socket has no room
/// for completes with its last records still held by the TLS stream, and the route may then wait
/// on the upstream for as long as it likes, so everything written is flushed before it does.
async fn write_out(w: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Reads from the upstream once there is one; pending until then.
async fn read_upstream(upstream: &mut Option<ReadHalf<BoxIo>>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match upstream {
        Some(u) => u.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// PROXY protocol v2 TLV types in the application range carrying the peer identity.
pub const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;
pub const PP2_TYPE_FINGERPRINT: u8 = 0xE1;
pub const PP2_TYPE_NOT_AFTER: u8 = 0xE2;
/// Standard PP2_TYPE_SSL with the client-certificate-verified flags.
const PP2_TYPE_SSL: u8 = 0x20;

/// A PROXY protocol v2 header: PROXY command, the client's address when it is a TCP address,
/// PP2_TYPE_SSL (verified client certificate) and the identity TLVs above.
///
/// Every length in the header is 16 bits: a value (a SPIFFE ID, say) or a header that does not
/// fit is refused, never written with a wrapped length the upstream would misread.
pub fn proxy_v2_header(peer: &PeerIdentity, remote: &str) -> Result<Vec<u8>, Error> {
    let mut tlvs = Vec::new();
    let mut tlv = |t: u8, name: &str, v: &[u8]| -> Result<(), Error> {
        let len = u16::try_from(v.len()).map_err(|_| Error::Protocol {
            message: format!(
                "cannot write the PROXY v2 header: the peer's {name} is {} bytes, more than a TLV holds ({})",
                v.len(),
                u16::MAX
            ),
        })?;
        tlvs.push(t);
        tlvs.extend_from_slice(&len.to_be_bytes());
        tlvs.extend_from_slice(v);
        Ok(())
    };
    // client: PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS; verify = 0 (ok).
    tlv(PP2_TYPE_SSL, "PP2_TYPE_SSL", &[0x07, 0, 0, 0, 0])?;
    if let Some(id) = &peer.spiffe_id {
        tlv(PP2_TYPE_SPIFFE_ID, "SPIFFE ID", id.as_bytes())?;
    }
    tlv(PP2_TYPE_FINGERPRINT, "fingerprint", peer.fingerprint_sha256.as_bytes())?;
    let na = peer.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    tlv(PP2_TYPE_NOT_AFTER, "not-after", na.to_string().as_bytes())?;

    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x21); // version 2, PROXY
    let addrs: Option<Vec<u8>> = match remote.parse::<std::net::SocketAddr>() {
        Ok(std::net::SocketAddr::V4(a)) => {
            out.push(0x11);
            let mut v = a.ip().octets().to_vec();
            v.extend_from_slice(&[0, 0, 0, 0]); // destination not tracked
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            Some(v)
        }
        Ok(std::net::SocketAddr::V6(a)) => {
            out.push(0x21);
            let mut v = a.ip().octets().to_vec();
            v.extend_from_slice(&[0; 16]);
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            Some(v)
        }
        Err(_) => {
            out.push(0x00); // AF_UNSPEC
            None
        }
    };
    let addrs = addrs.unwrap_or_default();
    let total = u16::try_from(addrs.len() + tlvs.len()).map_err(|_| Error::Protocol {
        message: format!(
            "cannot write the PROXY v2 header: addresses and TLVs take {} bytes, more than the header's length \
             field holds ({})",
            addrs.len() + tlvs.len(),
            u16::MAX
        ),
    })?;
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&addrs);
    out.extend_from_slice(&tlvs);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client-bound writer flushes: a writer that holds bytes until flushed (as a TLS stream
    /// holds the records its socket had no room for) still delivers every answer while the
    /// upstream stays open and quiet.
    #[tokio::test]
    async fn answers_reach_a_client_whose_stream_holds_writes_until_flushed() {
        let (client_end, route_end) = tokio::io::duplex(1 << 20);
        let (upstream_end, upstream_far) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel(4);
        let (_, cwr) = tokio::io::split(tokio::io::BufWriter::new(route_end));
        let writer = tokio::spawn(to_client("t", cwr, rx));
        let (urd, _uwr) = tokio::io::split(Box::pin(upstream_end) as BoxIo);
        let (_far_rd, mut far_wr) = tokio::io::split(upstream_far);

        let local = crate::rpc::response_frame(1, Err((1009, "local".into()))).to_bytes().unwrap();
        let upstream_frame = crate::rpc::response_frame(
            2,
            Ok(crate::rpc::Response { payload: Bytes::from_static(b"up"), attachment: Bytes::new() }),
        )
        .to_bytes()
        .unwrap();
        let (mut crd, _cwr) = tokio::io::split(client_end);

        // An answer of the route's own, with an upstream that is open and says nothing.
        tx.send(ToClient::Frame(local.clone())).await.unwrap();
        tx.send(ToClient::Upstream(urd)).await.unwrap();
        let mut got = vec![0u8; local.len()];
        tokio::time::timeout(Duration::from_secs(5), crd.read_exact(&mut got))
            .await
            .expect("the route's own answer arrives while the upstream is silent")
            .unwrap();
        assert_eq!(got, &local[..]);

        // Then an upstream frame, with nothing after it.
        far_wr.write_all(&upstream_frame).await.unwrap();
        let mut got = vec![0u8; upstream_frame.len()];
        tokio::time::timeout(Duration::from_secs(5), crd.read_exact(&mut got))
            .await
            .expect("the upstream's answer arrives while the upstream stays open")
            .unwrap();
        assert_eq!(got, &upstream_frame[..]);
        writer.abort();
    }
}
