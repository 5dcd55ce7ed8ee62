//! `[tls] resumption`: off by default; when both sides turn it on, a new connection resumes a
//! TLS 1.3 session, and everything that would change what a full handshake concludes (our or
//! the peer's credentials, the trust bundle, CRLs, time, the policy) makes the next one full or
//! refuses it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use trustwire::authz::PeerDecision;
use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::{Credential, DevCa, IssueRequest};
use trustwire::rpc::{CallOptions, Client, ClientOptions, Request, Response, RunningServer, Server, Status};
use trustwire::tls::{ClientTls, MinVersion, PeerIdentity, ServerTls, TlsProfile};

const HOUR: u64 = 3600;

fn resuming(mut p: TlsProfile, max_age_s: u64) -> TlsProfile {
    p.resumption = Some(Duration::from_secs(max_age_s));
    p
}

/// Refused handshakes' verdicts, as the server's hook saw them.
type Refusals = Arc<Mutex<Vec<String>>>;

/// A server whose `test.Peer/Who` answers with the caller's SPIFFE ID and serial.
async fn who_server(tls: ServerTls) -> (RunningServer, Refusals) {
    let mut server = Server::new(tls);
    server.register("test.Peer", "Who", |req: Request| async move {
        let who = format!("{}|{}", req.peer.spiffe_id.as_deref().unwrap_or("-"), req.peer.serial);
        Ok::<_, Status>(Response::new(who.into_bytes()))
    });
    let refusals = Refusals::default();
    let r = refusals.clone();
    server.options_mut().on_handshake_error = Some(Arc::new(move |_, e: &trustwire::Error| {
        r.lock().unwrap().push(e.verdict().map(|v| v.name()).unwrap_or("-").to_string())
    }));
    (server.bind("127.0.0.1:0").await.unwrap(), refusals)
}

/// What one new connection and one call on it saw.
#[derive(Debug)]
struct Seen {
    resumed: bool,
    /// The server as the client saw it.
    server: Arc<PeerIdentity>,
    /// The client as the server saw it: `spiffe id|serial`.
    client: String,
}

/// A new connection through `tls` (clones share its sessions), and a call on it; the call also
/// reads the ticket the server sent after the handshake.
async fn connect(server: &RunningServer, tls: &ClientTls) -> trustwire::Result<Seen> {
    let c = Client::new(server.local_addr().to_string(), tls.clone(), ClientOptions::default());
    let info = c.connect().await?.expect("a TLS client");
    let opts = CallOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    let r = c.call("test.Peer", "Who", Vec::<u8>::new(), opts).await?;
    c.close();
    Ok(Seen { resumed: info.resumed, server: info.peer, client: String::from_utf8(r.payload.to_vec()).unwrap() })
}

async fn resumed(server: &RunningServer, tls: &ClientTls) -> bool {
    connect(server, tls).await.unwrap().resumed
}

fn serial_of(c: &Credential) -> String {
    identity(c).leaf_info().unwrap().identity.serial
}

fn pem_sources(identity: &Credential, ca_pem: &str) -> Sources {
    Sources {
        identity: IdentitySource::Pem { chain: identity.cert_pem.clone().into(), key: identity.key_pem.clone().into() },
        trust: vec![PemSource::Pem(ca_pem.as_bytes().to_vec())],
        crls: vec![],
        ..Sources::default()
    }
}

