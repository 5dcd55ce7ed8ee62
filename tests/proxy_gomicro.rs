//! go-micro through trustwire proxies: a go-micro client calls a client-side route on loopback,
//! which speaks mTLS to a server-side route, which forwards to a go-micro service. Neither Go
//! program knows about TLS. A client-side route holding an identity outside the server route's
//! allow-list gets nothing through.
//!
//! tests/go/gomicro is built with Go modules (go-micro.dev/v4 from the Go module proxy) into the
//! target directory.

mod common;

use std::process::Command;
use std::sync::OnceLock;

use common::peers::*;
use common::*;
use trustwire::proxy::{Endpoint, Route, RouteTls, RunningProxy};
use trustwire::tls::{Policy, TlsProfile};

fn gomicro() -> Option<std::path::PathBuf> {
    static BUILT: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| go_build("gomicro", true, "go-micro through the proxy")).clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tcp(p: &RunningProxy) -> String {
    match p.local() {
        Endpoint::Tcp(a) => a.clone(),
        Endpoint::Unix(_) => unreachable!(),
    }
}

async fn client_route(upstream: &str, profile: &TlsProfile) -> RunningProxy {
    let mut profile = profile.clone();
    profile.server_name = Some("localhost".into());
    trustwire::proxy::start(Route::new(
        "gm-out",
        Endpoint::Tcp("127.0.0.1:0".into()),
        Endpoint::Tcp(upstream.to_string()),
        RouteTls::Client(profile.client().unwrap()),
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_micro_service_and_client_talk_through_both_proxies() {
    let Some(bin) = tokio::task::block_in_place(gomicro) else { return };
    let pki = Pki::new();
    let service_addr = format!("127.0.0.1:{}", free_port());
    let mut service = Proc::spawn(Command::new(&bin).args(["server", &service_addr]));
    service.wait_for("the go-micro service to listen", |out, err| {
        (err.contains("Listening on") || String::from_utf8_lossy(out).contains("Listening on")).then_some(())
    });

    let mut server_profile = pki.server_profile();
    server_profile.policy = Policy::from_patterns(&[CLIENT_ID]).unwrap();
    let inbound = trustwire::proxy::start(Route::new(
        "gm-in",
        Endpoint::Tcp("127.0.0.1:0".into()),
        Endpoint::Tcp(service_addr.clone()),
        RouteTls::Server(server_profile.server().unwrap()),
    ))
    .await
    .unwrap();
    let outbound = client_route(&tcp(&inbound), &pki.client_profile()).await;

    let call = |addr: String, name: &'static str| {
        let bin = bin.clone();
        tokio::task::block_in_place(move || {
            let out = Command::new(&bin).args(["client", &addr, name]).output().unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
    };
    let (code, text) = call(tcp(&outbound), "trustwire");
    assert_eq!((code, text.as_str()), (Some(0), "hello trustwire"));

    // A caller whose identity the server route does not allow gets no answer.
    let outsider = pki.issue(client_usage("outsider", "spiffe://example.org/ns/test/outsider"));
    let outsider_profile = TlsProfile::new(Some(identity(&outsider)), pki.trust());
    let refused = client_route(&tcp(&inbound), &outsider_profile).await;
    let (code, text) = call(tcp(&refused), "intruder");
    assert_eq!(code, Some(3), "{text}");
    assert!(text.starts_with("error"), "{text}");
    assert!(!text.contains("hello"), "{text}");
}
