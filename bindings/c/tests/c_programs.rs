//! C programs against the built library: tests/c/api_test.c under ASan/UBSan and under
//! Valgrind, and tests/c/peer.c facing Rust peers (a C client calling a Rust server, a C server
//! answering a Rust client, the token verifier, the in-process proxy, a C server fed by the
//! Workload API test agent).
//!
//! A C compiler (and valgrind) missing is a failure with TRUSTWIRE_REQUIRE_PEERS=1 (as in
//! `make test`), else the test is skipped with a message.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tw::pki::{Credential, DevCa, IssueRequest};
use tw::rpc::{CallOptions, Client, ClientOptions, Request, Response, Server};
use tw::tls::{Identity, Policy, TlsProfile, TrustBundle};
use tw::Error;

mod common;
use common::{lib_dir, root};

// The core crate's test helpers for child processes and the Go Workload API agent.
extern crate tw as trustwire;
#[path = "../../../tests/common/peers.rs"]
mod peers;
#[path = "../../../tests/common/workload.rs"]
mod workload;

const SANITIZERS: &[&str] =
    &["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"];

fn required() -> bool {
    std::env::var_os("TRUSTWIRE_REQUIRE_PEERS").is_some_and(|v| v == "1")
}

fn tool(program: &str, arg: &str) -> bool {
    let found = Command::new(program).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(
            !required(),
            "{program} is required (TRUSTWIRE_REQUIRE_PEERS=1) but was not found; run scripts/deps.sh"
        );
        eprintln!("skipped: {program} not found");
    }
    found
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Compiles tests/c/`source` (C11) into target/<profile>/c-tests/`name`.
fn compile(source: &str, name: &str, sanitize: bool) -> PathBuf {
    build(&format!("tests/c/{source}"), name, false, sanitize)
}

fn peer_program() -> Option<&'static Path> {
    static PEER: OnceLock<Option<PathBuf>> = OnceLock::new();
    PEER.get_or_init(|| tool(&cc(), "--version").then(|| compile("peer.c", "peer", true))).as_deref()
}

fn sanitizer_env(cmd: &mut Command) -> &mut Command {
    // The programs set their own log levels; the caller's TRUSTWIRE_LOG would override them.
    cmd.env_remove("TRUSTWIRE_LOG")
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=86")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
}

fn report(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn api_test_passes_under_asan_and_ubsan() {
    if !tool(&cc(), "--version") {
        return;
    }
    let exe = compile("api_test.c", "api_test_asan", true);
    let out = sanitizer_env(&mut Command::new(&exe)).output().unwrap();
    assert!(out.status.success(), "{}", report(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1000 async calls: all answered"), "{stdout}");
    assert!(stdout.contains("api_test: all passed"), "{stdout}");
}

#[test]
fn api_test_leaks_nothing_under_valgrind() {
    if !tool(&cc(), "--version") || !tool("valgrind", "--version") {
        return;
    }
    let exe = compile("api_test.c", "api_test_plain", false);
    // Definite leaks and memory errors fail the run. Blocks still reachable from the runtime's
    // threads at exit (the process-wide runtime is never torn down) are not leaks.
    let out = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--show-leak-kinds=definite",
            "--errors-for-leak-kinds=definite",
            "--error-exitcode=99",
        ])
        .arg(&exe)
        .arg("quick")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", report(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("definitely lost: 0 bytes") || stderr.contains("no leaks are possible"), "{stderr}");
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "{stderr}");
}

