//! Interop with Go's crypto/tls, a TLS stack we did not write: a small stdlib-only Go peer
//! (tests/go/tlspeer) calls a trustwire server with the brpc echo capture, serves a trustwire
//! client and reports the SPIFFE ID it verified, and refuses or is refused as it should.
//!
//! The peer is built with `go build` into the target directory (with GOCACHE, GOPATH and the
//! Go config dir there too, so nothing is written outside the repo). The tests skip (loudly)
//! when `go` is absent.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

use common::peers::*;
use common::*;
use trustwire::pki::IssueRequest;
use trustwire::rpc::RunningServer;
use trustwire::{Error, Verdict};

/// Builds tests/go/tlspeer once per test run; None (after a loud notice) when `go` is absent.
fn tlspeer() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| go_build("tlspeer", false, "Go crypto/tls interop")).clone()
}

/// Runs the Go client against `server`; returns its exit status, stdout and the whole output.
fn go_client(
    bin: &Path,
    pki: &Pki,
    server: &RunningServer,
    cert: Option<&str>,
    name: &str,
) -> (ExitStatus, Vec<u8>, String) {
    let mut cmd = Command::new(bin);
    cmd.current_dir(pki.dir.path()).arg("client");
    cmd.args(["-addr", &server.local_addr().to_string(), "-ca", "ca.pem", "-servername", name]);
    cmd.arg("-send").arg(captures().join("echo_request.bin"));
    if let Some(n) = cert {
        cmd.args(["-cert", &format!("{n}.pem"), "-key", &format!("{n}.key")]);
    }
    let mut p = Proc::spawn(&mut cmd);
    drop(p.stdin.take());
    let status = p.wait_exit_within(WAIT);
    (status, p.stdout(), p.output())
}

/// Starts the Go server with `cert`; returns it and the port it printed.
fn go_server(bin: &Path, pki: &Pki, cert: &str, extra: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new(bin);
    cmd.current_dir(pki.dir.path()).arg("server");
    cmd.args(["-ca", "ca.pem", "-cert", &format!("{cert}.pem"), "-key", &format!("{cert}.key")]);
    cmd.args(extra);
    let mut p = Proc::spawn(&mut cmd);
    let port = p.wait_for("the Go server's port line", |out, _| {
        let text = String::from_utf8_lossy(out);
        let line = text.lines().next().filter(|_| text.contains('\n'))?;
        Some(line.strip_prefix("port ").expect("first line is the port").parse::<u16>().unwrap())
    });
    (p, port)
}

/// The Go server's report on the first connection: `peer URI VERSION GROUP` or `refused ERR`.
fn go_report(p: &mut Proc) -> String {
    p.wait_for("the Go server's connection report", |out, _| {
        let text = String::from_utf8_lossy(out);
        let line = text.lines().nth(1).filter(|_| text.matches('\n').count() >= 2)?;
        Some(line.to_string())
    })
}

