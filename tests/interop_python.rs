//! Interop with Python's `ssl` module (OpenSSL underneath, driven by a stdlib-only script we
//! did not write against rustls): a Python client calls a trustwire server with the brpc echo
//! capture, and clients that offer only TLS 1.2 or no certificate are refused.
//!
//! The tests skip (loudly) when `python3` is absent.

mod common;

use std::process::{Command, ExitStatus};

use common::peers::*;
use common::*;
use trustwire::pki::DevCa;
use trustwire::rpc::RunningServer;

fn have_python() -> bool {
    tool_available(
        Command::new("python3").args(["-c", "import ssl"]),
        "`python3` with the ssl module (Python's ssl interop)",
    )
}

/// A child process whose output is collected by background threads. Killed on drop.
/// The Python client. Arguments: port, CA file, cert file or "-", key file or "-", request
/// file, max TLS version ("1.2" or "-"). Prints `version`, `cipher`, `peer_uri` and `frame`
/// (hex) lines, or an `error` line and exits with 3 when the connection fails.
const CLIENT_PY: &str = r#"
import socket, ssl, sys

port, cafile, cert, key, request, maxver = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile)
if cert != "-":
    ctx.load_cert_chain(cert, key)
if maxver == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2

def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf

try:
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            print("version", tls.version(), flush=True)
            print("cipher", tls.cipher()[0], flush=True)
            for kind, value in tls.getpeercert().get("subjectAltName", ()):
                if kind == "URI":
                    print("peer_uri", value, flush=True)
            with open(request, "rb") as f:
                tls.sendall(f.read())
            header = read_exact(tls, 12)
            if header[:4] != b"PRPC":
                raise ValueError("not a baidu_std frame: %r" % header)
            body = read_exact(tls, int.from_bytes(header[4:8], "big"))
            print("frame", (header + body).hex(), flush=True)
except (ssl.SSLError, OSError, EOFError, ValueError) as e:
    print("error", type(e).__name__, e, flush=True)
    sys.exit(3)
"#;

struct PyRun {
    status: ExitStatus,
    lines: Vec<(String, String)>,
    output: String,
}

impl PyRun {
    fn get(&self, key: &str) -> Option<&str> {
        self.lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn run_python(pki: &Pki, server: &RunningServer, cert: Option<&str>, max_tls12: bool) -> PyRun {
    let path = |f: String| pki.path(&f).to_string_lossy().into_owned();
    let (cert, key) = match cert {
        Some(n) => (path(format!("{n}.pem")), path(format!("{n}.key"))),
        None => ("-".into(), "-".into()),
    };
    let request = captures().join("echo_request.bin").to_string_lossy().into_owned();
    let mut p = Proc::spawn(
        Command::new("python3")
            .args(["-I", "-c", CLIENT_PY])
            .arg(server.local_addr().port().to_string())
            .args([path("ca.pem".into()), cert, key, request])
            .arg(if max_tls12 { "1.2" } else { "-" }),
    );
    drop(p.stdin.take());
    let status = p.wait_exit();
    let out = String::from_utf8_lossy(&p.stdout()).into_owned();
    let lines = out.lines().filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    PyRun { status, lines, output: p.output() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_calls_echo_with_brpc_capture() {
    if !have_python() {
        return;
    }
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let run = tokio::task::block_in_place(|| run_python(&pki, &server, Some("client"), false));
    assert!(run.status.success(), "{}", run.output);
    assert_eq!(run.get("version"), Some("TLSv1.3"), "{}", run.output);
    assert_eq!(run.get("peer_uri"), Some(SERVER_ID), "{}", run.output);
    let bytes = hex::decode(run.get("frame").expect("a frame line")).unwrap();
    let frame = frame_in(&bytes).expect("one complete frame");
    assert_echo_answer(&frame);
    assert_eq!(bytes, capture("echo_response.bin"), "response differs from the brpc capture");
    assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_limited_to_tls12_is_refused_as_protocol_version() {
    if !have_python() {
        return;
    }
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let run = tokio::task::block_in_place(|| run_python(&pki, &server, Some("client"), true));
    assert_eq!(run.status.code(), Some(3), "{}", run.output);
    let err = run.get("error").expect("an error line");
    assert!(err.contains("SSLError") && err.to_ascii_lowercase().contains("protocol version"), "{}", run.output);
    assert!(run.get("frame").is_none());
    assert_eq!(server_verdict(&seen).await.name(), "protocol_version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_without_certificate_is_refused() {
    if !have_python() {
        return;
    }
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let run = tokio::task::block_in_place(|| run_python(&pki, &server, None, false));
    assert_eq!(run.status.code(), Some(3), "{}", run.output);
    // TLS 1.3: the client's side completes, the refusal arrives as an alert on the first read.
    let err = run.get("error").expect("an error line");
    assert!(err.to_ascii_lowercase().contains("certificate required"), "{}", run.output);
    assert!(run.get("frame").is_none());
    assert_eq!(server_verdict(&seen).await.name(), "no_peer_certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_with_certificate_from_another_ca_is_refused_as_unknown_issuer() {
    if !have_python() {
        return;
    }
    let pki = Pki::new();
    let rogue = DevCa::new("example.org").unwrap();
    rogue.issue(&client_usage("rogue", CLIENT_ID)).unwrap().write(pki.dir.path(), "rogue").unwrap();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let run = tokio::task::block_in_place(|| run_python(&pki, &server, Some("rogue"), false));
    assert_eq!(run.status.code(), Some(3), "{}", run.output);
    assert!(run.get("frame").is_none());
    assert_eq!(server_verdict(&seen).await.name(), "unknown_issuer");
}
