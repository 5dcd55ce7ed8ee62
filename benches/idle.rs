//! What an idle connection costs in memory: the server's resident set per idle mTLS connection,
//! and the client's, against the same code over plaintext.
//!
//! Run with `make bench` (= `cargo bench --bench idle --features insecure-plaintext-bench`; without
//! the feature only the mTLS side runs). Not a test: nothing is asserted.
//!
//! * Every side (mTLS, plaintext) is measured by processes of its own, so that neither inherits
//!   the other's freed memory: this bench binary started again as the client (`TW_IDLE_SIDE`),
//!   which starts it once more as the server (`TW_IDLE_SERVE`). The server is an echo server as
//!   `trustwire serve-echo` builds it (`Server::new`, `echo::register`, the shared runtime;
//!   fixed PEM material instead of a credential store, which a connection holds nothing of),
//!   with `max_connections` raised to fit the connections opened (the default is 10,000, and
//!   the bench's own connections must not be refused at the edge). Nothing else is configured.
//! * A dev PKI (ECDSA P-256, TLS 1.3) is generated at start-up and handed to both as PEM files
//!   in a temporary directory.
//! * Warm-up: 256 connections, one echo call each, closed; then the server's VmRSS (and the
//!   client's) is read once the server has closed them all and its resident set has settled.
//! * Then N connections (one `Client` with `pool_size` N, as a client holds a pool), opened 64 at
//!   a time so the handshakes do not flood the listen backlog, with one echo call on each, so
//!   every connection is past its handshake and its first request, as a pooled connection
//!   waiting for its next call is. Once the server holds all N and its resident set has stopped
//!   moving, VmRSS is read again: (after - before) / N is the figure, for the server and for
//!   the client.
//! * Informational: one 256 KiB echo on each of 200 of those connections (4 at a time), then the
//!   server's resident set again, per connection: what a connection keeps after a large message
//!   went through it. What grows is memory freed but kept resident by the allocator (glibc does
//!   not hand back free chunks between live ones; `malloc_trim` returns about half of it): a
//!   heap profile of the server shows the same live allocations per connection as before.
//!
//! N is 10,000 (`IDLE_CONNS` to change it), lowered to what RLIMIT_NOFILE's hard limit allows:
//! each process holds one descriptor per connection (server and client are separate processes),
//! and the soft limit is raised to the hard one (the processes started inherit it).
//! `IDLE_SERVER_WRAPPER` runs the server under a program, e.g. `heaptrack -o /tmp/idle` to see
//! what it allocates (the figures are then the profiled process's).
//!
//! The last line printed is `BENCH_JSON {...}` with every figure.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use trustwire::pki::{DevCa, IssueRequest};
use trustwire::rpc::{CallOptions, Client, ClientOptions, Server};
use trustwire::tls::{ClientTls, Identity, TlsProfile, TrustBundle};

const SERVICE: &str = trustwire::echo::SERVICE;
const METHOD: &str = trustwire::echo::METHOD;
/// Connections opened when the descriptor limit allows.
const DEFAULT_CONNS: usize = 10_000;
/// Descriptors each process keeps for everything that is not a connection.
const FD_MARGIN: usize = 512;
const WARMUP_CONNS: usize = 256;
/// Connections being opened (and called) at once.
const CONCURRENCY: usize = 64;
/// Connections that carry one large echo after the idle figure is taken.
const LARGE: usize = 200;
const LARGE_BYTES: usize = 256 * 1024;
/// The goal per idle mTLS connection on the server.
const TARGET_KIB: f64 = 32.0;

