//! What a key on a PKCS#11 token (SoftHSM2) costs, measured against baselines in the same run:
//!
//! 1. full mTLS handshakes per second against a server whose P-256 key is on the token vs one
//!    whose P-256 key is in a file (8 concurrent connectors);
//! 2. against the token-keyed server: 8 concurrent connectors vs 1, to show that handshakes do
//!    not queue on one token session;
//! 3. the same 8 connectors against a token-keyed server with a pool of 1 session vs the
//!    default pool, to show what the pool buys;
//! 4. raw signatures per second through the token key from 8 threads: the default pool vs a
//!    pool of 1 session (the signing path alone, without the rest of the handshake).
//!
//! Baseline and candidate alternate in rounds so background load falls on both. Client and
//! server share one 2-worker tokio runtime. Duration per side and round: `BENCH_SECONDS`
//! (default 2). Prints a table and a `BENCH_JSON` line. Needs `softhsm2-util` and
//! `pkcs11-tool` (scripts/deps.sh); says so and exits when they are missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trustwire::credentials::{
    CredentialStore, IdentitySource, PemSource, PinSource, Pkcs11KeySpec, Pkcs11Uri, Sources, StoreOptions, Use,
};
use trustwire::pki::{DevCa, IssueRequest, Usage};
use trustwire::rpc::{RunningServer, Server};
use trustwire::tls::{ClientTls, Identity, ServerTls, TlsProfile, TrustBundle};

const ROUNDS: usize = 3;
const PIN: &str = "112233";

fn module() -> Option<PathBuf> {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .chain(std::env::var_os("TRUSTWIRE_SOFTHSM_MODULE").map(PathBuf::from))
    .find(|p| p.exists())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn server_request() -> IssueRequest {
    IssueRequest::new("server").spiffe_id("spiffe://example.org/bench/server").dns("localhost")
}

fn store(sources: Sources) -> ServerTls {
    let options = StoreOptions { name: "bench".into(), watch: false, poll_interval: None, ..StoreOptions::default() };
    let s = CredentialStore::new(Use::Server, sources, TlsProfile::new(None, TrustBundle::default()), options).unwrap();
    s.server_tls().unwrap()
}

async fn serve(tls: ServerTls) -> RunningServer {
    let mut server = Server::new(tls);
    trustwire::echo::register(&mut server);
    server.bind("127.0.0.1:0").await.unwrap()
}

/// Signatures per second through `key` from `threads` threads.
fn signatures(key: &dyn rustls::sign::SigningKey, threads: usize, secs: f64) -> f64 {
    let count = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let signer = key.choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256]).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    signer.sign(b"a handshake transcript, more or less").unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// CPU time this process has used (both ends of every handshake run here, SoftHSM included).
