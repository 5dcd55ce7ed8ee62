//! trustwire RPC benchmark: what mutual TLS costs against the same RPC stack in plaintext.
//!
//! Run with `make bench` (= `cargo bench --bench rpc --features insecure-plaintext-bench`).
//! Not a test: nothing is asserted. Every figure is printed next to a baseline measured in the
//! same run, and the ratio between the two is the number to read; absolute figures depend on the
//! machine and on whatever else runs on it.
//!
//! Set-up, chosen for honest figures on a small shared machine:
//! * One process, two multi-thread tokio runtimes of 2 worker threads each: the servers run on
//!   one (threads `tw-srv*`), the clients on the other (`tw-cli*`), as a server process and a
//!   client process would, but without a second binary. Both share the machine's cores, so every
//!   throughput figure pays for both ends (each side's encryption, decryption, framing and
//!   scheduling). The ratio is what TLS costs a client+server pair on one box.
//!   Because throughput on a shared 2-core box is noisy, the bench also reads each thread's CPU
//!   time from /proc and prints CPU microseconds per operation for the server runtime alone and
//!   for the whole process: those figures are much steadier than rates, and the server's share
//!   says what a server on dedicated cores would pay. `BENCH_RUNTIME=shared` puts servers and
//!   clients on one 2-worker runtime instead (no server/client CPU split then).
//! * Two echo servers (example.EchoService/Echo) on 127.0.0.1: one mTLS (a dev PKI generated at
//!   start-up, ECDSA P-256 keys, TLS 1.3, default profile), one built with
//!   `Server::insecure_plaintext_for_benchmarks`. Both run the same accept/dispatch/write code.
//! * Each scenario is measured in alternating rounds (baseline, trustwire, baseline, trustwire),
//!   each round a short warm-up and then BENCH_SECONDS/2 of measurement, so background load
//!   (other cargo builds on this machine) falls on both sides alike. A call counts when it
//!   completes inside a measured window.
//!
//! Scenarios:
//! 1. calls/s, 1 connection x 64 concurrent callers, small echo payload (and its p50/p99 latency).
//! 2. calls/s, 8 connections (one client, pool_size 8) x 8 callers per connection (64 in all).
//! 3. new connections/s, each: connect (+ full mTLS handshake with client certificate), one echo
//!    call, orderly close; 1 caller and 8 concurrent callers. Baseline: plaintext TCP + one call.
//!    The call is framed by hand over `trustwire::transport::handshake_on` (what
//!    `transport::connect` and `Client` use) because a dropped `Client` does not close its
//!    connection (see the probe printed at the end). Client sockets get SO_LINGER=0 (both sides
//!    alike): otherwise tens of thousands of loopback connections per run pile up in TIME_WAIT,
//!    exhaust ephemeral ports and stall connects (a trial run measured 118 TCP connects/s).
//!    Also, informational: handshake only (transport::connect, then drop) vs TCP connect only.
//! 4. 1 MiB payload echo throughput, 1 connection x 4 callers, MiB/s of payload echoed
//!    (each call moves 1 MiB each way; the figure counts it once).
//! 5. Informational: scenarios 3 (8 callers) and 4 with the default suite (AES-128-GCM) in the
//!    baseline column and AES-256-GCM in the other, against the same mTLS server.
//! 6. Informational: scenario 3 with 8 callers, full handshakes (the default profiles) in the
//!    baseline column and resumed TLS 1.3 sessions (`resumption` on at both ends, its own mTLS
//!    server) in the other. The handshakes of the resumed side are counted and printed: a
//!    connection that found no ticket is a full handshake and shows there.
//!
//! Environment: BENCH_SECONDS (default 3) = measured seconds per side and scenario;
//! BENCH_ONLY = comma-separated subset of s1,s2,s3,hs,s4,suites,resume,probe; BENCH_RUNTIME =
//! split|shared.
//!
//! The last line printed is `BENCH_JSON {...}` with every figure.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use trustwire::pki::{DevCa, IssueRequest};
use trustwire::rpc::{CallOptions, Client, ClientOptions, RunningServer, Server};
use trustwire::tls::{ClientTls, Identity, TlsProfile, TrustBundle};
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta, DEFAULT_MAX_BODY};

const SERVICE: &str = trustwire::echo::SERVICE;
const METHOD: &str = trustwire::echo::METHOD;
const WORKERS: usize = 2;
/// Thread-name prefixes of the server's and the clients' runtimes (split mode).
const SERVER_THREADS: &str = "tw-srv";
const CLIENT_THREADS: &str = "tw-cli";

const TARGET_S1_RATIO: f64 = 0.92;
const TARGET_S1_CALLS: f64 = 62_000.0;
const TARGET_S3_CONNS: f64 = 3_000.0;

