//! Finding 8: Connections outlive their certificate.
//!
//! An established connection is closed when the peer's certificate (or ours) expires, on the
//! server and on the client. Idle time counts from the last complete frame, a frame must arrive
//! whole within `frame_timeout`, and a frame header alone no longer makes the server reserve
//! the whole declared body, so one byte every few minutes neither keeps a connection alive nor
//! holds a 64 MiB buffer.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use trustwire::rpc::Server;
use trustwire::tls::TlsProfile;
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcResponseMeta, DEFAULT_MAX_BODY, HEADER_LEN, MAX_RESERVE_AHEAD};

use super::f02_unbounded_memory_per_connection::{child, echo_request};
use crate::common::*;

/// Upper bound for anything the test waits for; the limits under test are a few seconds.
const GUARD: Duration = Duration::from_secs(60);

/// Reads until the peer closes; panics after `GUARD`.
async fn until_closed(rd: &mut (impl AsyncRead + Unpin)) {
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(GUARD, read_all).await.expect("the connection was not closed");
}

/// Reads one frame; panics on end of stream or after `GUARD`.
async fn read_frame(rd: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut) -> Frame {
    let mut dec = Decoder::default();
    tokio::time::timeout(GUARD, async {
        loop {
            if let Some(f) = dec.decode(buf).unwrap() {
                return f;
            }
            assert!(rd.read_buf(buf).await.unwrap() > 0, "closed before a whole frame arrived");
        }
    })
    .await
    .expect("no frame")
}