fn main() {
    if let Ok(dir) = std::env::var("TW_IDLE_SERVE") {
        serve(Path::new(&dir));
        return;
    }
    if let Ok(side) = std::env::var("TW_IDLE_SIDE") {
        let dir = std::env::var("TW_IDLE_DIR").expect("TW_IDLE_DIR");
        let n = std::env::var("TW_IDLE_CONNS").ok().and_then(|s| s.parse().ok()).expect("TW_IDLE_CONNS");
        let result = trustwire::runtime::runtime().block_on(measure(Path::new(&dir), n, side == "mtls"));
        // What the parent reads: one line of numbers, then the errors.
        println!("RESULT {}", result.render());
        for e in &result.errors {
            println!("ERROR {e}");
        }
        return;
    }
    let hard = raise_nofile();
    let wanted = std::env::var("IDLE_CONNS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_CONNS);
    let fits = usize::try_from(hard).unwrap_or(usize::MAX).saturating_sub(FD_MARGIN);
    bench(wanted.min(fits), wanted, hard);
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (the processes it starts
/// inherit it) and returns the hard limit.
fn raise_nofile() -> libc::rlim_t {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_max
    }
}

/// The server process: an echo server on 127.0.0.1:0 (mTLS with the PEM files in `dir`, or
/// plaintext when `TW_IDLE_PLAIN` is set). Prints its port and pid, then serves until stdin
/// closes.
fn serve(dir: &Path) {
    let max_connections: usize = std::env::var("TW_IDLE_MAX_CONNS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let plain = std::env::var_os("TW_IDLE_PLAIN").is_some();
    let rt = trustwire::runtime::runtime();
    let running = rt.block_on(async {
        let mut server = if plain { plaintext_server() } else { Server::new(server_tls(dir)) };
        trustwire::echo::register(&mut server);
        server.options_mut().max_connections = max_connections;
        server.bind("127.0.0.1:0").await.expect("bind")
    });
    println!("port {} pid {}", running.local_addr().port(), std::process::id());
    let _ = std::io::stdout().flush();
    // The client holds our stdin open for as long as we are needed.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(running);
}

fn server_tls(dir: &Path) -> trustwire::tls::ServerTls {
    let read = |name: &str| std::fs::read(dir.join(name)).expect("PKI file");
    let trust = TrustBundle::from_pem(&read("ca.pem")).expect("trust bundle");
    let identity = Identity::from_pem(&read("server.pem"), &read("server.key")).expect("server identity");
    TlsProfile::new(Some(identity), trust).server().expect("server TLS")
}

fn client_tls(dir: &Path) -> ClientTls {
    let read = |name: &str| std::fs::read(dir.join(name)).expect("PKI file");
    let trust = TrustBundle::from_pem(&read("ca.pem")).expect("trust bundle");
    let identity = Identity::from_pem(&read("client.pem"), &read("client.key")).expect("client identity");
    TlsProfile::new(Some(identity), trust).client().expect("client TLS")
}

#[cfg(feature = "insecure-plaintext-bench")]
fn plaintext_server() -> Server {
    Server::insecure_plaintext_for_benchmarks()
}

#[cfg(not(feature = "insecure-plaintext-bench"))]
fn plaintext_server() -> Server {
    panic!("the plaintext side needs --features insecure-plaintext-bench")
}

/// The server process.
struct ServerProc {
    child: Child,
    /// The server's own pid: the child's, unless a wrapper started it.
    pid: u32,
    addr: String,
}

impl ServerProc {
    fn start(dir: &Path, plain: bool, max_connections: usize) -> ServerProc {
        let exe = std::env::current_exe().expect("current exe");
        let wrapper = std::env::var("IDLE_SERVER_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.env("TW_IDLE_SERVE", dir)
            .env("TW_IDLE_MAX_CONNS", max_connections.to_string())
            .env_remove("TW_IDLE_SIDE")
            .env_remove("TW_IDLE_PLAIN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if plain {
            cmd.env("TW_IDLE_PLAIN", "1");
        }
        let mut child = cmd.spawn().expect("start the server process");
        // "port P pid N"; a wrapper may print other lines, before and after, which go on to
        // stderr (a wrapper that finds its stdout closed may not finish its work).
        let mut lines = BufReader::new(child.stdout.take().expect("server stdout")).lines();
        let (port, pid) = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.strip_prefix("port ")?;
                let (port, pid) = rest.split_once(" pid ")?;
                Some((port.to_string(), pid.parse::<u32>().ok()?))
            })
            .expect("the server process ended without saying its port");
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                eprintln!("{l}");
            }
        });
        ServerProc { addr: format!("127.0.0.1:{port}"), pid, child }
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(&format!("/proc/{}/status", self.pid))
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map(|d| d.count()).unwrap_or(0)
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid)).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(status: &str) -> u64 {
    let s = std::fs::read_to_string(status).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn own_rss_kib() -> u64 {
    rss_kib("/proc/self/status")
}

/// Waits until `cond` holds (checked every 50 ms), at most `limit`. Returns whether it did.
async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `rss` until two readings a second apart differ by less than 64 KiB (at most 15 s),
/// and returns the last one.
async fn settled(mut rss: impl FnMut() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = rss();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss();
        if now.abs_diff(last) < 64 || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

fn client_for(addr: &str, tls: Option<&ClientTls>, pool_size: usize) -> Client {
    let opts = ClientOptions { pool_size, ..ClientOptions::default() };
    match tls {
        Some(tls) => Client::new(addr.to_string(), tls.clone(), opts),
        None => plaintext_client(addr, opts),
    }
}

#[cfg(feature = "insecure-plaintext-bench")]
fn plaintext_client(addr: &str, opts: ClientOptions) -> Client {
    Client::insecure_plaintext_for_benchmarks(addr.to_string(), opts)
}

#[cfg(not(feature = "insecure-plaintext-bench"))]
fn plaintext_client(_: &str, _: ClientOptions) -> Client {
    panic!("the plaintext side needs --features insecure-plaintext-bench")
}

/// Makes `calls` echo calls of `payload` on `client`, `concurrency` at a time. A client spreads
/// its calls over its pool in turn, so on a fresh pool of `calls` connections each call opens
/// one. Returns the calls that succeeded and the first error.
async fn calls(client: &Client, calls: usize, concurrency: usize, payload: Bytes) -> (usize, Option<String>) {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(calls) {
        let (client, next, ok, first_error, payload) =
            (client.clone(), next.clone(), ok.clone(), first_error.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                match client.call(SERVICE, METHOD, payload.clone(), CallOptions::default()).await {
                    Ok(r) if r.payload.len() == payload.len() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let text = format!("echo returned {} bytes, sent {}", r.payload.len(), payload.len());
                        first_error.lock().unwrap().get_or_insert(text);
                    }
                    Err(e) => {
                        first_error.lock().unwrap().get_or_insert(e.to_string());
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("call task");
    }
    let e = first_error.lock().unwrap().take();
    (ok.load(Ordering::Relaxed), e)
}

/// What one side (mTLS or plaintext) measured.
#[derive(Default)]
struct Side {
    conns: usize,
    connect_secs: f64,
    server_before_kib: u64,
    server_after_kib: u64,
    client_before_kib: u64,
    client_after_kib: u64,
    server_threads: usize,
    /// Server resident set after one large echo on LARGE connections.
    server_after_large_kib: u64,
    large_ok: usize,
    errors: Vec<String>,
}

impl Side {
    fn server_kib_per_conn(&self) -> f64 {
        self.server_after_kib.saturating_sub(self.server_before_kib) as f64 / self.conns.max(1) as f64
    }

    fn client_kib_per_conn(&self) -> f64 {
        self.client_after_kib.saturating_sub(self.client_before_kib) as f64 / self.conns.max(1) as f64
    }

    fn large_retained_kib_per_conn(&self) -> f64 {
        self.server_after_large_kib.saturating_sub(self.server_after_kib) as f64 / self.large_ok.max(1) as f64
    }

    /// `key=value` pairs, as the client process reports them.
    fn render(&self) -> String {
        format!(
            "conns={} connect_secs={:.3} server_before={} server_after={} client_before={} client_after={} \
             server_threads={} server_after_large={} large_ok={}",
            self.conns,
            self.connect_secs,
            self.server_before_kib,
            self.server_after_kib,
            self.client_before_kib,
            self.client_after_kib,
            self.server_threads,
            self.server_after_large_kib,
            self.large_ok
        )
    }

    fn parse(line: &str) -> Side {
        let kv: HashMap<&str, &str> = line.split_whitespace().filter_map(|w| w.split_once('=')).collect();
        let int = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Side {
            conns: int("conns") as usize,
            connect_secs: kv.get("connect_secs").and_then(|v| v.parse().ok()).unwrap_or(0.0),
            server_before_kib: int("server_before"),
            server_after_kib: int("server_after"),
            client_before_kib: int("client_before"),
            client_after_kib: int("client_after"),
            server_threads: int("server_threads") as usize,
            server_after_large_kib: int("server_after_large"),
            large_ok: int("large_ok") as usize,
            errors: Vec::new(),
        }
    }
}

/// Runs in the client process of one side.
async fn measure(dir: &Path, n: usize, mtls: bool) -> Side {
    let label = if mtls { "mTLS" } else { "plaintext" };
    let tls = mtls.then(|| client_tls(dir));
    let tls = tls.as_ref();
    let server = ServerProc::start(dir, !mtls, n + WARMUP_CONNS + 64);
    let mut errors = Vec::new();
    let small = Bytes::from(trustwire::echo::encode("hello, idle connection"));
    let base_fds = server.fds();

    // Warm-up: the allocators' arenas, the runtimes' threads, the first handshakes.
    let warm = client_for(&server.addr, tls, WARMUP_CONNS);
    let (ok, err) = calls(&warm, WARMUP_CONNS, CONCURRENCY, small.clone()).await;
    if ok < WARMUP_CONNS {
        errors.push(format!(
            "warm-up: {} of {WARMUP_CONNS} calls failed, first: {}",
            WARMUP_CONNS - ok,
            err.unwrap_or_default()
        ));
    }
    drop(warm);
    if !wait_until(Duration::from_secs(30), || server.fds() <= base_fds).await {
        errors
            .push(format!("warm-up: the server still holds {} descriptors more than before", server.fds() - base_fds));
    }
    let server_before_kib = settled(|| server.rss_kib()).await;
    let client_before_kib = own_rss_kib();

    eprintln!("  {label}: opening {n} connections, {CONCURRENCY} at a time");
    let t0 = Instant::now();
    let client = client_for(&server.addr, tls, n);
    let (ok, err) = calls(&client, n, CONCURRENCY, small.clone()).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    if ok < n {
        errors.push(format!("{} of {n} connections failed, first: {}", n - ok, err.unwrap_or_default()));
    }
    if !wait_until(Duration::from_secs(30), || server.fds() >= base_fds + ok).await {
        errors.push(format!("the server holds {} connections, expected {ok}", server.fds().saturating_sub(base_fds)));
    }
    let server_after_kib = settled(|| server.rss_kib()).await;
    let client_after_kib = own_rss_kib();
    eprintln!(
        "  {label}: {ok} connections in {connect_secs:.1} s; server RSS {server_before_kib} -> {server_after_kib} KiB"
    );

    // One large echo on some of them: the first LARGE connections of the pool, in turn.
    let big = Bytes::from(vec![0x5Au8; LARGE_BYTES]);
    let (large_ok, err) = calls(&client, LARGE, 4, big).await;
    if large_ok < LARGE {
        errors.push(format!("large echo: {} of {LARGE} failed, first: {}", LARGE - large_ok, err.unwrap_or_default()));
    }
    let server_after_large_kib = settled(|| server.rss_kib()).await;
    let server_threads = server.threads();

    client.close();
    drop(client);
    drop(server);
    Side {
        conns: ok,
        connect_secs,
        server_before_kib,
        server_after_kib,
        client_before_kib,
        client_after_kib,
        server_threads,
        server_after_large_kib,
        large_ok,
        errors,
    }
}

/// Measures one side in a client process of its own.
fn run_side(dir: &Path, n: usize, mtls: bool) -> Side {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .env("TW_IDLE_SIDE", if mtls { "mtls" } else { "plain" })
        .env("TW_IDLE_DIR", dir)
        .env("TW_IDLE_CONNS", n.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("start the client process");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut side = match text.lines().find_map(|l| l.strip_prefix("RESULT ")) {
        Some(line) => Side::parse(line),
        None => Side { errors: vec![format!("the client process failed ({})", out.status)], ..Side::default() },
    };
    side.errors.extend(text.lines().filter_map(|l| l.strip_prefix("ERROR ")).map(str::to_string));
    side
}

struct Json(Vec<(String, String)>);

impl Json {
    fn num(&mut self, k: &str, v: f64) {
        let v = if v.is_finite() { format!("{v:.3}") } else { "null".into() };
        self.0.push((k.into(), v));
    }
    fn text(&mut self, k: &str, v: &str) {
        let esc: String = v.chars().map(|c| if c == '"' || c == '\\' || c.is_control() { ' ' } else { c }).collect();
        self.0.push((k.into(), format!("\"{esc}\"")));
    }
    fn flag(&mut self, k: &str, v: bool) {
        self.0.push((k.into(), v.to_string()));
    }
    fn render(&self) -> String {
        let body: Vec<String> = self.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    }
}

fn bench(n: usize, wanted: usize, hard: libc::rlim_t) {
    println!(
        "trustwire idle-connection bench: {n} connections each side; server and client in processes of their own; {} CPUs",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    if n < wanted {
        println!(
            "  ! RLIMIT_NOFILE hard limit is {hard}: {n} connections instead of {wanted} \
             (each process needs one descriptor per connection, plus {FD_MARGIN})"
        );
    }

    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = DevCa::new("example.org").expect("dev CA");
    let server_cred = ca
        .issue(
            &IssueRequest::new("server")
                .spiffe_id("spiffe://example.org/bench/server")
                .dns("localhost")
                .ip(std::net::Ipv4Addr::LOCALHOST.into()),
        )
        .expect("server credential");
    let client_cred = ca
        .issue(&IssueRequest::new("client").spiffe_id("spiffe://example.org/bench/client"))
        .expect("client credential");
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write ca.pem");
    server_cred.write(dir.path(), "server").expect("write server credential");
    client_cred.write(dir.path(), "client").expect("write client credential");

    let mtls = run_side(dir.path(), n, true);
    let plain = cfg!(feature = "insecure-plaintext-bench").then(|| run_side(dir.path(), n, false));

    let mut json = Json(Vec::new());
    json.num("connections", n as f64);
    json.num("nofile_hard_limit", hard as f64);
    println!();
    println!(
        "{:<10} {:>7} {:>16} {:>16} {:>20} {:>22}",
        "side", "conns", "server KiB/conn", "client KiB/conn", "server RSS KiB", "kept after 256 KiB"
    );
    println!("{}", "-".repeat(96));
    for (name, side) in [("mTLS", Some(&mtls)), ("plaintext", plain.as_ref())] {
        let Some(s) = side else { continue };
        println!(
            "{:<10} {:>7} {:>16.1} {:>16.1} {:>20} {:>22}",
            name,
            s.conns,
            s.server_kib_per_conn(),
            s.client_kib_per_conn(),
            format!("{} -> {}", s.server_before_kib, s.server_after_kib),
            format!("{:.1} KiB/conn", s.large_retained_kib_per_conn()),
        );
        let key = if name == "mTLS" { "mtls" } else { "plain" };
        json.num(&format!("{key}_connections"), s.conns as f64);
        json.num(&format!("{key}_connect_secs"), s.connect_secs);
        json.num(&format!("{key}_server_kib_per_conn"), s.server_kib_per_conn());
        json.num(&format!("{key}_client_kib_per_conn"), s.client_kib_per_conn());
        json.num(&format!("{key}_server_rss_before_kib"), s.server_before_kib as f64);
        json.num(&format!("{key}_server_rss_after_kib"), s.server_after_kib as f64);
        json.num(&format!("{key}_client_rss_before_kib"), s.client_before_kib as f64);
        json.num(&format!("{key}_client_rss_after_kib"), s.client_after_kib as f64);
        json.num(&format!("{key}_server_kept_after_large_kib_per_conn"), s.large_retained_kib_per_conn());
        json.num(&format!("{key}_server_threads"), s.server_threads as f64);
        json.num(&format!("{key}_errors"), s.errors.len() as f64);
        for e in &s.errors {
            println!("  ! {name}: {e}");
        }
    }
    println!("{}", "-".repeat(96));
    let met = mtls.server_kib_per_conn() <= TARGET_KIB && mtls.errors.is_empty();
    println!(
        "server KiB per idle mTLS connection: {:.1} (target <= {TARGET_KIB:.0}: {})",
        mtls.server_kib_per_conn(),
        if met { "met" } else { "MISS" }
    );
    json.num("target_server_kib_per_conn", TARGET_KIB);
    json.flag("target_met", met);
    if let Some(p) = &plain {
        println!(
            "mTLS against plaintext per idle connection: server {:.2}x (+{:.1} KiB), client {:.2}x (+{:.1} KiB)",
            mtls.server_kib_per_conn() / p.server_kib_per_conn(),
            mtls.server_kib_per_conn() - p.server_kib_per_conn(),
            mtls.client_kib_per_conn() / p.client_kib_per_conn(),
            mtls.client_kib_per_conn() - p.client_kib_per_conn(),
        );
        json.num("server_ratio_mtls_to_plain", mtls.server_kib_per_conn() / p.server_kib_per_conn());
        json.num("client_ratio_mtls_to_plain", mtls.client_kib_per_conn() / p.client_kib_per_conn());
    }
    println!(
        "(RSS = VmRSS from /proc: what a process holds in memory, the allocator's free lists included; kernel \
         socket buffers are not in it. \"kept after 256 KiB\" = the server's RSS growth after one {} KiB echo \
         on {LARGE} of the connections, per connection.)",
        LARGE_BYTES / 1024
    );
    json.text("tls", "TLS 1.3, ECDSA P-256, client certificate");
    println!("BENCH_JSON {}", json.render());
}