/// A store changed only by the test (no watching, no polling).
fn store(role: Use, sources: Sources, max_age_s: u64) -> CredentialStore {
    let options = StoreOptions { name: "resumption".into(), watch: false, poll_interval: None, ..Default::default() };
    let template = resuming(TlsProfile::new(None, Default::default()), max_age_s);
    CredentialStore::new(role, sources, template, options).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_and_unless_both_sides_ask_for_it() {
    let pki = Pki::new();
    for (server_on, client_on) in [(false, false), (true, false), (false, true)] {
        let sp = if server_on { resuming(pki.server_profile(), HOUR) } else { pki.server_profile() };
        let cp = if client_on { resuming(pki.client_profile(), HOUR) } else { pki.client_profile() };
        let (server, _) = who_server(sp.server().unwrap()).await;
        let tls = cp.client().unwrap();
        for i in 0..3 {
            assert!(!resumed(&server, &tls).await, "server {server_on}, client {client_on}: connection {i} resumed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_resumption_on_both_sides_the_next_connections_resume_as_the_same_peers() {
    let pki = Pki::new();
    let (server, refusals) = who_server(resuming(pki.server_profile(), HOUR).server().unwrap()).await;
    let tls = resuming(pki.client_profile(), HOUR).client().unwrap();
    let client_seen = format!("{CLIENT_ID}|{}", serial_of(&pki.client));
    let first = connect(&server, &tls).await.unwrap();
    assert!(!first.resumed);
    for i in 0..3 {
        let again = connect(&server, &tls).await.unwrap();
        assert!(again.resumed, "connection {i} after the first was a full handshake");
        assert_eq!(again.server.spiffe_id.as_deref(), Some(SERVER_ID));
        assert_eq!(again.server.serial, serial_of(&pki.server));
        assert_eq!(again.client, client_seen, "the server sees the client of the resumed session");
    }
    assert!(refusals.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_new_server_generation_forces_a_full_handshake() {
    let pki = Pki::new();
    let store = store(Use::Server, pem_sources(&pki.server, pki.ca.cert_pem()), HOUR);
    let (server, _) = who_server(store.server_tls().unwrap()).await;
    let tls = resuming(pki.client_profile(), HOUR).client().unwrap();
    assert!(!resumed(&server, &tls).await);
    assert!(resumed(&server, &tls).await);

    // Our identity rotates: the client meets the new certificate.
    let next = pki.issue(IssueRequest::new("server2").spiffe_id(SERVER_ID).dns("localhost").ip(localhost()));
    store.set_identity_pem(next.cert_pem.as_bytes(), next.key_pem.as_bytes()).unwrap();
    let seen = connect(&server, &tls).await.unwrap();
    assert!(!seen.resumed, "resumed across an identity rotation");
    assert_eq!(seen.server.serial, serial_of(&next));
    assert!(resumed(&server, &tls).await);

    // The trust bundle changes (another CA joins).
    let other = DevCa::new(TD).unwrap();
    store.set_trust_pem(format!("{}{}", pki.ca.cert_pem(), other.cert_pem()).as_bytes()).unwrap();
    assert!(!resumed(&server, &tls).await, "resumed across a trust bundle change");
    assert!(resumed(&server, &tls).await);

    // A CRL arrives.
    let far = std::time::SystemTime::now() + Duration::from_secs(86_400);
    store.set_crls_pem(pki.ca.crl_pem(&[], far).unwrap().as_bytes()).unwrap();
    assert!(!resumed(&server, &tls).await, "resumed across a CRL change");
    assert!(resumed(&server, &tls).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_cannot_resume_its_session() {
    let pki = Pki::new();
    let store = store(Use::Server, pem_sources(&pki.server, pki.ca.cert_pem()), HOUR);
    let (server, refusals) = who_server(store.server_tls().unwrap()).await;
    let tls = resuming(pki.client_profile(), HOUR).client().unwrap();
    assert!(!resumed(&server, &tls).await);
    assert!(resumed(&server, &tls).await);
    let far = std::time::SystemTime::now() + Duration::from_secs(86_400);
    store.set_crls_pem(pki.ca.crl_pem(&[&serial_of(&pki.client)], far).unwrap().as_bytes()).unwrap();
    let err = connect(&server, &tls).await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_alert"), "{err}");
    wait_for(|| !refusals.lock().unwrap().is_empty()).await;
    // (The client may try again, and be refused again.)
    let refusals = refusals.lock().unwrap();
    assert!(refusals.iter().all(|v| v == "revoked"), "{refusals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_new_client_generation_forces_a_full_handshake() {
    let pki = Pki::new();
    let (server, _) = who_server(resuming(pki.server_profile(), HOUR).server().unwrap()).await;
    let store = store(Use::Client, pem_sources(&pki.client, pki.ca.cert_pem()), HOUR);
    let tls = store.client_tls().unwrap();
    assert!(!resumed(&server, &tls).await);
    assert!(resumed(&server, &tls).await);

    let next = pki.issue(client_usage("client2", CLIENT_ID));
    store.set_identity_pem(next.cert_pem.as_bytes(), next.key_pem.as_bytes()).unwrap();
    let seen = connect(&server, &tls).await.unwrap();
    assert!(!seen.resumed, "resumed across our identity rotation");
    assert_eq!(seen.client, format!("{CLIENT_ID}|{}", serial_of(&next)), "the server sees our new certificate");
    assert!(resumed(&server, &tls).await);

    let other = DevCa::new(TD).unwrap();
    store.set_trust_pem(format!("{}{}", pki.ca.cert_pem(), other.cert_pem()).as_bytes()).unwrap();
    assert!(!resumed(&server, &tls).await, "resumed across our trust bundle change");
    assert!(resumed(&server, &tls).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_end_max_age_after_the_full_handshake_on_either_side() {
    let pki = Pki::new();
    // The server's bound: a client that would still offer the ticket gets a full handshake.
    let (strict_server, _) = who_server(resuming(pki.server_profile(), 1).server().unwrap()).await;
    let lenient_client = resuming(pki.client_profile(), HOUR).client().unwrap();
    assert!(!resumed(&strict_server, &lenient_client).await);
    // The client's bound: it stops offering the ticket.
    let (lenient_server, _) = who_server(resuming(pki.server_profile(), HOUR).server().unwrap()).await;
    let strict_client = resuming(pki.client_profile(), 1).client().unwrap();
    assert!(!resumed(&lenient_server, &strict_client).await);
    assert!(resumed(&lenient_server, &strict_client).await);

    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(!resumed(&strict_server, &lenient_client).await, "the server took a ticket past its max_age");
    assert!(!resumed(&lenient_server, &strict_client).await, "the client offered a ticket past its max_age");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_does_not_extend_a_session_past_max_age() {
    let pki = Pki::new();
    let (server, _) = who_server(resuming(pki.server_profile(), 3).server().unwrap()).await;
    let tls = resuming(pki.client_profile(), HOUR).client().unwrap();
    assert!(!resumed(&server, &tls).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Resumed, and given a new ticket: it still ends 3 s after the full handshake.
    assert!(resumed(&server, &tls).await);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(!resumed(&server, &tls).await, "a reissued ticket outlived the full handshake's max_age");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_client_the_policy_no_longer_admits_is_refused_as_peer_not_allowed() {
    let pki = Pki::new();
    let banned = Arc::new(AtomicBool::new(false));
    let mut sp = resuming(pki.server_profile(), HOUR);
    let b = banned.clone();
    sp.policy.hooks.peer = Some(Arc::new(move |_: &PeerIdentity| match b.load(Ordering::SeqCst) {
        true => PeerDecision::Deny("tenant suspended".into()),
        false => PeerDecision::Allow,
    }));
    let (server, refusals) = who_server(sp.server().unwrap()).await;
    let tls = resuming(pki.client_profile(), HOUR).client().unwrap();
    assert!(!resumed(&server, &tls).await);
    assert!(resumed(&server, &tls).await, "the connection hook admits a resumed peer");

    banned.store(true, Ordering::SeqCst);
    assert!(connect(&server, &tls).await.is_err(), "a resumed session outlived the hook's refusal");
    wait_for(|| !refusals.lock().unwrap().is_empty()).await;
    // (The client may try again, and be refused again.)
    let refusals = refusals.lock().unwrap();
    assert!(refusals.iter().all(|v| v == "peer_not_allowed"), "{refusals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_server_the_client_no_longer_admits_is_refused_as_peer_not_allowed() {
    let pki = Pki::new();
    let (server, _) = who_server(resuming(pki.server_profile(), HOUR).server().unwrap()).await;
    let banned = Arc::new(AtomicBool::new(false));
    let mut cp = resuming(pki.client_profile(), HOUR);
    let b = banned.clone();
    cp.policy.hooks.peer = Some(Arc::new(move |_: &PeerIdentity| match b.load(Ordering::SeqCst) {
        true => PeerDecision::Deny("server decommissioned".into()),
        false => PeerDecision::Allow,
    }));
    let tls = cp.client().unwrap();
    assert!(!resumed(&server, &tls).await);
    assert!(resumed(&server, &tls).await);

    banned.store(true, Ordering::SeqCst);
    let err = connect(&server, &tls).await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_not_allowed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_server_whose_certificate_expired_since_is_refused_as_expired() {
    let pki = Pki::new();
    let (from, until) = validity(-60, 2);
    let short = pki
        .issue(IssueRequest::new("short").spiffe_id(SERVER_ID).dns("localhost").ip(localhost()).validity(from, until));
    let (server, _) =
        who_server(resuming(TlsProfile::new(Some(identity(&short)), pki.trust()), HOUR).server().unwrap()).await;
    let tls = resuming(pki.client_profile(), HOUR).client().unwrap();
    assert!(!resumed(&server, &tls).await);
    assert!(resumed(&server, &tls).await);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let err = connect(&server, &tls).await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("expired"), "{err}");
    assert!(err.to_string().contains("has expired"), "{err}");
}

#[test]
fn the_profile_turns_it_on_within_bounds_and_for_tls13_only() {
    let load = |tls: &str| trustwire::profile::ProfileFile::parse(&format!("[tls]\n{tls}\n")).unwrap().settings();
    assert_eq!(load("").unwrap().resumption, None);
    assert_eq!(load("resumption = { max_age_s = 600 }").unwrap().resumption, Some(Duration::from_secs(600)));
    for bad in ["0", "86401"] {
        let err = load(&format!("resumption = {{ max_age_s = {bad} }}")).unwrap_err().to_string();
        assert!(err.contains("1 to 86400"), "{err}");
    }
    let err = load("min_version = \"1.2\"\nresumption = { max_age_s = 60 }").unwrap_err().to_string();
    assert!(err.contains("TLS 1.3 only"), "{err}");
    assert!(trustwire::profile::ProfileFile::parse("[tls]\nresumption = { max_age = 60 }\n").is_err());

    // A profile built in code is held to the same rules.
    let pki = Pki::new();
    let mut sp = resuming(pki.server_profile(), 60);
    sp.min_version = MinVersion::Tls12;
    assert!(sp.server().unwrap_err().to_string().contains("TLS 1.3 only"));
    let mut cp = resuming(pki.client_profile(), 60);
    cp.min_version = MinVersion::Tls12;
    assert!(cp.client().unwrap_err().to_string().contains("TLS 1.3 only"));
    assert!(resuming(pki.client_profile(), 0).client().is_err());
}

/// Waits (up to 5 s) for something the server records after the client has seen the outcome.
async fn wait_for(done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}