/// A CA, a server credential (SPIFFE spiffe://example.org/server, names localhost and
/// 127.0.0.1) and client credentials, written to a temporary directory with profile files.
struct Pki {
    dir: tempfile::TempDir,
    ca: DevCa,
    server: Credential,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("example.org").unwrap();
        ca.write(dir.path()).unwrap();
        let server = ca
            .issue(
                &IssueRequest::new("server")
                    .spiffe_id("spiffe://example.org/server")
                    .dns("localhost")
                    .ip("127.0.0.1".parse().unwrap()),
            )
            .unwrap();
        server.write(dir.path(), "server").unwrap();
        Pki { dir, ca, server }
    }

    fn issue(&self, name: &str, spiffe_id: &str) -> Credential {
        let c = self.ca.issue(&IssueRequest::new(name).spiffe_id(spiffe_id)).unwrap();
        c.write(self.dir.path(), name).unwrap();
        c
    }

    /// Writes NAME.toml for the credential NAME.pem/NAME.key, with an allow-list.
    fn profile_file(&self, name: &str, allow: &[&str]) -> PathBuf {
        let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
        let text = format!(
            "[identity]\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\n\n[trust]\nca = [\"ca.pem\"]\n\n[policy]\nallow = [{}]\n",
            allow.join(", ")
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn profile(&self, c: &Credential, allow: &[&str]) -> TlsProfile {
        let mut p = TlsProfile::new(
            Some(Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()),
            TrustBundle::from_pem(self.ca.cert_pem().as_bytes()).unwrap(),
        );
        p.policy = Policy::from_patterns(allow).unwrap();
        p
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tw::runtime::runtime().block_on(f)
}

fn run_peer(args: &[&std::ffi::OsStr]) -> String {
    let out = sanitizer_env(&mut Command::new(peer_program().unwrap())).args(args).output().unwrap();
    assert!(out.status.success(), "{}", report(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn c_client_calls_a_rust_server_and_gets_refusals_by_name() {
    if peer_program().is_none() {
        return;
    }
    let pki = Pki::new();
    pki.issue("client", "spiffe://example.org/client");
    pki.issue("intruder", "spiffe://example.org/intruder");
    let client_profile = pki.profile_file("client", &[]);
    let intruder_profile = pki.profile_file("intruder", &[]);

    let mut server = Server::new(pki.profile(&pki.server, &["spiffe://example.org/client"]).server().unwrap());
    server.register("example.EchoService", "Echo", |req: Request| async move {
        let who = req.peer.spiffe_id.clone().unwrap_or_default();
        Ok(Response::new(req.payload).with_attachment(who))
    });
    let running = block_on(server.bind("127.0.0.1:0")).unwrap();
    let addr = running.local_addr().to_string();

    let out = run_peer(&["client".as_ref(), client_profile.as_os_str(), addr.as_ref(), "hello from C".as_ref()]);
    assert_eq!(out, "ok hello from C|spiffe://example.org/client");

    // The Rust server refuses the identity; the C client learns it from the alert.
    let out = run_peer(&["client".as_ref(), intruder_profile.as_os_str(), addr.as_ref(), "x".as_ref()]);
    assert!(out.starts_with("error peer_alert 0 peer_alert: handshake failed"), "{out}");
    assert!(out.contains("access_denied"), "{out}");

    // Nobody listening.
    drop(running);
    let out = run_peer(&["client".as_ref(), client_profile.as_os_str(), addr.as_ref(), "x".as_ref()]);
    assert!(out.starts_with("error transport"), "{out}");
}

/// Starts `peer ARGS…` with a pipe on stdin and returns it with its first stdout line.
fn spawn_peer(args: &[&std::ffi::OsStr]) -> (Child, BufReader<std::process::ChildStdout>, String) {
    spawn_with_first_line(sanitizer_env(&mut Command::new(peer_program().unwrap())).args(args).stdin(Stdio::piped()))
}

/// Starts `cmd` with stdout and stderr piped and returns it with its first stdout line.
fn spawn_with_first_line(cmd: &mut Command) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    (child, stdout, first.trim().to_string())
}

/// Closes the peer's stdin, checks it exits cleanly after printing "stopped", and returns what
/// it wrote to stderr.
fn finish(mut child: Child, mut stdout: BufReader<std::process::ChildStdout>) -> String {
    drop(child.stdin.take());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "status {status:?}\nstdout: {rest}\nstderr: {stderr}");
    assert!(rest.contains("stopped"), "{rest}\n{stderr}");
    stderr
}

#[test]
fn c_server_answers_rust_clients() {
    if peer_program().is_none() {
        return;
    }
    let pki = Pki::new();
    let server_profile = pki.profile_file("server", &["spiffe://example.org/client"]);
    // An operator turns the C library's logs up with TRUSTWIRE_LOG, without a rebuild.
    let (child, stdout, first) = spawn_with_first_line(
        sanitizer_env(&mut Command::new(peer_program().unwrap()))
            .env("TRUSTWIRE_LOG", "info")
            .args(["server".as_ref(), server_profile.as_os_str()])
            .stdin(Stdio::piped()),
    );
    let port: u16 = first.strip_prefix("port ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{first}"));
    let addr = format!("127.0.0.1:{port}");

    let client_cred = pki.issue("client", "spiffe://example.org/client");
    let client = Client::new(addr.clone(), pki.profile(&client_cred, &[]).client().unwrap(), ClientOptions::default());
    let call = |method: &'static str, payload: &'static str| {
        let client = client.clone();
        block_on(async move { client.call("example.EchoService", method, payload, CallOptions::default()).await })
    };
    let r = call("Echo", "hello from Rust").unwrap();
    assert_eq!((&r.payload[..], &r.attachment[..]), (&b"hello from Rust"[..], &b"from C"[..]));
    assert_eq!(&call("Peer", "").unwrap().payload[..], b"spiffe://example.org/client");
    assert_eq!(&call("Later", "").unwrap().payload[..], b"answered from a C thread");

    // A handler working on a thread of its own learns that its caller went away.
    let leaving = Client::new(addr.clone(), pki.profile(&client_cred, &[]).client().unwrap(), ClientOptions::default());
    let pending = {
        let leaving = leaving.clone();
        std::thread::spawn(move || {
            block_on(async move { leaving.call("example.EchoService", "Abandoned", "", CallOptions::default()).await })
        })
    };
    let mut stdout = stdout;
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "working");
    leaving.close();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "caller gone");
    assert!(pending.join().unwrap().is_err(), "the closed client's call failed");
    match call("Missing", "") {
        Err(Error::Rpc { code: 1002, .. }) => {}
        other => panic!("expected ENOMETHOD, got {other:?}"),
    }

    // An identity outside the C server's allow-list is refused at the handshake.
    let intruder = pki.issue("intruder", "spiffe://example.org/intruder");
    let refused = Client::new(addr, pki.profile(&intruder, &[]).client().unwrap(), ClientOptions::default());
    let err = block_on(async move { refused.call("example.EchoService", "Echo", "x", CallOptions::default()).await })
        .unwrap_err();
    assert_eq!(err.verdict(), Some(tw::Verdict::PeerAlert), "{err}");
    assert!(err.to_string().contains("access_denied"), "{err}");

    drop(client);
    let logged = finish(child, stdout);
    // The C server's stderr says why it refused the intruder.
    let refusal = logged.lines().find(|l| l.contains("handshake refused")).unwrap_or_else(|| panic!("{logged}"));
    assert!(refusal.contains("peer_not_allowed") && refusal.contains("spiffe://example.org/intruder"), "{refusal}");
}

