//! The blocking client (`rpc::blocking`): one thread drives its own connection with blocking
//! system calls. Servers run on the shared runtime; the calls are made from the test thread.

mod common;
use common::raw::{answer, raw_server, read_request};
use common::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trustwire::error::codes;
use trustwire::rpc::blocking::{BlockingClient, Failure};
use trustwire::rpc::RunningServer;
use trustwire::{CallOptions, ClientOptions, Error, Request, Response, Server, TlsProfile, Verdict};

fn rt() -> &'static tokio::runtime::Runtime {
    trustwire::runtime::runtime()
}

fn start(server: Server) -> RunningServer {
    rt().block_on(server.bind("127.0.0.1:0")).unwrap()
}

/// An echo server that also has `t.Slow/Sleep` (answers after `slow`) and `t.Raw/Echo` (the
/// payload as it came).
fn server(pki: &Pki, slow: Duration) -> RunningServer {
    let mut server = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut server);
    server.register("t.Slow", "Sleep", move |_req: Request| async move {
        tokio::time::sleep(slow).await;
        Ok(Response::new(trustwire::echo::encode("late")))
    });
    server.register("t.Raw", "Echo", |req: Request| async move { Ok(Response::new(req.payload)) });
    // Answers its payload after as many milliseconds as the payload says.
    server.register("t.Wait", "Ms", |req: Request| async move {
        let ms: u64 = std::str::from_utf8(&req.payload).unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Response::new(req.payload))
    });
    start(server)
}

fn blocking(addr: impl ToString, profile: &TlsProfile) -> BlockingClient {
    BlockingClient::new(addr.to_string(), profile.client().unwrap(), ClientOptions::default())
}

fn within(ms: u64) -> CallOptions {
    CallOptions { timeout: Some(Duration::from_millis(ms)), ..Default::default() }
}

fn go_on() -> impl FnMut() -> Result<(), ()> {
    || Ok(())
}

fn echo_on(c: &mut BlockingClient, text: &str) -> Result<String, Error> {
    match c.call("example.EchoService", "Echo", trustwire::echo::encode(text), within(5000), &mut go_on()) {
        Ok(r) => Ok(trustwire::echo::decode(&r.payload).unwrap()),
        Err(Failure::Error(e)) => Err(e),
        Err(Failure::Interrupted(())) => unreachable!("go_on never interrupts"),
    }
}

#[test]
fn sequential_calls_share_one_connection_and_each_gets_its_own_answer() {
    let pki = Pki::new();
    let running = server(&pki, Duration::ZERO);
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    assert_eq!(c.local_addr(), None, "connects on the first call");
    assert_eq!(echo_on(&mut c, "first").unwrap(), "first");
    let conn = c.local_addr().expect("connected");
    for i in 0..200 {
        let text = format!("call-{i}");
        assert_eq!(echo_on(&mut c, &text).unwrap(), text);
    }
    assert_eq!(c.local_addr(), Some(conn), "one connection for all of them");
}

#[test]
fn an_error_answer_reaches_the_caller_with_its_code() {
    let pki = Pki::new();
    let running = server(&pki, Duration::ZERO);
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    match c.call("example.EchoService", "Nope", vec![], within(5000), &mut go_on()) {
        Err(Failure::Error(Error::Rpc { code, .. })) => assert_eq!(code, codes::ENOMETHOD),
        other => panic!("expected ENOMETHOD, got {other:?}"),
    }
    assert_eq!(echo_on(&mut c, "still fine").unwrap(), "still fine");
}

