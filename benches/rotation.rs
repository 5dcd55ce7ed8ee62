//! What the credential lifecycle costs, measured against a fixed configuration in the same run:
//!
//! 1. full mTLS handshakes per second against a server whose material comes from a watched
//!    `CredentialStore` vs one built once from a fixed profile (target ≥ 0.98×);
//! 2. calls per second from pooled clients while the server's certificate is rotated every
//!    second vs not rotated, with the number of failed calls (target: none);
//! 3. full handshakes per second against a server trusting three trust domains (its own plus
//!    two federated, each with its CA) vs one trusting a single CA (target ≥ 0.97×).
//!
//! Baseline and candidate alternate in rounds (B, T, B, T, …) so background load on a shared
//! machine falls on both. Client and server share one 2-worker tokio runtime. Duration per
//! side and round: `BENCH_SECONDS` (default 2). Prints a table and a `BENCH_JSON` line.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::{DevCa, IssueRequest, Usage};
use trustwire::rpc::{CallOptions, Client, ClientOptions, RunningServer, Server};
use trustwire::tls::{ClientTls, Identity, ServerTls, TlsProfile, TrustBundle};

const ROUNDS: usize = 3;

struct Pki {
    dir: tempfile::TempDir,
    ca: DevCa,
    client: TlsProfile,
}

fn server_request() -> IssueRequest {
    IssueRequest::new("server")
        .spiffe_id("spiffe://example.org/bench/server")
        .dns("localhost")
        .ip([127, 0, 0, 1].into())
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("example.org").unwrap();
        ca.write(dir.path()).unwrap();
        ca.issue(&server_request()).unwrap().write(dir.path(), "server").unwrap();
        let c = ca
            .issue(&IssueRequest::new("client").spiffe_id("spiffe://example.org/bench/client").usage(Usage::Client))
            .unwrap();
        let trust = TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap();
        let client =
            TlsProfile::new(Some(Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()), trust);
        Pki { dir, ca, client }
    }

    fn fixed(&self) -> ServerTls {
        let d = self.dir.path();
        let id = Identity::from_files(&d.join("server.pem"), &d.join("server.key")).unwrap();
        let trust = TrustBundle::from_paths(&[d.join("ca.pem")]).unwrap();
        TlsProfile::new(Some(id), trust).server().unwrap()
    }

    /// The fixed server, also trusting two federated trust domains with their own CAs.
    fn three_domains(&self) -> ServerTls {
        let d = self.dir.path();
        let id = Identity::from_files(&d.join("server.pem"), &d.join("server.key")).unwrap();
        let mut trust = TrustBundle::from_paths(&[d.join("ca.pem")]).unwrap();
        for td in ["partner-a.example", "partner-b.example"] {
            let ca = DevCa::new(td).unwrap();
            let cas = TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap().roots;
            trust = trust.federate(trustwire::tls::TrustDomain::parse(td).unwrap(), cas);
        }
        TlsProfile::new(Some(id), trust).server().unwrap()
    }

    fn store(&self) -> CredentialStore {
        let d = self.dir.path();
        CredentialStore::new(
            Use::Server,
            Sources {
                identity: IdentitySource::Files { chain: d.join("server.pem"), key: d.join("server.key") },
                trust: vec![PemSource::Path(d.join("ca.pem"))],
                crls: vec![],
                ..Sources::default()
            },
            TlsProfile::new(None, TrustBundle::default()),
            StoreOptions {
                name: "bench".into(),
                poll_interval: Some(Duration::from_secs(1)),
                ..StoreOptions::default()
            },
        )
        .unwrap()
    }
}

