//! Proxy pair vs direct plaintext, in the same run: a plaintext client talks to a client-side
//! route (loopback), which speaks mTLS to a server-side route, which forwards plaintext to an
//! echo upstream. Baseline: the same client straight to the upstream.
//!
//! 1. 1 MiB-stream throughput: 4 streams at once, each writing and reading back 16 MiB;
//! 2. small-message round trips: 16 connections, each sending 64 bytes and waiting for them.
//! 3. and 4. what a `baidu_std` server-side route costs over a `tcp` one in front of the same
//!    brpc-style upstream (mTLS clients straight to the route): 1 MiB request frames pipelined on
//!    4 connections, and 64-byte calls on 16 connections with one in flight each.
//!
//! Rounds alternate (B, T, B, T, …) so background load falls on both. Target for (1): ≥ 0.7×.
//! A third side, two plaintext TCP relays in a row, shows the ceiling for any proxy pair when
//! client, relays and upstream share one host: each byte crosses three sockets each way
//! instead of one.
//! `BENCH_SECONDS` sets the round-trip measurement time per side and round (default 2).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trustwire::pki::{DevCa, IssueRequest, Usage};
use trustwire::proxy::{Endpoint, Protocol, Route, RouteTls};
use trustwire::tls::{ClientTls, Identity, TlsProfile, TrustBundle};
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta};

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

/// A plaintext baidu_std upstream that answers every request with its payload.
async fn brpc_echo_upstream() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(1 << 20);
                let mut out = BytesMut::new();
                let mut dec = Decoder::default();
                loop {
                    while let Ok(Some(f)) = dec.decode(&mut buf) {
                        let reply = Frame {
                            meta: RpcMeta {
                                response: Some(Default::default()),
                                correlation_id: f.meta.correlation_id,
                                ..Default::default()
                            },
                            payload: f.payload,
                            attachment: Bytes::new(),
                        };
                        reply.encode(&mut out).unwrap();
                    }
                    if !out.is_empty() && s.write_all(&out.split()).await.is_err() {
                        return;
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn request(id: i64, payload: Bytes) -> Bytes {
    let f = Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some("example.EchoService".into()),
                method_name: Some("Echo".into()),
                ..Default::default()
            }),
            correlation_id: Some(id),
            ..Default::default()
        },
        payload,
        attachment: Bytes::new(),
    };
    f.to_bytes().unwrap()
}

/// Reads `n` response frames into `buf`; the payload bytes they carried.
async fn read_responses(r: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut, n: usize) -> usize {
    let (mut dec, mut got, mut bytes) = (Decoder::default(), 0, 0);
    while got < n {
        while let Some(f) = dec.decode(buf).unwrap() {
            assert_eq!(f.meta.response.and_then(|r| r.error_code).unwrap_or(0), 0, "call failed");
            bytes += f.payload.len();
            got += 1;
        }
        if got < n {
            assert!(r.read_buf(buf).await.unwrap() > 0, "connection closed early");
        }
    }
    bytes
}

