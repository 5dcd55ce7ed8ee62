//! Accepting and opening mTLS connections: handshakes with deadlines and precise verdicts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Error, Side, Verdict};
use crate::telemetry::{self, Role};
use crate::tls::identity::PeerIdentity;
use crate::tls::verify::{handshake_error, Diagnosed, Diagnosis, Verified};
use crate::tls::{ClientTls, ServerTls};

mod read_ahead;

pub(crate) use read_ahead::{give_back, take_buffer};
pub use read_ahead::{ReadAhead, READ_AHEAD};

/// A client's TLS stream over `IO` (reads go through a [`ReadAhead`]).
pub type ClientStream<IO> = tokio_rustls::client::TlsStream<ReadAhead<IO>>;
/// A server's TLS stream over `IO` (reads go through a [`ReadAhead`]).
pub type ServerStream<IO> = tokio_rustls::server::TlsStream<ReadAhead<IO>>;

/// What a completed handshake negotiated, and who the peer is.
#[derive(Clone, Debug)]
pub struct HandshakeInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// e.g. `X25519`, `secp256r1`.
    pub kx_group: Option<String>,
    /// The server answered our first key share with a HelloRetryRequest (it wanted another
    /// group): one extra round trip.
    pub hello_retry: bool,
    /// The peer's chain as sent, leaf first.
    pub peer_chain: Vec<CertificateDer<'static>>,
    /// The verified peer.
    pub peer: Arc<PeerIdentity>,
    /// The credential generation this handshake used (0 for fixed material).
    pub generation: u64,
    /// Our certificate's not-after in that generation.
    pub our_not_after: Option<std::time::SystemTime>,
    /// A TLS 1.3 session of this generation was resumed (`[tls] resumption`): no certificate
    /// verifier ran, and the peer's chain is the one verified when the session was made.
    pub resumed: bool,
}

fn info(conn: &rustls::CommonState, verified: Option<Verified>) -> Result<HandshakeInfo, Error> {
    let chain: Vec<CertificateDer<'static>> =
        conn.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()).unwrap_or_default();
    let leaf = chain.first().ok_or_else(|| Error::Handshake {
        verdict: Verdict::NoPeerCertificate,
        side: Side::Local,
        alert: None,
        message: "the peer presented no certificate".into(),
    })?;
    // The verifier's reading of the leaf when it is this leaf (it always is, unless a
    // verifier other than ours ran), else a reading of our own.
    let peer = match verified.and_then(|v| v.of(leaf)) {
        Some(peer) => peer,
        None => Arc::new(PeerIdentity::from_der(leaf)?),
    };
    Ok(HandshakeInfo {
        version: conn
            .protocol_version()
            .map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default(),
        cipher_suite: conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default(),
        kx_group: conn.negotiated_key_exchange_group().map(|g| kx_name(g.name())),
        hello_retry: conn.handshake_kind() == Some(rustls::HandshakeKind::FullWithHelloRetryRequest),
        peer_chain: chain,
        peer,
        generation: 0,
        our_not_after: None,
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    })
}

/// A resumed session skipped the verifier: what it would refuse now (a certificate past its
/// validity, a peer the pin, policy or hook no longer admits) is refused here, as it would be.
pub(crate) fn refuse(d: Diagnosis) -> Error {
    Error::Handshake { verdict: d.verdict, side: Side::Local, alert: None, message: d.message }
}

fn kx_name(g: rustls::NamedGroup) -> String {
    match g {
        rustls::NamedGroup::X25519 => "X25519".into(),
        rustls::NamedGroup::secp256r1 => "secp256r1".into(),
        rustls::NamedGroup::secp384r1 => "secp384r1".into(),
        other => format!("{other:?}"),
    }
}

fn timeout_error(after: Duration, whom: &str) -> Error {
    Error::Handshake {
        verdict: Verdict::HandshakeTimeout,
        side: Side::Local,
        alert: None,
        message: format!(
            "the TLS handshake with {whom} did not finish within {}ms (the peer sent nothing or \
             stalled)",
            after.as_millis()
        ),
    }
}

fn count<T>(role: Role, result: Result<T, Error>) -> Result<T, Error> {
    match &result {
        Ok(_) => telemetry::handshake_accepted(role),
        Err(e) => telemetry::handshake_refused(role, e),
    }
    result
}

/// Runs the server side of a handshake on an accepted TCP connection.
pub async fn accept(tls: &ServerTls, tcp: TcpStream) -> Result<(ServerStream<TcpStream>, HandshakeInfo), Error> {
    let _ = tcp.set_nodelay(true);
    let remote = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "peer".into());
    accept_on(tls, tcp, &remote).await
}