fn process_cpu() -> Duration {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Full handshakes per second with `callers` concurrent connectors, and the process CPU (µs)
/// each took, client and server together.
async fn handshakes_cpu(addr: String, tls: ClientTls, callers: usize, secs: f64) -> (f64, f64) {
    let cpu = process_cpu();
    let start = Instant::now();
    let rate = handshakes(addr, tls, callers, secs).await;
    let n = rate * start.elapsed().as_secs_f64();
    (rate, (process_cpu() - cpu).as_secs_f64() * 1e6 / n.max(1.0))
}

/// Full handshakes per second with `callers` concurrent connectors.
async fn handshakes(addr: String, tls: ClientTls, callers: usize, secs: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (addr, tls, count, stop) = (addr.clone(), tls.clone(), count.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (stream, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
                let (tcp, _) = stream.get_ref();
                #[allow(deprecated)]
                let _ = tcp.get_ref().set_linger(Some(Duration::ZERO));
                drop(stream);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed) as f64;
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    n / elapsed
}

fn main() {
    let Some(module) = module() else {
        eprintln!("benches/pkcs11: SoftHSM2 (libsofthsm2.so) not found; run scripts/deps.sh");
        return;
    };
    let secs: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("tokens")).unwrap();
    let conf = d.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\n", d.join("tokens").display()),
    )
    .unwrap();
    // Read once, when the module is initialised: before anything opens it.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    std::fs::write(d.join("pin"), PIN).unwrap();
    run(Command::new("softhsm2-util").args([
        "--init-token",
        "--free",
        "--label",
        "bench",
        "--so-pin",
        "0000",
        "--pin",
        PIN,
    ]));
    run(Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&module)
        .args(["--token-label", "bench", "--login", "--pin", PIN, "--keypairgen", "--key-type", "EC:prime256v1"])
        .args(["--label", "server-key", "--id", "01"]));

    let ca = DevCa::new("example.org").unwrap();
    ca.write(d).unwrap();
    let spec = |sessions: usize| Pkcs11KeySpec {
        uri: Pkcs11Uri::parse("pkcs11:token=bench;object=server-key").unwrap(),
        module: module.clone(),
        pin: PinSource::File(d.join("pin")),
        sessions,
    };
    let token_key = trustwire::credentials::pkcs11::TokenKey::open(&spec(1), None).unwrap();
    let pem = ca.issue_for_public_key(&server_request(), token_key.public_key_der()).unwrap();
    drop(token_key);
    std::fs::write(d.join("token-server.pem"), pem).unwrap();
    ca.issue(&server_request()).unwrap().write(d, "file-server").unwrap();
    let trust = || vec![PemSource::Path(d.join("ca.pem"))];
    let token_sources = |sessions: usize| Sources {
        identity: IdentitySource::Pkcs11 { chain: d.join("token-server.pem"), key: Box::new(spec(sessions)) },
        trust: trust(),
        ..Sources::default()
    };
    let file_sources = Sources {
        identity: IdentitySource::Files { chain: d.join("file-server.pem"), key: d.join("file-server.key") },
        trust: trust(),
        ..Sources::default()
    };
    let c = ca
        .issue(&IssueRequest::new("client").spiffe_id("spiffe://example.org/bench/client").usage(Usage::Client))
        .unwrap();
    let client = TlsProfile::new(
        Some(Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()),
        TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap(),
    );
    let mut client = client;
    client.server_name = Some("localhost".into());
    let client_tls = client.client().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let file_srv = serve(store(file_sources)).await;
        let token_srv = serve(store(token_sources(trustwire::credentials::pkcs11::DEFAULT_SESSIONS))).await;
        let token1_srv = serve(store(token_sources(1))).await;
        let addr = |s: &RunningServer| s.local_addr().to_string();
        let (file_addr, token_addr, token1_addr) = (addr(&file_srv), addr(&token_srv), addr(&token1_srv));
        for a in [&file_addr, &token_addr, &token1_addr] {
            handshakes(a.clone(), client_tls.clone(), 8, 0.3).await;
        }
        let (mut file8, mut token8, mut token1, mut pool1) = (0.0, 0.0, 0.0, 0.0);
        let (mut token8b, mut file_cpu, mut token_cpu) = (0.0, 0.0, 0.0);
        for _ in 0..ROUNDS {
            let r = ROUNDS as f64;
            let (rate, cpu) = handshakes_cpu(file_addr.clone(), client_tls.clone(), 8, secs).await;
            (file8, file_cpu) = (file8 + rate / r, file_cpu + cpu / r);
            let (rate, cpu) = handshakes_cpu(token_addr.clone(), client_tls.clone(), 8, secs).await;
            (token8, token_cpu) = (token8 + rate / r, token_cpu + cpu / r);
            token1 += handshakes(token_addr.clone(), client_tls.clone(), 1, secs).await / r;
            token8b += handshakes(token_addr.clone(), client_tls.clone(), 8, secs).await / r;
            pool1 += handshakes(token1_addr.clone(), client_tls.clone(), 8, secs).await / r;
        }
        let token8_all = (token8 + token8b) / 2.0;
        println!("{:<60} {:>12} {:>12} {:>8}", "scenario (full mTLS handshakes/s)", "baseline", "candidate", "ratio");
        let row = |name: &str, base: f64, cand: f64| {
            println!("{name:<60} {base:>12.1} {cand:>12.1} {:>7.3}x", cand / base);
        };
        row("1. P-256 key on SoftHSM vs in a file (8 conc.)", file8, token8);
        row("2. SoftHSM key: 8 concurrent vs 1", token1, token8_all);
        row("3. SoftHSM key, 8 conc.: default pool vs 1 session", pool1, token8b);
        println!(
            "CPU per full handshake, both ends in this process: file key {file_cpu:.0} µs, SoftHSM key {token_cpu:.0} µs \
             ({:.2}x)",
            token_cpu / file_cpu
        );
        println!(
            "BENCH_JSON {{\"file_cpu_us_per_handshake\":{file_cpu:.1},\"token_cpu_us_per_handshake\":{token_cpu:.1},\"file_8\":{file8:.1},\"token_8\":{token8:.1},\"token_vs_file\":{:.4},\"token_1\":{token1:.1},\"token_8_vs_1\":{:.4},\"pool_1_session_8\":{pool1:.1},\"pool_vs_one_session\":{:.4}}}",
            token8 / file8,
            token8_all / token1,
            token8b / pool1
        );
        drop((file_srv, token_srv, token1_srv));
    });
    let open =
        |sessions| trustwire::credentials::pkcs11::TokenKey::open(&spec(sessions), None).unwrap().into_signing_key();
    let (pooled, single) = (open(trustwire::credentials::pkcs11::DEFAULT_SESSIONS), open(1));
    let (mut sig_pool, mut sig_one) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        sig_one += signatures(single.as_ref(), 8, secs) / ROUNDS as f64;
        sig_pool += signatures(pooled.as_ref(), 8, secs) / ROUNDS as f64;
    }
    println!(
        "{:<60} {:>12.1} {:>12.1} {:>7.3}x",
        "4. signatures/s, 8 threads: default pool vs 1 session",
        sig_one,
        sig_pool,
        sig_pool / sig_one
    );
    println!("BENCH_JSON {{\"signatures_1_session\":{sig_one:.1},\"signatures_pool\":{sig_pool:.1},\"signature_pool_ratio\":{:.4}}}", sig_pool / sig_one);
}