#[test]
fn c_verifier_accepts_proxy_tokens_and_names_each_refusal() {
    if peer_program().is_none() {
        return;
    }
    let pki = Pki::new();
    let cred = pki.issue("web", "spiffe://example.org/web");
    let peer =
        Identity::from_pem(cred.cert_pem.as_bytes(), cred.key_pem.as_bytes()).unwrap().leaf_info().unwrap().identity;
    let secret = "0123456789abcdef-secret";
    let token = tw::proxy::token::issue(&peer, "k1", secret.as_bytes(), "echo-in");
    let verify_for = |token: &str, kid: &str, secret: &str, audience: &str, max_age: &str| {
        run_peer(&[
            "token".as_ref(),
            token.as_ref(),
            kid.as_ref(),
            secret.as_ref(),
            audience.as_ref(),
            max_age.as_ref(),
        ])
    };
    let verify = |token: &str, kid: &str, secret: &str| verify_for(token, kid, secret, "echo-in", "300");

    assert_eq!(verify(&token, "k1", secret), format!("ok spiffe://example.org/web {}", peer.not_after_unix()));
    assert!(verify(&token, "k1", "another secret").starts_with("token_bad_mac "));
    assert!(verify(&token, "k2", secret).starts_with("token_unknown_key "));
    let tampered = token.replace("spiffe://example.org/web", "spiffe://example.org/admin");
    assert!(verify(&tampered, "k1", secret).starts_with("token_bad_mac "));
    assert!(verify("tw2;kid=k1;mac=00", "k1", secret).starts_with("token_bad_format "));
    assert!(verify("tw1;kid=k1;mac=00", "k1", secret).starts_with("token_unsupported_version "));
    assert!(verify_for(&token, "k1", secret, "billing-in", "300").starts_with("token_wrong_audience "));
    let issued = std::time::SystemTime::now() - Duration::from_secs(600);
    let old_token = tw::proxy::token::issue_at(&peer, "k1", secret.as_bytes(), "echo-in", issued);
    assert!(verify(&old_token, "k1", secret).starts_with("token_too_old "));
    assert!(verify_for(&old_token, "k1", secret, "echo-in", "3600").starts_with("ok "));

    let now = std::time::SystemTime::now();
    let expired_cert = pki
        .ca
        .issue(
            &IssueRequest::new("old")
                .spiffe_id("spiffe://example.org/old")
                .validity(now - Duration::from_secs(7200), now - Duration::from_secs(3600)),
        )
        .unwrap();
    let old = Identity::from_pem(expired_cert.cert_pem.as_bytes(), expired_cert.key_pem.as_bytes())
        .unwrap()
        .leaf_info()
        .unwrap()
        .identity;
    let expired = tw::proxy::token::issue(&old, "k1", secret.as_bytes(), "echo-in");
    assert!(verify(&expired, "k1", secret).starts_with("token_expired "));
}

