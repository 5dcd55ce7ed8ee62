//! RPC semantics as callers rely on them: brpc-identical answers to captured brpc requests,
//! pipelining, concurrency, timeouts, panics, bad requests, identity seen by handlers, graceful
//! shutdown, reconnects and per-method policy.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};
use trustwire::error::codes;
use trustwire::rpc::RunningServer;
use trustwire::tls::{Policy, TlsProfile};
use trustwire::transport::ClientStream;
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta, HEADER_LEN};
use trustwire::{CallOptions, Error, Request, Response, Server, Status, Verdict};

/// Every wait in this file is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);

fn opts(timeout_ms: u64) -> CallOptions {
    CallOptions { timeout: Some(Duration::from_millis(timeout_ms)), ..Default::default() }
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("{what}: not done within {LIMIT:?}"))
}

/// A raw mTLS stream to `addr` with the fixture's client credentials.
async fn raw_tls(profile: &TlsProfile, addr: std::net::SocketAddr) -> ClientStream<TcpStream> {
    let tls = profile.client().unwrap();
    let (stream, _) =
        trustwire::transport::connect(&tls, &addr.to_string(), Duration::from_secs(5)).await.expect("raw mTLS connect");
    stream
}

/// Reads one whole frame (header included); None on a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut header = [0u8; HEADER_LEN];
    match bounded("frame header", r.read_exact(&mut header)).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("reading a frame header: {e}"),
    }
    assert_eq!(&header[..4], b"PRPC", "server wrote a frame without the magic");
    let body = u32::from_be_bytes(header[4..8].try_into().unwrap()) as usize;
    let mut frame = header.to_vec();
    frame.resize(HEADER_LEN + body, 0);
    bounded("frame body", r.read_exact(&mut frame[HEADER_LEN..])).await.expect("frame body");
    Some(frame)
}

fn decode(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let f = Decoder::default().decode(&mut buf).expect("decodable").expect("complete frame");
    assert!(buf.is_empty(), "trailing bytes after the frame");
    f
}

fn request_frame(cid: i64, service: &str, method: &str, payload: Vec<u8>) -> Frame {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some(service.into()),
                method_name: Some(method.into()),
                ..Default::default()
            }),
            compress_type: Some(0),
            correlation_id: Some(cid),
            ..Default::default()
        },
        payload: payload.into(),
        attachment: Bytes::new(),
    }
}

/// (code, text) of a response frame.
fn error_of(f: &Frame) -> (i32, String) {
    let r = f.meta.response.clone().expect("response meta");
    (r.error_code.unwrap_or(0), r.error_text.unwrap_or_default())
}

/// Sends one frame on a raw stream and returns the decoded answer.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, frame: &Frame) -> Frame {
    s.write_all(&frame.to_bytes().unwrap()).await.unwrap();
    s.flush().await.unwrap();
    decode(&read_frame(s).await.expect("an answer, not a closed connection"))
}

// ---------------------------------------------------------------------------------------------
// The captures, replayed against a trustwire server over mTLS
// ---------------------------------------------------------------------------------------------

/// Behaves like the brpc servers in the captures: brpc's example echo server, which also fails
/// a call whose message is "fail" with 4001 (the error_* capture's server).
async fn brpc_like_echo(req: Request) -> Result<Response, Status> {
    if trustwire::echo::decode(&req.payload).ok().as_deref() == Some("fail") {
        return Err(Status::new(4001, "deliberate failure requested by client"));
    }
    Ok(Response { payload: req.payload, attachment: req.attachment })
}

