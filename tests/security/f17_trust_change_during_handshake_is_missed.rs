//! Finding 17: a trust change while a handshake finishes never reaches that connection.
//!
//! A connection is registered for trust rechecks only once its handshake has completed. When
//! new trust material arrived between the peer's verification and that registration, the
//! recheck ran before the connection was there to check, and the connection went on serving a
//! peer the new material refuses. A connection verified under an earlier generation is now
//! checked against the latest recheck when it registers, and closed before a call is read.

use std::sync::{Arc, Mutex};

use trustwire::authz::PeerDecision;
use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::DevCa;
use trustwire::rpc::Server;
use trustwire::tls::{TlsProfile, TrustBundle};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_by_trust_that_changed_mid_handshake_gets_no_call_through() {
    // The server trusts two client CAs; `partner` is dropped while its client's handshake is
    // finishing (by the application's peer hook, so the timing is exact).
    let pki = Pki::new();
    let partner = DevCa::new(TD).unwrap();
    let partner_client = partner.issue(&client_usage("partner", CLIENT_ID)).unwrap();
    let both = format!("{}{}", pki.ca.cert_pem(), partner.cert_pem());

    let store_slot: Arc<Mutex<Option<CredentialStore>>> = Arc::new(Mutex::new(None));
    let mut template = TlsProfile::new(None, pki.trust());
    let (slot, only_ours) = (store_slot.clone(), pki.ca.cert_pem().to_string());
    template.policy.hooks.peer = Some(Arc::new(move |_: &trustwire::PeerIdentity| {
        if let Some(store) = slot.lock().unwrap().take() {
            store.set_trust_pem(only_ours.as_bytes()).unwrap();
        }
        PeerDecision::Allow
    }));
    let store = CredentialStore::new(
        Use::Server,
        Sources {
            identity: IdentitySource::Pem {
                chain: pki.server.cert_pem.clone().into(),
                key: pki.server.key_pem.clone().into(),
            },
            trust: vec![PemSource::Pem(both.into_bytes())],
            crls: vec![],
            ..Sources::default()
        },
        template,
        StoreOptions { name: "f17".into(), watch: false, poll_interval: None, ..StoreOptions::default() },
    )
    .unwrap();
    let mut server = Server::new(store.server_tls().unwrap());
    trustwire::echo::register(&mut server);
    let server = server.bind("127.0.0.1:0").await.unwrap();
    *store_slot.lock().unwrap() = Some(store.clone());

    // The partner's client: verified under the old trust, registered after the change.
    let mut profile = TlsProfile::new(
        Some(identity(&partner_client)),
        TrustBundle::from_pem(format!("{}{}", pki.ca.cert_pem(), partner.cert_pem()).as_bytes()).unwrap(),
    );
    profile.server_name = Some("localhost".into());
    let err = echo(&client(server.local_addr(), &profile), "through").await.expect_err("the call was served");
    assert!(store_slot.lock().unwrap().is_none(), "the hook ran");
    // Closed cleanly before any call was read; the retry's handshake hears the new trust.
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_alert"), "{err}");

    // Our own clients are unaffected.
    assert_eq!(echo(&client(server.local_addr(), &pki.client_profile()), "ours").await.unwrap(), "ours");
    server.shutdown().await;
}
