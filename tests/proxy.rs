//! Proxy mode: plaintext upstreams reached through a server-side proxy, a trustwire server
//! reached through a client-side proxy, identity tokens injected into baidu_std frames, PROXY v2
//! headers, per-route allow-lists, a dead upstream, and many concurrent streams.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use trustwire::proxy::token::{self, TokenError};
use trustwire::proxy::{Endpoint, Protocol, Route, RouteTls, RunningProxy};
use trustwire::tls::{Policy, TlsProfile};
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A plaintext upstream that echoes every byte back until the client half-closes.
async fn echo_upstream() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A plaintext baidu_std upstream that records each request's authentication_data and answers
/// with the request payload.
async fn brpc_upstream() -> (String, Arc<Mutex<Vec<Option<Bytes>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<Option<Bytes>>>> = Arc::default();
    let rec = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut dec = Decoder::default();
                loop {
                    while let Ok(Some(f)) = dec.decode(&mut buf) {
                        rec.lock().unwrap().push(f.meta.authentication_data.clone());
                        let reply = Frame {
                            meta: RpcMeta {
                                response: Some(Default::default()),
                                correlation_id: f.meta.correlation_id,
                                ..Default::default()
                            },
                            payload: f.payload.clone(),
                            attachment: Bytes::new(),
                        };
                        s.write_all(&reply.to_bytes().unwrap()).await.unwrap();
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn server_route(pki: &Pki, upstream: &str, protocol: Protocol, allow: &[&str]) -> Route {
    let mut profile = pki.server_profile();
    profile.policy = Policy::from_patterns(allow).unwrap();
    Route {
        protocol,
        token_key: (protocol == Protocol::BaiduStd).then(|| ("k1".to_string(), KEY.to_vec())),
        connect_timeout: Duration::from_secs(2),
        ..Route::new(
            "in",
            Endpoint::Tcp("127.0.0.1:0".into()),
            Endpoint::parse(upstream),
            RouteTls::Server(profile.server().unwrap()),
        )
    }
}

/// Verifies a token the route "in" issued, with the default maximum age.
fn verify(token: &[u8], keys: &[(&str, &[u8])]) -> Result<token::TokenIdentity, TokenError> {
    token::verify(token, keys, "in", token::DEFAULT_MAX_AGE)
}

fn addr_of(p: &RunningProxy) -> String {
    match p.local() {
        Endpoint::Tcp(a) => a.clone(),
        Endpoint::Unix(_) => unreachable!(),
    }
}

fn digest(data: &[u8]) -> String {
    trustwire::tls::identity::sha256_hex(data)
}

/// Sends `data` through an mTLS connection to `addr`, half-closes, returns all it reads back.
async fn through(addr: &str, profile: &TlsProfile, data: Vec<u8>) -> Vec<u8> {
    let tls = profile.client().unwrap();
    let (stream, _) = trustwire::transport::connect(&tls, addr, Duration::from_secs(5)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_tcp_route_carries_streams_intact() {
    let pki = Pki::new();
    let proxy = trustwire::proxy::start(server_route(&pki, &echo_upstream().await, Protocol::Tcp, &[])).await.unwrap();
    let addr = addr_of(&proxy);
    // Four 16 MiB streams at once, then 500 concurrent smaller ones: every byte comes back.
    let big: Vec<_> = (0..4u64)
        .map(|i| {
            let (addr, profile) = (addr.clone(), pki.client_profile());
            tokio::spawn(async move {
                let data = pseudo_random(16 << 20, i + 1);
                let want = digest(&data);
                assert_eq!(digest(&through(&addr, &profile, data).await), want);
            })
        })
        .collect();
    for t in big {
        t.await.unwrap();
    }
    let small: Vec<_> = (0..500u64)
        .map(|i| {
            let (addr, profile) = (addr.clone(), pki.client_profile());
            tokio::spawn(async move {
                let data = pseudo_random(32 * 1024 + i as usize, i + 100);
                let want = digest(&data);
                assert_eq!(digest(&through(&addr, &profile, data).await), want);
            })
        })
        .collect();
    for t in small {
        t.await.unwrap();
    }
    proxy.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baidu_std_route_replaces_authentication_data_with_a_verifiable_token() {
    let pki = Pki::new();
    let (upstream, seen) = brpc_upstream().await;
    let proxy = trustwire::proxy::start(server_route(&pki, &upstream, Protocol::BaiduStd, &[])).await.unwrap();
    let addr = addr_of(&proxy);

    // A client that sends its own authentication_data (trying to claim another identity).
    let forged = Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some("example.EchoService".into()),
                method_name: Some("Echo".into()),
                ..Default::default()
            }),
            correlation_id: Some(7),
            authentication_data: Some(Bytes::from_static(b"spiffe://example.org/ns/admin")),
            ..Default::default()
        },
        payload: Bytes::from_static(b"\x0a\x02hi"),
        attachment: Bytes::new(),
    };
    let mut wire = forged.to_bytes().unwrap().to_vec();
    wire.extend_from_slice(&capture("echo_request.bin"));
    let back = through(&addr, &pki.client_profile(), wire).await;
    let mut buf = BytesMut::from(&back[..]);
    let mut dec = Decoder::default();
    let first = dec.decode(&mut buf).unwrap().unwrap();
    let second = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(first.meta.correlation_id, Some(7));
    assert_eq!(&first.payload[..], b"\x0a\x02hi");
    assert_eq!(second.meta.correlation_id, Some(4294967298));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for auth in &seen {
        let auth = auth.as_ref().expect("every request carries the token");
        assert!(auth.starts_with(b"tw2;kid=k1;aud=in;spiffe=spiffe://example.org/ns/test/client;fp="), "{auth:?}");
        let id = verify(auth, &[("k1", KEY)]).unwrap();
        assert_eq!(id.audience, "in");
        assert_eq!(id.spiffe_id.as_deref(), Some(CLIENT_ID));
        let want_fp = trustwire::tls::identity::PeerIdentity::from_der(&identity(&pki.client).chain[0]).unwrap();
        assert_eq!(id.fingerprint_sha256, want_fp.fingerprint_sha256);
    }
    // Byte level: the frame the upstream got is the client's frame with only the token changed.
    let mut expected = forged.clone();
    expected.meta.authentication_data = seen[0].clone();
    let mut got_first = BytesMut::from(&expected.to_bytes().unwrap()[..]);
    let reparsed = Decoder::default().decode(&mut got_first).unwrap().unwrap();
    assert_eq!(reparsed.meta.request, forged.meta.request);
    assert_eq!(reparsed.payload, forged.payload);
}

#[test]
fn identity_tokens_refuse_wrong_keys_formats_and_tampering() {
    let pki = Pki::new();
    let peer = trustwire::tls::identity::PeerIdentity::from_der(&identity(&pki.client).chain[0]).unwrap();
    let t = token::issue(&peer, "k1", KEY, "in");
    assert!(verify(t.as_bytes(), &[("k1", KEY)]).is_ok());
    let name = |r: Result<_, TokenError>| r.unwrap_err().name();
    assert_eq!(name(verify(t.as_bytes(), &[("k1", b"another secret, same key id....")])), "bad_mac");
    assert_eq!(name(verify(t.as_bytes(), &[("k2", KEY)])), "unknown_key");
    let tampered = t.replace("ns/test/client", "ns/test/admin1");
    assert_eq!(name(verify(tampered.as_bytes(), &[("k1", KEY)])), "bad_mac");
    let retargeted = t.replace(";aud=in;", ";aud=xx;");
    assert_eq!(name(verify(retargeted.as_bytes(), &[("k1", KEY)])), "bad_mac", "the audience is under the MAC");
    for bad in
        ["", "tw2", "tw2;kid=k1;mac=00", "tw2;kid=k1;aud=in;spiffe=;fp=;na=x;iat=1;mac=00", "\u{ff}\u{fe}", "twx;a"]
    {
        assert_eq!(name(verify(bad.as_bytes(), &[("k1", KEY)])), "bad_format", "{bad:?}");
    }
    // A field value cannot smuggle in another field.
    let mut evil = peer.clone();
    evil.spiffe_id = Some("x;na=99999999999".into());
    let t = token::issue(&evil, "k1", KEY, "in");
    assert_eq!(verify(t.as_bytes(), &[("k1", KEY)]).unwrap().spiffe_id.as_deref(), Some("x;na=99999999999"));
    let t = token::issue(&peer, "k1", KEY, "in;aud=other");
    assert_eq!(
        token::verify(t.as_bytes(), &[("k1", KEY)], "in;aud=other", token::DEFAULT_MAX_AGE).unwrap().audience,
        "in;aud=other"
    );
    assert_eq!(name(verify(t.as_bytes(), &[("k1", KEY)])), "wrong_audience");
    // An expired caller certificate.
    let mut old = peer.clone();
    old.not_after = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let t = token::issue(&old, "k1", KEY, "in");
    assert_eq!(name(verify(t.as_bytes(), &[("k1", KEY)])), "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_route_originates_mtls_to_a_trustwire_server() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let mut profile = pki.client_profile();
    profile.server_name = Some("localhost".into());
    let proxy = trustwire::proxy::start(Route::new(
        "out",
        Endpoint::Tcp("127.0.0.1:0".into()),
        Endpoint::Tcp(server.local_addr().to_string()),
        RouteTls::Client(profile.client().unwrap()),
    ))
    .await
    .unwrap();
    // A plaintext brpc client (the capture) talks to the local port.
    let mut s = tokio::net::TcpStream::connect(addr_of(&proxy)).await.unwrap();
    s.write_all(&capture("echo_request.bin")).await.unwrap();
    let want = capture("echo_response.bin");
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, want, "brpc's own response bytes, through the proxy");

    // A client-side route refuses to listen on a non-loopback address.
    let err = match trustwire::proxy::start(Route::new(
        "open",
        Endpoint::Tcp("0.0.0.0:0".into()),
        Endpoint::Tcp(server.local_addr().to_string()),
        RouteTls::Client(profile.client().unwrap()),
    ))
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("a plaintext listener on 0.0.0.0 was accepted"),
    };
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refuses_and_a_dead_upstream_closes_cleanly() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let proxy =
        trustwire::proxy::start(server_route(&pki, &upstream, Protocol::Tcp, &["spiffe://example.org/ns/other/*"]))
            .await
            .unwrap();
    let tls = pki.client_profile().client().unwrap();
    let (stream, _) = trustwire::transport::connect(&tls, &addr_of(&proxy), Duration::from_secs(5)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = w.write_all(b"hello").await;
    let mut buf = Vec::new();
    let err = r.read_to_end(&mut buf).await.expect_err("refused by the proxy's allow-list");
    assert!(err.to_string().contains("AccessDenied") || err.to_string().contains("access"), "{err}");

    // Upstream down: the client sees the connection close (EOF), promptly, not a hang.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    // A route name of its own, so the count below is this stream's and no other test's.
    let route = Route { name: "tcp-dead".into(), ..server_route(&pki, &dead, Protocol::Tcp, &[]) };
    let proxy = trustwire::proxy::start(route).await.unwrap();
    let (mut stream, _) = trustwire::transport::connect(&tls, &addr_of(&proxy), Duration::from_secs(5)).await.unwrap();
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back)).await.expect("no hang");
    assert!(read.is_ok(), "a clean close (close_notify), not a reset: {read:?}");
    assert!(back.is_empty());
    let counted = "trustwire_proxy_streams_total{route=\"tcp-dead\",outcome=\"upstream_error\"} 1";
    until_counted(counted).await;
}

