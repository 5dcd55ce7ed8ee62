//! Child processes for interop tests (openssl, python3, go): output collected by background
//! threads, bounded waits, killed on drop; plus the checks the interop suites share.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use trustwire::rpc::RunningServer;
use trustwire::tls::TlsProfile;
use trustwire::wire::{Decoder, Frame};
use trustwire::{Error, Server, Verdict};

/// Whether `cmd` runs and exits successfully. When it does not, the interop suite that needs it
/// is skipped with a loud line on stderr, unless `TRUSTWIRE_REQUIRE_PEERS=1` (set by `make
/// test`), where a missing peer fails the test instead of passing it untested.
pub fn tool_available(cmd: &mut Command, skipped: &str) -> bool {
    let ok = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        let message = format!("{skipped} was not found; run scripts/deps.sh");
        assert!(std::env::var_os("TRUSTWIRE_REQUIRE_PEERS").is_none(), "{message}");
        // Straight to stderr, past libtest's capture, so the skip shows even when tests pass.
        let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
    }
    ok
}

/// Upper bound for anything a child process is waited for.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Proc {
    pub what: String,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub out: Arc<Mutex<Vec<u8>>>,
    pub err: Arc<Mutex<Vec<u8>>>,
    /// How many of the two output pipes have reached end of file.
    pub closed: Arc<AtomicUsize>,
}

#[allow(dead_code)]
impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        collect(child.stdout.take().unwrap(), out.clone(), closed.clone());
        collect(child.stderr.take().unwrap(), err.clone(), closed.clone());
        let stdin = child.stdin.take();
        Proc { what, child, stdin, out, err, closed }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    pub fn stdout(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    pub fn output(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            String::from_utf8_lossy(&self.stdout()),
            self.stderr()
        )
    }

    /// After the process exited: lets the reader threads take in the rest of its output.
    pub fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.closed.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Polls until `f` finds what it looks for in (stdout, stderr), or panics after `WAIT`.
    pub fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&[u8], &str) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(t) = f(&self.stdout(), &self.stderr()) {
                return t;
            }
            if self.child.try_wait().unwrap().is_some() {
                self.drain();
                if let Some(t) = f(&self.stdout(), &self.stderr()) {
                    return t;
                }
                panic!("process exited before {what}:\n{}", self.output());
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit and its output to be read, or panics after `WAIT`.
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.wait_exit_within(WAIT)
    }

    /// Waits for the process to exit and its output to be read, or panics after `limit`.
    pub fn wait_exit_within(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.drain();
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out after {limit:?} waiting for exit:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>, closed: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
        closed.fetch_add(1, Ordering::Release);
    });
}

/// One complete baidu_std frame at the start of `bytes`, if there is one yet.
pub fn frame_in(bytes: &[u8]) -> Option<Frame> {
    let mut buf = BytesMut::from(bytes);
    Decoder::default().decode(&mut buf).unwrap_or_else(|e| panic!("bad frame {bytes:02x?}: {e}"))
}

/// Checks `frame` is the successful answer to the brpc capture echo_request.bin.
pub fn assert_echo_answer(frame: &Frame) {
    let resp = frame.meta.response.as_ref().expect("response meta");
    assert_eq!(resp.error_code.unwrap_or(0), 0, "{:?}", resp.error_text);
    assert_eq!(frame.meta.correlation_id, Some(4294967298), "correlation_id echoed verbatim");
    assert_eq!(trustwire::echo::decode(&frame.payload).unwrap(), "hello world");
    assert!(frame.attachment.is_empty());
}

/// An echo server that records every refused handshake.
pub async fn recording_server(profile: &TlsProfile) -> (RunningServer, Arc<Mutex<Vec<Error>>>) {
    let seen: Arc<Mutex<Vec<Error>>> = Arc::default();
    let sink = seen.clone();
    let mut server = Server::new(profile.server().unwrap());
    trustwire::echo::register(&mut server);
    server.options_mut().on_handshake_error = Some(Arc::new(move |_, e| sink.lock().unwrap().push(e.clone())));
    (server.bind("127.0.0.1:0").await.unwrap(), seen)
}

/// The verdict of the first refused handshake the server records (waits for it).
pub async fn server_verdict(seen: &Mutex<Vec<Error>>) -> Verdict {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(e) = seen.lock().unwrap().first() {
            return e.verdict().unwrap_or_else(|| panic!("no verdict in {e:?}"));
        }
        assert!(Instant::now() < deadline, "the server recorded no refused handshake");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A cold `go build` compiles crypto/tls (and for go-micro, a few dozen modules): allow for a
/// slow machine.
const GO_BUILD_WAIT: Duration = Duration::from_secs(600);

/// The target directory (CARGO_TARGET_TMPDIR is `<target>/tmp`).
pub fn target_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().to_path_buf()
}

/// `go` on PATH, else where the official tarball installs it (scripts/deps.sh accepts both).
fn go_program() -> std::path::PathBuf {
    let on_path = Command::new("go").arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    let tarball = std::path::Path::new("/usr/local/go/bin/go");
    if on_path.is_err() && tarball.exists() {
        return tarball.to_path_buf();
    }
    std::path::PathBuf::from("go")
}

/// A `go` command whose caches, module downloads and config all live under the target dir.
/// `online`: modules may be fetched from the Go module proxy (else GOPROXY=off: stdlib only).
pub fn go_command(online: bool) -> Command {
    static GO: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let target = target_dir();
    let mut cmd = Command::new(GO.get_or_init(go_program));
    cmd.env("GOFLAGS", "-mod=mod -buildvcs=false")
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", target.join("go-cache"))
        .env("GOPATH", target.join("go-path"))
        .env("GOMODCACHE", target.join("go-path/pkg/mod"))
        // The go command keeps telemetry counters under the user config dir.
        .env("XDG_CONFIG_HOME", target.join("go-config"))
        .env("CGO_ENABLED", "0");
    if !online {
        cmd.env("GOPROXY", "off");
    }
    cmd
}

/// Builds tests/go/NAME into `<target>/go-bin/NAME`; None (after a loud notice, or a failure
/// under TRUSTWIRE_REQUIRE_PEERS) when `go` is absent.
pub fn go_build(name: &str, online: bool, what: &str) -> Option<std::path::PathBuf> {
    if !tool_available(go_command(false).arg("version"), &format!("`go` ({what})")) {
        return None;
    }
    let dir = target_dir().join("go-bin");
    std::fs::create_dir_all(&dir).unwrap();
    // Build under a private name, then rename: concurrent test runs never see half a binary.
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    // The repository root: this file also serves the C bindings' crate, one level further down.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().find(|d| d.join("Cargo.lock").exists());
    let src = root.expect("the workspace root").join("tests/go").join(name);
    let mut build = Proc::spawn(go_command(online).current_dir(&src).arg("build").arg("-o").arg(&tmp).arg("."));
    let status = build.wait_exit_within(GO_BUILD_WAIT);
    assert!(status.success(), "go build of {name} failed:\n{}", build.output());
    let bin = dir.join(name);
    std::fs::rename(&tmp, &bin).unwrap();
    Some(bin)
}