#[test]
fn proxy_started_from_c_carries_mtls_to_a_plain_upstream() {
    if peer_program().is_none() {
        return;
    }
    let pki = Pki::new();
    let server_profile = pki.profile_file("server", &["spiffe://example.org/client"]);
    // A plaintext echo upstream.
    let upstream = block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tw::runtime::runtime().spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let config = pki.dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "drain_seconds = 2\n\n[[route]]\nname = \"echo-in\"\nmode = \"server\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream_addr}\"\nprofile = \"{}\"\n",
            server_profile.display()
        ),
    )
    .unwrap();
    let (child, stdout, first) = spawn_peer(&["proxy".as_ref(), config.as_os_str()]);
    let addr = first.strip_prefix("route echo-in ").unwrap_or_else(|| panic!("{first}")).to_string();

    let client_cred = pki.issue("client", "spiffe://example.org/client");
    let tls = pki.profile(&client_cred, &[]).client().unwrap();
    let echoed = block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, _) = tw::transport::connect(&tls, &addr, Duration::from_secs(5)).await?;
        let message = b"through the proxy started from C";
        stream.write_all(message).await.map_err(|e| Error::Transport { message: e.to_string() })?;
        stream.flush().await.map_err(|e| Error::Transport { message: e.to_string() })?;
        let mut buf = vec![0u8; message.len()];
        stream.read_exact(&mut buf).await.map_err(|e| Error::Transport { message: e.to_string() })?;
        Ok::<_, Error>(buf)
    })
    .unwrap();
    assert_eq!(&echoed[..], b"through the proxy started from C");
    finish(child, stdout);
}

