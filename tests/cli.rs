//! The `trustwire` command as an operator uses it: dev PKI, echo server, call, probe, inspect.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::trustwire_bin;

fn run(args: &[&str]) -> Output {
    Command::new(trustwire_bin()).args(args).output().expect("run trustwire")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "trustwire {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).display().to_string()
}

/// Starts `serve-echo` on an ephemeral port and returns it with the address it printed.
fn serve(dir: &Path, extra: &[&str]) -> (Kill, String) {
    let mut args = vec![
        "serve-echo".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cert".into(),
        p(dir, "echo.pem"),
        "--key".into(),
        p(dir, "echo.key"),
        "--ca".into(),
        p(dir, "ca.pem"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(trustwire_bin())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(line.contains("serving"), "unexpected first line: {line}");
    (Kill(child), addr)
}

fn pki_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    ok(&["pki", "init", "--dir", &d, "--trust-domain", "example.org"]);
    ok(&["pki", "issue", "--dir", &d, "--name", "echo", "--spiffe-id", "spiffe://example.org/ns/prod/echo", "--dns", "localhost", "--ip", "127.0.0.1"]);
    ok(&["pki", "issue", "--dir", &d, "--name", "web", "--spiffe-id", "spiffe://example.org/ns/prod/web", "--usage", "client"]);
    ok(&["pki", "issue", "--dir", &d, "--name", "batch", "--spiffe-id", "spiffe://example.org/ns/batch/job"]);
    dir
}

#[test]
fn pki_serve_call_probe_inspect() {
    let dir = pki_dir();
    let d = dir.path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("web.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "private keys must not be readable by others");
    }
    let (_server, addr) = serve(d, &["--allow", "spiffe://example.org/ns/prod/*"]);

    let out = ok(&["call", &addr, "example.EchoService/Echo", "--echo", "hello cli", "--cert", &p(d, "web.pem"), "--key", &p(d, "web.key"), "--ca", &p(d, "ca.pem")]);
    assert_eq!(out.trim(), "hello cli");

    // A peer outside the allow-list: non-zero exit and the verdict on stderr.
    let out = run(&["call", &addr, "example.EchoService/Echo", "--echo", "x", "--cert", &p(d, "batch.pem"), "--key", &p(d, "batch.key"), "--ca", &p(d, "ca.pem")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[peer_alert]") && err.contains("access_denied"), "{err}");

    // Wrong server name.
    let out = run(&["call", &addr, "example.EchoService/Echo", "--echo", "x", "--server-name", "db.example.org", "--cert", &p(d, "web.pem"), "--key", &p(d, "web.key"), "--ca", &p(d, "ca.pem")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("[name_mismatch]") && err.contains("db.example.org"), "{err}");

    // Unknown method: the server's brpc error code.
    let out = run(&["call", &addr, "example.EchoService/Nope", "--cert", &p(d, "web.pem"), "--key", &p(d, "web.key"), "--ca", &p(d, "ca.pem")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("1002") && err.contains("ENOMETHOD"), "{err}");

    let out = ok(&["probe", &addr, "--ca", &p(d, "ca.pem"), "--cert", &p(d, "web.pem"), "--key", &p(d, "web.key")]);
    for want in ["TLSv1.3", "TLS13_", "spiffe://example.org/ns/prod/echo", "client certificate: accepted"] {
        assert!(out.contains(want), "probe output lacks {want}:\n{out}");
    }
    let out = run(&["probe", &addr, "--ca", &p(d, "ca.pem"), "--cert", &p(d, "batch.pem"), "--key", &p(d, "batch.key")]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("access_denied"));

    let out = ok(&["inspect", &p(d, "echo.pem")]);
    for want in ["spiffe://example.org/ns/prod/echo", "dns:localhost", "ip:127.0.0.1", "ECDSA P-256", "serverAuth", "sha256"] {
        assert!(out.contains(want), "inspect output lacks {want}:\n{out}");
    }
}

#[test]
fn config_file_and_usage_errors() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    std::fs::write(
        d.join("web.toml"),
        "[identity]\ncert = \"web.pem\"\nkey = \"web.key\"\n[trust]\nca = [\"ca.pem\"]\n[client]\nserver_name = \"localhost\"\n",
    )
    .unwrap();
    let out = ok(&["call", &addr, "example.EchoService/Echo", "--echo", "via config", "--config", &p(d, "web.toml"), "--attachment", "att"]);
    assert_eq!(out.trim(), "via config");

    let out = run(&["call", &addr, "no-slash", "--config", &p(d, "web.toml")]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["pki", "issue", "--dir", &p(d, "missing"), "--name", "x"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pki init"));
}

#[test]
fn demo_runs_and_reports_refusals() {
    let out = Command::new(trustwire_bin()).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("unknown_issuer") && text.contains("peer_not_allowed"), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
}

#[test]
fn serve_echo_stops_gracefully_on_sigterm() {
    let dir = pki_dir();
    let (mut server, _addr) = serve(dir.path(), &[]);
    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "serve-echo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
