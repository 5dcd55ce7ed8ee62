//! Finding 18: a client-side proxy route's mTLS streams outlive trust changes.
//!
//! The RPC client, the server and the proxy's server-side routes register every verified
//! connection for trust rechecks and certificate expiry; the proxy's client-side route did not.
//! A stream it opened to a server stayed open after the route's trust material stopped
//! accepting that server (or after a certificate expired). The route now registers its streams
//! and closes one as soon as its close signal fires.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::DevCa;
use trustwire::proxy::{Endpoint, Route, RouteTls};
use trustwire::tls::TlsProfile;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_side_route_closes_its_stream_when_trust_refuses_the_server() {
    let pki = Pki::new();
    // The route's client certificate comes from `ours`, so its trust can drop the server's CA
    // (`pki.ca`) and still pass the pre-flight check.
    let ours = DevCa::new(TD).unwrap();
    let cred = ours.issue(&client_usage("route", CLIENT_ID)).unwrap();
    let both = format!("{}{}", pki.ca.cert_pem(), ours.cert_pem());
    let mut template = TlsProfile::new(None, pki.trust());
    template.server_name = Some("localhost".into());
    let store = CredentialStore::new(
        Use::Client,
        Sources {
            identity: IdentitySource::Pem { chain: cred.cert_pem.clone().into(), key: cred.key_pem.clone().into() },
            trust: vec![PemSource::Pem(both.clone().into_bytes())],
            crls: vec![],
            ..Sources::default()
        },
        template,
        StoreOptions { name: "f18".into(), watch: false, poll_interval: None, ..StoreOptions::default() },
    )
    .unwrap();
    // The server must accept the route's certificate.
    let mut server_profile = pki.server_profile();
    server_profile.trust = trustwire::tls::TrustBundle::from_pem(both.as_bytes()).unwrap();
    let server = echo_server(&server_profile).await;
    let proxy = trustwire::proxy::start(Route::new(
        "out",
        Endpoint::Tcp("127.0.0.1:0".into()),
        Endpoint::Tcp(server.local_addr().to_string()),
        RouteTls::Client(store.client_tls().unwrap()),
    ))
    .await
    .unwrap();
    let Endpoint::Tcp(local) = proxy.local().clone() else { unreachable!() };

    let mut s = tokio::net::TcpStream::connect(&local).await.unwrap();
    s.write_all(&capture("echo_request.bin")).await.unwrap();
    let want = capture("echo_response.bin");
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, want);

    // The route stops trusting the server's CA: the open stream must end.
    store.set_trust_pem(ours.cert_pem().as_bytes()).unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the stream to a server the route no longer trusts stayed open");
    proxy.shutdown(Duration::from_secs(1)).await;
}