/// Waits until the metrics hold `line`: a route counts a stream once it has finished with it,
/// just after the last bytes left, so a client can see the end before the count moves.
async fn until_counted(line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !trustwire::telemetry::metrics_text().contains(line) {
        assert!(std::time::Instant::now() < deadline, "{}", trustwire::telemetry::metrics_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `frames` through a baidu_std route as the test client and reads one response for each.
async fn brpc_calls(addr: &str, pki: &Pki, frames: Vec<Frame>) -> Vec<Frame> {
    let tls = pki.client_profile().client().unwrap();
    let (stream, _) = trustwire::transport::connect(&tls, addr, Duration::from_secs(5)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let n = frames.len();
    // Written while the answers are read, so large frames cannot deadlock the two directions.
    let writer = tokio::spawn(async move {
        for f in frames {
            w.write_all(&f.to_bytes().unwrap()).await.unwrap();
        }
        // TLS may still hold the last records; they leave on a flush.
        w.flush().await.unwrap();
        w
    });
    let (mut buf, mut dec, mut out) = (BytesMut::new(), Decoder::default(), Vec::new());
    tokio::time::timeout(Duration::from_secs(30), async {
        while out.len() < n {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            if out.len() < n {
                assert!(r.read_buf(&mut buf).await.unwrap() > 0, "closed after {} responses", out.len());
            }
        }
    })
    .await
    .expect("no hang");
    drop(writer.await.unwrap());
    out
}

fn echo_request(id: i64, payload: Vec<u8>) -> Frame {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some("example.EchoService".into()),
                method_name: Some("Echo".into()),
                ..Default::default()
            }),
            correlation_id: Some(id),
            ..Default::default()
        },
        payload: payload.into(),
        attachment: Bytes::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baidu_std_route_carries_large_and_small_frames_intact_both_ways() {
    let pki = Pki::new();
    let (upstream, seen) = brpc_upstream().await;
    let proxy = trustwire::proxy::start(server_route(&pki, &upstream, Protocol::BaiduStd, &[])).await.unwrap();
    // 8 MiB, 1 byte, 100 KiB and 0 bytes, pipelined: the large bodies go through without a copy,
    // the small ones are gathered; every answer comes back whole and in order.
    let sizes = [8 << 20, 1, 100 << 10, 0, 3 << 20];
    let frames: Vec<_> =
        sizes.iter().enumerate().map(|(i, n)| echo_request(i as i64, pseudo_random(*n, i as u64))).collect();
    let answers = brpc_calls(&addr_of(&proxy), &pki, frames.clone()).await;
    for (sent, got) in frames.iter().zip(&answers) {
        assert_eq!(got.meta.correlation_id, sent.meta.correlation_id);
        assert_eq!(digest(&got.payload), digest(&sent.payload));
    }
    assert_eq!(seen.lock().unwrap().len(), sizes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baidu_std_route_answers_efailedsocket_when_its_upstream_is_down() {
    let pki = Pki::new();
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let route = Route { name: "brpc-dead".into(), ..server_route(&pki, &dead, Protocol::BaiduStd, &[]) };
    let proxy = trustwire::proxy::start(route).await.unwrap();
    let addr = addr_of(&proxy);
    let answers = brpc_calls(&addr, &pki, vec![echo_request(9, b"hi".to_vec())]).await;
    let response = answers[0].meta.response.clone().unwrap();
    assert_eq!(answers[0].meta.correlation_id, Some(9));
    assert_eq!(response.error_code, Some(1009), "EFAILEDSOCKET: {response:?}");
    let text = response.error_text.unwrap();
    assert!(text.starts_with(&format!("[{addr}][E1009]")), "{text}");
    assert!(text.contains(&format!("route brpc-dead: upstream {dead} unreachable")), "{text}");
    // The stream is counted once the route has finished with it, just after the answer left.
    let counted = "trustwire_proxy_streams_total{route=\"brpc-dead\",outcome=\"upstream_error\"} 1";
    until_counted(counted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_header_names_the_peer() {
    let pki = Pki::new();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap().to_string();
    let got = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        all
    });
    let mut route = server_route(&pki, &upstream, Protocol::Tcp, &[]);
    route.proxy_protocol = true;
    let proxy = trustwire::proxy::start(route).await.unwrap();
    through(&addr_of(&proxy), &pki.client_profile(), b"payload".to_vec()).await;
    let all = got.await.unwrap();
    assert_eq!(&all[..12], b"\r\n\r\n\0\r\nQUIT\n", "PROXY v2 signature");
    assert_eq!(all[12], 0x21);
    assert_eq!(all[13], 0x11, "TCP over IPv4");
    let len = u16::from_be_bytes([all[14], all[15]]) as usize;
    let (header, rest) = all.split_at(16 + len);
    assert_eq!(rest, b"payload");
    // Walk the TLVs after the 12 address bytes.
    let mut tlvs = std::collections::HashMap::new();
    let mut at = 16 + 12;
    while at < header.len() {
        let (t, l) = (header[at], u16::from_be_bytes([header[at + 1], header[at + 2]]) as usize);
        tlvs.insert(t, header[at + 3..at + 3 + l].to_vec());
        at += 3 + l;
    }
    assert_eq!(tlvs[&trustwire::proxy::PP2_TYPE_SPIFFE_ID], CLIENT_ID.as_bytes());
    assert_eq!(tlvs[&0x20][0] & 0x07, 0x07, "PP2_TYPE_SSL: client certificate verified");
}

/// Peers we did not write reach a plaintext upstream through the server-side proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_python_clients_through_the_server_side_proxy() {
    use common::peers::{tool_available, Proc};
    use std::process::Command;
    let pki = Pki::new();
    let proxy = trustwire::proxy::start(server_route(&pki, &echo_upstream().await, Protocol::Tcp, &[])).await.unwrap();
    let port = addr_of(&proxy).rsplit(':').next().unwrap().to_string();
    let d = pki.dir.path();

    if tool_available(Command::new("openssl").arg("version"), "the `openssl` binary (proxy interop)") {
        let mut sc = Proc::spawn(
            Command::new("openssl")
                .current_dir(d)
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-CAfile", "ca.pem"])
                .args(["-cert", "client.pem", "-key", "client.key", "-verify_return_error"])
                .args(["-brief", "-ign_eof", "-nocommands"]),
        );
        sc.write(b"hello from openssl\n");
        sc.wait_for("the echo through the proxy", |out, _| {
            out.windows(18).any(|w| w == b"hello from openssl").then_some(())
        });
    }

    if tool_available(Command::new("python3").args(["-c", "import ssl"]), "`python3` (proxy interop)") {
        let script = r#"
import socket, ssl, sys
port, d = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=d + "/ca.pem")
ctx.load_cert_chain(d + "/client.pem", d + "/client.key")
with socket.create_connection(("127.0.0.1", port)) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"hello from python")
        got = b""
        while len(got) < 17:
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
        print(got.decode(), s.version())
"#;
        let out = tokio::task::block_in_place(|| {
            Command::new("python3").args(["-c", script, &port, &d.display().to_string()]).output().unwrap()
        });
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(text.trim(), "hello from python TLSv1.3");
    }
}

/// Go's crypto/tls as the client of a server-side baidu_std route: the brpc echo capture goes
/// through, and the upstream receives the identity token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_through_a_baidu_std_route() {
    use common::peers::{go_build, Proc, WAIT};
    let Some(bin) = tokio::task::block_in_place(|| go_build("tlspeer", false, "Go crypto/tls through the proxy"))
    else {
        return;
    };
    let pki = Pki::new();
    let (upstream, seen) = brpc_upstream().await;
    let proxy = trustwire::proxy::start(server_route(&pki, &upstream, Protocol::BaiduStd, &[CLIENT_ID])).await.unwrap();
    let addr = addr_of(&proxy);
    let (status, out, output) = tokio::task::block_in_place(|| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.current_dir(pki.dir.path()).arg("client");
        cmd.args([
            "-addr",
            &addr,
            "-ca",
            "ca.pem",
            "-servername",
            "localhost",
            "-cert",
            "client.pem",
            "-key",
            "client.key",
        ]);
        cmd.arg("-send").arg(captures().join("echo_request.bin"));
        let mut p = Proc::spawn(&mut cmd);
        drop(p.stdin.take());
        let status = p.wait_exit_within(WAIT);
        (status, p.stdout(), p.output())
    });
    assert!(status.success(), "{output}");
    let frame = Decoder::default().decode(&mut BytesMut::from(&out[..])).unwrap().expect("a response frame");
    assert_eq!(frame.meta.correlation_id, Some(4294967298));
    let auth = seen.lock().unwrap()[0].clone().expect("token");
    assert_eq!(verify(&auth, &[("k1", KEY)]).unwrap().spiffe_id.as_deref(), Some(CLIENT_ID));
}