type OpFuture = Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>;
/// One unit of work (a call, a connection): returns the payload bytes it moved.
type Op = Arc<dyn Fn() -> OpFuture + Send + Sync>;

/// What one side of a scenario achieved.
#[derive(Default)]
struct Sample {
    ops: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    /// Per-call latency in microseconds (only when asked for).
    lat_us: Vec<u32>,
    /// CPU seconds used during the measured window by the server's threads, the clients'
    /// threads, and the whole process.
    cpu: Cpu,
}

/// CPU seconds (user + system) by thread role, read from /proc/self/task/*/stat.
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    client: f64,
    total: f64,
}

impl Cpu {
    fn now() -> Cpu {
        // USER_HZ is 100 on Linux for every architecture /proc reports in.
        const TICK: f64 = 0.01;
        let mut c = Cpu::default();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return c;
        };
        for t in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            // The name is in parentheses and may hold spaces; the fields after it are plain.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = &stat[open + 1..close];
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // After the name: state is field 3, utime field 14, stime field 15 (1-based).
            let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            let secs = ticks as f64 * TICK;
            c.total += secs;
            if name.starts_with(SERVER_THREADS) {
                c.server += secs;
            } else if name.starts_with(CLIENT_THREADS) {
                c.client += secs;
            }
        }
        c
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu { server: self.server - start.server, client: self.client - start.client, total: self.total - start.total }
    }

    fn add(&mut self, o: Cpu) {
        self.server += o.server;
        self.client += o.client;
        self.total += o.total;
    }
}

impl Sample {
    fn merge(&mut self, o: Sample) {
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.secs += o.secs;
        self.lat_us.extend(o.lat_us);
        self.cpu.add(o.cpu);
    }

    /// CPU microseconds per operation: (server threads, whole process).
    fn cpu_us_per_op(&self) -> (f64, f64) {
        let n = self.ops.max(1) as f64;
        (self.cpu.server * 1e6 / n, self.cpu.total * 1e6 / n)
    }

    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    fn mib_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / (1024.0 * 1024.0)
        } else {
            0.0
        }
    }

    /// Latency percentile in microseconds (nearest rank); sorts on first use.
    fn pct(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() - 1) as f64 * p).round() as usize;
        self.lat_us[i] as f64
    }
}

const WARM: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Runs `op` in a loop on `callers` tasks: `warm` unmeasured, then `dur` measured.
async fn run_round(op: &Op, callers: usize, warm: Duration, dur: Duration, latency: bool) -> Sample {
    let phase = Arc::new(AtomicU8::new(WARM));
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let op = op.clone();
        let phase = phase.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Sample::default();
            if latency {
                s.lat_us.reserve(64 * 1024);
            }
            loop {
                if phase.load(Ordering::Relaxed) == STOP {
                    break;
                }
                let t0 = Instant::now();
                let r = op().await;
                let took = t0.elapsed();
                // Counted when it completes inside the measured window.
                if phase.load(Ordering::Relaxed) != MEASURE {
                    if let Err(e) = r {
                        // A failing warm-up would make every figure meaningless: stop early.
                        s.errors += 1;
                        s.first_error.get_or_insert(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
                match r {
                    Ok(b) => {
                        s.ops += 1;
                        s.bytes += b;
                        if latency {
                            s.lat_us.push(took.as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Err(e) => {
                        s.errors += 1;
                        s.first_error.get_or_insert(e);
                    }
                }
            }
            s
        }));
    }
    tokio::time::sleep(warm).await;
    let cpu0 = Cpu::now();
    phase.store(MEASURE, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(dur).await;
    phase.store(STOP, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu = Cpu::now().since(cpu0);
    let mut total = Sample::default();
    for t in tasks {
        total.merge(t.await.expect("benchmark task panicked"));
    }
    total.secs = secs;
    total.cpu = cpu;
    total
}

/// Baseline and trustwire in alternating rounds: B, T, B, T.
async fn run_pair(cfg: &Cfg, label: &str, base: &Op, tw: &Op, callers: usize, latency: bool) -> (Sample, Sample) {
    let half = cfg.seconds / 2.0;
    let dur = Duration::from_secs_f64(half);
    let (mut b, mut t) = (Sample::default(), Sample::default());
    for round in 0..2 {
        let warm = Duration::from_millis(if round == 0 { 500 } else { 250 });
        let mut rb = run_round(base, callers, warm, dur, latency).await;
        let mut rt = run_round(tw, callers, warm, dur, latency).await;
        rb.secs = rb.secs.max(1e-9);
        rt.secs = rt.secs.max(1e-9);
        b.merge(rb);
        t.merge(rt);
    }
    for (side, s) in [("baseline", &b), ("trustwire", &t)] {
        if s.errors > 0 {
            println!("  ! {label} {side}: {} errors, first: {}", s.errors, s.first_error.as_deref().unwrap_or("?"));
        }
    }
    eprintln!("  done: {label}: baseline {:.0}/s, trustwire {:.0}/s", b.rate(), t.rate());
    (b, t)
}

fn call_op(client: Client, payload: Bytes) -> Op {
    Arc::new(move || {
        let client = client.clone();
        let payload = payload.clone();
        Box::pin(async move {
            let len = payload.len();
            let r = client.call(SERVICE, METHOD, payload, CallOptions::default()).await.map_err(|e| e.to_string())?;
            if r.payload.len() != len {
                return Err(format!("echo returned {} bytes, sent {len}", r.payload.len()));
            }
            Ok(len as u64)
        })
    })
}

/// A request frame as `Client::call` builds it.
fn request_frame(payload: Bytes) -> Bytes {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some(SERVICE.into()),
                method_name: Some(METHOD.into()),
                timeout_ms: Some(5000),
                ..Default::default()
            }),
            compress_type: Some(0),
            correlation_id: Some(1 << 32),
            content_type: Some(0),
            checksum_type: Some(0),
            checksum_value: Some(Bytes::new()),
            ..Default::default()
        },
        payload,
        attachment: Bytes::new(),
    }
    .to_bytes()
    .expect("request frame encodes")
}

