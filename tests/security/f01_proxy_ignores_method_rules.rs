//! Finding 1: The proxy's baidu_std routes ignore [[policy.rules]].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use trustwire::proxy::{Endpoint, Protocol, Route, RouteTls, RunningProxy};
use trustwire::tls::{Policy, TlsProfile};
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta};

use crate::common::*;

pub const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
/// Guards against a hang only; nothing here is timed.
const GUARD: Duration = Duration::from_secs(20);

/// One frame as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `service/method`, or None for a frame without request meta.
    pub call: Option<String>,
    pub auth: Option<Bytes>,
    /// The first frame on its upstream connection (the one brpc authenticates).
    pub first_on_connection: bool,
}

/// A plaintext baidu_std upstream that records every frame it receives and answers each with
/// its payload. It serves one connection at a time, so once it has answered a call, everything
/// sent to it before on any connection has been recorded.
pub async fn brpc_upstream() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let rec = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let (mut buf, mut dec, mut first) = (BytesMut::new(), Decoder::default(), true);
            'conn: loop {
                while let Ok(Some(f)) = dec.decode(&mut buf) {
                    let call = f.meta.request.as_ref().map(|r| {
                        format!(
                            "{}/{}",
                            r.service_name.as_deref().unwrap_or(""),
                            r.method_name.as_deref().unwrap_or("")
                        )
                    });
                    rec.lock().unwrap().push(Seen {
                        call,
                        auth: f.meta.authentication_data.clone(),
                        first_on_connection: first,
                    });
                    first = false;
                    let reply = Frame {
                        meta: RpcMeta {
                            response: Some(Default::default()),
                            correlation_id: f.meta.correlation_id,
                            ..Default::default()
                        },
                        payload: f.payload.clone(),
                        attachment: Bytes::new(),
                    };
                    if s.write_all(&reply.to_bytes().unwrap()).await.is_err() {
                        break 'conn;
                    }
                }
                if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        }
    });
    (addr, seen)
}

/// A request frame for `service/method` with `auth` as its authentication_data.
pub fn request(correlation_id: i64, service: &str, method: &str, auth: Option<&[u8]>) -> Frame {
    Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some(service.into()),
                method_name: Some(method.into()),
                ..Default::default()
            }),
            correlation_id: Some(correlation_id),
            authentication_data: auth.map(Bytes::copy_from_slice),
            ..Default::default()
        },
        payload: Bytes::from(format!("payload {correlation_id}")),
        attachment: Bytes::new(),
    }
}

/// A server-side baidu_std route named `name` in front of `upstream`, with `profile`'s policy.
pub fn baidu_route(name: &str, profile: &TlsProfile, upstream: &str) -> Route {
    Route {
        protocol: Protocol::BaiduStd,
        token_key: Some(("k1".into(), KEY.to_vec())),
        ..Route::new(
            name,
            Endpoint::Tcp("127.0.0.1:0".into()),
            Endpoint::Tcp(upstream.into()),
            RouteTls::Server(profile.server().unwrap()),
        )
    }
}

pub fn addr_of(p: &RunningProxy) -> String {
    match p.local() {
        Endpoint::Tcp(a) => a.clone(),
        Endpoint::Unix(_) => unreachable!(),
    }
}

/// Connects to `addr` as `profile`, sends `frames` (pipelined) and reads one response for each.
pub async fn calls(addr: &str, profile: &TlsProfile, frames: &[Frame]) -> Vec<Frame> {
    let tls = profile.client().unwrap();
    let (mut s, _) = trustwire::transport::connect(&tls, addr, Duration::from_secs(5)).await.unwrap();
    let mut wire = BytesMut::new();
    for f in frames {
        f.encode(&mut wire).unwrap();
    }
    s.write_all(&wire).await.unwrap();
    let (mut buf, mut dec, mut out) = (BytesMut::new(), Decoder::default(), Vec::new());
    tokio::time::timeout(GUARD, async {
        while out.len() < frames.len() {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            if out.len() < frames.len() {
                assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed after {} responses", out.len());
            }
        }
    })
    .await
    .expect("responses within the guard time");
    out
}