/// 1 MiB request frames, 32 pipelined on each of 4 mTLS connections; MiB/s echoed.
async fn frame_throughput(addr: &str, tls: &ClientTls) -> f64 {
    const FRAMES: usize = 32;
    let start = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (addr, tls) = (addr.to_string(), tls.clone());
            tokio::spawn(async move {
                let (s, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
                let (mut r, mut w) = tokio::io::split(s);
                let writer = tokio::spawn(async move {
                    let payload = Bytes::from(vec![0x5au8; 1 << 20]);
                    for i in 0..FRAMES {
                        w.write_all(&request(i as i64, payload.clone())).await.unwrap();
                    }
                    w
                });
                let bytes = read_responses(&mut r, &mut BytesMut::with_capacity(1 << 20), FRAMES).await;
                drop(writer.await.unwrap());
                assert_eq!(bytes, FRAMES << 20, "bytes lost");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (4 * FRAMES) as f64 / start.elapsed().as_secs_f64()
}

/// 64-byte calls, one in flight on each of 16 mTLS connections; calls/s.
async fn frame_round_trips(addr: &str, tls: &ClientTls, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (addr, tls, stop, count) = (addr.to_string(), tls.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let (mut s, _) = trustwire::transport::connect(&tls, &addr, Duration::from_secs(5)).await.unwrap();
                let msg = request(1, Bytes::from_static(&[7u8; 64]));
                let mut buf = BytesMut::with_capacity(4096);
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&msg).await.unwrap();
                    read_responses(&mut s, &mut buf, 1).await;
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

        let brpc = brpc_echo_upstream().await;
        let listen = || Endpoint::Tcp("127.0.0.1:0".into());
        let tcp_route = trustwire::proxy::start(Route::new("bench-tcp", listen(), Endpoint::Tcp(brpc.clone()), RouteTls::Server(server.server().unwrap())))
        .await
        .unwrap();
        let brpc_route = trustwire::proxy::start(Route {
            protocol: Protocol::BaiduStd,
            token_key: Some(("k1".into(), b"0123456789abcdef0123456789abcdef".to_vec())),
            ..Route::new("bench-brpc", listen(), Endpoint::Tcp(brpc.clone()), RouteTls::Server(server.server().unwrap()))
        })
        .await
        .unwrap();
        let Endpoint::Tcp(tcp_addr) = tcp_route.local().clone() else { unreachable!() };
        let Endpoint::Tcp(brpc_addr) = brpc_route.local().clone() else { unreachable!() };
        let client_tls = client.client().unwrap();

        throughput(&upstream).await;
        throughput(&pair).await;
        let (mut t_direct, mut t_pair, mut r_direct, mut r_pair) = (0.0, 0.0, 0.0, 0.0);
        let (mut t_relay, mut r_relay) = (0.0, 0.0);
        let (mut f_tcp, mut f_brpc, mut c_tcp, mut c_brpc) = (0.0, 0.0, 0.0, 0.0);
        frame_throughput(&tcp_addr, &client_tls).await;
        frame_throughput(&brpc_addr, &client_tls).await;
        for _ in 0..ROUNDS {
            t_direct += throughput(&upstream).await / ROUNDS as f64;
            t_pair += throughput(&pair).await / ROUNDS as f64;
            t_relay += throughput(&relay).await / ROUNDS as f64;
            r_direct += round_trips(&upstream, secs).await / ROUNDS as f64;
            r_pair += round_trips(&pair, secs).await / ROUNDS as f64;
            r_relay += round_trips(&relay, secs).await / ROUNDS as f64;
            f_tcp += frame_throughput(&tcp_addr, &client_tls).await / ROUNDS as f64;
            f_brpc += frame_throughput(&brpc_addr, &client_tls).await / ROUNDS as f64;
            c_tcp += frame_round_trips(&tcp_addr, &client_tls, secs).await / ROUNDS as f64;
            c_brpc += frame_round_trips(&brpc_addr, &client_tls, secs).await / ROUNDS as f64;
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
        println!("{:<48} {:>8} {:>10} {:>10} {:>7}", "baidu_std route vs tcp route, same upstream", "unit", "tcp", "baidu_std", "ratio");
        let fr = f_brpc / f_tcp;
        println!("{:<48} {:>8} {:>10.0} {:>10.0} {:>7.3}", "3. 1 MiB frames, 32 pipelined x 4 connections", "MiB/s", f_tcp, f_brpc, fr);
        let cr = c_brpc / c_tcp;
        println!("{:<48} {:>8} {:>10.0} {:>10.0} {:>7.3}", "4. 64-byte calls, 16 connections", "calls/s", c_tcp, c_brpc, cr);
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
            "BENCH_JSON {{\"throughput_direct_mib_s\":{t_direct:.1},\"throughput_proxied_mib_s\":{t_pair:.1},\"throughput_ratio\":{tr:.4},\"round_trips_direct\":{r_direct:.1},\"round_trips_proxied\":{r_pair:.1},\"round_trip_ratio\":{rr:.4},\"throughput_relay_pair_mib_s\":{t_relay:.1},\"round_trips_relay_pair\":{r_relay:.1},\"frames_tcp_route_mib_s\":{f_tcp:.1},\"frames_baidu_std_route_mib_s\":{f_brpc:.1},\"frames_ratio\":{fr:.4},\"calls_tcp_route\":{c_tcp:.1},\"calls_baidu_std_route\":{c_brpc:.1},\"calls_ratio\":{cr:.4}}}"
        );
    });
}
