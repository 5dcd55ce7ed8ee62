//! Proxy mode: mTLS for services that cannot change their code.
//!
//! - **Server side** ([`Mode::Server`]): accept mTLS, verify and authorize the peer with the
//!   route's profile, forward the plaintext stream to a local upstream (TCP or Unix socket).
//!   With `protocol = baidu_std`, every request frame's `authentication_data` is replaced by an
//!   identity token ([`token`]) naming the verified caller, so a brpc service learns it through
//!   its Authenticator. With `proxy_protocol`, a PROXY protocol v2 header carrying the peer
//!   identity in TLVs goes first (for go-micro, HTTP and other upstreams).
//! - **Client side** ([`Mode::Client`]): accept plaintext on loopback or a Unix socket, originate
//!   mTLS to the remote upstream (its name and, optionally, SPIFFE ID verified).
//!
//! Credentials come from a [`crate::credentials::CredentialStore`], so rotation applies.

pub mod config;
pub mod token;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::error::{Error, Verdict};
use crate::limits::{Admission, ConnectionLimits, Handshaking};
use crate::telemetry;
use crate::tls::identity::PeerIdentity;
use crate::tls::{ClientTls, ServerTls};
use crate::wire::{Decoder, DEFAULT_MAX_BODY};

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
}

impl Route {
    /// A plain TCP route (no identity token, no PROXY header, 5 s upstream connect timeout).
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
        }
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
    let listener = match &route.listen {
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::config(format!("route {}: cannot listen on {addr}: {e}", route.name)))?;
            let local = l.local_addr().map_err(|e| Error::config(e.to_string()))?;
            if route.mode() == Mode::Client && !local.ip().is_loopback() {
                return Err(Error::config(format!(
                    "route {}: a client-side route accepts plaintext, so it listens on loopback or a Unix \
                     socket only, not {addr}",
                    route.name
                )));
            }
            Listener::Tcp(l)
        }
        Endpoint::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).map_err(|e| {
                Error::config(format!("route {}: cannot listen on {}: {e}", route.name, path.display()))
            })?;
            Listener::Unix(l, path.clone())
        }
    };
    let local = match &listener {
        Listener::Tcp(l) => Endpoint::Tcp(l.local_addr().map_err(|e| Error::config(e.to_string()))?.to_string()),
        Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
    };
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

