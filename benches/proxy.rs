//! Proxy pair vs direct plaintext, in the same run: a plaintext client talks to a client-side
//! route (loopback), which speaks mTLS to a server-side route, which forwards plaintext to an
//! echo upstream. Baseline: the same client straight to the upstream.
//!
//! 1. 1 MiB-stream throughput: 4 streams at once, each writing and reading back 16 MiB;
//! 2. small-message round trips: 16 connections, each sending 64 bytes and waiting for them.
//!
//! Rounds alternate (B, T, B, T, …) so background load falls on both. Target for (1): ≥ 0.7×.
//! A third side, two plaintext TCP relays in a row, shows the ceiling for any proxy pair when
//! client, relays and upstream share one host: each byte crosses three sockets each way
//! instead of one.
//! `BENCH_SECONDS` sets the round-trip measurement time per side and round (default 2).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trustwire::pki::{DevCa, IssueRequest, Usage};
use trustwire::proxy::{Endpoint, Route, RouteTls};
use trustwire::tls::{Identity, TlsProfile, TrustBundle};

const ROUNDS: usize = 3;

async fn echo_upstream() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A plaintext TCP relay to `to`, copying with the proxy's buffer sizes. Two of them in a row
/// carry every byte over the same number of sockets as the proxy pair, without TLS: the ceiling
/// for any proxy pair on one host.
async fn plain_relay(to: String) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut a, _)) = l.accept().await else { return };
            let to = to.clone();
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                let Ok(mut b) = TcpStream::connect(&to).await else { return };
                let _ = b.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 * 1024, 64 * 1024).await;
            });
        }
    });
    addr
}

fn profile(ca: &DevCa, req: IssueRequest) -> TlsProfile {
    let c = ca.issue(&req).unwrap();
    let id = Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap();
    TlsProfile::new(Some(id), TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap())
}

/// Four concurrent 16 MiB echo streams; MiB/s of payload carried each way.
async fn throughput(addr: &str) -> f64 {
    const SIZE: usize = 16 << 20;
    let start = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.to_string();
            tokio::spawn(async move {
                let s = TcpStream::connect(&addr).await.unwrap();
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    let chunk = vec![0x5au8; 1 << 20];
                    for _ in 0..SIZE / chunk.len() {
                        w.write_all(&chunk).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0;
                loop {
                    let n = r.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                writer.await.unwrap();
                assert_eq!(got, SIZE, "bytes lost");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (4 * SIZE) as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// Round trips per second: 16 connections, 64-byte messages, one in flight each.
async fn round_trips(addr: &str, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (addr, stop, count) = (addr.to_string(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let mut s = TcpStream::connect(&addr).await.unwrap();
                let _ = s.set_nodelay(true);
                let msg = [7u8; 64];
                let mut back = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&msg).await.unwrap();
                    s.read_exact(&mut back).await.unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    n
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let ca = DevCa::new("example.org").unwrap();
        let server = profile(
            &ca,
            IssueRequest::new("proxy-in").spiffe_id("spiffe://example.org/bench/in").dns("localhost").usage(Usage::Server),
        );
        let mut client = profile(&ca, IssueRequest::new("proxy-out").spiffe_id("spiffe://example.org/bench/out").usage(Usage::Client));
        client.server_name = Some("localhost".into());
        let upstream = echo_upstream().await;
        let inbound = trustwire::proxy::start(Route::new("bench-in", Endpoint::Tcp("127.0.0.1:0".into()), Endpoint::Tcp(upstream.clone()), RouteTls::Server(server.server().unwrap())))
        .await
        .unwrap();
        let Endpoint::Tcp(in_addr) = inbound.local().clone() else { unreachable!() };
        let outbound = trustwire::proxy::start(Route::new("bench-out", Endpoint::Tcp("127.0.0.1:0".into()), Endpoint::Tcp(in_addr), RouteTls::Client(client.client().unwrap())))
        .await
        .unwrap();
        let Endpoint::Tcp(pair) = outbound.local().clone() else { unreachable!() };

        let relay = plain_relay(plain_relay(upstream.clone()).await).await;

        throughput(&upstream).await;
        throughput(&pair).await;
        let (mut t_direct, mut t_pair, mut r_direct, mut r_pair) = (0.0, 0.0, 0.0, 0.0);
        let (mut t_relay, mut r_relay) = (0.0, 0.0);
        for _ in 0..ROUNDS {
            t_direct += throughput(&upstream).await / ROUNDS as f64;
            t_pair += throughput(&pair).await / ROUNDS as f64;
            t_relay += throughput(&relay).await / ROUNDS as f64;
            r_direct += round_trips(&upstream, secs).await / ROUNDS as f64;
            r_pair += round_trips(&pair, secs).await / ROUNDS as f64;
            r_relay += round_trips(&relay, secs).await / ROUNDS as f64;
        }
        println!("trustwire proxy bench: plaintext client -> client-side route -> mTLS -> server-side route -> echo upstream,");
        println!("vs the same client straight to the upstream; {ROUNDS} alternating rounds; one 2-worker runtime for everything");
        println!();
        println!("{:<48} {:>8} {:>10} {:>10} {:>7} {:>8} {:>5}", "scenario", "unit", "direct", "proxied", "ratio", "target", "met?");
        println!("{}", "-".repeat(102));
        let tr = t_pair / t_direct;
        println!(
            "{:<48} {:>8} {:>10.0} {:>10.0} {:>7.3} {:>8} {:>5}",
            "1. 4 x 16 MiB echo streams", "MiB/s", t_direct, t_pair, tr, ">=0.7", if tr >= 0.7 { "yes" } else { "MISS" }
        );
        let rr = r_pair / r_direct;
        println!("{:<48} {:>8} {:>10.0} {:>10.0} {:>7.3} {:>8} {:>5}", "2. 64-byte round trips, 16 connections", "rt/s", r_direct, r_pair, rr, "-", "-");
        println!("{}", "-".repeat(102));
        println!(
            "Ceiling on one host: two plaintext relays in a row carry each byte over three sockets each way, like the pair:"
        );
        println!(
            "  relay pair without TLS: {t_relay:.0} MiB/s ({:.3} of direct), {r_relay:.0} rt/s ({:.3}); proxy pair / relay pair: {:.3} and {:.3}",
            t_relay / t_direct,
            r_relay / r_direct,
            t_pair / t_relay,
            r_pair / r_relay
        );
        println!(
            "BENCH_JSON {{\"throughput_direct_mib_s\":{t_direct:.1},\"throughput_proxied_mib_s\":{t_pair:.1},\"throughput_ratio\":{tr:.4},\"round_trips_direct\":{r_direct:.1},\"round_trips_proxied\":{r_pair:.1},\"round_trip_ratio\":{rr:.4},\"throughput_relay_pair_mib_s\":{t_relay:.1},\"round_trips_relay_pair\":{r_relay:.1}}}"
        );
    });
}
