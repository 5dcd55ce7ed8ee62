//! Finding 2: Memory is unbounded per connection.
//!
//! A peer that pipelines large requests and never reads the answers used to make the server
//! hold every request and answer (9 MB to 1.5 GB RSS in 2.4 s). Now a connection holds at most
//! `max_unwritten_bytes` (plus a frame or two in flight) before the server stops reading from
//! it, while other connections are served as before. Error texts echo only a bounded prefix of
//! a peer's service or method name.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use trustwire::error::codes;
use trustwire::rpc::CallOptions;
use trustwire::wire::{Frame, RpcMeta, RpcRequestMeta};
use trustwire::Error;

use crate::common::*;

/// The server's cap in the flood test: small, so the bound is tight and reached quickly.
const CAP: u64 = 8 << 20;
/// Each flood request's payload.
const REQUEST: usize = 1 << 20;
/// What the flooder offers in all.
const OFFERED: u64 = 1 << 30;
/// Allowed RSS growth: the cap twice over (requests held, then the answers they become), plus
/// room for a few frames being decoded, answered or encrypted at once, and allocator slack.
const BOUND: u64 = 2 * CAP + 16 * (1 << 20);

/// A baidu_std Echo request carrying `payload`.
pub(crate) fn echo_request(correlation_id: i64, payload: Bytes) -> Bytes {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some("example.EchoService".into()),
                method_name: Some("Echo".into()),
                ..Default::default()
            }),
            correlation_id: Some(correlation_id),
            ..Default::default()
        },
        payload,
        attachment: Bytes::new(),
    }
    .to_bytes()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_grow_the_server_past_its_unwritten_bytes_cap() {
    let pki = Pki::new();
    let server = child::start(&pki, &[("kind", "server"), ("max_unwritten_bytes", &CAP.to_string())]);
    let healthy = client(&server.addr, &pki.client_profile());
    assert_eq!(echo(&healthy, "before the flood").await.unwrap(), "before the flood");
    let tls = pki.client_profile().client().unwrap();
    let (flood, _) = trustwire::transport::connect(&tls, &server.addr, Duration::from_secs(5)).await.unwrap();
    let base = server.rss();

    // One frame, written again and again: the flooder's own memory stays flat, and it never
    // reads what the server answers.
    let frame = echo_request(1, Bytes::from(vec![0x5a; REQUEST]));
    let sent = Arc::new(AtomicU64::new(0));
    let (_unread, mut wr) = tokio::io::split(flood);
    let flooder = {
        let sent = sent.clone();
        tokio::spawn(async move {
            while sent.load(Ordering::Relaxed) < OFFERED {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
                sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            wr
        })
    };

    let started = Instant::now();
    let (mut peak, mut calls) = (0u64, 0u32);
    let (mut last_sent, mut last_progress) = (0u64, Instant::now());
    loop {
        let grown = server.rss().saturating_sub(base);
        peak = peak.max(grown);
        assert!(
            peak < BOUND,
            "server RSS grew by {} MiB (bound {} MiB) after the flooder sent {} MiB",
            peak >> 20,
            BOUND >> 20,
            sent.load(Ordering::Relaxed) >> 20
        );
        let text = format!("during the flood {calls}");
        let answer = tokio::time::timeout(Duration::from_secs(20), echo(&healthy, &text)).await;
        assert_eq!(answer.expect("a healthy client is answered during the flood").unwrap(), text);
        calls += 1;
        let now_sent = sent.load(Ordering::Relaxed);
        if now_sent != last_sent {
            (last_sent, last_progress) = (now_sent, Instant::now());
        }
        // Done when the whole gigabyte went out, or when the server has stopped taking it.
        if now_sent >= OFFERED || last_progress.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the flood neither finished nor stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last_sent < OFFERED, "the server read all {} MiB a client never collected the answers to", OFFERED >> 20);
    eprintln!(
        "flooder got {} MiB in before the server stopped reading; server RSS grew by at most {} MiB (bound {} MiB, \
         cap {} MiB); {calls} healthy calls answered meanwhile",
        last_sent >> 20,
        peak >> 20,
        BOUND >> 20,
        CAP >> 20
    );
    flooder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_texts_echo_only_a_bounded_prefix_of_a_huge_service_or_method_name() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let c = client(server.local_addr(), &pki.client_profile());
    let huge = "S".repeat(1 << 20);
    let qualified = format!("example.{huge}");
    let cases = [
        (huge.as_str(), "Echo", codes::ENOSERVICE),
        (qualified.as_str(), "Echo", codes::ENOMETHOD),
        ("example.EchoService", huge.as_str(), codes::ENOMETHOD),
    ];
    for (service, method, code) in cases {
        let opts = CallOptions { timeout: Some(Duration::from_secs(20)), ..Default::default() };
        let err = c.call(service, method, vec![], opts).await.unwrap_err();
        assert_eq!(err.rpc_code(), Some(code), "{err}");
        let Error::Rpc { text, .. } = &err else { panic!("{err:?}") };
        assert!(text.len() < 1024, "the error text echoes {} bytes of the peer's name", text.len());
        assert!(text.contains('…'), "a cut name is marked as cut: {text}");
    }
}

/// Started by [`child::start`] in a process of its own; does nothing in a normal test run.
#[test]
#[ignore = "a server process for other tests; started by them"]
fn child_process() {
    child::run();
}

/// A trustwire server (or proxy route) in a process of its own: this test binary started again
/// to run only [`child_process`]. Its memory and file descriptors are then its own, so a test
/// can measure them (or limit them) without counting the test's clients or other tests.
pub(crate) mod child {
    use std::io::{Read, Write};
    use std::process::Command;
    use std::time::Duration;

    use trustwire::proxy::{Endpoint, Route, RouteTls};
    use trustwire::rpc::Server;
    use trustwire::tls::{Identity, TlsProfile, TrustBundle};

    use crate::common::peers::Proc;
    use crate::common::Pki;

    const SPEC: &str = "TRUSTWIRE_TEST_CHILD";
    const TEST: &str = "f02_unbounded_memory_per_connection::child_process";

    pub(crate) struct Child {
        pub proc: Proc,
        /// Where the server (or the proxy route) listens.
        pub addr: String,
    }

    impl Child {
        fn status_kib(&self, field: &str) -> u64 {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id())).unwrap();
            let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }

        /// Resident memory, bytes.
        pub fn rss(&self) -> u64 {
            self.status_kib("VmRSS:") << 10
        }

        /// Address space, bytes.
        pub fn vm_size(&self) -> u64 {
            self.status_kib("VmSize:") << 10
        }
    }

    /// Starts a child serving with `pki`'s server credential. `spec`: `kind` = `server` (echo)
    /// or `proxy` (a server-side TCP route to an echo upstream); optional `max_unwritten_bytes`,
    /// `handshake_timeout_s`, and `nofile` (the child's RLIMIT_NOFILE).
    pub(crate) fn start(pki: &Pki, spec: &[(&str, &str)]) -> Child {
        let mut spec: Vec<String> = spec.iter().map(|(k, v)| format!("{k}={v}")).collect();
        spec.push(format!("dir={}", pki.dir.path().display()));
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"]).env(SPEC, spec.join(";"));
        let mut proc = Proc::spawn(&mut cmd);
        let addr = proc.wait_for("the child's address", |out, _| {
            let out = String::from_utf8_lossy(out);
            out.lines().find_map(|l| l.split_once("LISTENING ").map(|(_, a)| a.trim().to_string()))
        });
        Child { proc, addr }
    }

    pub(super) fn run() {
        let Ok(spec) = std::env::var(SPEC) else { return };
        let get = |key: &str| {
            spec.split(';').find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::to_string)
        };
        if let Some(n) = get("nofile") {
            let n: libc::rlim_t = n.parse().unwrap();
            let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: setrlimit reads the struct we pass and nothing else.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0, "setrlimit");
        }
        let dir = std::path::PathBuf::from(get("dir").expect("dir"));
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let mut profile = TlsProfile::new(
            Some(Identity::from_pem(&read("server.pem"), &read("server.key")).unwrap()),
            TrustBundle::from_pem(&read("ca.pem")).unwrap(),
        );
        if let Some(s) = get("handshake_timeout_s") {
            profile.handshake_timeout = Duration::from_secs(s.parse().unwrap());
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let addr = rt.block_on(async {
            match get("kind").as_deref() {
                Some("server") => {
                    let mut server = Server::new(profile.server().unwrap());
                    trustwire::echo::register(&mut server);
                    if let Some(n) = get("max_unwritten_bytes") {
                        server.options_mut().max_unwritten_bytes = n.parse().unwrap();
                    }
                    let running = server.bind("127.0.0.1:0").await.unwrap();
                    let addr = running.local_addr().to_string();
                    std::mem::forget(running);
                    addr
                }
                Some("proxy") => {
                    let upstream = echo_upstream().await;
                    let route = Route::new(
                        "f07",
                        Endpoint::Tcp("127.0.0.1:0".into()),
                        Endpoint::Tcp(upstream),
                        RouteTls::Server(profile.server().unwrap()),
                    );
                    let proxy = trustwire::proxy::start(route).await.unwrap();
                    let Endpoint::Tcp(addr) = proxy.local().clone() else { unreachable!() };
                    std::mem::forget(proxy);
                    addr
                }
                other => panic!("unknown kind {other:?}"),
            }
        });
        // libtest has written "test … " without a newline: start a line of our own.
        println!("\nLISTENING {addr}");
        std::io::stdout().flush().unwrap();
        // Serve until the test closes our stdin (or kills us).
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    }

    /// A plaintext upstream that echoes every byte back.
    async fn echo_upstream() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }
}