/// The application's call hook runs on a baidu_std route exactly as on a server: it sees the
/// caller's verified identity and the call, and a call it denies is answered by the route (the
/// upstream sees nothing); a tcp route refuses to start with a call hook it could not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baidu_std_route_runs_the_call_hook_and_a_tcp_route_refuses_one() {
    use trustwire::authz::{Call, CallDecision};
    let pki = Pki::new();
    let (upstream, seen) = brpc_upstream().await;
    let mut route = server_route(&pki, &upstream, Protocol::BaiduStd, &[]);
    let mut profile = pki.server_profile();
    profile.policy.hooks.call = Some(Arc::new(|call: &Call<'_>| match call.metadata.log_id {
        Some(666) => CallDecision::deny(format!("{} may not send log id 666", call.peer.display_name())),
        _ => CallDecision::Allow,
    }));
    route.tls = RouteTls::Server(profile.server().unwrap());
    let proxy = trustwire::proxy::start(route).await.unwrap();
    let mut denied = echo_request(1, b"x".to_vec());
    denied.meta.request.as_mut().unwrap().log_id = Some(666);
    let answers = brpc_calls(&addr_of(&proxy), &pki, vec![denied, echo_request(2, b"y".to_vec())]).await;
    let by_id = |id| answers.iter().find(|f| f.meta.correlation_id == Some(id)).unwrap().meta.response.clone().unwrap();
    assert_eq!(by_id(1).error_code, Some(1004));
    assert!(by_id(1).error_text.unwrap().contains("method_not_allowed: spiffe://example.org/ns/test/client may not"));
    assert_eq!(by_id(2).error_code.unwrap_or(0), 0);
    assert_eq!(seen.lock().unwrap().len(), 1, "only the allowed call reached the upstream");

    let mut tcp = server_route(&pki, &upstream, Protocol::Tcp, &[]);
    tcp.tls = RouteTls::Server(profile.server().unwrap());
    let err = trustwire::proxy::start(tcp).await.err().expect("a tcp route with a call hook does not start");
    assert!(err.to_string().contains("route in: a call hook is set"), "{err}");
}
