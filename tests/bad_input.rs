//! One server, one healthy client calling throughout, and a parade of bad peers hitting the same
//! server: broken frames after the handshake, and handshakes that must be refused with the right
//! verdict. The healthy client must never notice, and the server must still serve at the end.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trustwire::pki::{DevCa, IssueRequest, Usage};
use trustwire::tls::TlsProfile;
use trustwire::transport::ClientStream;
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta};
use trustwire::{Error, Server, Side, Verdict};

const LIMIT: Duration = Duration::from_secs(20);
const MAX_BODY: usize = 256 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1500);

type Events = Arc<Mutex<Vec<(SocketAddr, Error)>>>;

struct Fixture {
    pki: Pki,
    addr: SocketAddr,
    events: Events,
}

impl Fixture {
    /// The refusal the server reported for the connection from `local` (our side's address).
    async fn server_verdict(&self, local: SocketAddr, what: &str) -> Error {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some((_, e)) = self.events.lock().unwrap().iter().find(|(a, _)| *a == local) {
                return e.clone();
            }
            assert!(Instant::now() < deadline, "{what}: the server reported no refusal for {local}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn no_verdict_for(&self, local: SocketAddr, what: &str) {
        let ev = self.events.lock().unwrap();
        assert!(!ev.iter().any(|(a, _)| *a == local), "{what}: unexpected refusal {ev:?}");
    }

    async fn tcp(&self) -> (TcpStream, SocketAddr) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let local = tcp.local_addr().unwrap();
        (tcp, local)
    }

    /// An mTLS connection with the good client credentials.
    async fn good_tls(&self) -> (ClientStream<TcpStream>, SocketAddr) {
        let (res, local) = self.tls_with(&self.pki.client_profile()).await;
        (res.expect("good handshake"), local)
    }

    async fn tls_with(&self, p: &TlsProfile) -> (Result<ClientStream<TcpStream>, Error>, SocketAddr) {
        let (tcp, local) = self.tcp().await;
        let tls = p.client().unwrap();
        let r =
            bounded("client handshake", trustwire::transport::handshake_on(&tls, tcp, &self.addr.to_string())).await;
        (r.map(|(s, _)| s), local)
    }
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("{what}: not done within {LIMIT:?}"))
}

/// Reads until the server closes; returns the bytes it sent first (an orderly close or a reset
/// both count as closed).
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match bounded(what, s.read(&mut buf)).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn echo_frame(cid: i64, text: &str) -> Bytes {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some("example.EchoService".into()),
                method_name: Some("Echo".into()),
                ..Default::default()
            }),
            correlation_id: Some(cid),
            ..Default::default()
        },
        payload: trustwire::echo::encode(text).into(),
        attachment: Bytes::new(),
    }
    .to_bytes()
    .unwrap()
}

fn header(body: u32, meta: u32) -> Vec<u8> {
    let mut h = b"PRPC".to_vec();
    h.extend(body.to_be_bytes());
    h.extend(meta.to_be_bytes());
    h
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = Decoder::default().decode(&mut buf).expect("server frames decode") {
        out.push(f);
    }
    assert!(buf.is_empty(), "partial frame from the server");
    out
}

/// Deterministic junk (xorshift), not starting with 'P' so it is not mistaken for a header.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    v[0] = 0x17;
    v
}