/// Sends `req` on a fresh stream, waits for a successful answer, closes the stream.
async fn one_call_then_close<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &[u8]) -> Result<u64, String> {
    s.write_all(req).await.map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut dec = Decoder::new(DEFAULT_MAX_BODY);
    let frame = loop {
        match dec.decode(&mut buf) {
            Ok(Some(f)) => break f,
            Ok(None) => {}
            Err(e) => return Err(format!("bad response frame: {e}")),
        }
        match s.read_buf(&mut buf).await {
            Ok(0) => return Err("server closed before answering".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let code = frame.meta.response.as_ref().and_then(|r| r.error_code).unwrap_or(-1);
    if code != 0 {
        return Err(format!("call failed with code {code}"));
    }
    let _ = s.shutdown().await;
    Ok(frame.payload.len() as u64)
}

/// A client TCP connection as `transport::connect` makes it, plus SO_LINGER=0 so that closing
/// it leaves no TIME_WAIT socket behind (see the header).
async fn tcp_connect(addr: &str) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_zero_linger();
    Ok(tcp)
}

fn churn_plain_op(addr: String, req: Bytes) -> Op {
    Arc::new(move || {
        let addr = addr.clone();
        let req = req.clone();
        Box::pin(async move {
            let tcp = tcp_connect(&addr).await?;
            one_call_then_close(tcp, &req).await
        })
    })
}

fn churn_tls_op(addr: String, tls: ClientTls, req: Bytes) -> Op {
    Arc::new(move || {
        let addr = addr.clone();
        let tls = tls.clone();
        let req = req.clone();
        Box::pin(async move {
            // transport::connect = TCP connect + nodelay + handshake_on; same path, plus linger 0.
            let tcp = tcp_connect(&addr).await?;
            let (stream, _info) =
                trustwire::transport::handshake_on(&tls, tcp, &addr).await.map_err(|e| e.to_string())?;
            one_call_then_close(stream, &req).await
        })
    })
}

/// As [`churn_tls_op`], counting the handshakes that resumed a session in `kinds.0` and the
/// full ones in `kinds.1`.
fn churn_counted_op(addr: String, tls: ClientTls, req: Bytes, kinds: Arc<(AtomicU64, AtomicU64)>) -> Op {
    Arc::new(move || {
        let addr = addr.clone();
        let tls = tls.clone();
        let req = req.clone();
        let kinds = kinds.clone();
        Box::pin(async move {
            let tcp = tcp_connect(&addr).await?;
            let (stream, info) =
                trustwire::transport::handshake_on(&tls, tcp, &addr).await.map_err(|e| e.to_string())?;
            let kind = if info.resumed { &kinds.0 } else { &kinds.1 };
            kind.fetch_add(1, Ordering::Relaxed);
            one_call_then_close(stream, &req).await
        })
    })
}

fn connect_only_plain_op(addr: String) -> Op {
    Arc::new(move || {
        let addr = addr.clone();
        Box::pin(async move {
            let tcp = tcp_connect(&addr).await?;
            drop(tcp);
            Ok(0)
        })
    })
}

fn handshake_only_op(addr: String, tls: ClientTls) -> Op {
    Arc::new(move || {
        let addr = addr.clone();
        let tls = tls.clone();
        Box::pin(async move {
            // transport::connect = TCP connect + nodelay + handshake_on; same path, plus linger 0.
            let tcp = tcp_connect(&addr).await?;
            let (stream, _info) =
                trustwire::transport::handshake_on(&tls, tcp, &addr).await.map_err(|e| e.to_string())?;
            drop(stream);
            Ok(0)
        })
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

struct Cfg {
    seconds: f64,
    only: Option<Vec<String>>,
    /// Server on its own runtime (default), or server and clients on one.
    split: bool,
}

impl Cfg {
    fn from_env() -> Self {
        let seconds =
            std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| *s > 0.0).unwrap_or(3.0);
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
        let split = !matches!(std::env::var("BENCH_RUNTIME").as_deref(), Ok("shared"));
        Cfg { seconds, only, split }
    }

    fn wants(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|x| x == name))
    }
}

/// One printed row.
struct Row {
    scenario: String,
    unit: &'static str,
    baseline: f64,
    trustwire: f64,
    /// Higher is better (throughput) or lower is better (latency).
    higher_better: bool,
    target: Option<Target>,
}

enum Target {
    /// trustwire / baseline at least this.
    Ratio(f64),
    /// trustwire at least this (absolute).
    Absolute(f64),
}

impl Row {
    fn ratio(&self) -> f64 {
        self.trustwire / self.baseline
    }

    fn met(&self) -> Option<bool> {
        match self.target {
            Some(Target::Ratio(r)) => Some(self.ratio() >= r),
            Some(Target::Absolute(a)) => Some(self.trustwire >= a),
            None => None,
        }
    }
}

/// CPU cost per operation of one scenario, both sides.
struct CpuRow {
    scenario: String,
    unit: &'static str,
    /// (server threads, whole process) microseconds per op.
    baseline: (f64, f64),
    trustwire: (f64, f64),
}

fn note_cpu(
    rows: &mut Vec<CpuRow>,
    json: &mut Json,
    key: &str,
    scenario: &str,
    unit: &'static str,
    b: &Sample,
    t: &Sample,
) {
    let (bc, tc) = (b.cpu_us_per_op(), t.cpu_us_per_op());
    json.num(&format!("{key}_plain_server_cpu_us_per_op"), bc.0);
    json.num(&format!("{key}_mtls_server_cpu_us_per_op"), tc.0);
    json.num(&format!("{key}_plain_process_cpu_us_per_op"), bc.1);
    json.num(&format!("{key}_mtls_process_cpu_us_per_op"), tc.1);
    rows.push(CpuRow { scenario: scenario.into(), unit, baseline: bc, trustwire: tc });
}

struct Json(Vec<(String, String)>);

impl Json {
    fn num(&mut self, k: &str, v: f64) {
        let v = if v.is_finite() { format!("{v:.3}") } else { "null".into() };
        self.0.push((k.into(), v));
    }
    fn text(&mut self, k: &str, v: &str) {
        let esc: String = v
            .chars()
            .flat_map(|c| match c {
                '"' => vec!['\\', '"'],
                '\\' => vec!['\\', '\\'],
                c if c.is_control() => vec![' '],
                c => vec![c],
            })
            .collect();
        self.0.push((k.into(), format!("\"{esc}\"")));
    }
    fn flag(&mut self, k: &str, v: Option<bool>) {
        self.0.push((k.into(), v.map(|b| b.to_string()).unwrap_or_else(|| "null".into())));
    }
    fn render(&self) -> String {
        let body: Vec<String> = self.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() {
    let cfg = Cfg::from_env();
    let clients = runtime(if cfg.split { CLIENT_THREADS } else { "tw-shared" });
    let servers = cfg.split.then(|| runtime(SERVER_THREADS));
    let server_handle = servers.as_ref().unwrap_or(&clients).handle().clone();
    clients.block_on(bench(cfg, server_handle));
}

async fn bench(cfg: Cfg, server_rt: tokio::runtime::Handle) {
    let load_before = loadavg();
    let layout = if cfg.split {
        format!("servers on one {WORKERS}-worker tokio runtime, clients on another (same process)")
    } else {
        format!("servers and clients on one {WORKERS}-worker tokio runtime")
    };
    println!(
        "trustwire rpc bench: {layout}; {}s per side and scenario (2 alternating rounds); {} CPUs; loadavg {load_before}",
        cfg.seconds,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    // Dev PKI, in memory.
    let ca = DevCa::new("example.org").expect("dev CA");
    let server_cred = ca
        .issue(
            &IssueRequest::new("bench-server")
                .spiffe_id("spiffe://example.org/bench/server")
                .dns("localhost")
                .ip(std::net::Ipv4Addr::LOCALHOST.into()),
        )
        .expect("server credential");
    let client_cred = ca
        .issue(&IssueRequest::new("bench-client").spiffe_id("spiffe://example.org/bench/client"))
        .expect("client credential");
    let trust = TrustBundle::from_pem(ca.cert_pem().as_bytes()).expect("trust bundle");
    let identity = |c: &trustwire::pki::Credential| {
        Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).expect("identity")
    };
    let server_profile = TlsProfile::new(Some(identity(&server_cred)), trust.clone());
    let client_profile = TlsProfile::new(Some(identity(&client_cred)), trust);
    let client_tls = client_profile.client().expect("client TLS");

    // bind() spawns the accept loop (and so every connection task) on the runtime it runs on.
    let mut s = Server::new(server_profile.server().expect("server TLS"));
    trustwire::echo::register(&mut s);
    let tls_server: RunningServer =
        server_rt.spawn(s.bind("127.0.0.1:0")).await.expect("bind task").expect("bind mTLS server");
    let mut s = Server::insecure_plaintext_for_benchmarks();
    trustwire::echo::register(&mut s);
    let plain_server: RunningServer =
        server_rt.spawn(s.bind("127.0.0.1:0")).await.expect("bind task").expect("bind plaintext server");
    let tls_addr = tls_server.local_addr().to_string();
    let plain_addr = plain_server.local_addr().to_string();

    // What the handshake negotiated, for the header.
    let info = Client::new(tls_addr.clone(), client_tls.clone(), ClientOptions::default())
        .connect()
        .await
        .expect("mTLS connect")
        .expect("handshake info");
    println!(
        "mTLS: {} {} kx={} peer={}",
        info.version,
        info.cipher_suite,
        info.kx_group.as_deref().unwrap_or("?"),
        info.peer
    );

    let small = Bytes::from(trustwire::echo::encode("hello, trustwire benchmark"));
    let big = Bytes::from(vec![0xA5u8; 1 << 20]);
    let opts = |pool_size: usize| ClientOptions { pool_size, ..ClientOptions::default() };

    let mut rows: Vec<Row> = Vec::new();
    let mut cpu_rows: Vec<CpuRow> = Vec::new();
    let mut json = Json(Vec::new());
    json.num("bench_seconds", cfg.seconds);
    json.num("workers", WORKERS as f64);
    json.text("runtime", if cfg.split { "split" } else { "shared" });
    json.text("tls", &format!("{} {}", info.version, info.cipher_suite));
    json.text("loadavg_before", &load_before);

    // 1 + 5: one connection, 64 callers.
    if cfg.wants("s1") {
        let base = call_op(Client::insecure_plaintext_for_benchmarks(plain_addr.clone(), opts(1)), small.clone());
        let tw = call_op(Client::new(tls_addr.clone(), client_tls.clone(), opts(1)), small.clone());
        let (mut b, mut t) = run_pair(&cfg, "s1", &base, &tw, 64, true).await;
        note_cpu(&mut cpu_rows, &mut json, "s1", "1. 1 conn x 64 callers", "us/call", &b, &t);
        rows.push(Row {
            scenario: "1. 1 conn x 64 callers, small echo".into(),
            unit: "calls/s",
            baseline: b.rate(),
            trustwire: t.rate(),
            higher_better: true,
            target: Some(Target::Ratio(TARGET_S1_RATIO)),
        });
        rows.push(Row {
            scenario: "1. same, absolute mTLS rate".into(),
            unit: "calls/s",
            baseline: b.rate(),
            trustwire: t.rate(),
            higher_better: true,
            target: Some(Target::Absolute(TARGET_S1_CALLS)),
        });
        let (bp50, tp50, bp99, tp99) = (b.pct(0.50), t.pct(0.50), b.pct(0.99), t.pct(0.99));
        rows.push(Row {
            scenario: "5. latency p50, scenario 1".into(),
            unit: "us",
            baseline: bp50,
            trustwire: tp50,
            higher_better: false,
            target: None,
        });
        rows.push(Row {
            scenario: "5. latency p99, scenario 1".into(),
            unit: "us",
            baseline: bp99,
            trustwire: tp99,
            higher_better: false,
            target: None,
        });
        json.num("s1_plain_calls_per_s", b.rate());
        json.num("s1_mtls_calls_per_s", t.rate());
        json.num("s1_ratio", t.rate() / b.rate());
        json.num("s1_target_ratio", TARGET_S1_RATIO);
        json.flag("s1_ratio_met", Some(t.rate() / b.rate() >= TARGET_S1_RATIO));
        json.num("s1_target_calls_per_s", TARGET_S1_CALLS);
        json.flag("s1_absolute_met", Some(t.rate() >= TARGET_S1_CALLS));
        json.num("s1_errors", (b.errors + t.errors) as f64);
        json.num("s5_plain_p50_us", bp50);
        json.num("s5_mtls_p50_us", tp50);
        json.num("s5_plain_p99_us", bp99);
        json.num("s5_mtls_p99_us", tp99);
    }

    // 2: 8 connections x 8 callers each.
    if cfg.wants("s2") {
        let base = call_op(Client::insecure_plaintext_for_benchmarks(plain_addr.clone(), opts(8)), small.clone());
        let tw = call_op(Client::new(tls_addr.clone(), client_tls.clone(), opts(8)), small.clone());
        let (b, t) = run_pair(&cfg, "s2", &base, &tw, 64, false).await;
        note_cpu(&mut cpu_rows, &mut json, "s2", "2. 8 conns x 8 callers", "us/call", &b, &t);
        rows.push(Row {
            scenario: "2. 8 conns (pool) x 8 callers each".into(),
            unit: "calls/s",
            baseline: b.rate(),
            trustwire: t.rate(),
            higher_better: true,
            target: None,
        });
        json.num("s2_plain_calls_per_s", b.rate());
        json.num("s2_mtls_calls_per_s", t.rate());
        json.num("s2_ratio", t.rate() / b.rate());
        json.num("s2_errors", (b.errors + t.errors) as f64);
    }

    // 3: connection churn (connect + handshake + one call + close).
    if cfg.wants("s3") {
        let req = request_frame(small.clone());
        let base = churn_plain_op(plain_addr.clone(), req.clone());
        let tw = churn_tls_op(tls_addr.clone(), client_tls.clone(), req);
        for callers in [1usize, 8] {
            let (b, t) = run_pair(&cfg, &format!("s3 x{callers}"), &base, &tw, callers, false).await;
            let label = format!("3. new conn + 1 call, {callers} caller(s)");
            note_cpu(&mut cpu_rows, &mut json, &format!("s3_c{callers}"), &label, "us/conn", &b, &t);
            rows.push(Row {
                scenario: format!("3. new conn + 1 call, {callers} caller{}", if callers == 1 { "" } else { "s" }),
                unit: "conn/s",
                baseline: b.rate(),
                trustwire: t.rate(),
                higher_better: true,
                target: (callers == 8).then_some(Target::Absolute(TARGET_S3_CONNS)),
            });
            json.num(&format!("s3_c{callers}_plain_conns_per_s"), b.rate());
            json.num(&format!("s3_c{callers}_mtls_conns_per_s"), t.rate());
            json.num(&format!("s3_c{callers}_ratio"), t.rate() / b.rate());
            json.num(&format!("s3_c{callers}_errors"), (b.errors + t.errors) as f64);
            if callers == 8 {
                json.num("s3_target_conns_per_s", TARGET_S3_CONNS);
                json.flag("s3_met", Some(t.rate() >= TARGET_S3_CONNS));
            }
        }
    }

    // 3b (informational): handshake only vs TCP connect only, 8 callers.
    if cfg.wants("hs") {
        let base = connect_only_plain_op(plain_addr.clone());
        let tw = handshake_only_op(tls_addr.clone(), client_tls.clone());
        let (b, t) = run_pair(&cfg, "hs", &base, &tw, 8, false).await;
        note_cpu(&mut cpu_rows, &mut json, "hs_c8", "3b. handshake only, 8 callers", "us/conn", &b, &t);
        rows.push(Row {
            scenario: "3b. handshake only (no call), 8 callers".into(),
            unit: "conn/s",
            baseline: b.rate(),
            trustwire: t.rate(),
            higher_better: true,
            target: None,
        });
        json.num("hs_c8_tcp_connects_per_s", b.rate());
        json.num("hs_c8_mtls_handshakes_per_s", t.rate());
        json.num("hs_c8_ratio", t.rate() / b.rate());
    }

    // 4: 1 MiB payloads.
    if cfg.wants("s4") {
        let base = call_op(Client::insecure_plaintext_for_benchmarks(plain_addr.clone(), opts(1)), big.clone());
        let tw = call_op(Client::new(tls_addr.clone(), client_tls.clone(), opts(1)), big.clone());
        let (b, t) = run_pair(&cfg, "s4", &base, &tw, 4, false).await;
        note_cpu(&mut cpu_rows, &mut json, "s4", "4. 1 MiB echo", "us/call", &b, &t);
        rows.push(Row {
            scenario: "4. 1 MiB echo, 1 conn x 4 callers".into(),
            unit: "MiB/s",
            baseline: b.mib_per_s(),
            trustwire: t.mib_per_s(),
            higher_better: true,
            target: None,
        });
        json.num("s4_plain_mib_per_s", b.mib_per_s());
        json.num("s4_mtls_mib_per_s", t.mib_per_s());
        json.num("s4_ratio", t.mib_per_s() / b.mib_per_s());
        json.num("s4_errors", (b.errors + t.errors) as f64);
    }

    // 5 (informational): the two AES-GCM suites side by side, on the same mTLS server: the
    // default (AES-128-GCM, SHA-256) in the baseline column, AES-256-GCM (SHA-384) in the other.
    if cfg.wants("suites") {
        let mut aes256 = client_profile.clone();
        aes256.cipher_suites = vec!["TLS13_AES_256_GCM_SHA384".into()];
        let aes256 = aes256.client().expect("AES-256 client TLS");
        let req = request_frame(small.clone());
        let a128 = churn_tls_op(tls_addr.clone(), client_tls.clone(), req.clone());
        let a256 = churn_tls_op(tls_addr.clone(), aes256.clone(), req);
        let (b, t) = run_pair(&cfg, "suites s3", &a128, &a256, 8, false).await;
        note_cpu(&mut cpu_rows, &mut json, "suites_s3", "5a. new conn x8: AES-128 | AES-256", "us/conn", &b, &t);
        rows.push(Row {
            scenario: "5a. new conn x8: AES-128 | AES-256".into(),
            unit: "conn/s",
            baseline: b.rate(),
            trustwire: t.rate(),
            higher_better: true,
            target: None,
        });
        let a128 = call_op(Client::new(tls_addr.clone(), client_tls.clone(), opts(1)), big.clone());
        let a256 = call_op(Client::new(tls_addr.clone(), aes256, opts(1)), big.clone());
        let (b, t) = run_pair(&cfg, "suites s4", &a128, &a256, 4, false).await;
        note_cpu(&mut cpu_rows, &mut json, "suites_s4", "5b. 1 MiB echo: AES-128 | AES-256", "us/call", &b, &t);
        rows.push(Row {
            scenario: "5b. 1 MiB echo: AES-128 | AES-256".into(),
            unit: "MiB/s",
            baseline: b.mib_per_s(),
            trustwire: t.mib_per_s(),
            higher_better: true,
            target: None,
        });
        json.num("suites_s4_aes128_mib_per_s", b.mib_per_s());
        json.num("suites_s4_aes256_mib_per_s", t.mib_per_s());
    }

    // 6 (informational): full handshakes (default profiles) vs resumed sessions (`resumption`
    // on at both ends), new connection + 1 call, 8 callers.
    let mut resume_note = None;
    if cfg.wants("resume") {
        let age = Some(Duration::from_secs(3600));
        let mut sp = server_profile.clone();
        sp.resumption = age;
        let mut s = Server::new(sp.server().expect("resuming server TLS"));
        trustwire::echo::register(&mut s);
        let resuming_server: RunningServer =
            server_rt.spawn(s.bind("127.0.0.1:0")).await.expect("bind task").expect("bind resuming server");
        let mut cp = client_profile.clone();
        cp.resumption = age;
        let resuming_tls = cp.client().expect("resuming client TLS");
        let req = request_frame(small.clone());
        let kinds = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let full = churn_tls_op(tls_addr.clone(), client_tls.clone(), req.clone());
        let resumed = churn_counted_op(resuming_server.local_addr().to_string(), resuming_tls, req, kinds.clone());
        let (b, t) = run_pair(&cfg, "resume", &full, &resumed, 8, false).await;
        note_cpu(&mut cpu_rows, &mut json, "resume_c8", "6. new conn x8: full | resumed", "us/conn", &b, &t);
        rows.push(Row {
            scenario: "6. new conn + 1 call x8: full | resumed".into(),
            unit: "conn/s",
            baseline: b.rate(),
            trustwire: t.rate(),
            higher_better: true,
            target: None,
        });
        let (r, f) = (kinds.0.load(Ordering::Relaxed), kinds.1.load(Ordering::Relaxed));
        json.num("resume_c8_full_conns_per_s", b.rate());
        json.num("resume_c8_resumed_conns_per_s", t.rate());
        json.num("resume_c8_ratio", t.rate() / b.rate());
        json.num("resume_c8_handshakes_resumed", r as f64);
        json.num("resume_c8_handshakes_full", f as f64);
        resume_note = Some(format!(
            "row 6: of the resumed side's {} handshakes (warm-up included), {r} resumed a session and {f} were full{}",
            r + f,
            if r < 9 * f { " -- NOT MOSTLY RESUMED, the row does not measure resumption" } else { "" }
        ));
    }

    // Probe: does dropping a Client close its connection? Counts this process's open fds
    // (client and server ends both live here) around 200 connect-call-drop cycles.
    let mut probe_note = None;
    if cfg.wants("probe") {
        const N: usize = 200;
        let before = open_fds();
        for _ in 0..N {
            let c = Client::new(tls_addr.clone(), client_tls.clone(), opts(1));
            c.call(SERVICE, METHOD, small.clone(), CallOptions::default()).await.expect("probe call");
            drop(c);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = open_fds();
        let leaked = after.saturating_sub(before);
        json.num("probe_client_drop_cycles", N as f64);
        json.num("probe_client_drop_fds_still_open", leaked as f64);
        probe_note = Some(format!(
            "probe: {N} x (Client::new + 1 call + drop) left {leaked} more fds open after 0.5 s \
             ({:.1} per dropped client; 2 = both ends of a connection still open)",
            leaked as f64 / N as f64
        ));
    }

    let load_after = loadavg();
    json.text("loadavg_after", &load_after);

    // The table.
    println!();
    println!(
        "{:<42} {:>8} {:>11} {:>11} {:>7} {:>14} {:>5}",
        "scenario", "unit", "baseline", "trustwire", "ratio", "target", "met?"
    );
    println!("{}", "-".repeat(104));
    for r in &rows {
        let target = match r.target {
            Some(Target::Ratio(x)) => format!("ratio>={x}"),
            Some(Target::Absolute(x)) => format!(">={x:.0}"),
            None => "-".into(),
        };
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "MISS",
            None => "-",
        };
        let ratio = format!("{:.3}{}", r.ratio(), if r.higher_better { "" } else { "*" });
        println!(
            "{:<42} {:>8} {:>11} {:>11} {:>7} {:>14} {:>5}",
            r.scenario,
            r.unit,
            fmt_num(r.baseline),
            fmt_num(r.trustwire),
            ratio,
            target,
            met
        );
    }
    println!("{}", "-".repeat(104));
    println!(
        "baseline = same server/client code without TLS (insecure-plaintext-bench); ratio = trustwire/baseline \
         (* = latency: lower is better, ratio >1 means slower); rows 5a/5b: baseline = mTLS with AES-128-GCM \
         (the default), trustwire = mTLS with AES-256-GCM; row 6: baseline = full handshakes (default \
         profiles), trustwire = resumed TLS 1.3 sessions ([tls] resumption at both ends)"
    );
    if let Some(n) = resume_note {
        println!("{n}");
    }
    if !cpu_rows.is_empty() {
        println!();
        println!(
            "CPU per operation (user+sys, from /proc; server = the server runtime's threads only{}):",
            if cfg.split { "" } else { "; not separable with BENCH_RUNTIME=shared" }
        );
        println!(
            "{:<42} {:>8} {:>11} {:>11} {:>7} {:>11} {:>11} {:>7}",
            "scenario", "unit", "srv base", "srv mTLS", "x", "proc base", "proc mTLS", "x"
        );
        println!("{}", "-".repeat(113));
        for r in &cpu_rows {
            let srv = |v: f64| if cfg.split { fmt_num(v) } else { "-".into() };
            println!(
                "{:<42} {:>8} {:>11} {:>11} {:>7} {:>11} {:>11} {:>7}",
                r.scenario,
                r.unit,
                srv(r.baseline.0),
                srv(r.trustwire.0),
                if cfg.split { format!("{:.2}", r.trustwire.0 / r.baseline.0) } else { "-".into() },
                fmt_num(r.baseline.1),
                fmt_num(r.trustwire.1),
                format!("{:.2}", r.trustwire.1 / r.baseline.1),
            );
        }
        println!("{}", "-".repeat(113));
        if cfg.split {
            if let Some(r) = cpu_rows.iter().find(|r| r.scenario.starts_with("3. new conn + 1 call, 8")) {
                let cap = WORKERS as f64 * 1e6 / r.trustwire.0;
                println!(
                    "server-side capacity implied by its CPU cost: {cap:.0} new mTLS conn/s on {WORKERS} dedicated cores \
                     (target {TARGET_S3_CONNS:.0}; the table's figure pays for the client's handshake too)"
                );
                json.num("s3_c8_mtls_server_only_capacity_conns_per_s", cap);
            }
        }
    }
    if let Some(n) = probe_note {
        println!("{n}");
    }
    println!("loadavg before {load_before}, after {load_after}");
    println!("BENCH_JSON {}", json.render());

    drop(plain_server);
    drop(tls_server);
}