#[test]
fn a_timed_out_call_leaves_the_connection_usable_and_its_late_answer_is_dropped() {
    let pki = Pki::new();
    let running = server(&pki, Duration::from_millis(400));
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    assert_eq!(echo_on(&mut c, "before").unwrap(), "before");
    let conn = c.local_addr();
    match c.call("t.Slow", "Sleep", vec![], within(100), &mut go_on()) {
        Err(Failure::Error(Error::Timeout { after, message })) => {
            assert_eq!(after, Duration::from_millis(100));
            assert!(message.contains("t.Slow/Sleep"), "{message}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(echo_on(&mut c, "during").unwrap(), "during");
    // A late answer that arrives while a later call waits is not taken for that call's.
    let wait = |c: &mut BlockingClient, ms: u64, timeout: u64| {
        c.call("t.Wait", "Ms", ms.to_string(), within(timeout), &mut go_on()).map(|r| r.payload)
    };
    assert!(matches!(wait(&mut c, 400, 100), Err(Failure::Error(Error::Timeout { .. }))));
    assert_eq!(wait(&mut c, 700, 5000).unwrap(), "700");
    // The late answer comes while the connection is idle, and is taken in before the next call.
    std::thread::sleep(Duration::from_millis(600));
    for i in 0..20 {
        let text = format!("after-{i}");
        assert_eq!(echo_on(&mut c, &text).unwrap(), text);
    }
    assert_eq!(c.local_addr(), conn);
}

#[test]
fn a_call_that_check_interrupts_returns_what_check_said_and_the_next_call_is_answered() {
    let pki = Pki::new();
    let running = server(&pki, Duration::from_millis(3000));
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    assert_eq!(echo_on(&mut c, "before").unwrap(), "before");
    let checks = AtomicUsize::new(0);
    let mut stop_at_second = || if checks.fetch_add(1, Ordering::Relaxed) >= 1 { Err("stop") } else { Ok(()) };
    let started = Instant::now();
    match c.call("t.Slow", "Sleep", vec![], within(30_000), &mut stop_at_second) {
        Err(Failure::Interrupted("stop")) => {}
        other => panic!("expected the interruption, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(2500), "check runs while the call waits");
    assert_eq!(echo_on(&mut c, "after").unwrap(), "after");
}

#[test]
fn a_server_that_closed_cleanly_is_replaced_and_the_call_goes_through() {
    let pki = Pki::new();
    let first = server(&pki, Duration::ZERO);
    let addr = first.local_addr();
    let mut c = blocking(addr, &pki.client_profile());
    assert_eq!(echo_on(&mut c, "one").unwrap(), "one");
    let conn = c.local_addr();
    rt().block_on(first.shutdown());
    let mut second = Server::new(pki.server_profile().server().unwrap());
    trustwire::echo::register(&mut second);
    let _second = rt().block_on(second.bind(&addr.to_string())).unwrap();
    assert_eq!(echo_on(&mut c, "two").unwrap(), "two");
    assert_ne!(c.local_addr(), conn, "a new connection");
}

#[test]
fn a_closer_fails_the_call_in_flight_on_another_thread_and_every_later_call() {
    let pki = Pki::new();
    let running = server(&pki, Duration::from_secs(20));
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    assert_eq!(echo_on(&mut c, "before").unwrap(), "before");
    let closer = c.closer();
    let caller = std::thread::spawn(move || {
        let started = Instant::now();
        let r = c.call("t.Slow", "Sleep", vec![], within(30_000), &mut go_on());
        (r, started.elapsed(), c)
    });
    std::thread::sleep(Duration::from_millis(200));
    closer.close();
    let (r, took, mut c) = caller.join().unwrap();
    match r {
        Err(Failure::Error(Error::Transport { message })) => assert!(message.contains("closed"), "{message}"),
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "the call ended when the client was closed");
    assert!(matches!(echo_on(&mut c, "later"), Err(Error::Transport { .. })));
}

#[test]
fn requests_and_answers_larger_than_the_tls_buffers_go_through_whole() {
    let pki = Pki::new();
    let running = server(&pki, Duration::ZERO);
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    for size in [0usize, 1, 16_383, 16_385, 300_000, 4 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let r = c.call("t.Raw", "Echo", payload.clone(), within(20_000), &mut go_on()).unwrap();
        assert_eq!(r.payload.len(), size);
        assert!(r.payload == payload, "the {size}-byte answer is the request");
    }
}

#[test]
fn a_server_refusing_our_certificate_is_reported_with_its_verdict() {
    let pki = Pki::new();
    let running = rt().block_on(echo_server_allowing(&pki, &["spiffe://example.org/ns/test/someone-else"]));
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    let err = echo_on(&mut c, "hi").unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::PeerAlert), "{err}");
    // And again, on a new connection: the refusal is not a failure of the client.
    let err = echo_on(&mut c, "hi").unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::PeerAlert), "{err}");
}

#[test]
fn an_untrusted_server_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let other = Pki::new();
    let running = server(&other, Duration::ZERO);
    let mut c = blocking(running.local_addr(), &pki.client_profile());
    let err = echo_on(&mut c, "hi").unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::UnknownIssuer), "{err}");
}