/// The brpc Authenticator example (examples/brpc_authenticator) compiles against our header.
/// brpc is not installed here, so minimal stand-ins declare the few brpc and butil names it
/// uses, with brpc's signatures; a machine with brpc builds it against the real headers.
#[test]
fn brpc_authenticator_example_compiles_against_the_header() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if !tool(&cxx, "--version") {
        return;
    }
    let stubs = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(stubs.path().join("brpc")).unwrap();
    std::fs::create_dir_all(stubs.path().join("butil")).unwrap();
    std::fs::write(
        stubs.path().join("brpc/authenticator.h"),
        r#"#pragma once
#include <ostream>
#include <string>
namespace butil { struct EndPoint {}; inline std::ostream& operator<<(std::ostream& o, const EndPoint&) { return o; } }
namespace brpc {
class AuthContext {
public:
    void set_user(const std::string& u) { user_ = u; }
    void set_group(const std::string& g) { group_ = g; }
    void set_is_service(bool s) { is_service_ = s; }
private:
    std::string user_, group_;
    bool is_service_ = false;
};
class Authenticator {
public:
    virtual ~Authenticator() {}
    virtual int GenerateCredential(std::string* auth_str) const = 0;
    virtual int VerifyCredential(const std::string& auth_str, const butil::EndPoint& client_addr, AuthContext* out_ctx) const = 0;
};
}
"#,
    )
    .unwrap();
    std::fs::write(
        stubs.path().join("butil/logging.h"),
        "#pragma once\n#include <iostream>\n#define LOG(level) std::cerr\n",
    )
    .unwrap();
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only"])
        .arg("-I")
        .arg(stubs.path())
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("examples/brpc_authenticator/trustwire_authenticator.cc"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", report(&out));
}

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Compiles a C or C++ file (path relative to the repository) into target/<profile>/c-tests.
fn build(source: &str, name: &str, cpp: bool, sanitize: bool) -> PathBuf {
    let out_dir = lib_dir().join("c-tests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(name);
    let lib = lib_dir();
    let mut cmd = Command::new(if cpp { cxx() } else { cc() });
    cmd.arg(if cpp { "-std=c++17" } else { "-std=c11" }).args(["-Wall", "-Wextra", "-Werror", "-g"]);
    if sanitize {
        cmd.args(SANITIZERS);
    }
    cmd.arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("tests/c"))
        .arg("-I")
        .arg(root().join("examples/c"));
    cmd.arg(root().join(source));
    cmd.arg("-L").arg(&lib).arg("-ltrustwire").arg(format!("-Wl,-rpath,{}", lib.display())).arg("-lpthread");
    cmd.arg("-o").arg(&exe);
    let out = cmd.output().expect("cannot run the compiler");
    assert!(out.status.success(), "compiling {source} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

#[test]
fn cpp_wrapper_test_passes_under_asan_and_ubsan() {
    if !tool(&cxx(), "--version") {
        return;
    }
    let exe = build("tests/cpp/wrapper_test.cpp", "wrapper_test", true, true);
    let out = sanitizer_env(&mut Command::new(&exe)).output().unwrap();
    assert!(out.status.success(), "{}", report(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrapper_test: all passed"), "{}", report(&out));
}

/// The C and C++ examples build with warnings as errors, and work: each client calls the C
/// server, an identity outside its allow-list is refused by name, and SIGTERM stops it.
#[test]
fn examples_build_and_talk_to_each_other() {
    if !tool(&cc(), "--version") || !tool(&cxx(), "--version") {
        return;
    }
    let c_server = build("examples/c/echo_server.c", "example_c_server", false, false);
    let c_client = build("examples/c/echo_client.c", "example_c_client", false, false);
    let cpp_server = build("examples/cpp/echo_server.cpp", "example_cpp_server", true, false);
    let cpp_client = build("examples/cpp/echo_client.cpp", "example_cpp_client", true, false);

    let pki = Pki::new();
    let server_profile = pki.profile_file("server", &["spiffe://example.org/client"]);
    pki.issue("client", "spiffe://example.org/client");
    pki.issue("intruder", "spiffe://example.org/intruder");
    let client_profile = pki.profile_file("client", &[]);
    let intruder_profile = pki.profile_file("intruder", &[]);

    for server in [&c_server, &cpp_server] {
        let (mut child, mut stdout, first) =
            spawn_with_first_line(Command::new(server).arg(&server_profile).arg("127.0.0.1:0"));
        let port =
            first.split("port ").nth(1).and_then(|p| p.split_whitespace().next()).unwrap_or_else(|| panic!("{first}"));
        let addr = format!("127.0.0.1:{port}");
        for client in [&c_client, &cpp_client] {
            let out = Command::new(client).arg(&client_profile).arg(&addr).arg("hello example").output().unwrap();
            assert!(out.status.success(), "{}", report(&out));
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello example");
            let out = Command::new(client).arg(&intruder_profile).arg(&addr).arg("x").output().unwrap();
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).starts_with("peer_alert: "), "{}", report(&out));
        }
        let term = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        assert!(term.success());
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        assert!(child.wait().unwrap().success());
        assert!(rest.contains("spiffe://example.org/client says hello example"), "{rest}");
        assert!(rest.trim_end().ends_with("stopped"), "{rest}");
    }
}

/// `make examples` builds the examples against the library in the build tree, and they run
/// from there as they are: no LD_LIBRARY_PATH, no install.
#[test]
fn make_examples_run_from_the_build_tree_without_ld_library_path() {
    if !tool(&cc(), "--version") || !tool(&cxx(), "--version") || !tool("pkg-config", "--version") {
        return;
    }
    let target = lib_dir().parent().unwrap().to_path_buf();
    let out = Command::new("make")
        .args(["--no-print-directory", "examples"])
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cannot run make");
    assert!(out.status.success(), "make examples failed:\n{}", report(&out));
    let bin = target.join("release/examples-c");

    let pki = Pki::new();
    let server_profile = pki.profile_file("server", &["spiffe://example.org/client"]);
    pki.issue("client", "spiffe://example.org/client");
    let client_profile = pki.profile_file("client", &[]);
    let (mut child, mut stdout, first) = spawn_with_first_line(
        Command::new(bin.join("echo_server")).env_remove("LD_LIBRARY_PATH").arg(&server_profile).arg("127.0.0.1:0"),
    );
    let port =
        first.split("port ").nth(1).and_then(|p| p.split_whitespace().next()).unwrap_or_else(|| panic!("{first}"));
    for client in ["echo_client", "echo_client_cpp"] {
        let out = Command::new(bin.join(client))
            .env_remove("LD_LIBRARY_PATH")
            .arg(&client_profile)
            .arg(format!("127.0.0.1:{port}"))
            .arg("from the build tree")
            .output()
            .unwrap();
        assert!(out.status.success(), "{client}: {}", report(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from the build tree");
    }
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
}

/// A C server whose SVID comes from the Workload API (`tw_profile_builder_set_workload_api`,
/// chosen by hint among two) follows three rotations the agent pushes while Rust clients call on
/// a kept connection and on a new connection per call, with no failed call.
#[test]
fn c_server_takes_its_svid_from_the_workload_api_and_follows_rotations() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    if peer_program().is_none() {
        return;
    }
    let Some(bin) = workload::agent_bin() else { return };
    const SERVER: &str = "spiffe://example.org/ns/test/c-server";
    const CLIENT: &str = "spiffe://example.org/ns/test/client";
    let m = workload::Material::new();
    // Name order puts the other SVID first: only the hint picks the server's.
    m.issue("0", "spiffe://example.org/ns/test/other", Some("other"));
    let mut current = m.issue("1", SERVER, Some("server"));
    let mut agent = workload::Agent::start(&bin, &m, &m.path("agent.sock"), false);
    let address = format!("unix://{}", m.path("agent.sock").display());
    let (child, stdout, first) =
        spawn_peer(&["workload".as_ref(), address.as_ref(), "server".as_ref(), CLIENT.as_ref()]);
    let addr = format!("127.0.0.1:{}", first.strip_prefix("port ").unwrap_or_else(|| panic!("{first}")));

    let cred = m.ca.issue(&IssueRequest::new("client").spiffe_id(CLIENT)).unwrap();
    let mut profile = TlsProfile::new(
        Some(Identity::from_pem(cred.cert_pem.as_bytes(), cred.key_pem.as_bytes()).unwrap()),
        TrustBundle::from_pem(m.ca.cert_pem().as_bytes()).unwrap(),
    );
    // An SVID names no host: the client checks the server's SPIFFE ID instead.
    profile.server_spiffe_id = Some(SERVER.into());
    let tls = profile.client().unwrap();
    let connect = || Client::new(addr.clone(), tls.clone(), ClientOptions::default());
    let served_serial = || {
        block_on(connect().server_identity())
            .map_err(|e| eprintln!("connect: {e}"))
            .ok()
            .flatten()
            .map(|p| (p.serial.clone(), p.spiffe_id.clone()))
    };
    assert_eq!(served_serial(), Some((workload::serial(&current), Some(SERVER.to_string()))));

    let (stop, ok, failures) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
    let caller = {
        let (stop, ok, failures, kept) = (stop.clone(), ok.clone(), failures.clone(), connect());
        let (addr, tls) = (addr.clone(), tls.clone());
        let fresh = move || Client::new(addr.clone(), tls.clone(), ClientOptions::default());
        std::thread::spawn(move || {
            let opts = CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let client = if i % 2 == 0 { kept.clone() } else { fresh() };
                let text = format!("call {i}");
                match block_on(client.call("example.EchoService", "Echo", text.clone().into_bytes(), opts.clone())) {
                    Ok(r) if r.payload[..] == *text.as_bytes() => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => return failures.lock().unwrap().push(format!("wrong answer {:?}", r.payload)),
                    Err(e) => return failures.lock().unwrap().push(e.to_string()),
                };
            }
        })
    };
    for round in 0..3 {
        current = m.issue("1", SERVER, Some("server"));
        agent.push();
        let want = workload::serial(&current);
        workload::wait_until(&format!("round {round}: a new connection sees the pushed SVID"), || {
            served_serial().is_some_and(|(serial, _)| serial == want)
        });
    }
    stop.store(true, Ordering::Relaxed);
    caller.join().unwrap();
    assert!(failures.lock().unwrap().is_empty(), "{:?}", failures.lock().unwrap());
    assert!(ok.load(Ordering::Relaxed) > 0, "calls were made during the rotations");
    assert_eq!(agent.count("stream 0 opened"), 1, "one stream carried every rotation");
    finish(child, stdout);
}

/// A C program's connection and call hooks (`tw_profile_builder_set_connection_hook`,
/// `tw_profile_builder_set_call_hook`) decide for a C server: the connection hook refuses a peer
/// the CA vouches for, the call hook denies with 1004 or its own code and sees the call's
/// metadata, and both user_data releases run once the server and profile are gone.
#[test]
fn c_hooks_refuse_peers_and_calls_with_their_own_reasons() {
    if peer_program().is_none() {
        return;
    }
    let pki = Pki::new();
    let (dir, ca) = (pki.dir.path(), pki.dir.path().join("ca.pem"));
    let (child, stdout, first) = spawn_with_first_line(
        sanitizer_env(&mut Command::new(peer_program().unwrap()))
            .env("TRUSTWIRE_LOG", "info")
            .args([
                "hooked".as_ref(),
                dir.join("server.pem").as_os_str(),
                dir.join("server.key").as_os_str(),
                ca.as_os_str(),
            ])
            .stdin(Stdio::piped()),
    );
    let addr = format!("127.0.0.1:{}", first.strip_prefix("port ").unwrap_or_else(|| panic!("{first}")));
    let as_client = |name: &str, id: &str| {
        let cred = pki.issue(name, id);
        Client::new(addr.clone(), pki.profile(&cred, &[]).client().unwrap(), ClientOptions::default())
    };
    let call = |client: &Client, method: &'static str, log_id: Option<i64>| {
        let client = client.clone();
        let opts = CallOptions { log_id, timeout: Some(Duration::from_secs(5)), ..Default::default() };
        block_on(async move { client.call("example.EchoService", method, "x", opts).await })
    };
    let web = as_client("web", "spiffe://example.org/web");
    assert_eq!(&call(&web, "Echo", Some(1)).unwrap().payload[..], b"x");
    let err = call(&web, "Peer", None).unwrap_err();
    assert!(
        matches!(&err, Error::Rpc { code: 1004, text } if text.contains("method_not_allowed: Peer is for admins")),
        "{err}"
    );
    assert_eq!(err.verdict(), Some(tw::Verdict::MethodNotAllowed));
    let err = call(&web, "Echo", Some(13)).unwrap_err();
    assert!(
        matches!(&err, Error::Rpc { code: 2001, text } if text.contains("log_id 13 refused by C for example.EchoService/Echo")),
        "{err}"
    );
    let admin = as_client("admin", "spiffe://example.org/admin");
    assert_eq!(&call(&admin, "Peer", None).unwrap().payload[..], b"spiffe://example.org/admin");

    let blocked = as_client("blocked", "spiffe://example.org/blocked");
    let err = call(&blocked, "Echo", None).unwrap_err();
    assert!(err.to_string().contains("access_denied"), "{err}");
    assert!(!err.to_string().contains("blocked by the C hook"), "the reason stays on the server: {err}");
    drop((web, admin, blocked));

    let mut child = child;
    drop(child.stdin.take());
    let mut rest = String::new();
    let mut stdout = stdout;
    stdout.read_to_string(&mut rest).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}\n{stderr}");
    assert!(stderr.contains("is blocked by the C hook"), "the hook's reason is logged: {stderr}");
    // Three connections reached the connection hook, four calls the call hook.
    assert!(rest.contains("hooks 7 freed 2"), "{rest}");
}