fn handshake_parts(e: &Error) -> (Verdict, Side, Option<&'static str>) {
    match e {
        Error::Handshake { verdict, side, alert, .. } => (*verdict, *side, *alert),
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

/// The bad peers after a successful handshake: each must be closed (or answered) without
/// affecting anyone else.
async fn frame_level_peers(fx: &Fixture) {
    // Random garbage after TLS: closed, nothing answered.
    let (mut s, local) = fx.good_tls().await;
    s.write_all(&garbage(8192, 0x9e37_79b9_7f4a_7c15)).await.unwrap();
    s.flush().await.unwrap();
    assert!(until_closed(&mut s, "garbage").await.is_empty(), "garbage got an answer");
    fx.no_verdict_for(local, "garbage after a good handshake");

    // Wrong magic with an otherwise plausible header: closed. A good frame first is answered.
    let (mut s, _) = fx.good_tls().await;
    let mut bytes = echo_frame(1, "first").to_vec();
    let mut wrong = echo_frame(2, "second").to_vec();
    wrong[..4].copy_from_slice(b"PRPD");
    bytes.extend(wrong);
    s.write_all(&bytes).await.unwrap();
    let got = frames(&until_closed(&mut s, "wrong magic").await);
    assert_eq!(got.len(), 1, "only the good frame before the bad magic is answered");
    assert_eq!(got[0].meta.correlation_id, Some(1));

    // meta_size > body_size: that frame is dropped without an answer (as brpc does) and the
    // connection stays in sync: the next frame is answered.
    let (mut s, _) = fx.good_tls().await;
    let mut bytes = header(4, 10);
    bytes.extend(b"abcd");
    bytes.extend(echo_frame(3, "after-skip"));
    s.write_all(&bytes).await.unwrap();
    let mut buf = vec![0u8; 12];
    bounded("answer after skipped frame", s.read_exact(&mut buf)).await.unwrap();
    let body = u32::from_be_bytes(buf[4..8].try_into().unwrap()) as usize;
    buf.resize(12 + body, 0);
    bounded("answer body", s.read_exact(&mut buf[12..])).await.unwrap();
    let f = &frames(&buf)[0];
    assert_eq!(f.meta.correlation_id, Some(3));
    assert_eq!(trustwire::echo::decode(&f.payload).unwrap(), "after-skip");
    drop(s);

    // A body over max_body: closed as soon as the header arrives (the body is never sent).
    let (mut s, _) = fx.good_tls().await;
    s.write_all(&header(MAX_BODY as u32 + 1, 0)).await.unwrap();
    s.flush().await.unwrap();
    assert!(until_closed(&mut s, "oversized body").await.is_empty());
    // 4 GiB declared.
    let (mut s, _) = fx.good_tls().await;
    s.write_all(&header(u32::MAX, u32::MAX)).await.unwrap();
    s.flush().await.unwrap();
    assert!(until_closed(&mut s, "4 GiB body").await.is_empty());

    // A truncated frame, then an orderly close: the server closes its side too.
    let (mut s, _) = fx.good_tls().await;
    let whole = echo_frame(4, "truncated");
    s.write_all(&whole[..whole.len() - 5]).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(until_closed(&mut s, "truncated frame").await.is_empty());
    // … and a truncated frame followed by a hard drop of the TCP connection.
    let (mut s, _) = fx.good_tls().await;
    s.write_all(&whole[..7]).await.unwrap();
    s.flush().await.unwrap();
    drop(s);

    // An undecodable RpcMeta: closed, nothing answered.
    let (mut s, _) = fx.good_tls().await;
    let meta = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    let mut bytes = header(meta.len() as u32 + 3, meta.len() as u32);
    bytes.extend(meta);
    bytes.extend(b"xyz");
    s.write_all(&bytes).await.unwrap();
    assert!(until_closed(&mut s, "bad meta").await.is_empty());

    // attachment_size larger than what follows the meta: answered with EREQUEST, stays open.
    let (mut s, _) = fx.good_tls().await;
    let mut f = Frame::default();
    f.meta.request = Some(RpcRequestMeta {
        service_name: Some("example.EchoService".into()),
        method_name: Some("Echo".into()),
        ..Default::default()
    });
    f.meta.correlation_id = Some(5);
    f.meta.attachment_size = Some(1000);
    let meta_bytes = prost::Message::encode_to_vec(&f.meta);
    let mut bytes = header(meta_bytes.len() as u32 + 2, meta_bytes.len() as u32);
    bytes.extend(meta_bytes);
    bytes.extend(b"ab");
    bytes.extend(echo_frame(6, "next"));
    s.write_all(&bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let got = frames(&until_closed(&mut s, "bad attachment size").await);
    let mut by_id: Vec<(i64, i32)> = got
        .iter()
        .map(|f| (f.meta.correlation_id.unwrap(), f.meta.response.clone().unwrap().error_code.unwrap_or(0)))
        .collect();
    by_id.sort();
    assert_eq!(by_id, [(5, trustwire::error::codes::EREQUEST), (6, 0)]);
}

/// The bad peers refused at the handshake, each with its verdict reported on the server.
async fn handshake_level_peers(fx: &Fixture) {
    let pki = &fx.pki;

    // A TCP connection that never sends a ClientHello: dropped after the handshake timeout.
    let (mut tcp, local) = fx.tcp().await;
    let started = Instant::now();
    assert!(until_closed(&mut tcp, "silent TCP peer").await.is_empty());
    assert!(started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(100));
    let e = fx.server_verdict(local, "silent peer").await;
    assert_eq!(handshake_parts(&e).0, Verdict::HandshakeTimeout, "{e}");

    // A plaintext baidu_std frame (a brpc client without TLS): not_tls.
    let (mut tcp, local) = fx.tcp().await;
    tcp.write_all(&capture("echo_request.bin")).await.unwrap();
    let answer = until_closed(&mut tcp, "plaintext frame").await;
    assert!(!answer.starts_with(b"PRPC"), "plaintext must never be answered as baidu_std");
    let e = fx.server_verdict(local, "plaintext").await;
    assert_eq!(handshake_parts(&e).0, Verdict::NotTls, "{e}");

    // Each refused client credential, with the verdict the server must give.
    let (past_nb, past_na) = validity(-7200, -3600);
    let (future_nb, future_na) = validity(3600, 7200);
    let rogue_ca = DevCa::new("rogue.example").unwrap();
    let rogue = rogue_ca.issue(&client_usage("rogue", CLIENT_ID)).unwrap();
    let expired = pki.issue(client_usage("expired", CLIENT_ID).validity(past_nb, past_na));
    let not_yet = pki.issue(client_usage("notyet", CLIENT_ID).validity(future_nb, future_na));
    let server_only = pki.issue(IssueRequest::new("serveronly").spiffe_id(CLIENT_ID).usage(Usage::Server));
    let cases: Vec<(&str, Option<trustwire::pki::Credential>, Verdict)> = vec![
        ("no client certificate", None, Verdict::NoPeerCertificate),
        ("certificate from another CA", Some(rogue), Verdict::UnknownIssuer),
        ("expired certificate", Some(expired), Verdict::Expired),
        ("not-yet-valid certificate", Some(not_yet), Verdict::NotYetValid),
        ("server-only certificate as client", Some(server_only), Verdict::BadKeyUsage),
    ];
    for (what, cred, want) in cases {
        let mut p = pki.client_profile();
        p.identity = cred.as_ref().map(identity);
        let (res, local) = fx.tls_with(&p).await;
        // With TLS 1.3 the client may finish before the server has judged its certificate; the
        // refusal then arrives as an alert on the first read.
        if let Ok(mut s) = res {
            let _ = s.write_all(&echo_frame(9, "should not be served")).await;
            let _ = s.flush().await;
            let got = until_closed(&mut s, what).await;
            assert!(got.is_empty(), "{what}: a refused peer got an answer");
        }
        let e = fx.server_verdict(local, what).await;
        let (verdict, side, _) = handshake_parts(&e);
        assert_eq!((verdict, side), (want, Side::Local), "{what}: {e}");
        assert_eq!(verdict.name(), want.name());
    }

    // A client that asks for a name the server's certificate does not cover refuses the server
    // itself (name_mismatch on the client); the server sees the client's alert.
    let mut p = pki.client_profile();
    p.server_name = Some("payments.example.org".into());
    let (res, local) = fx.tls_with(&p).await;
    let e = res.expect_err("client must refuse the server");
    assert_eq!(handshake_parts(&e).0, Verdict::NameMismatch, "{e}");
    let e = fx.server_verdict(local, "name mismatch").await;
    let (verdict, side, alert) = handshake_parts(&e);
    assert_eq!((verdict, side), (Verdict::PeerAlert, Side::Remote), "{e}");
    assert!(alert.is_some(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_do_not_disturb_a_healthy_client() {
    let pki = Pki::new();
    let mut sp = pki.server_profile();
    sp.handshake_timeout = HANDSHAKE_TIMEOUT;
    let mut server = Server::new(sp.server().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().max_body = MAX_BODY;
    let events: Events = Arc::default();
    let sink = events.clone();
    server.options_mut().on_handshake_error = Some(Arc::new(move |remote, e| {
        sink.lock().unwrap().push((remote, e.clone()));
    }));
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();

    // The healthy client calls in a loop for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let healthy = {
        let c = client(addr, &pki.client_profile());
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let text = format!("healthy-{i}");
                match echo(&c, &text).await {
                    Ok(t) if t == text => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(t) => failures.lock().unwrap().push(format!("wrong answer {t:?} for {text:?}")),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    bounded("healthy client warms up", async {
        while ok.load(Ordering::Relaxed) == 0 && failures.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let fx = Fixture { pki, addr, events };
    let before = ok.load(Ordering::Relaxed);
    for _round in 0..2 {
        frame_level_peers(&fx).await;
        handshake_level_peers(&fx).await;
    }
    // Bad peers also arriving all at once.
    let burst: Vec<_> = (0..20u64)
        .map(|i| {
            let addr = fx.addr;
            let p = fx.pki.client_profile();
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                if i % 2 == 0 {
                    let mut tcp = tcp;
                    let _ = tcp.write_all(&garbage(512, i + 1)).await;
                    let _ = until_closed(&mut tcp, "burst plaintext").await;
                } else {
                    let tls = p.client().unwrap();
                    let (mut s, _) = trustwire::transport::handshake_on(&tls, tcp, &addr.to_string()).await.unwrap();
                    let _ = s.write_all(&garbage(512, i + 1)).await;
                    let _ = until_closed(&mut s, "burst garbage").await;
                }
            })
        })
        .collect();
    for b in burst {
        bounded("burst peer", b).await.unwrap();
    }

    // The server still serves: a fresh client, and the brpc capture on a fresh raw connection.
    let fresh = client(addr, &fx.pki.client_profile());
    assert_eq!(echo(&fresh, "at the end").await.unwrap(), "at the end");
    let (mut s, _) = fx.good_tls().await;
    s.write_all(&capture("echo_request.bin")).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(until_closed(&mut s, "capture at the end").await, capture("echo_response.bin"));

    stop.store(true, Ordering::Release);
    bounded("healthy client stops", healthy).await.unwrap();
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(failures.is_empty(), "the healthy client saw {} failures: {:?}", failures.len(), &failures[..]);
    assert!(ok.load(Ordering::Relaxed) > before, "the healthy client kept calling during the bad traffic");
    assert_eq!(running.in_flight(), 0);
    bounded("shutdown", running.shutdown()).await;
}