/// The value of the metric line starting with `series` (0 when absent).
pub fn counter(series: &str) -> f64 {
    trustwire::telemetry::metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn error_of(f: &Frame) -> (i32, String) {
    let r = f.meta.response.clone().expect("a response");
    (r.error_code.unwrap_or(0), r.error_text.unwrap_or_default())
}

fn admin_rules_profile(pki: &Pki) -> TlsProfile {
    let mut profile = pki.server_profile();
    profile.policy = Policy::from_patterns(&["spiffe://example.org/ns/prod/*"])
        .unwrap()
        .with_rule(&["example.AdminService/*"], &["spiffe://example.org/ns/prod/admin-only"])
        .unwrap()
        .with_rule(&["example.EchoService/*"], &["spiffe://example.org/ns/prod/*"])
        .unwrap()
        // Everything else is open to prod, so the unqualified AdminService below is refused only
        // because the route checks the full name brpc would resolve it to, not by default-deny.
        .with_rule(&["*"], &["spiffe://example.org/ns/prod/*"])
        .unwrap();
    profile
}

fn caller(pki: &Pki, name: &str) -> TlsProfile {
    let cred = pki.issue(client_usage(name, &format!("spiffe://example.org/ns/prod/{name}")));
    TlsProfile::new(Some(identity(&cred)), pki.trust())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baidu_std_route_answers_calls_the_rules_refuse_itself_and_the_upstream_sees_none() {
    let pki = Pki::new();
    let (upstream, seen) = brpc_upstream().await;
    let proxy = trustwire::proxy::start(baidu_route("f01-rules", &admin_rules_profile(&pki), &upstream)).await.unwrap();
    let addr = addr_of(&proxy);

    // Admitted by `allow`, but the rule reserves AdminService for admin-only: qualified or not,
    // the call is answered by the route; the echo call after them reaches the upstream.
    let web = caller(&pki, "web");
    let answers = calls(
        &addr,
        &web,
        &[
            request(1, "example.AdminService", "DropAll", None),
            request(2, "AdminService", "DropAll", None),
            request(3, "example.EchoService", "Echo", None),
        ],
    )
    .await;
    let by_id = |id: i64| answers.iter().find(|f| f.meta.correlation_id == Some(id)).expect("an answer per call");
    for (id, service) in [(1, "example.AdminService"), (2, "AdminService")] {
        let (code, text) = error_of(by_id(id));
        assert_eq!(code, 1004, "ERPCAUTH for {service}: {text}");
        assert_eq!(
            text,
            format!("[{addr}][E1004]method_not_allowed: peer spiffe://example.org/ns/prod/web may not call {service}/DropAll")
        );
    }
    assert_eq!(error_of(by_id(3)), (0, String::new()));
    assert_eq!(&by_id(3).payload[..], b"payload 3");
    let calls_seen: Vec<_> = seen.lock().unwrap().iter().map(|s| s.call.clone()).collect();
    assert_eq!(calls_seen, [Some("example.EchoService/Echo".to_string())], "the upstream saw only the allowed call");
    assert_eq!(counter("trustwire_calls_refused_total{scope=\"f01-rules\",verdict=\"method_not_allowed\"}"), 2.0);

    // The identity the rule names gets through.
    let admin = caller(&pki, "admin-only");
    let answers = calls(&addr, &admin, &[request(4, "example.AdminService", "DropAll", None)]).await;
    assert_eq!(error_of(&answers[0]), (0, String::new()));
    assert_eq!(seen.lock().unwrap().last().unwrap().call.as_deref(), Some("example.AdminService/DropAll"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_route_whose_profile_has_method_rules_refuses_to_start() {
    let pki = Pki::new();
    let (upstream, _) = brpc_upstream().await;
    let route = Route::new(
        "f01-tcp",
        Endpoint::Tcp("127.0.0.1:0".into()),
        Endpoint::Tcp(upstream.clone()),
        RouteTls::Server(admin_rules_profile(&pki).server().unwrap()),
    );
    let err = trustwire::proxy::start(route).await.err().expect("a tcp route cannot enforce method rules");
    assert_eq!(err.kind_name(), "config", "{err}");
    assert!(err.to_string().contains("route f01-tcp: the profile has [[policy.rules]]"), "{err}");

    // The same from a proxy config file, as `trustwire proxy` reads it.
    let d = pki.dir.path();
    std::fs::write(
        d.join("rules.toml"),
        "[identity]\ncert = \"server.pem\"\nkey = \"server.key\"\n[trust]\nca = [\"ca.pem\"]\n\n\
         [[policy.rules]]\nmethods = [\"example.AdminService/*\"]\nallow = [\"spiffe://example.org/ns/prod/admin-only\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("proxy.toml"),
        format!(
            "[[route]]\nname = \"admin-in\"\nmode = \"server\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
             profile = \"rules.toml\"\n"
        ),
    )
    .unwrap();
    let file = trustwire::proxy::config::ProxyFile::load(&d.join("proxy.toml")).unwrap();
    let err = file.start().await.err().expect("refused");
    assert!(err.to_string().contains("route admin-in: the profile has [[policy.rules]]"), "{err}");
}