#[test]
fn a_blocking_call_on_a_runtime_thread_is_refused_rather_than_blocking_it() {
    let pki = Pki::new();
    let running = server(&pki, Duration::ZERO);
    let c = Arc::new(std::sync::Mutex::new(blocking(running.local_addr(), &pki.client_profile())));
    let r = rt().block_on(async {
        let c = c.clone();
        tokio::spawn(async move {
            let mut c = c.lock().unwrap();
            matches!(
                c.call("example.EchoService", "Echo", vec![], within(1000), &mut go_on()),
                Err(Failure::Error(Error::Config { .. }))
            )
        })
        .await
        .unwrap()
    });
    assert!(r, "a configuration error, not a blocked worker");
}

#[test]
fn a_call_abandoned_half_sent_ends_its_connection() {
    // The server never reads, so a large request stops part-way when the call times out; the
    // next request must not follow the cut-off one on the same stream.
    let pki = Pki::new();
    let (addr, accepted) = raw_server(&pki, |s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let mut c = blocking(addr, &pki.client_profile());
    let big = vec![7u8; 48 << 20];
    match c.call("t.Raw", "Echo", big, within(300), &mut go_on()) {
        Err(Failure::Error(Error::Timeout { .. })) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let _ = c.call("t.Raw", "Echo", vec![1u8], within(300), &mut go_on());
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the second call went over a new connection");
}

#[test]
fn check_runs_while_a_server_keeps_sending_something_else() {
    // Stale answers every 20 ms keep recv busy; Ctrl-C must still be looked at.
    let pki = Pki::new();
    let (addr, _) = raw_server(&pki, |mut s| async move {
        use tokio::io::AsyncWriteExt;
        let req = read_request(&mut s).await;
        let stale = answer(req.meta.correlation_id.unwrap() - 1000, b"not yours");
        for _ in 0..500 {
            if s.write_all(&stale).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut c = blocking(addr, &pki.client_profile());
    let started = Instant::now();
    let checks = AtomicUsize::new(0);
    let mut stop_at_third = || if checks.fetch_add(1, Ordering::Relaxed) >= 2 { Err("stop") } else { Ok(()) };
    match c.call("t.Raw", "Echo", vec![], within(8000), &mut stop_at_third) {
        Err(Failure::Interrupted("stop")) => {}
        other => panic!("expected the interruption, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
}

#[test]
fn a_server_that_sends_garbage_or_an_oversized_frame_fails_the_call_and_the_next_one_reconnects() {
    let pki = Pki::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let (addr, accepted) = raw_server(&pki, move |mut s| {
        let n = n.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let req = read_request(&mut s).await;
            let id = req.meta.correlation_id.unwrap();
            let reply = match n.fetch_add(1, Ordering::SeqCst) {
                0 => b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                // A header that claims a 1 GiB body.
                1 => [&b"PRPC"[..], &(1u32 << 30).to_be_bytes(), &8u32.to_be_bytes()].concat(),
                _ => answer(id, b"fine"),
            };
            let _ = s.write_all(&reply).await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let options = ClientOptions { max_body: 1 << 20, ..ClientOptions::default() };
    let mut c = BlockingClient::new(addr.to_string(), pki.client_profile().client().unwrap(), options);
    for what in ["garbage", "an oversized frame"] {
        match c.call("t.Raw", "Echo", vec![], within(5000), &mut go_on()) {
            Err(Failure::Error(Error::Protocol { message })) => assert!(message.contains("invalid frame"), "{message}"),
            other => panic!("expected a protocol error for {what}, got {other:?}"),
        }
    }
    let r = c.call("t.Raw", "Echo", vec![], within(5000), &mut go_on()).unwrap();
    assert_eq!(&r.payload[..], b"fine");
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection after each bad one");
}