/// Go's name for a group, in trustwire's (rustls') spelling.
fn rustls_group_name(go: &str) -> &str {
    match go {
        "CurveP256" => "secp256r1",
        "CurveP384" => "secp384r1",
        other => other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_calls_echo_with_brpc_capture() {
    let Some(bin) = tokio::task::block_in_place(tlspeer) else { return };
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let (status, out, output) =
        tokio::task::block_in_place(|| go_client(&bin, &pki, &server, Some("client"), "localhost"));
    assert!(status.success(), "{output}");
    let frame = frame_in(&out).expect("a complete frame on stdout");
    assert_echo_answer(&frame);
    assert_eq!(out, capture("echo_response.bin"), "response differs from the brpc capture");
    assert!(output.contains("connected TLS 1.3"), "{output}");
    assert!(output.contains(&format!("server_uri {SERVER_ID}")), "{output}");
    assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_without_certificate_is_refused() {
    let Some(bin) = tokio::task::block_in_place(tlspeer) else { return };
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let (status, out, output) = tokio::task::block_in_place(|| go_client(&bin, &pki, &server, None, "localhost"));
    assert_eq!(status.code(), Some(3), "{output}");
    assert!(out.is_empty(), "{output}");
    assert!(output.contains("certificate required"), "Go should report the alert:\n{output}");
    assert_eq!(server_verdict(&seen).await.name(), "no_peer_certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_checks_our_server_name() {
    let Some(bin) = tokio::task::block_in_place(tlspeer) else { return };
    let pki = Pki::new();
    let (server, _seen) = recording_server(&pki.server_profile()).await;
    let (status, out, output) =
        tokio::task::block_in_place(|| go_client(&bin, &pki, &server, Some("client"), "payments.example.org"));
    assert_eq!(status.code(), Some(3), "{output}");
    assert!(out.is_empty(), "{output}");
    assert!(output.contains("not payments.example.org"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustwire_client_handshakes_with_go_server() {
    let Some(bin) = tokio::task::block_in_place(tlspeer) else { return };
    let pki = Pki::new();
    let (mut gs, port) = tokio::task::block_in_place(|| go_server(&bin, &pki, "server", &[]));
    let c = client(format!("127.0.0.1:{port}"), &pki.client_profile());
    let info = c.connect().await.unwrap().expect("handshake info");
    assert_eq!(info.version, "TLSv1.3");
    assert_eq!(info.peer.spiffe_id.as_deref(), Some(SERVER_ID));
    let report = tokio::task::block_in_place(|| go_report(&mut gs));
    eprintln!("Go server saw: {report}; we negotiated {:?}", info.kx_group);
    let fields: Vec<&str> = report.split(' ').collect();
    assert_eq!(fields[..4], ["peer", CLIENT_ID, "TLS", "1.3"], "Go saw: {report}");
    if fields[4] != "unknown" {
        assert_eq!(Some(rustls_group_name(fields[4])), info.kx_group.as_deref(), "Go saw: {report}");
    }
    // Application data flows both ways over the Go-terminated connection: Go echoes raw bytes,
    // so the call gets its own request frame back (same correlation_id). Like brpc's client,
    // trustwire reads a frame without response meta as error_code 0; all that matters here is
    // that the answer arrives at all, promptly.
    let opts = trustwire::CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    let res = c.call("example.EchoService", "Echo", trustwire::echo::encode("hi"), opts).await;
    assert!(!matches!(res, Err(Error::Timeout { .. })), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_server_offering_only_p256_completes_after_hello_retry() {
    let Some(bin) = tokio::task::block_in_place(tlspeer) else { return };
    let pki = Pki::new();
    let (mut gs, port) = tokio::task::block_in_place(|| go_server(&bin, &pki, "server", &["-p256"]));
    let info = client(format!("127.0.0.1:{port}"), &pki.client_profile()).connect().await.unwrap().unwrap();
    assert_eq!(info.kx_group.as_deref(), Some("secp256r1"));
    let report = tokio::task::block_in_place(|| go_report(&mut gs));
    assert!(report.starts_with(&format!("peer {CLIENT_ID} TLS 1.3")), "Go saw: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_server_with_wrong_name_is_refused_as_name_mismatch() {
    let Some(bin) = tokio::task::block_in_place(tlspeer) else { return };
    let pki = Pki::new();
    pki.issue(
        IssueRequest::new("elsewhere").spiffe_id("spiffe://example.org/ns/test/elsewhere").dns("elsewhere.example.org"),
    );
    let (mut gs, port) = tokio::task::block_in_place(|| go_server(&bin, &pki, "elsewhere", &[]));
    let err = client(format!("127.0.0.1:{port}"), &pki.client_profile()).connect().await.unwrap_err();
    assert_eq!(err.verdict().map(Verdict::name), Some("name_mismatch"), "{err}");
    let report = tokio::task::block_in_place(|| go_report(&mut gs));
    assert!(report.starts_with("refused"), "Go saw: {report}");
}
