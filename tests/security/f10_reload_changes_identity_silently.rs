//! Finding 10: A reload that changes our own SPIFFE ID (or trust domain) goes live silently, and
//! the pre-flight ignores CRLs, so a revoked new certificate is published.
//!
//! Both are refused by default with a named verdict, and the previous generation keeps serving;
//! an explicit option allows a change of identity.

use std::time::{Duration, SystemTime};

use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::IssueRequest;
use trustwire::tls::{TlsProfile, TrustBundle};
use trustwire::Verdict;

use crate::common::*;

fn store(pki: &Pki, crl: Option<&str>, allow_identity_change: bool) -> CredentialStore {
    let sources = Sources {
        identity: IdentitySource::Pem {
            chain: pki.server.cert_pem.clone().into(),
            key: pki.server.key_pem.clone().into(),
        },
        trust: vec![PemSource::Path(pki.path("ca.pem"))],
        crls: crl.map(|c| vec![PemSource::Pem(c.as_bytes().to_vec())]).unwrap_or_default(),
        ..Sources::default()
    };
    let options = StoreOptions { watch: false, poll_interval: None, allow_identity_change, ..StoreOptions::default() };
    CredentialStore::new(Use::Server, sources, TlsProfile::new(None, TrustBundle::default()), options).unwrap()
}

fn spiffe_id(store: &CredentialStore) -> Option<String> {
    store.generation().certificate.as_ref().and_then(|c| c.identity.spiffe_id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_another_spiffe_id_is_refused_and_the_old_identity_keeps_serving() {
    let pki = Pki::new();
    let store = store(&pki, None, false);
    let running = {
        let mut s = trustwire::Server::new(store.server_tls().unwrap());
        trustwire::echo::register(&mut s);
        s.bind("127.0.0.1:0").await.unwrap()
    };
    let other =
        pki.issue(IssueRequest::new("impostor").spiffe_id("spiffe://example.org/ns/test/other").ip(localhost()));
    let err = store.set_identity_pem(other.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::IdentityChanged), "{err}");
    assert!(err.to_string().contains("spiffe://example.org/ns/test/other"), "{err}");
    assert_eq!(spiffe_id(&store).as_deref(), Some(SERVER_ID));
    // New connections still see the identity in service.
    let c = client(running.local_addr(), &pki.client_profile());
    assert_eq!(echo(&c, "still me").await.unwrap(), "still me");
    assert_eq!(c.server_identity().await.unwrap().unwrap().spiffe_id.as_deref(), Some(SERVER_ID));

    // A new certificate for the same identity is an ordinary rotation.
    let renewed = pki.issue(IssueRequest::new("server2").spiffe_id(SERVER_ID).ip(localhost()));
    store.set_identity_pem(renewed.cert_pem.as_bytes(), renewed.key_pem.as_bytes()).unwrap();
}

#[test]
fn a_change_of_identity_goes_live_when_allowed_explicitly() {
    let pki = Pki::new();
    let other = pki.issue(IssueRequest::new("renamed").spiffe_id("spiffe://example.org/ns/test/renamed"));
    // The option is what lets it through: the same change is refused without it.
    let default = store(&pki, None, false);
    let err = default.set_identity_pem(other.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::IdentityChanged), "{err}");
    assert_eq!(spiffe_id(&default).as_deref(), Some(SERVER_ID));

    let store = store(&pki, None, true);
    store.set_identity_pem(other.cert_pem.as_bytes(), other.key_pem.as_bytes()).unwrap();
    assert_eq!(spiffe_id(&store).as_deref(), Some("spiffe://example.org/ns/test/renamed"));
}

#[test]
fn a_revoked_new_certificate_is_not_published() {
    let pki = Pki::new();
    let next = pki.issue(IssueRequest::new("next").spiffe_id(SERVER_ID));
    let serial = trustwire::tls::PeerIdentity::from_der(&identity(&next).chain[0]).unwrap().serial;
    let crl = pki.ca.crl_pem(&[serial.as_str()], SystemTime::now() + Duration::from_secs(3600)).unwrap();
    let store = store(&pki, Some(&crl), false);
    let before = store.generation().number;
    let err = store.set_identity_pem(next.cert_pem.as_bytes(), next.key_pem.as_bytes()).unwrap_err();
    assert_eq!(err.verdict(), Some(Verdict::Revoked), "{err}");
    assert_eq!(store.generation().number, before, "the previous generation stays in service");
}
