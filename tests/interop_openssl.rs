//! Interop with the `openssl` command line tool, a TLS stack we did not write:
//! `s_client` calls a trustwire server with a real brpc request frame, and a trustwire client
//! handshakes with `s_server`, including the P-256-only setup of a stock brpc server.
//!
//! The tests skip (loudly) when the `openssl` binary is absent; CI installs it (scripts/deps.sh).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::peers::*;
use common::*;
use trustwire::pki::{DevCa, IssueRequest};
use trustwire::Verdict;

fn have_openssl() -> bool {
    tool_available(Command::new("openssl").arg("version"), "the `openssl` binary (OpenSSL interop)")
}

fn s_client(pki_dir: &Path, port: u16, cert: Option<&str>) -> Command {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(pki_dir).args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    cmd.args(["-CAfile", "ca.pem", "-verify_return_error", "-servername", "localhost"]);
    cmd.args(["-verify_hostname", "localhost"]);
    if let Some(name) = cert {
        cmd.args(["-cert", &format!("{name}.pem"), "-key", &format!("{name}.key")]);
    }
    // -brief: a short summary on stderr and nothing but the peer's data on stdout;
    // -ign_eof: keep the connection up after stdin is done, and no command letters.
    cmd.args(["-brief", "-ign_eof", "-nocommands"]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_calls_echo_with_brpc_capture_over_tls13() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let mut sc = Proc::spawn(&mut s_client(pki.dir.path(), server.local_addr().port(), Some("client")));
    sc.write(&capture("echo_request.bin"));
    let frame = sc.wait_for("the echo response frame", |out, _| frame_in(out));
    assert_echo_answer(&frame);
    // The response is the whole of what came back, and byte for byte what brpc's server sends.
    let out = sc.stdout();
    assert_eq!(out, capture("echo_response.bin"), "response differs from the brpc capture");
    // -brief's summary (on stderr): the negotiated version, and the server verified.
    let summary =
        sc.wait_for("s_client's connection summary", |_, err| err.contains("Verification").then(|| err.to_string()));
    assert!(summary.contains("Protocol version: TLSv1.3"), "{summary}");
    assert!(summary.contains("Verification: OK"), "{summary}");
    // A second request on the same connection works as well.
    sc.write(&capture("echo_request.bin"));
    let one = out.len();
    let second = sc.wait_for("the second response", |out, _| frame_in(&out[one..]));
    assert_echo_answer(&second);
    assert_eq!(sc.stdout().len(), 2 * one);
    assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_without_certificate_is_refused() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let mut sc = Proc::spawn(&mut s_client(pki.dir.path(), server.local_addr().port(), None));
    // In TLS 1.3 the client finishes its side first, then learns of the refusal from an alert.
    sc.write(&capture("echo_request.bin"));
    let status = sc.wait_exit();
    assert!(sc.stdout().is_empty(), "no answer expected:\n{}", sc.output());
    let err = sc.stderr();
    assert!(!status.success() || err.contains("alert"), "{}", sc.output());
    assert!(err.contains("certificate required"), "s_client should report the alert:\n{}", sc.output());
    assert_eq!(server_verdict(&seen).await, Verdict::NoPeerCertificate);
    assert_eq!(server_verdict(&seen).await.name(), "no_peer_certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_with_certificate_from_another_ca_is_refused_as_unknown_issuer() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let rogue = DevCa::new("example.org").unwrap();
    rogue.issue(&client_usage("rogue", CLIENT_ID)).unwrap().write(pki.dir.path(), "rogue").unwrap();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let mut sc = Proc::spawn(&mut s_client(pki.dir.path(), server.local_addr().port(), Some("rogue")));
    sc.write(&capture("echo_request.bin"));
    sc.wait_exit();
    assert!(sc.stdout().is_empty(), "no answer expected:\n{}", sc.output());
    assert!(sc.stderr().contains("alert"), "s_client should report the alert:\n{}", sc.output());
    assert_eq!(server_verdict(&seen).await.name(), "unknown_issuer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_client_offering_only_tls12_is_refused_as_protocol_version() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let mut cmd = s_client(pki.dir.path(), server.local_addr().port(), Some("client"));
    cmd.arg("-tls1_2");
    let mut sc = Proc::spawn(&mut cmd);
    let status = sc.wait_exit();
    assert!(!status.success(), "{}", sc.output());
    assert!(sc.stderr().contains("protocol version"), "{}", sc.output());
    assert_eq!(server_verdict(&seen).await.name(), "protocol_version");
}

/// `openssl s_server` requiring a client certificate, on a port it picks and prints.
fn s_server(pki_dir: &Path, cert: &str, extra: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(pki_dir).args(["s_server", "-accept", "127.0.0.1:0", "-naccept", "1"]);
    cmd.args(["-cert", &format!("{cert}.pem"), "-key", &format!("{cert}.key")]);
    cmd.args(["-CAfile", "ca.pem", "-Verify", "1", "-verify_return_error"]);
    cmd.args(extra);
    let mut p = Proc::spawn(&mut cmd);
    let port = p.wait_for("s_server's ACCEPT line", |out, _| {
        let text = String::from_utf8_lossy(out);
        let line = text.lines().find(|l| l.starts_with("ACCEPT "))?;
        Some(line.rsplit(':').next()?.trim().parse::<u16>().expect("port"))
    });
    (p, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trustwire_client_handshakes_with_s_server() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let (mut ss, port) = s_server(pki.dir.path(), "server", &[]);
    let c = client(format!("127.0.0.1:{port}"), &pki.client_profile());
    let info = c.connect().await.unwrap().expect("handshake info");
    assert_eq!(info.version, "TLSv1.3");
    assert_eq!(info.peer.spiffe_id.as_deref(), Some(SERVER_ID));
    // s_server verified our certificate and shows who we are.
    ss.wait_for("s_server to verify the client", |out, _| {
        let text = String::from_utf8_lossy(out);
        text.contains("CIPHER is").then_some(())
    });
    let out = String::from_utf8_lossy(&ss.stdout()).into_owned();
    assert!(!out.contains("verify error"), "{}", ss.output());
    assert!(out.contains("Client certificate"), "s_server should have our certificate:\n{}", ss.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_server_with_wrong_name_is_refused_as_name_mismatch() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    pki.issue(
        IssueRequest::new("elsewhere").spiffe_id("spiffe://example.org/ns/test/elsewhere").dns("elsewhere.example.org"),
    );
    let (_ss, port) = s_server(pki.dir.path(), "elsewhere", &[]);
    let mut cp = pki.client_profile();
    cp.server_name = Some("localhost".into());
    let err = client(format!("127.0.0.1:{port}"), &cp).connect().await.unwrap_err();
    assert_eq!(err.verdict().map(Verdict::name), Some("name_mismatch"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_server_from_another_ca_is_refused_as_unknown_issuer() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let rogue = DevCa::new("example.org").unwrap();
    rogue
        .issue(&IssueRequest::new("rogue-server").spiffe_id(SERVER_ID).dns("localhost").ip(localhost()))
        .unwrap()
        .write(pki.dir.path(), "rogue-server")
        .unwrap();
    let (_ss, port) = s_server(pki.dir.path(), "rogue-server", &[]);
    let err = client(format!("127.0.0.1:{port}"), &pki.client_profile()).connect().await.unwrap_err();
    assert_eq!(err.verdict().map(Verdict::name), Some("unknown_issuer"), "{err}");
}

/// Stock brpc servers offer only secp256r1. rustls leads with an X25519 key share, so the first
/// connection gets a HelloRetryRequest and completes on P-256; the client remembers the group,
/// so the next connection to that server sends a P-256 share first and needs no retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_server_offering_only_p256_costs_one_hello_retry_then_none() {
    if !have_openssl() {
        return;
    }
    let pki = Pki::new();
    let (mut ss, port) = s_server(pki.dir.path(), "server", &["-groups", "P-256", "-naccept", "2"]);
    let tls = pki.client_profile().client().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (stream, info) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
        assert_eq!(info.version, "TLSv1.3");
        assert_eq!(info.kx_group.as_deref(), Some("secp256r1"));
        seen.push(info.hello_retry);
        drop(stream);
    }
    assert_eq!(seen, [true, false], "HelloRetryRequest on the first connection, none on the second");
    ss.wait_for("s_server to finish the handshake", |out, _| {
        String::from_utf8_lossy(out).contains("CIPHER is").then_some(())
    });
}