async fn connect_upstream(route: &Route) -> Result<BoxIo, Error> {
    let fail = |e: std::io::Error| Error::transport(format!("upstream {} unreachable: {e}", route.upstream));
    let timeout = |_| Error::Timeout {
        after: route.connect_timeout,
        message: format!("connecting to upstream {}", route.upstream),
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

async fn serve(route: &Route, downstream: BoxIo, remote: &str, slot: Handshaking) {
    let result = match &route.tls {
        RouteTls::Server(tls) => serve_server_side(route, tls, downstream, remote, slot).await,
        RouteTls::Client(tls) => serve_client_side(route, tls, downstream, slot).await,
    };
    match result {
        Ok(()) => telemetry::proxy_stream(&route.name, "completed"),
        Err((stage, e)) => {
            telemetry::proxy_stream(&route.name, stage);
            info!(route = %route.name, %remote, stage, verdict = e.verdict().map(Verdict::name).unwrap_or(""), "{e}");
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
    let guard = tls.tracker.register(info.peer_chain.clone(), None, info.peer.clone(), info.our_not_after);
    let mut close_signal = guard.close_signal();
    let mut stream = stream;
    let mut upstream = match connect_upstream(route).await {
        Ok(u) => u,
        Err(e) => {
            // A clean close for the client, not a hang.
            let _ = stream.shutdown().await;
            return Err(("upstream_error", e));
        }
    };
    if route.proxy_protocol {
        let header = proxy_v2_header(&info.peer, remote);
        upstream.write_all(&header).await.map_err(|e| ("upstream_error", Error::transport(e.to_string())))?;
    }
    let forward = async {
        match (route.protocol, &route.token_key) {
            (Protocol::BaiduStd, Some((kid, secret))) => {
                let token = token::issue(&info.peer, kid, secret);
                inject(stream, upstream, token.into_bytes()).await
            }
            _ => splice(stream, upstream).await,
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
        Endpoint::Unix(_) => return Err(("config", Error::config("a client-side route's upstream is a TCP address"))),
    };
    let (stream, _info) =
        crate::transport::connect(tls, &addr, route.connect_timeout).await.map_err(|e| ("upstream_error", e))?;
    let _slot = slot.established().map_err(refused)?;
    splice(downstream, stream).await
}

/// Copies both ways until both sides have finished (half-closes are passed on).
async fn splice(a: impl AsyncRead + AsyncWrite + Unpin, b: impl AsyncRead + AsyncWrite + Unpin) -> Outcome {
    let (mut a, mut b) = (a, b);
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 * 1024, 64 * 1024)
        .await
        .map(|_| ())
        .map_err(|e| ("io", Error::transport(e.to_string())))
}

/// baidu_std, client to upstream: every request frame's `authentication_data` becomes `token`
/// (whatever the client sent there is dropped). Upstream to client: bytes as they come.
async fn inject(client: impl AsyncRead + AsyncWrite + Unpin, upstream: BoxIo, token: Vec<u8>) -> Outcome {
    let token = bytes::Bytes::from(token);
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (mut urd, mut uwr) = tokio::io::split(upstream);
    let up = async {
        let mut decoder = Decoder::new(DEFAULT_MAX_BODY);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut out = BytesMut::with_capacity(16 * 1024);
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(mut frame)) => {
                        if frame.meta.request.is_some() {
                            frame.meta.authentication_data = Some(token.clone());
                        }
                        frame.encode(&mut out).map_err(|e| ("protocol", Error::Protocol { message: e.to_string() }))?;
                    }
                    Ok(None) => break,
                    Err(e) => return Err(("protocol", Error::Protocol { message: format!("client sent {e}") })),
                }
            }
            if !out.is_empty() {
                uwr.write_all(&out).await.map_err(|e| ("io", Error::transport(e.to_string())))?;
                out.clear();
            }
            match crd.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = uwr.shutdown().await;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => return Err(("io", Error::transport(e.to_string()))),
            }
        }
    };
    let down = async {
        tokio::io::copy(&mut urd, &mut cwr).await.map_err(|e| ("io", Error::transport(e.to_string())))?;
        let _ = cwr.shutdown().await;
        Ok(())
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

/// PROXY protocol v2 TLV types in the application range carrying the peer identity.
pub const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;
pub const PP2_TYPE_FINGERPRINT: u8 = 0xE1;
pub const PP2_TYPE_NOT_AFTER: u8 = 0xE2;
/// Standard PP2_TYPE_SSL with the client-certificate-verified flags.
const PP2_TYPE_SSL: u8 = 0x20;

/// A PROXY protocol v2 header: PROXY command, the client's address when it is a TCP address,
/// PP2_TYPE_SSL (verified client certificate) and the identity TLVs above.
pub fn proxy_v2_header(peer: &PeerIdentity, remote: &str) -> Vec<u8> {
    let mut tlvs = Vec::new();
    let mut tlv = |t: u8, v: &[u8]| {
        tlvs.push(t);
        tlvs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        tlvs.extend_from_slice(v);
    };
    // client: PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS; verify = 0 (ok).
    tlv(PP2_TYPE_SSL, &[0x07, 0, 0, 0, 0]);
    if let Some(id) = &peer.spiffe_id {
        tlv(PP2_TYPE_SPIFFE_ID, id.as_bytes());
    }
    tlv(PP2_TYPE_FINGERPRINT, peer.fingerprint_sha256.as_bytes());
    let na = peer.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    tlv(PP2_TYPE_NOT_AFTER, na.to_string().as_bytes());

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
    out.extend_from_slice(&((addrs.len() + tlvs.len()) as u16).to_be_bytes());
    out.extend_from_slice(&addrs);
    out.extend_from_slice(&tlvs);
    out
}
