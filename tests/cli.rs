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
    let mut child =
        Command::new(trustwire_bin()).args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
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
    ok(&[
        "pki",
        "issue",
        "--dir",
        &d,
        "--name",
        "echo",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/echo",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
    ]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        &d,
        "--name",
        "web",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/web",
        "--usage",
        "client",
    ]);
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

    let out = ok(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "hello cli",
        "--cert",
        &p(d, "web.pem"),
        "--key",
        &p(d, "web.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    assert_eq!(out.trim(), "hello cli");

    // A peer outside the allow-list: non-zero exit and the verdict on stderr.
    let out = run(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "x",
        "--cert",
        &p(d, "batch.pem"),
        "--key",
        &p(d, "batch.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[peer_alert]") && err.contains("access_denied"), "{err}");

    // Wrong server name.
    let out = run(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "x",
        "--server-name",
        "db.example.org",
        "--cert",
        &p(d, "web.pem"),
        "--key",
        &p(d, "web.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("[name_mismatch]") && err.contains("db.example.org"), "{err}");

    // Unknown method: the server's brpc error code.
    let out = run(&[
        "call",
        &addr,
        "example.EchoService/Nope",
        "--cert",
        &p(d, "web.pem"),
        "--key",
        &p(d, "web.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("1002") && err.contains("ENOMETHOD"), "{err}");

    let out = ok(&["probe", &addr, "--ca", &p(d, "ca.pem"), "--cert", &p(d, "web.pem"), "--key", &p(d, "web.key")]);
    for want in ["TLSv1.3", "TLS13_", "spiffe://example.org/ns/prod/echo", "client certificate: accepted"] {
        assert!(out.contains(want), "probe output lacks {want}:\n{out}");
    }
    let out =
        run(&["probe", &addr, "--ca", &p(d, "ca.pem"), "--cert", &p(d, "batch.pem"), "--key", &p(d, "batch.key")]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("access_denied"));

    let out = ok(&["inspect", &p(d, "echo.pem")]);
    for want in
        ["spiffe://example.org/ns/prod/echo", "dns:localhost", "ip:127.0.0.1", "ECDSA P-256", "serverAuth", "sha256"]
    {
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
    let out = ok(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "via config",
        "--config",
        &p(d, "web.toml"),
        "--attachment",
        "att",
    ]);
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
    assert!(text.contains("'rogue', which impersonates") && text.contains("rogue (impersonating frontend"), "{text}");

    // The next steps it ends with work as printed (the server on a free port instead of 8443).
    let steps: Vec<Vec<String>> = text
        .lines()
        .skip_while(|l| !l.starts_with("next: "))
        .filter_map(|l| l.trim().strip_prefix("trustwire "))
        .map(|l| l.trim_end_matches(" &").split(' ').map(|w| w.trim_matches('\'').to_string()).collect())
        .collect();
    assert_eq!(steps.len(), 6, "{text}");
    let cwd = tempfile::tempdir().unwrap();
    let in_cwd = |args: &[String]| {
        let mut cmd = Command::new(trustwire_bin());
        cmd.args(args).current_dir(cwd.path());
        cmd
    };
    for step in &steps[..3] {
        let out = in_cwd(step).output().unwrap();
        assert!(out.status.success(), "trustwire {step:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let serve: Vec<String> = steps[3].iter().map(|w| w.replace("127.0.0.1:8443", "127.0.0.1:0")).collect();
    let mut child = in_cwd(&serve).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _server = Kill(child);
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    for step in &steps[4..] {
        let step: Vec<String> = step.iter().map(|w| w.replace("127.0.0.1:8443", &addr)).collect();
        let out = in_cwd(&step).output().unwrap();
        assert!(out.status.success(), "trustwire {step:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
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

/// `serve-echo --metrics` serves the Prometheus exposition over HTTP, and SIGHUP reloads the
/// credential files: a bad file is refused with its verdict while the old generation serves.
#[test]
fn serve_echo_metrics_and_sighup_reload() {
    use std::io::{Read, Write};
    let dir = pki_dir();
    let d = dir.path();
    let mut child = Command::new(trustwire_bin())
        .args(["serve-echo", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--cert", &p(d, "echo.pem"), "--key", &p(d, "echo.key"), "--ca", &p(d, "ca.pem")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let server = Kill(child);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    line.clear();
    out.read_line(&mut line).unwrap();
    let metrics =
        line.trim().rsplit(' ').next().unwrap().trim_start_matches("http://").trim_end_matches("/metrics").to_string();

    let called = ok(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "hi",
        "--cert",
        &p(d, "echo.pem"),
        "--key",
        &p(d, "echo.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    assert_eq!(called.trim(), "hi");

    let mut sock = std::net::TcpStream::connect(&metrics).unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    sock.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let text = &body[body.find("\r\n\r\n").unwrap() + 4..];
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("exposition parses");
    let generation = scrape
        .samples
        .iter()
        .find(|s| s.metric == "trustwire_credential_generation" && s.labels.get("store") == Some("serve-echo"));
    assert!(generation.is_some(), "{text}");
    assert!(
        scrape.samples.iter().any(|s| s.metric == "trustwire_calls_total"
            && s.labels.get("service") == Some("example.EchoService")
            && s.labels.get("code") == Some("0")),
        "{text}"
    );

    // A truncated key file, then SIGHUP: refused with its verdict, old generation serves on.
    std::fs::write(d.join("echo.key"), "-----BEGIN PRIVATE KEY-----\nMIGH").unwrap();
    Command::new("kill").args(["-HUP", &server.0.id().to_string()]).status().unwrap();
    let mut seen = String::new();
    while !seen.contains("SIGHUP") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "serve-echo ended; stderr: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.contains("reload refused") && seen.contains("[bad_pem]"), "{seen}");
    let called = ok(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "still",
        "--ca",
        &p(d, "ca.pem"),
        "--cert",
        &p(d, "web.pem"),
        "--key",
        &p(d, "web.key"),
    ]);
    assert_eq!(called.trim(), "still");
}

/// `trustwire proxy --config`: a client-side route in front of serve-echo carries a plaintext
/// brpc request over mTLS; SIGTERM drains and exits 0.
#[test]
fn proxy_command_routes_plaintext_brpc_over_mtls_and_drains_on_sigterm() {
    use std::io::{Read, Write};
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    std::fs::write(
        d.join("client.toml"),
        "[identity]\ncert = \"web.pem\"\nkey = \"web.key\"\n[trust]\nca = [\"ca.pem\"]\n[client]\nserver_name = \"localhost\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("proxy.toml"),
        format!(
            "drain_seconds = 5\n[[route]]\nname = \"out\"\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{addr}\"\nprofile = \"client.toml\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(trustwire_bin())
        .args(["proxy", "--config", &p(d, "proxy.toml")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let proxy = Kill(child);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("route out: listening on "), "{line}");
    let local = line.trim().rsplit(' ').next().unwrap().to_string();

    let captures = common::captures();
    let request = std::fs::read(captures.join("echo_request.bin")).unwrap();
    let want = std::fs::read(captures.join("echo_response.bin")).unwrap();
    let mut s = std::net::TcpStream::connect(&local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&request).unwrap();
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    drop(s);

    let mut proxy = proxy;
    Command::new("kill").args(["-TERM", &proxy.0.id().to_string()]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "proxy did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A profile may leave out what flags give: `--config` without `[trust]` plus `--ca` works, and
/// without either the command says what is missing instead of `missing field 'trust'`.
#[test]
fn flags_complete_a_profile_and_override_one_setting() {
    let dir = pki_dir();
    let d = dir.path();
    let (_server, addr) = serve(d, &[]);
    std::fs::write(d.join("id-only.toml"), "[identity]\ncert = \"web.pem\"\nkey = \"web.key\"\n").unwrap();
    let config = p(d, "id-only.toml");
    let out = ok(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "completed",
        "--config",
        &config,
        "--ca",
        &p(d, "ca.pem"),
    ]);
    assert_eq!(out.trim(), "completed");

    let out = run(&["call", &addr, "example.EchoService/Echo", "--echo", "x", "--config", &config]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no trusted CAs") && err.contains("--ca"), "{err}");

    // probe pins the server's SPIFFE ID like call does.
    let probe =
        |id: &str| run(&["probe", &addr, "--config", &config, "--ca", &p(d, "ca.pem"), "--server-spiffe-id", id]);
    let out = probe("spiffe://example.org/ns/prod/echo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = probe("spiffe://example.org/ns/prod/other");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("[peer_not_allowed]"), "{err}");
}

/// Every flag and argument of every command says what it is for in `-h`.
#[test]
fn every_flag_has_help_text() {
    let commands: &[&[&str]] = &[
        &["demo"],
        &["pki", "init"],
        &["pki", "issue"],
        &["serve-echo"],
        &["proxy"],
        &["call"],
        &["probe"],
        &["inspect"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("-h");
        let text = ok(&args);
        for line in text.lines().filter(|l| l.starts_with("  ")) {
            let entry = line.trim_start();
            if !(entry.starts_with('-') || entry.starts_with('<')) {
                continue;
            }
            let help = entry.split_once("  ").map(|(_, h)| h.trim()).unwrap_or("");
            assert!(!help.is_empty(), "trustwire {}: `{entry}` has no help text:\n{text}", command.join(" "));
        }
    }
}

#[test]
fn listen_without_a_host_means_all_addresses() {
    let dir = pki_dir();
    let d = dir.path();
    let mut child = Command::new(trustwire_bin())
        .args(["serve-echo", "--listen", ":0", "--cert", &p(d, "echo.pem"), "--key", &p(d, "echo.key")])
        .args(["--ca", &p(d, "ca.pem")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _server = Kill(child);
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let out = ok(&[
        "call",
        &format!("127.0.0.1:{port}"),
        "example.EchoService/Echo",
        "--echo",
        "any address",
        "--cert",
        &p(d, "web.pem"),
        "--key",
        &p(d, "web.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    assert_eq!(out.trim(), "any address", "{line}");
}

#[test]
fn pki_init_does_not_overwrite_a_ca_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    ok(&["pki", "init", "--dir", &d]);
    let before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let out = run(&["pki", "init", "--dir", &d]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("already holds a CA") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before, "the CA was replaced");
    ok(&["pki", "init", "--dir", &d, "--force"]);
    assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before, "--force did not replace the CA");
}

#[test]
fn pki_issue_names_certificates_in_the_cas_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    ok(&["pki", "init", "--dir", &d, "--trust-domain", "corp.example"]);
    let out = run(&["pki", "issue", "--dir", &d, "--name", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = ok(&["inspect", &p(dir.path(), "web.pem")]);
    assert!(shown.contains("spiffe id    spiffe://corp.example/ns/default/web"), "{shown}");

    let out = run(&["pki", "issue", "--dir", &d, "--name", "partner", "--spiffe-id", "spiffe://partner.org/x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("outside the CA's trust domain corp.example"), "{err}");

    let out = run(&["pki", "issue", "--dir", &d, "--name", "brief", "--days", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--days"));
    assert!(!dir.path().join("brief.pem").exists());
}

/// Messages for people and log collectors: no colour codes when stderr is not a terminal, no
/// Rust debug formatting, and the verdict said once.
#[test]
fn messages_are_plain_and_say_the_verdict_once() {
    let dir = pki_dir();
    let d = dir.path();
    let mut child = Command::new(trustwire_bin())
        .args(["serve-echo", "--listen", "127.0.0.1:0", "--allow", "spiffe://example.org/ns/prod/*"])
        .args(["--cert", &p(d, "echo.pem"), "--key", &p(d, "echo.key"), "--ca", &p(d, "ca.pem")])
        .env_remove("TRUSTWIRE_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut server_err = BufReader::new(child.stderr.take().unwrap());
    let _server = Kill(child);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();

    let refused = run(&[
        "call",
        &addr,
        "example.EchoService/Echo",
        "--echo",
        "x",
        "--cert",
        &p(d, "batch.pem"),
        "--key",
        &p(d, "batch.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.starts_with("error [peer_alert] (the peer refused us, alert access_denied): "), "{err}");
    assert!(!err.contains("handshake failed"), "{err}");

    let mut logged = String::new();
    while !logged.contains("handshake refused") {
        line.clear();
        assert!(server_err.read_line(&mut line).unwrap() > 0, "serve-echo ended; stderr: {logged}");
        logged.push_str(&line);
    }
    assert!(!logged.contains('\u{1b}'), "colour codes in a log that is not a terminal: {logged:?}");
    assert!(!logged.contains("Some("), "{logged}");
    assert!(logged.contains("verdict=\"peer_not_allowed\"") && logged.contains("side=\"local\""), "{logged}");
}

#[test]
fn address_in_use_is_not_a_configuration_error() {
    let dir = pki_dir();
    let d = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&[
        "serve-echo",
        "--listen",
        &addr,
        "--cert",
        &p(d, "echo.pem"),
        "--key",
        &p(d, "echo.key"),
        "--ca",
        &p(d, "ca.pem"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error (transport): cannot listen on") && err.contains("in use"), "{err}");
    assert!(!err.contains("invalid configuration"), "{err}");
}

/// Separate client and server CAs: a server whose certificate comes from CA-S while it trusts
/// only CA-C for its clients starts (its own chain is checked without CA-S, and the log says
/// peers must trust its issuer), and serves a client of CA-C that trusts CA-S; a client of CA-S
/// is still refused, since trust stays what was configured.
#[test]
fn our_certificate_need_not_chain_to_the_bundle_we_trust_peers_with() {
    let servers = pki_dir();
    let clients = tempfile::tempdir().unwrap();
    let c = clients.path().display().to_string();
    ok(&["pki", "init", "--dir", &c, "--trust-domain", "example.org"]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        &c,
        "--name",
        "web",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/web",
        "--usage",
        "client",
    ]);
    let s = servers.path();
    let mut child = Command::new(trustwire_bin())
        .args(["serve-echo", "--listen", "127.0.0.1:0", "--cert", &p(s, "echo.pem"), "--key", &p(s, "echo.key")])
        .args(["--ca", &p(clients.path(), "ca.pem")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let _server = Kill(child);
    assert!(line.contains("serving"), "serve-echo refused its own certificate: {line}");
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();

    let call = |dir: &Path, name: &str| {
        let (cert, key) = (p(dir, &format!("{name}.pem")), p(dir, &format!("{name}.key")));
        let args = ["call", &addr, "example.EchoService/Echo", "--echo", "hi", "--cert", &cert, "--key", &key];
        run(&[&args[..], &["--ca", &p(s, "ca.pem")]].concat())
    };
    let out = call(clients.path(), "web");
    assert!(out.status.success(), "a client of the client CA is served: {}", String::from_utf8_lossy(&out.stderr));
    let out = call(s, "batch");
    assert!(!out.status.success(), "a client of the server CA is not trusted by the server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("access_denied") || err.contains("unknown_ca"), "{err}");
    drop(_server);
    let mut log = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    assert!(log.contains("peers must trust it"), "{log}");
}

/// A half-written certificate or key says which block is unterminated and on which line, and
/// every identity refusal names the files it read.
#[test]
fn credential_errors_name_the_files_and_the_unterminated_block() {
    let dir = pki_dir();
    let d = dir.path();
    let cert = std::fs::read_to_string(d.join("echo.pem")).unwrap();
    std::fs::write(d.join("cut.pem"), &cert[..cert.len() / 2]).unwrap();
    let key = std::fs::read_to_string(d.join("echo.key")).unwrap();
    std::fs::write(d.join("cut.key"), &key[..key.len() / 2]).unwrap();
    let start = |cert: &str, key: &str| {
        let out = run(&["serve-echo", "--listen", "127.0.0.1:0", "--cert", &p(d, cert), "--key", &p(d, key)]
            .into_iter()
            .chain(["--ca", &p(d, "ca.pem")])
            .collect::<Vec<_>>());
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = start("cut.pem", "echo.key");
    assert!(err.contains("[bad_pem]") && err.contains("\"BEGIN CERTIFICATE\" block at line 1"), "{err}");
    assert!(err.contains("cut short") && err.contains(&p(d, "cut.pem")), "{err}");
    let err = start("echo.pem", "cut.key");
    assert!(err.contains("\"BEGIN PRIVATE KEY\" block at line 1") && err.contains(&p(d, "cut.key")), "{err}");
    let err = start("echo.pem", "web.key");
    assert!(err.contains("[key_mismatch]"), "{err}");
    assert!(err.contains(&format!("certificate {}, key {}", p(d, "echo.pem"), p(d, "web.key"))), "{err}");
}
