//! Finding 2: Memory is unbounded per connection.

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
        /// Held for the child's lifetime: dropping it ends the child.
        _proc: Proc,
        /// Where the server (or the proxy route) listens.
        pub addr: String,
    }

    /// Starts a child serving with `pki`'s server credential. `spec`: `kind` = `server` (echo)
    /// or `proxy` (a server-side TCP route to an echo upstream); optional `handshake_timeout_s`
    /// and `nofile` (the child's RLIMIT_NOFILE).
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
        Child { _proc: proc, addr }
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