/// Runs the server side of a handshake on any accepted byte stream (e.g. a Unix socket).
pub async fn accept_on<IO>(tls: &ServerTls, io: IO, remote: &str) -> Result<(ServerStream<IO>, HandshakeInfo), Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let generation = tls.current.load_full();
    let acceptor = TlsAcceptor::from(generation.config.clone());
    let handshake = Diagnosed::new(acceptor.accept(ReadAhead::new(io)));
    let Ok((res, diag, verified)) = tokio::time::timeout(tls.handshake_timeout, handshake).await else {
        return count(Role::Server, Err(timeout_error(tls.handshake_timeout, remote)));
    };
    let stream = res.map_err(|e| handshake_error(&e, diag, None));
    let result = stream.and_then(|s| {
        let mut i = info(s.get_ref().1, verified)?;
        if i.resumed {
            generation.verifier.check_resumed(&i.peer_chain, &i.peer).map_err(refuse)?;
        }
        i.generation = generation.number;
        i.our_not_after = generation.our_not_after;
        Ok((s, i))
    });
    count(Role::Server, result)
}

/// Opens a TCP connection to `addr` and runs the client side of a handshake.
///
/// The name verified (and sent as SNI) is the profile's `server_name`, else the host of `addr`.
pub async fn connect(
    tls: &ClientTls,
    addr: &str,
    connect_timeout: Duration,
) -> Result<(ClientStream<TcpStream>, HandshakeInfo), Error> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout {
            after: connect_timeout,
            message: format!("TCP connect to {addr} did not complete"),
        })?
        .map_err(|e| Error::transport(format!("cannot connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    handshake_on(tls, tcp, addr).await
}

/// Runs the client side of a handshake over an already-connected TCP stream.
pub async fn handshake_on(
    tls: &ClientTls,
    tcp: TcpStream,
    addr: &str,
) -> Result<(ClientStream<TcpStream>, HandshakeInfo), Error> {
    let name = server_name(tls, addr)?;
    let generation = tls.current.load_full();
    let connector = TlsConnector::from(generation.config.clone());
    let handshake = Diagnosed::new(connector.connect(name, ReadAhead::new(tcp)));
    let Ok((res, diag, verified)) = tokio::time::timeout(tls.handshake_timeout, handshake).await else {
        return count(Role::Client, Err(timeout_error(tls.handshake_timeout, addr)));
    };
    let stream = res.map_err(|e| handshake_error(&e, diag, generation.our_identity.as_deref()));
    let result = stream.and_then(|s| {
        let mut i = info(s.get_ref().1, verified)?;
        if i.resumed {
            generation.verifier.check_resumed(&i.peer_chain, &i.peer).map_err(refuse)?;
        }
        i.generation = generation.number;
        i.our_not_after = generation.our_not_after;
        Ok((s, i))
    });
    count(Role::Client, result)
}

/// Registers a verified client connection to `addr` with its tracker, so that it is closed
/// when trust stops accepting the server or a certificate expires (every client connection is).
/// An error when trust changed while the handshake finished and now refuses the server.
pub(crate) fn track_client(
    tls: &ClientTls,
    addr: &str,
    info: &HandshakeInfo,
) -> Result<crate::tls::tracker::TrackGuard, Error> {
    let name = server_name(tls, addr)?;
    tls.tracker
        .register(info.generation, info.peer_chain.clone(), Some(name), info.peer.clone(), info.our_not_after)
        .map_err(refuse)
}

/// The name a client verifies (and sends as SNI) when dialling `addr`.
pub(crate) fn server_name(tls: &ClientTls, addr: &str) -> Result<ServerName<'static>, Error> {
    match &tls.server_name {
        Some(n) => Ok(n.clone()),
        None => server_name_for(addr),
    }
}

/// The name to verify for `host:port` when no server_name is configured.
fn server_name_for(addr: &str) -> Result<ServerName<'static>, Error> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(ServerName::IpAddress(sa.ip().into()));
    }
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| Error::config(format!("cannot derive a server name from '{addr}'; set server_name")))
}

/// Turns an I/O error on an established connection into the error a caller should see: a TLS
/// alert arriving after the client's side of a TLS 1.3 handshake finished is still the peer
/// refusing us at the handshake (e.g. our client certificate was not accepted).
pub(crate) fn stream_error(e: &std::io::Error, ours: Option<&str>) -> Error {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return crate::tls::verify::tls_error(tls, ours);
    }
    Error::transport(format!("connection broke: {e}"))
}
