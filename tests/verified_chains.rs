//! A peer that reconnects with a chain we verified before skips path building, and nothing
//! else: it still proves it holds the key, and a remembered chain is not used past what the
//! trust material in force allows.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustwire::rpc::{RunningServer, Server};
use trustwire::tls::TlsProfile;

use common::*;

type Refusals = Arc<Mutex<Vec<Option<&'static str>>>>;

/// An echo server that records the verdict of every handshake it refuses.
async fn recording_server(profile: &TlsProfile) -> (RunningServer, Refusals) {
    let refusals: Refusals = Arc::default();
    let mut server = Server::new(profile.server().unwrap());
    trustwire::echo::register(&mut server);
    let r = refusals.clone();
    server.options_mut().on_handshake_error =
        Some(Arc::new(move |_, e: &trustwire::Error| r.lock().unwrap().push(e.verdict().map(|v| v.name()))));
    (server.bind("127.0.0.1:0").await.unwrap(), refusals)
}

async fn wait_for_refusal(refusals: &Refusals) -> Option<&'static str> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = refusals.lock().unwrap().first() {
            return *v;
        }
        assert!(tokio::time::Instant::now() < deadline, "the server refused nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Presents a chain with whatever key it is given: rustls' own builders refuse a key that does
/// not match the certificate, an attacker's client does not.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl ResolvesClientCert for Presents {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reconnecting_with_a_remembered_chain_still_proves_it_holds_the_key() {
    let pki = Pki::new();
    let (server, refusals) = recording_server(&pki.server_profile()).await;
    let addr = server.local_addr();
    // The real client connects: its chain is now remembered.
    assert_eq!(echo_as(addr, &pki, &pki.client).await.unwrap(), "hi");
    assert_eq!(echo_as(addr, &pki, &pki.client).await.unwrap(), "hi");

    // Someone who has the client's certificate (it is public) but not its key.
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.client.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let other = pki.issue(client_usage("mallory", "spiffe://example.org/ns/test/mallory"));
    let key = PrivateKeyDer::from_pem_slice(other.key_pem.as_bytes()).unwrap();
    let provider = trustwire::tls::provider();
    let signer = provider.key_provider.load_private_key(key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Presents(Arc::new(CertifiedKey::new(chain, signer)))));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let outcome = async {
        // TLS 1.3: the client's half may complete before the server judges it; the refusal then
        // arrives as an alert on the first read.
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        tls.write_all(b"PRPC").await?;
        let mut buf = [0u8; 1];
        tls.read(&mut buf).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcome).await.expect("no hang");
    assert!(matches!(outcome, Err(_) | Ok(0)), "the impostor got an answer: {outcome:?}");
    assert_eq!(wait_for_refusal(&refusals).await, Some("bad_signature"));
    // The real client is untouched.
    assert_eq!(echo_as(addr, &pki, &pki.client).await.unwrap(), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_chain_is_not_used_past_its_crls_next_update_when_fresh_crls_are_required() {
    let pki = Pki::new();
    // Whole seconds: a CRL's times have no finer grain.
    let next_update = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            (SystemTime::now() + Duration::from_secs(3)).duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 1,
        );
    let crl = pki.ca.crl_pem(&[], next_update).unwrap();
    let mut profile = pki.server_profile();
    profile.trust.crls = vec![CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap()];
    profile.trust.require_fresh_crls = true;
    let (server, refusals) = recording_server(&profile).await;
    let addr = server.local_addr();
    assert_eq!(echo_as(addr, &pki, &pki.client).await.unwrap(), "hi");
    assert!(refusals.lock().unwrap().is_empty());

    let wait = next_update.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(1100);
    tokio::time::sleep(wait).await;
    let err = echo_as(addr, &pki, &pki.client).await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_alert"), "{err}");
    assert_eq!(wait_for_refusal(&refusals).await, Some("crl_stale"));
}