/// A SoftHSM2 token store in `dir` with one P-256 key generated on it, and that key's
/// certificate (issued from its public half: no private key file is written). None, with a
/// message, when SoftHSM2 or pkcs11-tool is missing (a failure with TRUSTWIRE_REQUIRE_PEERS=1).
fn softhsm_key(pki: &Pki) -> Option<(PathBuf, PathBuf)> {
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    let have_tool =
        Command::new("sh").args(["-c", "command -v pkcs11-tool"]).output().is_ok_and(|o| o.status.success());
    let (Some(module), true) = (module, have_tool) else {
        assert!(!required(), "SoftHSM2 and pkcs11-tool are required (TRUSTWIRE_REQUIRE_PEERS=1); run scripts/deps.sh");
        eprintln!("skipped: SoftHSM2 or pkcs11-tool not found");
        return None;
    };
    let d = pki.dir.path();
    std::fs::create_dir_all(d.join("tokens")).unwrap();
    std::fs::write(d.join("softhsm2.conf"), format!("directories.tokendir = {}\n", d.join("tokens").display()))
        .unwrap();
    std::fs::write(d.join("pin"), "7531\n").unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.env("SOFTHSM2_CONF", d.join("softhsm2.conf")).output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("softhsm2-util").args([
        "--init-token",
        "--free",
        "--label",
        "c",
        "--so-pin",
        "0000",
        "--pin",
        "7531",
    ]));
    run(Command::new("pkcs11-tool").arg("--module").arg(&module).args([
        "--token-label",
        "c",
        "--login",
        "--pin",
        "7531",
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "c-key",
    ]));
    Some((module, d.join("softhsm2.conf")))
}