async fn serve(tls: ServerTls) -> RunningServer {
    let mut server = Server::new(tls);
    trustwire::echo::register(&mut server);
    server.bind("127.0.0.1:0").await.unwrap()
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
                // Close without TIME_WAIT piling up on the loopback.
                let _ = socket2_linger_zero(tcp.get_ref());
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

fn socket2_linger_zero(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    #[allow(deprecated)]
    tcp.set_linger(Some(Duration::ZERO))
}

/// Calls per second from 4 pooled clients × 16 callers; returns (rate, failures).
async fn calls(addr: String, tls: ClientTls, secs: f64, rotate: Option<(&Pki, CredentialStore)>) -> (f64, u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = Client::new(addr.clone(), tls.clone(), ClientOptions::default());
        for _ in 0..16 {
            let (client, ok, failed, stop) = (client.clone(), ok.clone(), failed.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let payload = trustwire::echo::encode("rotation bench");
                while !stop.load(Ordering::Relaxed) {
                    match client.call("example.EchoService", "Echo", payload.clone(), CallOptions::default()).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    let start = Instant::now();
    let before = rotate.as_ref().map(|(_, s)| s.generation().number);
    match &rotate {
        Some((pki, _)) => {
            while start.elapsed().as_secs_f64() + 1.0 <= secs {
                tokio::time::sleep(Duration::from_secs(1)).await;
                pki.ca.issue(&server_request()).unwrap().write(pki.dir.path(), "server").unwrap();
            }
            tokio::time::sleep(Duration::from_secs_f64((secs - start.elapsed().as_secs_f64()).max(0.0))).await;
        }
        None => tokio::time::sleep(Duration::from_secs_f64(secs)).await,
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    // Rotations that went live (the last write may still be settling).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rotations = match (&rotate, before) {
        (Some((_, s)), Some(b)) => s.generation().number - b,
        _ => 0,
    };
    (ok.load(Ordering::Relaxed) as f64 / elapsed, failed.load(Ordering::Relaxed), rotations)
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let pki = Pki::new();
        let client_tls = pki.client.client().unwrap();
        let fixed = serve(pki.fixed()).await;
        let store = pki.store();
        let rotating = serve(store.server_tls().unwrap()).await;
        let federated = serve(pki.three_domains()).await;
        let (fixed_addr, store_addr) = (fixed.local_addr().to_string(), rotating.local_addr().to_string());
        let federated_addr = federated.local_addr().to_string();

        // Warm-up.
        handshakes(fixed_addr.clone(), client_tls.clone(), 8, 0.3).await;
        handshakes(store_addr.clone(), client_tls.clone(), 8, 0.3).await;
        handshakes(federated_addr.clone(), client_tls.clone(), 8, 0.3).await;

        let (mut hs_fixed, mut hs_store, mut hs_fixed3, mut hs_three) = (0.0, 0.0, 0.0, 0.0);
        for _ in 0..ROUNDS {
            hs_fixed += handshakes(fixed_addr.clone(), client_tls.clone(), 8, secs).await / ROUNDS as f64;
            hs_store += handshakes(store_addr.clone(), client_tls.clone(), 8, secs).await / ROUNDS as f64;
        }
        for _ in 0..ROUNDS {
            hs_fixed3 += handshakes(fixed_addr.clone(), client_tls.clone(), 8, secs).await / ROUNDS as f64;
            hs_three += handshakes(federated_addr.clone(), client_tls.clone(), 8, secs).await / ROUNDS as f64;
        }

        let (mut c_still, mut c_rot, mut failed, mut rotations) = (0.0, 0.0, 0, 0);
        for _ in 0..ROUNDS {
            let (r, f, _) = calls(store_addr.clone(), client_tls.clone(), secs.max(3.0), None).await;
            c_still += r / ROUNDS as f64;
            failed += f;
            let (r, f, n) = calls(store_addr.clone(), client_tls.clone(), secs.max(3.0), Some((&pki, store.clone()))).await;
            c_rot += r / ROUNDS as f64;
            failed += f;
            rotations += n;
        }

        let ratio_hs = hs_store / hs_fixed;
        let ratio_calls = c_rot / c_still;
        println!("trustwire rotation bench: {ROUNDS} alternating rounds of {secs}s per side; 2-worker runtime shared by client and server");
        println!();
        println!("{:<52} {:>8} {:>11} {:>11} {:>7} {:>9} {:>5}", "scenario", "unit", "baseline", "trustwire", "ratio", "target", "met?");
        println!("{}", "-".repeat(110));
        let row = |name: &str, unit: &str, base: f64, cand: f64, target: Option<f64>| {
            let ratio = cand / base;
            let (t, met) = match target {
                Some(t) => (format!(">={t}"), if ratio >= t { "yes" } else { "MISS" }),
                None => ("-".to_string(), "-"),
            };
            println!("{:<52} {:>8} {:>11.0} {:>11.0} {:>7.3} {:>9} {:>5}", name, unit, base, cand, ratio, t, met);
        };
        row("1. handshakes, store-backed vs fixed server (8 conc.)", "hs/s", hs_fixed, hs_store, Some(0.98));
        row("2. calls/s rotating every 1s vs not rotating", "calls/s", c_still, c_rot, None);
        row("3. handshakes, three trust domains vs one CA", "hs/s", hs_fixed3, hs_three, Some(0.97));
        println!("{}", "-".repeat(110));
        println!("rotations during scenario 2: {rotations}; failed calls in scenario 2: {failed} (target 0)");
        println!(
            "BENCH_JSON {{\"handshakes_fixed\":{hs_fixed:.1},\"handshakes_store\":{hs_store:.1},\"handshake_ratio\":{ratio_hs:.4},\"calls_still\":{c_still:.1},\"calls_rotating\":{c_rot:.1},\"calls_ratio\":{ratio_calls:.4},\"rotations\":{rotations},\"failed_calls\":{failed},\"handshakes_one_ca\":{hs_fixed3:.1},\"handshakes_three_domains\":{hs_three:.1},\"trust_domains_ratio\":{:.4}}}", hs_three / hs_fixed3
        );
    });
}
