//! Finding 16: a connection whose tasks have not run since trust changed carries one more call.
//!
//! A client connection learns that new trust material refuses its server (or that a
//! certificate expired) in its reader task. A connection made on a runtime that only runs while
//! its thread is in a call, as the Python module's blocking calls do, sits unpolled between
//! calls: the next call was queued on it before the reader could notice, and was answered by
//! the server the client no longer trusts. A connection is now checked for a close signal
//! before each call is put on it.

use std::time::Duration;

use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::DevCa;
use trustwire::rpc::{Client, ClientOptions};
use trustwire::tls::TlsProfile;

use crate::common::*;

#[test]
fn a_call_after_trust_refuses_the_server_does_not_go_over_the_old_connection() {
    // The server's certificate comes from `pki.ca`, the client's from `clients`; the server
    // trusts `clients`, the client starts out trusting both.
    let pki = Pki::new();
    let clients = DevCa::new(TD).unwrap();
    let ours = clients.issue(&client_usage("client", CLIENT_ID)).unwrap();
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server_profile = TlsProfile::new(
        Some(identity(&pki.server)),
        trustwire::tls::TrustBundle::from_pem(clients.cert_pem().as_bytes()).unwrap(),
    );
    let server = server_rt.block_on(echo_server(&server_profile));
    let addr = server.local_addr().to_string();

    let both = format!("{}{}", pki.ca.cert_pem(), clients.cert_pem());
    let store = CredentialStore::new(
        Use::Client,
        Sources {
            identity: IdentitySource::Pem { chain: ours.cert_pem.clone().into(), key: ours.key_pem.clone().into() },
            trust: vec![PemSource::Pem(both.into_bytes())],
            crls: vec![],
            ..Sources::default()
        },
        TlsProfile::new(None, pki.trust()),
        StoreOptions { name: "f16".into(), watch: false, poll_interval: None, ..StoreOptions::default() },
    )
    .unwrap();

    // The client's connection lives on a runtime that runs only inside this thread's calls.
    let here = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = Client::new(addr, store.client_tls().unwrap(), ClientOptions::default());
    assert_eq!(here.block_on(echo(&client, "before")).unwrap(), "before");

    // Between calls, the client stops trusting the server's CA.
    store.set_trust_pem(clients.cert_pem().as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let err = here.block_on(echo(&client, "after")).expect_err("the call went to a server we no longer trust");
    assert_eq!(err.verdict().map(|v| v.name()), Some("unknown_issuer"), "{err}");
    drop(client);
    drop(here);
    server_rt.block_on(server.shutdown());
}