/// A C server whose key is on a PKCS#11 token, through a profile file (tw_profile_load_file)
/// and through tw_profile_builder_set_identity_pkcs11; a wrong PIN is TW_KEY_UNAVAILABLE.
#[test]
fn c_server_with_a_token_key() {
    if peer_program().is_none() {
        return;
    }
    let pki = Pki::new();
    let Some((module, conf)) = softhsm_key(&pki) else { return };
    let d = pki.dir.path();
    // The certificate, issued from the token key's public half by the CLI.
    // Built beside the library by `cargo build --release` (make test builds it first).
    let cli = lib_dir().join("trustwire");
    let out = Command::new(&cli)
        .env("SOFTHSM2_CONF", &conf)
        .args(["pki", "issue", "--dir"])
        .arg(d)
        .args(["--name", "token-server", "--spiffe-id", "spiffe://example.org/token-server", "--dns", "localhost"])
        .args(["--key", "pkcs11:token=c;object=c-key", "--pkcs11-module"])
        .arg(&module)
        .arg("--pkcs11-pin-file")
        .arg(d.join("pin"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (build it with cargo build --release)", cli.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.join("token-server.key").exists());
    std::fs::write(
        d.join("token.toml"),
        format!(
            "[identity]\ncert = \"token-server.pem\"\nkey = \"pkcs11:token=c;object=c-key\"\n\n[identity.pkcs11]\nmodule = \
             \"{}\"\npin_file = \"pin\"\n\n[trust]\nca = [\"ca.pem\"]\n",
            module.display()
        ),
    )
    .unwrap();
    let client_cred = pki.issue("client", "spiffe://example.org/client");
    let client_profile = pki.profile(&client_cred, &[]);
    // SoftHSM keeps its allocations until the process ends; only its own leaks are ignored.
    std::fs::write(d.join("lsan.supp"), "leak:libsofthsm2\nleak:libcrypto\n").unwrap();
    let peer = |args: &[&std::ffi::OsStr]| {
        let mut cmd = Command::new(peer_program().unwrap());
        sanitizer_env(&mut cmd)
            .env("SOFTHSM2_CONF", &conf)
            .env("LSAN_OPTIONS", format!("suppressions={}", d.join("lsan.supp").display()))
            .args(args)
            .stdin(Stdio::piped());
        spawn_with_first_line(&mut cmd)
    };
    let pem = d.join("token-server.pem");
    let ca = d.join("ca.pem");
    let pin = d.join("pin");
    for args in [
        vec![std::ffi::OsString::from("server"), d.join("token.toml").into_os_string()],
        vec![
            "pkcs11".into(),
            pem.clone().into_os_string(),
            "pkcs11:token=c;object=c-key".into(),
            module.clone().into_os_string(),
            pin.clone().into_os_string(),
            ca.clone().into_os_string(),
        ],
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let (child, stdout, first) = peer(&args);
        let port: u16 = first.strip_prefix("port ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{first}"));
        let mut profile = client_profile.clone();
        profile.server_name = Some("localhost".into());
        let client = Client::new(format!("127.0.0.1:{port}"), profile.client().unwrap(), ClientOptions::default());
        let r = block_on(async move {
            let r = client.call("example.EchoService", "Echo", "to a token", CallOptions::default()).await;
            let id = client.server_identity().await;
            (r, id)
        });
        assert_eq!(&r.0.unwrap().payload[..], b"to a token");
        assert_eq!(r.1.unwrap().unwrap().spiffe_id.as_deref(), Some("spiffe://example.org/token-server"));
        finish(child, stdout);
    }
    std::fs::write(d.join("wrong-pin"), "0000\n").unwrap();
    let wrong = d.join("wrong-pin");
    let (child, stdout, first) = peer(&[
        "pkcs11".as_ref(),
        pem.as_os_str(),
        "pkcs11:token=c;object=c-key".as_ref(),
        module.as_os_str(),
        wrong.as_os_str(),
        ca.as_os_str(),
    ]);
    assert!(first.starts_with("error key_unavailable:") && first.contains("wrong PIN"), "{first}");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