/// The captured brpc response with brpc's "[ip:port]" in error_text replaced by `addr`, encoded
/// again. The codec reproduces every capture byte-for-byte (tests/wire_captures.rs), so this
/// is exactly what brpc would have sent had it listened on `addr`.
fn captured_response_at(name: &str, addr: std::net::SocketAddr) -> Vec<u8> {
    let raw = capture(name);
    let mut f = decode(&raw);
    if let Some(resp) = f.meta.response.as_mut() {
        if let Some(text) = resp.error_text.as_mut() {
            let end = text.find(']').expect("brpc error_text starts with [ip:port]");
            assert!(text.starts_with("[127.0.0.1:"), "{text}");
            *text = format!("[{addr}]{}", &text[end + 1..]);
        } else {
            assert_eq!(f.to_bytes().unwrap().as_ref(), &raw[..], "{name} re-encodes");
        }
    }
    f.to_bytes().unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_brpc_requests_get_brpc_identical_answers() {
    let pki = Pki::new();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    server.register("example.EchoService", "Echo", brpc_like_echo);
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();
    let mut s = raw_tls(&pki.client_profile(), addr).await;

    // (request, brpc's response). Error texts carry the server's own address, so those are
    // compared after putting our address where brpc's was.
    let cases = [
        ("echo_request.bin", "echo_response.bin"),
        ("attachment_request.bin", "attachment_response.bin"),
        ("timeout_request.bin", "timeout_response.bin"),
        ("error_request.bin", "error_response.bin"),
        ("enomethod_request.bin", "enomethod_response.bin"),
        ("enoservice_request_crafted.bin", "enoservice_response.bin"),
    ];
    for (req, resp) in cases {
        s.write_all(&capture(req)).await.unwrap();
        let got = read_frame(&mut s).await.expect("an answer");
        let want = captured_response_at(resp, addr);
        assert_eq!(hex::encode(&got), hex::encode(&want), "{req}: answer differs from brpc's {resp}");
        if !resp.starts_with("en") && !resp.starts_with("error") {
            // No address in it: the capture itself, untouched.
            assert_eq!(got, capture(resp), "{req}");
        }
    }

    // Checksums: brpc's server fills checksum_value with the masked CRC32C of its answer but
    // labels it checksum_type 0 (see checksum_response.bin); trustwire labels the same value
    // CRC32C (1) so that a receiver actually verifies it. Everything else is byte-identical.
    s.write_all(&capture("checksum_request.bin")).await.unwrap();
    let got = read_frame(&mut s).await.expect("an answer");
    let brpc = capture("checksum_response.bin");
    let got_frame = decode(&got);
    got_frame.verify_checksum().expect("trustwire's CRC verifies");
    assert_eq!(got_frame.meta.checksum_type, Some(1));
    let mut relabelled = got_frame.clone();
    relabelled.meta.checksum_type = Some(0);
    assert_eq!(hex::encode(relabelled.to_bytes().unwrap()), hex::encode(&brpc), "checksum answer");
    assert_eq!(got.len(), brpc.len());
    let differing: Vec<usize> = (0..got.len()).filter(|&i| got[i] != brpc[i]).collect();
    assert_eq!(differing.len(), 1, "only checksum_type's value byte differs: {differing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_pipelined_on_one_connection_are_all_answered() {
    let pki = Pki::new();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    server.register("example.EchoService", "Echo", brpc_like_echo);
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();
    let mut s = raw_tls(&pki.client_profile(), addr).await;
    let names = ["echo", "attachment", "checksum", "timeout", "error", "enomethod"];
    let mut all = Vec::new();
    for n in names {
        all.extend(capture(&format!("{n}_request.bin")));
    }
    all.extend(capture("enoservice_request_crafted.bin"));
    s.write_all(&all).await.unwrap();
    let mut codes_seen = Vec::new();
    for _ in 0..names.len() + 1 {
        let f = decode(&read_frame(&mut s).await.expect("an answer"));
        codes_seen.push(error_of(&f).0);
    }
    codes_seen.sort();
    assert_eq!(codes_seen, [0, 0, 0, 0, 1001, 1002, 4001]);
}

// ---------------------------------------------------------------------------------------------
// Pipelining and concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_matched_by_correlation_id_and_may_overtake() {
    let pki = Pki::new();
    // "hold" waits until "release" has run, so "release" must be answered first even though it
    // was written last: answers come back out of order, matched by correlation_id only.
    let gate: Arc<Mutex<Option<oneshot::Sender<()>>>> = Arc::default();
    let (tx, rx) = oneshot::channel::<()>();
    *gate.lock().unwrap() = Some(tx);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let mut server = Server::new(pki.server_profile().server().unwrap());
    let g = gate.clone();
    server.register("t.Pipe", "Call", move |req: Request| {
        let g = g.clone();
        let rx = rx.clone();
        async move {
            let text = trustwire::echo::decode(&req.payload).unwrap();
            if text == "hold" {
                let rx = rx.lock().await.take().unwrap();
                let _ = bounded("release", rx).await;
            } else if text == "release" {
                if let Some(tx) = g.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            }
            Ok(Response::new(trustwire::echo::encode(&format!("re:{text}"))))
        }
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let mut s = raw_tls(&pki.client_profile(), running.local_addr()).await;

    // Large, non-sequential ids, as brpc uses.
    let base: i64 = 0x7000_0000_0000_0000;
    let mut texts: Vec<String> = vec!["hold".into()];
    texts.extend((0..48).map(|i| format!("m{i}")));
    texts.push("release".into());
    let mut wire = BytesMut::new();
    for (i, t) in texts.iter().enumerate() {
        let cid = base + (i as i64) * 7919;
        request_frame(cid, "t.Pipe", "Call", trustwire::echo::encode(t)).encode(&mut wire).unwrap();
    }
    s.write_all(&wire).await.unwrap();

    let mut answers = std::collections::HashMap::new();
    let mut order = Vec::new();
    for _ in 0..texts.len() {
        let f = decode(&read_frame(&mut s).await.expect("an answer"));
        assert_eq!(error_of(&f).0, 0);
        let cid = f.meta.correlation_id.expect("correlation_id echoed");
        let text = trustwire::echo::decode(&f.payload).unwrap();
        assert!(answers.insert(cid, text).is_none(), "two answers for {cid}");
        order.push(cid);
    }
    for (i, t) in texts.iter().enumerate() {
        let cid = base + (i as i64) * 7919;
        assert_eq!(answers.get(&cid), Some(&format!("re:{t}")), "answer for {cid}");
    }
    let pos = |cid: i64| order.iter().position(|c| *c == cid).unwrap();
    assert!(pos(base + 49 * 7919) < pos(base), "release must overtake hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_from_one_client() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let c = client(server.local_addr(), &pki.client_profile());
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let text = format!("call-{i}-{}", "x".repeat(i % 97));
            let o = CallOptions {
                timeout: Some(Duration::from_secs(30)),
                attachment: Bytes::from(format!("att-{i}")),
                ..Default::default()
            };
            let r = c.call("example.EchoService", "Echo", trustwire::echo::encode(&text), o).await?;
            assert_eq!(trustwire::echo::decode(&r.payload).unwrap(), text);
            assert_eq!(r.attachment, Bytes::from(format!("att-{i}")));
            Ok::<_, Error>(())
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = bounded("call", t).await.unwrap() {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{} of 1000 failed, e.g. {:?}", failures.len(), failures.first());
    assert_eq!(server.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// Timeouts, panics, bad requests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_fails_the_call_and_keeps_the_connection_usable() {
    let pki = Pki::new();
    let seen_timeout: Arc<Mutex<Vec<Option<i32>>>> = Arc::default();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    let seen = seen_timeout.clone();
    server.register("t.Slow", "Sleep", move |req: Request| {
        seen.lock().unwrap().push(req.timeout_ms);
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(Response::new(trustwire::echo::encode("late")))
        }
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let c = client(running.local_addr(), &pki.client_profile());
    assert_eq!(echo(&c, "before").await.unwrap(), "before");

    let err = c.call("t.Slow", "Sleep", vec![], opts(200)).await.unwrap_err();
    match &err {
        Error::Timeout { after, message } => {
            assert_eq!(*after, Duration::from_millis(200));
            assert!(message.contains("t.Slow/Sleep"), "{message}");
        }
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    assert_eq!(err.kind_name(), "timeout");
    assert_eq!(*seen_timeout.lock().unwrap(), [Some(200)], "timeout_ms reaches the handler");

    // The same client (same connection) still works while the abandoned call runs …
    assert_eq!(echo(&c, "during").await.unwrap(), "during");
    // … and after its late answer arrived and was dropped, answers still reach the right caller.
    bounded("slow handler finishing", async {
        while running.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for i in 0..20 {
        assert_eq!(echo(&c, &format!("after-{i}")).await.unwrap(), format!("after-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_is_einternal_and_the_server_keeps_serving() {
    let pki = Pki::new();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    server.register("t.Bad", "AsyncPanic", |req: Request| async move {
        if !req.payload.is_empty() {
            panic!("handler bug: {}", req.payload.len());
        }
        Ok(Response::default())
    });
    // A handler that panics while building its future, before any await.
    server.register("t.Bad", "SyncPanic", |_req: Request| -> std::future::Ready<Result<Response, Status>> {
        panic!("handler bug before the future exists")
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();
    let c = client(addr, &pki.client_profile());
    for method in ["AsyncPanic", "SyncPanic"] {
        for _ in 0..3 {
            let err = c.call("t.Bad", method, vec![1, 2, 3], opts(5000)).await.unwrap_err();
            assert_eq!(err.rpc_code(), Some(codes::EINTERNAL), "{method}: {err:?}");
            let text = match &err {
                Error::Rpc { text, .. } => text.clone(),
                _ => unreachable!(),
            };
            assert!(text.starts_with(&format!("[{addr}][E2001]")), "{text}");
            assert_eq!(echo(&c, "still here").await.unwrap(), "still here", "{method}");
        }
    }
    // A panicking call is not left counted as running (shutdown would wait for it).
    bounded("in_flight back to zero", async {
        while running.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    bounded("shutdown", running.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_bad_checksum_requests_are_erequest() {
    let pki = Pki::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut server = Server::new(pki.server_profile().server().unwrap());
    let n = calls.clone();
    server.register("example.EchoService", "Echo", move |req: Request| {
        n.fetch_add(1, Ordering::SeqCst);
        trustwire::echo::handler(req)
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();
    let mut s = raw_tls(&pki.client_profile(), addr).await;
    let hello = trustwire::echo::encode("hello");

    for (ct, name) in [(1, "snappy"), (2, "gzip"), (3, "zlib"), (4, "lz4"), (9, "unknown")] {
        let mut f = request_frame(100 + ct as i64, "example.EchoService", "Echo", hello.clone());
        f.meta.compress_type = Some(ct);
        let r = round_trip(&mut s, &f).await;
        assert_eq!(r.meta.correlation_id, Some(100 + ct as i64));
        let (code, text) = error_of(&r);
        assert_eq!(code, codes::EREQUEST, "{text}");
        assert!(text.starts_with(&format!("[{addr}][E1003]")), "{text}");
        assert!(text.contains("compress") && text.contains(name), "{text}");
        assert!(r.payload.is_empty() && r.attachment.is_empty(), "error answers carry no payload");
    }

    // A CRC32C that does not match the payload.
    let mut f = request_frame(200, "example.EchoService", "Echo", hello.clone());
    f.set_checksum(false);
    f.payload = trustwire::echo::encode("hellp").into();
    let (code, text) = error_of(&round_trip(&mut s, &f).await);
    assert_eq!(code, codes::EREQUEST, "{text}");
    assert!(text.contains("checksum"), "{text}");

    // A CRC over payload+attachment that only covers the payload.
    let mut f = request_frame(201, "example.EchoService", "Echo", hello.clone());
    f.attachment = Bytes::from_static(b"tail");
    f.meta.attachment_size = Some(4);
    f.set_checksum(false);
    f.meta.checksum_with_attachment = Some(true);
    assert_eq!(error_of(&round_trip(&mut s, &f).await).0, codes::EREQUEST);

    // An unknown checksum algorithm.
    let mut f = request_frame(202, "example.EchoService", "Echo", hello.clone());
    f.meta.checksum_type = Some(7);
    f.meta.checksum_value = Some(Bytes::from_static(b"abcd"));
    let (code, text) = error_of(&round_trip(&mut s, &f).await);
    assert_eq!(code, codes::EREQUEST, "{text}");

    // None of those reached the handler; the connection still serves good requests, with
    // and without a (correct) checksum.
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let mut good = request_frame(203, "example.EchoService", "Echo", hello.clone());
    good.attachment = Bytes::from_static(b"att");
    good.meta.attachment_size = Some(3);
    good.set_checksum(true);
    let r = round_trip(&mut s, &good).await;
    assert_eq!(error_of(&r), (0, String::new()));
    assert_eq!((r.payload.as_ref(), r.attachment.as_ref()), (&hello[..], &b"att"[..]));
    r.verify_checksum().expect("answer to a checksummed request is checksummed");
    assert_eq!(r.meta.checksum_with_attachment, Some(true));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A frame without request meta (e.g. a response sent to the server).
    let mut f = request_frame(204, "x", "y", vec![]);
    f.meta.request = None;
    assert_eq!(error_of(&round_trip(&mut s, &f).await).0, codes::EREQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_and_method_get_brpc_codes_and_text() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let addr = server.local_addr();
    let c = client(addr, &pki.client_profile());
    let cases = [
        ("NoSuchService", "Echo", codes::ENOSERVICE, "Fail to find service=NoSuchService"),
        ("example.NoSuchService", "Echo", codes::ENOMETHOD, "Fail to find method=example.NoSuchService/Echo"),
        ("example.EchoService", "Nope", codes::ENOMETHOD, "Fail to find method=example.EchoService/Nope"),
        // An unqualified name resolves to the full one, which then appears in the text.
        ("EchoService", "Nope", codes::ENOMETHOD, "Fail to find method=example.EchoService/Nope"),
    ];
    for (svc, m, code, text) in cases {
        let err = c.call(svc, m, trustwire::echo::encode("x"), opts(5000)).await.unwrap_err();
        match err {
            Error::Rpc { code: got, text: got_text } => {
                assert_eq!(got, code, "{svc}/{m}");
                assert_eq!(got_text, format!("[{addr}][E{code}]{text}"), "{svc}/{m}");
            }
            other => panic!("{svc}/{m}: expected an rpc error, got {other:?}"),
        }
    }
    let r = c.call("EchoService", "Echo", trustwire::echo::encode("short"), opts(5000)).await.unwrap();
    assert_eq!(trustwire::echo::decode(&r.payload).unwrap(), "short");
    let e = c.call("example.EchoService", "Nope", vec![], opts(5000)).await.unwrap_err();
    assert!(e.to_string().contains("1002") && e.to_string().contains("ENOMETHOD"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sees_peer_identity_log_id_attachment_and_request_id() {
    let pki = Pki::new();
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    let sink = seen.clone();
    server.register("example.EchoService", "Echo", move |req: Request| {
        sink.lock().unwrap().push(req.clone());
        let who = req.peer.spiffe_id.clone().unwrap_or_default();
        async move { Ok(Response::new(who.into_bytes()).with_attachment(req.attachment)) }
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let c = client(running.local_addr(), &pki.client_profile());
    let o = CallOptions {
        timeout: Some(Duration::from_secs(5)),
        attachment: Bytes::from_static(b"\x00binary\xffattachment"),
        log_id: Some(-77),
        request_id: Some("req-123".into()),
    };
    let r = c.call("EchoService", "Echo", trustwire::echo::encode("p"), o).await.unwrap();
    assert_eq!(r.payload.as_ref(), CLIENT_ID.as_bytes());
    assert_eq!(r.attachment.as_ref(), b"\x00binary\xffattachment");
    // A second client with another identity is seen as that identity.
    let other_id = "spiffe://example.org/ns/test/other";
    let other = pki.issue(client_usage("other", other_id));
    let mut op = pki.client_profile();
    op.identity = Some(identity(&other));
    let r = client(running.local_addr(), &op).call("example.EchoService", "Echo", vec![], opts(5000)).await.unwrap();
    assert_eq!(r.payload.as_ref(), other_id.as_bytes());

    let seen = seen.lock().unwrap();
    let req = &seen[0];
    assert_eq!(req.service, "example.EchoService", "unqualified name resolved");
    assert_eq!(req.method, "Echo");
    assert_eq!(req.peer.spiffe_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(req.peer.common_name.as_deref(), Some("client"));
    assert_eq!(req.log_id, Some(-77));
    assert_eq!(req.request_id.as_deref(), Some("req-123"));
    assert_eq!(req.timeout_ms, Some(5000));
    assert!(req.deadline.is_some());
    assert_eq!(req.payload.as_ref(), &trustwire::echo::encode("p")[..]);
    assert_eq!(seen[1].log_id, None, "no log_id when the caller sets none");
    assert!(seen[1].attachment.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Lifecycle: shutdown, restart, dropped connections
// ---------------------------------------------------------------------------------------------

/// A server whose `t.Gate/Wait` calls block until a permit is added to the returned semaphore.
async fn gated_server(pki: &Pki, addr: &str) -> (RunningServer, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    let g = gate.clone();
    server.register("t.Gate", "Wait", move |req: Request| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok(Response::new(req.payload))
        }
    });
    server.options_mut().shutdown_grace = Duration::from_secs(15);
    (server.bind(addr).await.unwrap(), gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_calls_in_flight_and_refuses_new_ones() {
    let pki = Pki::new();
    let (running, gate) = gated_server(&pki, "127.0.0.1:0").await;
    let addr = running.local_addr();
    let c = client(addr, &pki.client_profile());
    assert_eq!(echo(&c, "warm").await.unwrap(), "warm");

    let mut in_flight = Vec::new();
    for i in 0..5u8 {
        let c = c.clone();
        in_flight.push(tokio::spawn(async move { c.call("t.Gate", "Wait", vec![i], opts(15_000)).await }));
    }
    bounded("5 calls running", async {
        while running.in_flight() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // Start the shutdown: the first poll stops accepting and switches new calls to ELOGOFF.
    let mut shutdown = Box::pin(running.shutdown());
    tokio::select! {
        biased;
        _ = &mut shutdown => panic!("shutdown returned with calls in flight"),
        _ = std::future::ready(()) => {}
    }

    // A new call on the open connection is refused with ELOGOFF.
    let err = c.call("example.EchoService", "Echo", trustwire::echo::encode("late"), opts(5000)).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(codes::ELOGOFF), "{err:?}");
    assert!(err.to_string().contains(&format!("[{addr}][E2003]")), "{err}");
    // A new connection is not accepted (the listener is closed).
    let fresh = client(addr, &pki.client_profile());
    let err = echo(&fresh, "new").await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. } | Error::Handshake { verdict: Verdict::Io, .. }), "{err:?}");

    // Shutdown waits for the calls in flight …
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut shutdown).await.is_err(),
        "shutdown must wait for calls in flight"
    );
    gate.add_permits(5);
    // … which all finish with their answers, then it returns.
    for (i, t) in in_flight.into_iter().enumerate() {
        let r = bounded("call in flight", t).await.unwrap().expect("call in flight completes");
        assert_eq!(r.payload.as_ref(), &[i as u8]);
    }
    bounded("shutdown", shutdown).await;

    // After shutdown: a clean connect error, never a hang.
    let err = bounded("call after shutdown", echo(&c, "after")).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. } | Error::Rpc { code: codes::ELOGOFF, .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_restarts_on_the_same_port() {
    let pki = Pki::new();
    let (first, _gate) = gated_server(&pki, "127.0.0.1:0").await;
    let addr = first.local_addr();
    let c = client(addr, &pki.client_profile());
    assert_eq!(echo(&c, "one").await.unwrap(), "one");
    bounded("shutdown", first.shutdown()).await;

    // While down: calls fail cleanly.
    let err = echo(&c, "down").await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");

    let (_second, _gate) = gated_server(&pki, &addr.to_string()).await;
    assert_eq!(echo(&c, "two").await.unwrap(), "two", "reconnects on the next call");
    for i in 0..10 {
        assert_eq!(echo(&c, &format!("n{i}")).await.unwrap(), format!("n{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_drops_an_idle_connection() {
    let pki = Pki::new();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().idle_timeout = Some(Duration::from_millis(200));
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let c = client(running.local_addr(), &pki.client_profile());
    assert_eq!(echo(&c, "a").await.unwrap(), "a");
    // Long enough for the idle close and for the client to read the end of the stream.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // One call may race with the close; the client must reconnect by the next one at the latest.
    let mut last = None;
    for attempt in 0..2 {
        match echo(&c, "b").await {
            Ok(t) => {
                assert_eq!(t, "b");
                last = None;
                break;
            }
            Err(e) => {
                assert!(matches!(e, Error::Transport { .. }), "attempt {attempt}: {e:?}");
                last = Some(e);
            }
        }
    }
    assert!(last.is_none(), "client did not reconnect: {last:?}");
    assert_eq!(echo(&c, "c").await.unwrap(), "c");
}

// ---------------------------------------------------------------------------------------------
// Per-method policy (tls_policy.rs covers the rule matching; this covers what a denial does)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_method_never_runs_the_handler_and_the_connection_stays_open() {
    let pki = Pki::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut sp = pki.server_profile();
    sp.policy = Policy::default()
        .with_rule(&["example.EchoService/*"], &["*"])
        .unwrap()
        .with_rule(&["t.Admin/*"], &["spiffe://example.org/ns/ops/*"])
        .unwrap();
    let mut server = Server::new(sp.server().unwrap());
    trustwire::echo::register(&mut server);
    let r = ran.clone();
    server.register("t.Admin", "Wipe", move |_req: Request| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(Response::default()) }
    });
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();
    let c = client(addr, &pki.client_profile());
    for _ in 0..3 {
        let err = c.call("t.Admin", "Wipe", vec![], opts(5000)).await.unwrap_err();
        assert_eq!(err.rpc_code(), Some(codes::ERPCAUTH), "{err:?}");
        assert_eq!(err.verdict(), Some(Verdict::MethodNotAllowed));
        let text = match &err {
            Error::Rpc { text, .. } => text.clone(),
            _ => unreachable!(),
        };
        assert!(text.starts_with(&format!("[{addr}][E1004]method_not_allowed: ")), "{text}");
        assert!(text.contains("t.Admin/Wipe"), "{text}");
        assert_eq!(echo(&c, "ok").await.unwrap(), "ok");
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a denied call must not reach the handler");
    // An unknown method is still ENOMETHOD, not a policy denial.
    let err = c.call("t.Admin", "Nope", vec![], opts(5000)).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(codes::ENOMETHOD), "{err:?}");
}

/// Dropping a client closes its connection at once (not at the server's idle timeout), so a
/// process that makes short-lived clients does not pile up sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_or_closing_a_client_closes_its_connection() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let addr = server.local_addr().to_string();
    let open_fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let before = open_fds();
    for _ in 0..20 {
        let c = client(&addr, &pki.client_profile());
        assert_eq!(echo(&c, "x").await.unwrap(), "x");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_fds() > before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} fds still open after 20 dropped clients",
            open_fds() - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let c = client(&addr, &pki.client_profile());
    assert_eq!(echo(&c, "before close").await.unwrap(), "before close");
    c.close();
    assert_eq!(echo(&c, "after close").await.unwrap(), "after close", "a closed client reconnects on demand");
}

/// A server that ends a connection cleanly (close_notify) has answered all it read, so a call
/// left unanswered then is sent once more on a new connection; only once, so a server that keeps
/// doing it gives a transport error rather than a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_unanswered_at_a_clean_close_is_retried_once() {
    let pki = Pki::new();
    let tls = pki.server_profile().server().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let answer_from = Arc::new(AtomicUsize::new(1));
    {
        let (accepted, answer_from) = (accepted.clone(), answer_from.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let n = accepted.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                let answer = n >= answer_from.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut s, _) = trustwire::transport::accept(&tls, tcp).await.unwrap();
                    let Some(req) = read_frame(&mut s).await else { return };
                    if answer {
                        let f = decode(&req);
                        let reply = Frame {
                            meta: RpcMeta {
                                response: Some(Default::default()),
                                correlation_id: f.meta.correlation_id,
                                ..Default::default()
                            },
                            payload: f.payload,
                            attachment: Bytes::new(),
                        };
                        s.write_all(&reply.to_bytes().unwrap()).await.unwrap();
                        let _ = read_frame(&mut s).await;
                    }
                    // close_notify, then FIN.
                    let _ = s.shutdown().await;
                });
            }
        });
    }
    let c = client(addr, &pki.client_profile());
    assert_eq!(bounded("retried call", echo(&c, "second time lucky")).await.unwrap(), "second time lucky");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one retry on a new connection");

    answer_from.store(usize::MAX, Ordering::SeqCst);
    let c = client(addr, &pki.client_profile());
    let err = bounded("unanswered call", echo(&c, "never")).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 4, "exactly one retry");
}

/// A handler doing long work learns that its caller went away (the connection closed), so it can
/// stop instead of working for nobody; a caller still connected is not cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_is_cancelled_when_its_callers_connection_closes() {
    let pki = Pki::new();
    let mut server = Server::new(pki.server_profile().server().unwrap());
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    server.register("t.Slow", "Work", move |req: Request| {
        let seen = seen_tx.clone();
        let g = g.clone();
        async move {
            let _ = seen.send("started");
            tokio::select! {
                _ = req.cancelled.cancelled() => {
                    let _ = seen.send("cancelled");
                    Err(Status::new(codes::ELOGOFF, "the caller went away"))
                }
                _ = async { g.acquire().await.map(|p| p.forget()) } => {
                    let _ = seen.send("finished");
                    Ok(Response::new(req.payload))
                }
            }
        }
    });
    let server = server.bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr();

    // Connected throughout: the handler runs to the end.
    let mut kept = raw_tls(&pki.client_profile(), addr).await;
    kept.write_all(&request_frame(1, "t.Slow", "Work", b"kept".to_vec()).to_bytes().unwrap()).await.unwrap();
    kept.flush().await.unwrap();
    assert_eq!(bounded("started", seen_rx.recv()).await, Some("started"));
    gate.add_permits(1);
    assert_eq!(bounded("finished", seen_rx.recv()).await, Some("finished"));
    assert_eq!(&decode(&read_frame(&mut kept).await.expect("an answer")).payload[..], b"kept");

    // Gone mid-call: the handler sees the cancellation, whichever way the caller left.
    for clean in [true, false] {
        let mut s = raw_tls(&pki.client_profile(), addr).await;
        s.write_all(&request_frame(2, "t.Slow", "Work", b"lost".to_vec()).to_bytes().unwrap()).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(bounded("started", seen_rx.recv()).await, Some("started"));
        if clean {
            s.shutdown().await.unwrap();
        }
        drop(s);
        assert_eq!(bounded("cancelled", seen_rx.recv()).await, Some("cancelled"), "clean close: {clean}");
    }
}