/// A credential whose certificate expires `secs` from now, and (as certificates hold whole
/// seconds) the earliest its not-after can be.
fn short_lived(pki: &Pki, req: trustwire::pki::IssueRequest, secs: i64) -> (trustwire::pki::Credential, SystemTime) {
    let (from, to) = validity(-60, secs);
    (pki.issue(req.validity(from, to)), to - Duration::from_secs(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closes_a_connection_when_the_client_certificate_expires() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let (cred, not_after) = short_lived(&pki, client_usage("brief-client", CLIENT_ID), 3);
    let profile = TlsProfile::new(Some(identity(&cred)), pki.trust());
    // A bare connection: nothing on the client's side closes it when its certificate expires.
    let tls = profile.client().unwrap();
    let addr = server.local_addr().to_string();
    let (stream, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    wr.write_all(&echo_request(7, Bytes::from(trustwire::echo::encode("hi")))).await.unwrap();
    let answer = read_frame(&mut rd, &mut BytesMut::new()).await;
    assert_eq!(answer.meta.correlation_id, Some(7));

    until_closed(&mut rd).await;
    assert!(SystemTime::now() >= not_after, "closed before the certificate expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closes_a_connection_when_its_own_certificate_expires() {
    let pki = Pki::new();
    let req = trustwire::pki::IssueRequest::new("brief-server").spiffe_id(SERVER_ID).dns("localhost").ip(localhost());
    let (cred, not_after) = short_lived(&pki, req, 3);
    let server = echo_server(&TlsProfile::new(Some(identity(&cred)), pki.trust())).await;
    // The client's certificate outlives the test, and a bare connection does not close itself.
    let tls = pki.client_profile().client().unwrap();
    let addr = server.local_addr().to_string();
    let (stream, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    wr.write_all(&echo_request(9, Bytes::from(trustwire::echo::encode("hi")))).await.unwrap();
    let answer = read_frame(&mut rd, &mut BytesMut::new()).await;
    assert_eq!(answer.meta.correlation_id, Some(9));

    until_closed(&mut rd).await;
    assert!(SystemTime::now() >= not_after, "closed before the server's certificate expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_closes_its_connection_when_the_server_certificate_expires() {
    let pki = Pki::new();
    let req = trustwire::pki::IssueRequest::new("brief-server").spiffe_id(SERVER_ID).dns("localhost").ip(localhost());
    let (cred, not_after) = short_lived(&pki, req, 3);
    let tls = TlsProfile::new(Some(identity(&cred)), pki.trust()).server().unwrap();
    // A bare server: it answers one call and never closes the connection itself.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (stream, _) = trustwire::transport::accept(&tls, tcp).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::new();
        let request = read_frame(&mut rd, &mut buf).await;
        let answer = Frame {
            meta: RpcMeta {
                response: Some(RpcResponseMeta { error_code: Some(0), error_text: None }),
                correlation_id: request.meta.correlation_id,
                ..Default::default()
            },
            payload: request.payload,
            attachment: Bytes::new(),
        };
        wr.write_all(&answer.to_bytes().unwrap()).await.unwrap();
        until_closed(&mut rd).await;
        SystemTime::now()
    });
    let c = client(addr, &pki.client_profile());
    assert_eq!(echo(&c, "hello").await.unwrap(), "hello");
    let closed_at = served.await.unwrap();
    assert!(closed_at >= not_after, "closed before the server's certificate expired");
    drop(c);
}

/// A server with the given idle and frame timeouts.
async fn server_with(pki: &Pki, idle: Option<Duration>, frame: Option<Duration>) -> trustwire::rpc::RunningServer {
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().idle_timeout = idle;
    server.options_mut().frame_timeout = frame;
    server.bind("127.0.0.1:0").await.unwrap()
}

/// The value of `trustwire_connections_closed_by_limit_total{scope="server",reason}`.
fn closed_by(reason: &str) -> f64 {
    let text = trustwire::telemetry::metrics_text();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "trustwire_connections_closed_by_limit_total")
        .filter(|s| s.labels.get("scope") == Some("server") && s.labels.get("reason") == Some(reason))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Sends a frame header declaring a 1,000-byte body, then one byte of it every 200 ms.
async fn dribble(mut wr: impl AsyncWrite + Unpin) {
    let mut header = b"PRPC".to_vec();
    header.extend_from_slice(&1000u32.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    if wr.write_all(&header).await.is_err() {
        return;
    }
    for _ in 0..1000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if wr.write_all(b"x").await.is_err() || wr.flush().await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_dribbled_a_byte_at_a_time_is_cut_off_by_the_frame_timeout() {
    let pki = Pki::new();
    let server = server_with(&pki, None, Some(Duration::from_secs(1))).await;
    let before = closed_by("frame_timeout");
    let tls = pki.client_profile().client().unwrap();
    let addr = server.local_addr().to_string();
    let (stream, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
    let (mut rd, wr) = tokio::io::split(stream);
    let dribbler = tokio::spawn(dribble(wr));
    until_closed(&mut rd).await;
    assert!(closed_by("frame_timeout") >= before + 1.0);
    dribbler.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_time_counts_from_the_last_complete_frame_not_the_last_byte() {
    let pki = Pki::new();
    let server = server_with(&pki, Some(Duration::from_secs(1)), Some(Duration::from_secs(3600))).await;
    let before = closed_by("idle_timeout");
    let tls = pki.client_profile().client().unwrap();
    let addr = server.local_addr().to_string();
    let (stream, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(stream);
    wr.write_all(&echo_request(1, Bytes::from(trustwire::echo::encode("one call")))).await.unwrap();
    assert_eq!(read_frame(&mut rd, &mut BytesMut::new()).await.meta.correlation_id, Some(1));
    let dribbler = tokio::spawn(dribble(wr));
    until_closed(&mut rd).await;
    assert!(closed_by("idle_timeout") >= before + 1.0);
    dribbler.abort();
}

#[test]
fn a_frame_header_alone_reserves_at_most_max_reserve_ahead() {
    let mut header = b"PRPC".to_vec();
    header.extend_from_slice(&(DEFAULT_MAX_BODY as u32).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    let mut buf = BytesMut::from(&header[..]);
    let mut dec = Decoder::default();
    assert!(dec.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= HEADER_LEN + MAX_RESERVE_AHEAD, "reserved {} bytes", buf.capacity());
    assert!(dec.reserve_hint(&buf) <= MAX_RESERVE_AHEAD);
    // Room grows as the body arrives, never more than as much again as has come.
    buf.resize(8 << 20, 0);
    assert!(dec.reserve_hint(&buf) <= 8 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_headers_alone_do_not_make_the_server_reserve_their_bodies() {
    const CONNECTIONS: usize = 48;
    let pki = Pki::new();
    let server = child::start(&pki, &[("kind", "server")]);
    let tls = pki.client_profile().client().unwrap();
    let c = client(&server.addr, &pki.client_profile());
    assert_eq!(echo(&c, "warm").await.unwrap(), "warm");
    let base = server.vm_size();

    let mut header = b"PRPC".to_vec();
    header.extend_from_slice(&(DEFAULT_MAX_BODY as u32).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    let mut open = Vec::new();
    for _ in 0..CONNECTIONS {
        let (mut s, _) = trustwire::transport::connect(&tls, &server.addr, Duration::from_secs(5)).await.unwrap();
        s.write_all(&header).await.unwrap();
        s.flush().await.unwrap();
        open.push(s);
    }
    // The server serves every connection at once: answering a call on another one means it
    // has had time to read the headers, whose bodies would have been reserved by then.
    assert_eq!(echo(&c, "after").await.unwrap(), "after");
    // Each header declared 64 MiB: unfixed, that is 3 GiB of address space reserved here.
    let bound = (CONNECTIONS * (MAX_RESERVE_AHEAD + (1 << 20))) as u64 + (256 << 20);
    let mut grown = 0;
    for _ in 0..20 {
        grown = grown.max(server.vm_size().saturating_sub(base));
        assert!(grown < bound, "{CONNECTIONS} frame headers grew the server by {} MiB", grown >> 20);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{CONNECTIONS} headers declaring 64 MiB each grew the server's address space by {} MiB", grown >> 20);
    drop(open);
}
