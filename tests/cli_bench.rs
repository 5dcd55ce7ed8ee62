//! `trustwire bench` as an operator runs it: against `serve-echo` (a child process), a server
//! that refuses us, one we do not trust, and with bad arguments. No assertion depends on how fast
//! the machine is: counts are exact, and the only bounds on time are ones that a slower machine
//! cannot break.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::cli::{ok, p, pki_dir, run, serve};
use serde_json::Value;
use trustwire::rpc::{Response, Server, Status};

const ECHO: &str = "example.EchoService/Echo";

/// `bench ADDR TARGET` as the `web` client of a `pki_dir`, trusting `ca`, with `extra` flags.
fn bench(d: &Path, ca: &str, addr: &str, target: &str, extra: &[&str]) -> Output {
    let (cert, key) = (p(d, "web.pem"), p(d, "web.key"));
    let mut args = vec!["bench", addr, target, "--cert", &cert, "--key", &key, "--ca", ca];
    args.extend_from_slice(extra);
    run(&args)
}

/// The one JSON object a `--json` run prints on stdout.
fn report(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("stdout is not one JSON object ({e}):\n{text}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

fn errors(v: &Value) -> &serde_json::Map<String, Value> {
    v["errors"].as_object().unwrap_or_else(|| panic!("errors is not an object: {v}"))
}

#[test]
fn calls_against_serve_echo_are_counted_exactly_and_reported_as_text_and_json() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    let ca = p(d, "ca.pem");

    let flags = ["--calls", "300", "--concurrency", "8", "--connections", "2", "--payload-bytes", "100"];
    let out = bench(d, &ca, &addr, ECHO, &flags);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("calls       300 (300 ok, 0 failed)"), "{text}");
    assert!(text.contains("errors      none"), "{text}");
    for want in ["2 connections", "8 in flight", "calls/s", "MiB/s sent", "p50 ", "p90 ", "p99 ", "p99.9 ", "max "] {
        assert!(text.contains(want), "report lacks {want:?}:\n{text}");
    }

    let out = bench(d, &ca, &addr, ECHO, &["--calls", "50", "--payload-bytes", "100", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!(v["calls"], 50, "{v}");
    assert_eq!(v["succeeded"], 50, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert!(errors(&v).is_empty(), "{v}");
    assert_eq!(v["payload_bytes"], 100, "{v}");
    assert_eq!(v["aborted"], Value::Null, "{v}");
    assert_eq!(v["new_connection_per_call"], false, "{v}");
    for field in ["duration_secs", "calls_per_sec", "mib_per_sec_sent", "mib_per_sec_received"] {
        assert!(v[field].is_number(), "{field} is not a number: {v}");
    }
    let lat = &v["latency_us"];
    let q = |k: &str| lat[k].as_u64().unwrap_or_else(|| panic!("latency_us.{k} missing: {v}"));
    assert!(q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("p99_9") && q("p99_9") <= q("max"), "{v}");

    // No payload, no MiB/s.
    let v = report(&bench(d, &ca, &addr, ECHO, &["--calls", "5", "--json"]));
    assert_eq!(v["succeeded"], 5, "{v}");
    assert_eq!(v["mib_per_sec_sent"], Value::Null, "{v}");

    // A payload file goes out as it is.
    std::fs::write(d.join("payload.bin"), vec![7u8; 1000]).unwrap();
    let v = report(&bench(d, &ca, &addr, ECHO, &["--calls", "10", "--payload-file", &p(d, "payload.bin"), "--json"]));
    assert_eq!((v["succeeded"].as_u64(), v["request_bytes"].as_u64()), (Some(10), Some(1000)), "{v}");
}

#[test]
fn a_new_connection_per_call_makes_every_handshake_and_counts_no_errors() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    let flags = ["--new-connection-per-call", "--calls", "40", "--concurrency", "4", "--json"];
    let out = bench(d, &p(d, "ca.pem"), &addr, ECHO, &flags);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!((v["calls"].as_u64(), v["succeeded"].as_u64(), v["failed"].as_u64()), (Some(40), Some(40), Some(0)));
    assert!(errors(&v).is_empty(), "{v}");
    assert_eq!(v["new_connection_per_call"], true, "{v}");
    assert_eq!(v["connections"], Value::Null, "{v}");
}

/// The server's allow-list does not name us. In TLS 1.3 our side of the handshake completes
/// first, so what we see is the server's access_denied alert: peer_alert.
#[test]
fn a_server_that_refuses_us_is_reported_by_verdict_and_fails_the_run() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &["--allow", "spiffe://example.org/ns/prod/someone-else"]);
    let ca = p(d, "ca.pem");

    // Pooled: the run stops once the connection fails before any call succeeded.
    let out = bench(d, &ca, &addr, ECHO, &["--duration", "30", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!(v["succeeded"], 0, "{v}");
    assert!(errors(&v).get("peer_alert").and_then(Value::as_u64).is_some_and(|n| n >= 1), "{v}");
    assert!(v["aborted"].as_str().is_some_and(|a| a.contains("[peer_alert]")), "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[peer_alert]") && err.contains("access_denied"), "{err}");

    // A new connection per call: every attempt is refused and counted under its verdict.
    let out =
        bench(d, &ca, &addr, ECHO, &["--new-connection-per-call", "--calls", "12", "--concurrency", "3", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!((v["calls"].as_u64(), v["failed"].as_u64()), (Some(12), Some(12)), "{v}");
    assert_eq!(errors(&v).get("peer_alert").and_then(Value::as_u64), Some(12), "{v}");

    // The text report names it too.
    let out = bench(d, &ca, &addr, ECHO, &["--calls", "3"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("peer_alert") && text.contains("0 ok"), "{text}");
}

/// A server whose CA we do not trust: our own verdict, unknown_issuer, before any call.
#[test]
fn a_server_we_do_not_trust_is_reported_as_unknown_issuer() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    let other = tempfile::tempdir().unwrap();
    ok(&["pki", "init", "--dir", &other.path().display().to_string()]);
    let wrong_ca = p(other.path(), "ca.pem");

    let out = bench(d, &wrong_ca, &addr, ECHO, &["--duration", "30", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!(v["succeeded"], 0, "{v}");
    assert_eq!(errors(&v).get("unknown_issuer").and_then(Value::as_u64), Some(1), "{v}");
    assert!(v["aborted"].as_str().is_some_and(|a| a.contains("[unknown_issuer] (we refused the peer)")), "{v}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("[unknown_issuer]"));

    let out = bench(d, &wrong_ca, &addr, ECHO, &["--new-connection-per-call", "--calls", "5", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(errors(&report(&out)).get("unknown_issuer").and_then(Value::as_u64), Some(5));
}

#[test]
fn bad_arguments_exit_2_with_a_message_and_send_nothing() {
    let dir = pki_dir();
    let d = dir.path();
    let ca = p(d, "ca.pem");
    // Nothing listens here; a run that got as far as connecting would fail with 1, not 2.
    let addr = "127.0.0.1:9";
    let cases: &[(&[&str], &str)] = &[
        (&["--concurrency", "0"], "--concurrency"),
        (&["--concurrency", "100000"], "--concurrency"),
        (&["--connections", "0"], "--connections"),
        (&["--connections", "4", "--concurrency", "2"], "more than --concurrency"),
        (&["--connections", "2", "--new-connection-per-call"], "cannot be used with"),
        (&["--duration", "1", "--calls", "5"], "cannot be used with"),
        (&["--duration", "0"], "--duration"),
        (&["--calls", "0"], "--calls"),
        (&["--rate", "0"], "--rate"),
        (&["--payload-bytes", "4", "--payload-file", "x"], "cannot be used with"),
        (&["--payload-bytes", "100000000"], "--payload-bytes"),
        (&["--timeout-ms", "0"], "--timeout-ms"),
    ];
    for (flags, want) in cases {
        let out = bench(d, &ca, addr, ECHO, flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: stderr lacks {want:?}: {err}");
        assert!(out.stdout.is_empty(), "{flags:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let out = bench(d, &ca, addr, "no-slash", &["--calls", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SERVICE/METHOD"));
}

/// --rate with --duration sends the calls due in that time and no more.
#[test]
fn rate_paces_the_calls() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    let out = bench(d, &p(d, "ca.pem"), &addr, ECHO, &["--rate", "40", "--duration", "1.5", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    let calls = v["calls"].as_u64().unwrap();
    // Unpaced, eight callers on loopback make thousands of calls in 1.5s.
    assert!(calls >= 1 && calls as f64 <= 40.0 * 1.5 * 1.5 + 5.0, "{v}");
    assert_eq!(v["rate"], 40.0, "{v}");
}

/// An in-process server: an Echo that accepts only a well-formed EchoRequest (as brpc's does),
/// and a method that takes 200ms per call.
async fn strict_server(pki: &common::Pki) -> trustwire::rpc::RunningServer {
    let mut server = Server::new(pki.server_profile().server().unwrap());
    server.register("example.EchoService", "Echo", |req: trustwire::rpc::Request| async move {
        match trustwire::echo::decode(&req.payload) {
            Ok(message) if message.len() == 333 && message.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(Response::new(trustwire::echo::encode(&message)))
            }
            Ok(message) => Err(Status::new(2001, format!("a {}-byte message", message.len()))),
            Err(e) => Err(Status::new(1003, format!("not an EchoRequest: {e}"))),
        }
    });
    server.register("test.Slow", "Sleep", |_req: trustwire::rpc::Request| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Response::default())
    });
    server.bind("127.0.0.1:0").await.unwrap()
}

fn bench_in(pki: &common::Pki, addr: String, target: &'static str, extra: &'static [&'static str]) -> Output {
    let (cert, key, ca) = (pki.path("client.pem"), pki.path("client.key"), pki.path("ca.pem"));
    std::process::Command::new(common::trustwire_bin())
        .args(["bench", &addr, target, "--json"])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(ca)
        .args(extra)
        .output()
        .unwrap()
}

/// --payload-bytes for example.EchoService/Echo sends an EchoRequest with a message that long,
/// which a server decoding the request accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_payload_is_a_real_echo_request() {
    let pki = std::sync::Arc::new(common::Pki::new());
    let server = strict_server(&pki).await;
    let addr = server.local_addr().to_string();
    let p2 = pki.clone();
    let out =
        tokio::task::spawn_blocking(move || bench_in(&p2, addr, ECHO, &["--calls", "20", "--payload-bytes", "333"]))
            .await
            .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!((v["succeeded"].as_u64(), v["payload_bytes"].as_u64()), (Some(20), Some(333)), "{v}");
}

/// With --rate, latency runs from each call's scheduled time: one caller against a 200ms method
/// at 20 calls/s falls further behind with every call, and the report says so. A closed loop
/// would report ~200ms for each. (A slower machine only makes the latencies longer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_latency_counts_the_time_a_call_waited_for_its_turn() {
    let pki = std::sync::Arc::new(common::Pki::new());
    let server = strict_server(&pki).await;
    let addr = server.local_addr().to_string();
    let p2 = pki.clone();
    let flags = &["--calls", "6", "--rate", "20", "--concurrency", "1"];
    let out = tokio::task::spawn_blocking(move || bench_in(&p2, addr, "test.Slow/Sleep", flags)).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = report(&out);
    assert_eq!(v["succeeded"], 6, "{v}");
    // Call k (from 0) is due at 50k ms and cannot start before 200k ms: the last waited 750ms
    // before its own 200ms.
    let max = v["latency_us"]["max"].as_u64().unwrap();
    assert!(max >= 900_000, "max latency {max}us does not include the wait for its turn: {v}");
}
