//! Credential rotation under load: servers and clients pick up new certificates, trust bundles
//! and CRLs from files without a failed call; bad material is refused and the last good
//! generation keeps serving; trust changes close connections whose peer is no longer accepted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use trustwire::credentials::{CredentialStore, Event, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::{Credential, DevCa, IssueRequest};
use trustwire::rpc::{CallOptions, Client, ClientOptions, Request, Response, RunningServer, Server, Status};
use trustwire::tls::TlsProfile;

/// The exposition, parsed by a Prometheus text-format parser.
fn scrape() -> prometheus_parse::Scrape {
    let text = trustwire::telemetry::metrics_text();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("the exposition does not parse: {e}\n{text}"))
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k).unwrap_or("") == *v))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .reduce(|a, b| a + b)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64
}

fn fast_options(name: &str) -> StoreOptions {
    StoreOptions {
        name: name.into(),
        settle: Duration::from_millis(30),
        poll_interval: Some(Duration::from_millis(500)),
        ..StoreOptions::default()
    }
}

fn file_sources(chain: &Path, key: &Path, ca: &Path) -> Sources {
    Sources {
        identity: IdentitySource::Files { chain: chain.into(), key: key.into() },
        trust: vec![PemSource::Path(ca.into())],
        crls: vec![],
        ..Sources::default()
    }
}

fn template() -> TlsProfile {
    TlsProfile::new(None, Default::default())
}

/// A server whose `Peer/Serial` method answers with the caller's certificate serial.
async fn serial_server(tls: trustwire::tls::ServerTls) -> RunningServer {
    let mut server = Server::new(tls);
    trustwire::echo::register(&mut server);
    server.register("test.Peer", "Serial", |req: Request| async move {
        Ok::<_, Status>(Response::new(req.peer.serial.clone().into_bytes()))
    });
    server.bind("127.0.0.1:0").await.unwrap()
}

fn serial_of(c: &Credential) -> String {
    trustwire::tls::Identity::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes())
        .unwrap()
        .leaf_info()
        .unwrap()
        .identity
        .serial
}

/// Callers that loop on fresh clients and pooled clients until stopped, counting failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: String, clients: Vec<Client>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in clients {
            let (stop, ok, failures, _addr) = (stop.clone(), ok.clone(), failures.clone(), addr.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match echo(&c, &format!("call {i}")).await {
                        Ok(t) if t == format!("call {i}") => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(t) => failures.lock().unwrap().push(format!("wrong answer {t}")),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
        Load { stop, ok, failures, tasks }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "{} failed calls, first: {:?}", failures.len(), failures.first());
        self.ok.load(Ordering::Relaxed)
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `store` serves the certificate with `serial`.
async fn wait_for_serial(store: &CredentialStore, serial: &str, what: &str) {
    wait_for(what, || store.generation().certificate.as_ref().is_some_and(|c| c.identity.serial == serial)).await
}

/// The serial a fresh connection to `addr` sees on the server's certificate.
async fn server_serial_seen(addr: &str, profile: &TlsProfile) -> String {
    let c = client(addr, profile);
    c.server_identity().await.unwrap().unwrap().serial.clone()
}

/// A Kubernetes-style secret volume: `..data` points at a timestamped directory, and the
/// visible names are symlinks through `..data`.
struct SecretVolume {
    dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    fn new(dir: PathBuf, cred: &Credential, ca_pem: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = SecretVolume { dir, version: 0 };
        v.swap(cred, ca_pem);
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), v.dir.join(f)).unwrap();
        }
        v
    }

    /// Writes the new files into a fresh directory and swaps `..data` with one rename.
    fn swap(&mut self, cred: &Credential, ca_pem: &str) {
        self.version += 1;
        let name = format!("..2026_11_23_{:04}", self.version);
        let new = self.dir.join(&name);
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("tls.crt"), &cred.cert_pem).unwrap();
        std::fs::write(new.join("tls.key"), &cred.key_pem).unwrap();
        std::fs::write(new.join("ca.crt"), ca_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }

    fn sources(&self) -> Sources {
        file_sources(&self.dir.join("tls.crt"), &self.dir.join("tls.key"), &self.dir.join("ca.crt"))
    }
}

fn server_request(pki: &Pki) -> IssueRequest {
    let _ = pki;
    IssueRequest::new("server").spiffe_id(SERVER_ID).dns("localhost").ip(localhost())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rotates_by_rename_and_by_symlink_swap_without_failed_calls() {
    let pki = Pki::new();
    let store = CredentialStore::new(
        Use::Server,
        file_sources(&pki.path("server.pem"), &pki.path("server.key"), &pki.path("ca.pem")),
        template(),
        fast_options("server-rename"),
    )
    .unwrap();
    let server = serial_server(store.server_tls().unwrap()).await;
    let addr = server.local_addr().to_string();
    let client_profile = pki.client_profile();
    let clients: Vec<Client> = (0..4).map(|_| client(&addr, &client_profile)).collect();
    let load = Load::start(addr.clone(), clients);

    let first = store.generation().number;
    for round in 0..50 {
        let cred = pki.ca.issue(&server_request(&pki)).unwrap();
        // Two atomic renames, one per file: in between, the chain and key do not match, which
        // the store must treat as a write still in progress.
        cred.write(pki.dir.path(), "server").unwrap();
        let serial = serial_of(&cred);
        wait_for_serial(&store, &serial, &format!("round {round}: new serial in service")).await;
        assert_eq!(server_serial_seen(&addr, &client_profile).await, serial, "round {round}");
    }
    assert!(store.generation().number >= first + 50);
    let calls = load.finish().await;
    assert!(calls > 0);

    // The same through a Kubernetes secret volume.
    let vol_dir = pki.path("secret");
    let mut vol = SecretVolume::new(vol_dir, &pki.ca.issue(&server_request(&pki)).unwrap(), pki.ca.cert_pem());
    let store = CredentialStore::new(Use::Server, vol.sources(), template(), fast_options("server-k8s")).unwrap();
    let server = serial_server(store.server_tls().unwrap()).await;
    let addr = server.local_addr().to_string();
    let clients: Vec<Client> = (0..4).map(|_| client(&addr, &client_profile)).collect();
    let load = Load::start(addr.clone(), clients);
    for round in 0..20 {
        let cred = pki.ca.issue(&server_request(&pki)).unwrap();
        vol.swap(&cred, pki.ca.cert_pem());
        let serial = serial_of(&cred);
        wait_for_serial(&store, &serial, &format!("k8s round {round}")).await;
        assert_eq!(server_serial_seen(&addr, &client_profile).await, serial, "k8s round {round}");
    }
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rotates_by_rename_and_by_symlink_swap_without_failed_calls() {
    let pki = Pki::new();
    let server = serial_server(pki.server_profile().server().unwrap()).await;
    let addr = server.local_addr().to_string();

    for (layout, rounds) in [("rename", 50), ("k8s", 20)] {
        let mut vol = None;
        let sources = if layout == "rename" {
            file_sources(&pki.path("client.pem"), &pki.path("client.key"), &pki.path("ca.pem"))
        } else {
            let v = SecretVolume::new(pki.path("client-secret"), &pki.client, pki.ca.cert_pem());
            let s = v.sources();
            vol = Some(v);
            s
        };
        let store = CredentialStore::new(Use::Client, sources, template(), fast_options(layout)).unwrap();
        let tls = store.client_tls().unwrap();
        let pooled: Vec<Client> =
            (0..3).map(|_| Client::new(addr.clone(), tls.clone(), ClientOptions::default())).collect();
        let load = Load::start(addr.clone(), pooled);
        for round in 0..rounds {
            let cred = pki.ca.issue(&client_usage("client", CLIENT_ID)).unwrap();
            match vol.as_mut() {
                Some(v) => v.swap(&cred, pki.ca.cert_pem()),
                None => {
                    cred.write(pki.dir.path(), "client").unwrap();
                }
            }
            let serial = serial_of(&cred);
            wait_for_serial(&store, &serial, &format!("{layout} round {round}")).await;
            // A new connection presents the new certificate to the server.
            let fresh = Client::new(addr.clone(), tls.clone(), ClientOptions::default());
            let seen = fresh.call("test.Peer", "Serial", Vec::new(), CallOptions::default()).await.unwrap();
            assert_eq!(String::from_utf8(seen.payload.to_vec()).unwrap(), serial, "{layout} round {round}");
        }
        load.finish().await;
    }
}

fn events(store: &CredentialStore) -> Arc<Mutex<Vec<Event>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    store.subscribe(move |e| s.lock().unwrap().push(e.clone()));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_material_is_refused_and_the_last_good_generation_keeps_serving() {
    let pki = Pki::new();
    let mut options = fast_options("bad-material");
    options.watch = false;
    options.poll_interval = None;
    let store = CredentialStore::new(
        Use::Server,
        file_sources(&pki.path("server.pem"), &pki.path("server.key"), &pki.path("ca.pem")),
        template(),
        options,
    )
    .unwrap();
    let seen = events(&store);
    let server = serial_server(store.server_tls().unwrap()).await;
    let addr = server.local_addr().to_string();
    let c = client(&addr, &pki.client_profile());
    let good_serial = serial_of(&pki.server);
    let generation = store.generation().number;

    let other_ca = DevCa::new("other.example").unwrap();
    let other = pki.ca.issue(&server_request(&pki)).unwrap();
    let (not_before, not_after) = validity(-7200, -3600);
    let expired = pki.ca.issue(&server_request(&pki).validity(not_before, not_after)).unwrap();
    let untrusted = other_ca.issue(&server_request(&pki)).unwrap();
    let good_pem = pki.server.cert_pem.clone();
    let truncated = &good_pem[..good_pem.len() / 2];
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("key that does not match", pki.server.cert_pem.clone(), other.key_pem.clone(), "key_mismatch"),
        ("expired", expired.cert_pem.clone(), expired.key_pem.clone(), "expired"),
        ("untrusted issuer", untrusted.cert_pem.clone(), untrusted.key_pem.clone(), "unknown_issuer"),
        ("truncated certificate", truncated.to_string(), pki.server.key_pem.clone(), "bad_pem"),
        ("garbage", "this is not PEM\n\u{0}\u{1}".into(), "garbage".into(), "bad_pem"),
    ];
    for (what, cert, key, verdict) in cases {
        std::fs::write(pki.path("server.pem"), &cert).unwrap();
        std::fs::write(pki.path("server.key"), &key).unwrap();
        let err = store.reload().expect_err(what);
        assert_eq!(err.verdict().map(|v| v.name()), Some(verdict), "{what}: {err}");
        assert!(!err.to_string().is_empty());
        // Still serving the old generation, to old and new connections alike.
        assert_eq!(store.generation().number, generation, "{what}");
        assert_eq!(echo(&c, what).await.unwrap(), what);
        assert_eq!(server_serial_seen(&addr, &pki.client_profile()).await, good_serial, "{what}");
    }
    let rejected: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { verdict, .. } => verdict.map(|v| v.name()),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejected,
        vec!["key_mismatch", "expired", "unknown_issuer", "bad_pem", "bad_pem"],
        "one Rejected event per bad load, with its verdict"
    );
    let metrics = scrape();
    for (result, verdict, n) in [
        ("rejected", "expired", 1.0),
        ("rejected", "unknown_issuer", 1.0),
        ("rejected", "key_mismatch", 1.0),
        ("rejected", "bad_pem", 2.0),
        ("ok", "", 1.0),
    ] {
        let got = value(
            &metrics,
            "trustwire_reloads_total",
            &[("store", "bad-material"), ("result", result), ("verdict", verdict)],
        );
        assert_eq!(got, Some(n), "reloads {result}/{verdict}");
    }

    // Good material again: accepted as the next generation.
    pki.ca.issue(&server_request(&pki)).unwrap().write(pki.dir.path(), "server").unwrap();
    assert_eq!(store.reload().unwrap(), generation + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_is_retried_not_reported() {
    let pki = Pki::new();
    let store = CredentialStore::new(
        Use::Server,
        file_sources(&pki.path("server.pem"), &pki.path("server.key"), &pki.path("ca.pem")),
        template(),
        StoreOptions { settle: Duration::from_millis(100), ..fast_options("half-written") },
    )
    .unwrap();
    let seen = events(&store);
    let cred = pki.ca.issue(&server_request(&pki)).unwrap();
    // Written in place, in two halves, the way a careless deploy script would.
    let half = cred.cert_pem.len() / 2;
    std::fs::write(pki.path("server.pem"), &cred.cert_pem[..half]).unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    std::fs::write(pki.path("server.pem"), &cred.cert_pem).unwrap();
    std::fs::write(pki.path("server.key"), &cred.key_pem).unwrap();
    let serial = serial_of(&cred);
    wait_for_serial(&store, &serial, "the completed files in service").await;
    let rejected = seen.lock().unwrap().iter().filter(|e| matches!(e, Event::Rejected { .. })).count();
    assert_eq!(rejected, 0, "{:?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_with_overlap_then_removal_closes_old_peers() {
    let pki = Pki::new();
    let new_ca = DevCa::new(TD).unwrap();
    let new_client = new_ca.issue(&client_usage("client2", CLIENT_ID)).unwrap();
    // Clients trust both CAs throughout; what changes is what the server trusts.
    let both = format!("{}{}", pki.ca.cert_pem(), new_ca.cert_pem());
    let both_trust = trustwire::tls::TrustBundle::from_pem(both.as_bytes()).unwrap();
    let old_profile = TlsProfile::new(Some(identity(&pki.client)), both_trust.clone());
    let new_profile = TlsProfile::new(Some(identity(&new_client)), both_trust);

    let mut options = fast_options("ca-rotation");
    options.watch = false;
    options.poll_interval = None;
    let store = CredentialStore::new(
        Use::Server,
        Sources {
            identity: IdentitySource::Pem {
                chain: pki.server.cert_pem.clone().into(),
                key: pki.server.key_pem.clone().into(),
            },
            trust: vec![PemSource::Pem(pki.ca.cert_pem().as_bytes().to_vec())],
            crls: vec![],
            ..Sources::default()
        },
        template(),
        options,
    )
    .unwrap();
    let seen = events(&store);
    let server = serial_server(store.server_tls().unwrap()).await;
    let addr = server.local_addr().to_string();

    let old = client(&addr, &old_profile);
    assert_eq!(echo(&old, "old").await.unwrap(), "old");
    let err = echo(&client(&addr, &new_profile), "new").await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_alert"), "{err}");

    // Overlap: both CAs.
    store.set_trust_pem(both.as_bytes()).unwrap();
    let new = client(&addr, &new_profile);
    assert_eq!(echo(&new, "new").await.unwrap(), "new");
    assert_eq!(echo(&old, "old still").await.unwrap(), "old still", "overlap keeps old peers");

    // Our own certificate moves to the new CA during the overlap (a server whose certificate
    // chains to a CA no longer trusted is refused by the pre-flight check).
    let err = store.set_trust_pem(new_ca.cert_pem().as_bytes()).unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("unknown_issuer"), "{err}");
    let server_cred = new_ca.issue(&server_request(&pki)).unwrap();
    store.set_identity_pem(server_cred.cert_pem.as_bytes(), server_cred.key_pem.as_bytes()).unwrap();
    assert_eq!(echo(&new, "new after").await.unwrap(), "new after");

    // Old CA removed: the established old connection is closed, new ones are refused.
    store.set_trust_pem(new_ca.cert_pem().as_bytes()).unwrap();
    wait_for("ConnectionClosed event", || {
        seen.lock().unwrap().iter().any(|e| matches!(e, Event::ConnectionClosed { .. }))
    })
    .await;
    let closed: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::ConnectionClosed { verdict, peer, .. } => Some((verdict.name(), peer.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(closed.len(), 1, "only the old CA's client is closed: {closed:?}");
    assert_eq!(closed[0].0, "unknown_issuer");
    let err = echo(&client(&addr, &old_profile), "again").await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_alert"), "{err}");
    assert_eq!(echo(&new, "new still").await.unwrap(), "new still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_revocation_closes_the_revoked_client_and_refuses_it() {
    let pki = Pki::new();
    let crl_path = pki.path("ca.crl.pem");
    let far = SystemTime::now() + Duration::from_secs(86_400);
    std::fs::write(&crl_path, pki.ca.crl_pem(&[], far).unwrap()).unwrap();
    let store = CredentialStore::new(
        Use::Server,
        Sources {
            crls: vec![PemSource::Path(crl_path.clone())],
            ..file_sources(&pki.path("server.pem"), &pki.path("server.key"), &pki.path("ca.pem"))
        },
        template(),
        fast_options("crl"),
    )
    .unwrap();
    let seen = events(&store);
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let mut server = Server::new(store.server_tls().unwrap());
    trustwire::echo::register(&mut server);
    let r = refusals.clone();
    server.options_mut().on_handshake_error =
        Some(Arc::new(move |_, e: &trustwire::Error| r.lock().unwrap().push(e.verdict().map(|v| v.name()))));
    let server = server.bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().to_string();
    let victim = client(&addr, &pki.client_profile());
    let other_cred = pki.issue(client_usage("bystander", "spiffe://example.org/ns/test/bystander"));
    let bystander = client(&addr, &TlsProfile::new(Some(identity(&other_cred)), pki.trust()));
    assert_eq!(echo(&victim, "before").await.unwrap(), "before");
    assert_eq!(echo(&bystander, "before").await.unwrap(), "before");

    let crl = pki.ca.crl_pem(&[&serial_of(&pki.client)], far).unwrap();
    trustwire::pki::write_atomic(&crl_path, crl.as_bytes(), false).unwrap();
    wait_for("the revoked client's connection to close", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::ConnectionClosed { verdict, .. } if verdict.name() == "revoked"))
    })
    .await;
    let err = echo(&victim, "after").await.unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("peer_alert"), "a new connection is refused: {err}");
    wait_for("the server's refusal", || !refusals.lock().unwrap().is_empty()).await;
    assert_eq!(*refusals.lock().unwrap(), vec![Some("revoked")]);
    assert_eq!(echo(&bystander, "after").await.unwrap(), "after", "others are untouched");
    let next_update = store.generation().crls[0].next_update.unwrap();
    assert!((unix(next_update) - unix(far)).abs() <= 1.0);
    assert_eq!(value(&scrape(), "trustwire_crl_next_update_seconds", &[("store", "crl")]), Some(unix(next_update)));
    assert_eq!(store.generation().crls.len(), 1);
    assert_eq!(store.generation().crls[0].revoked, 1);

    // A CRL from an issuer outside the bundle (an intermediate's, say) is kept: it applies only
    // to certificates that issuer signed, and only if its signature verifies with their issuer's
    // key. Peers of other issuers are untouched.
    let other_issuer = DevCa::new("other.example").unwrap();
    store.set_crls_pem(other_issuer.crl_pem(&[], far).unwrap().as_bytes()).unwrap();
    assert_eq!(echo(&bystander, "still").await.unwrap(), "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_crls_refuse_only_when_asked() {
    let pki = Pki::new();
    let past = SystemTime::now() - Duration::from_secs(60);
    let stale = pki.ca.crl_pem(&[], past);
    // rcgen refuses a next-update before this-update; a CRL that went stale a minute ago has
    // this-update five minutes back.
    let stale = stale.unwrap();
    let sources = || Sources {
        crls: vec![PemSource::Pem(stale.clone().into_bytes())],
        ..file_sources(&pki.path("server.pem"), &pki.path("server.key"), &pki.path("ca.pem"))
    };
    let mut options = fast_options("stale");
    options.watch = false;
    options.poll_interval = None;
    CredentialStore::new(Use::Server, sources(), template(), options.clone())
        .expect("stale CRLs are accepted by default");
    let mut strict = template();
    strict.trust.require_fresh_crls = true;
    let err = CredentialStore::new(Use::Server, sources(), strict, options).unwrap_err();
    assert_eq!(err.verdict().map(|v| v.name()), Some("crl_stale"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_certificate_is_reported_and_gauged() {
    let pki = Pki::new();
    let (nb, na) = validity(-60, 3600);
    let short = pki.ca.issue(&server_request(&pki).validity(nb, na)).unwrap();
    let mut options = fast_options("expiring");
    options.watch = false;
    options.poll_interval = None;
    options.expiry_warning = Duration::from_secs(86_400);
    let store = CredentialStore::new(
        Use::Server,
        Sources {
            identity: IdentitySource::Pem { chain: short.cert_pem.into(), key: short.key_pem.into() },
            trust: vec![PemSource::Path(pki.path("ca.pem"))],
            crls: vec![],
            ..Sources::default()
        },
        template(),
        options,
    )
    .unwrap();
    let seen = events(&store);
    // The first generation's warning went out before anyone subscribed; a reload of the same
    // material does not repeat it, a new generation does.
    let next = pki.ca.issue(&server_request(&pki).validity(nb, na)).unwrap();
    store.set_identity_pem(next.cert_pem.as_bytes(), next.key_pem.as_bytes()).unwrap();
    let expiring: Vec<i64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Expiring { seconds_left, .. } => Some(*seconds_left),
            _ => None,
        })
        .collect();
    assert_eq!(expiring.len(), 1, "{:?}", seen.lock().unwrap());
    assert!((3000..=3600).contains(&expiring[0]), "{expiring:?}");
    let metrics = scrape();
    let store_label = [("store", "expiring")];
    let left = value(&metrics, "trustwire_certificate_seconds_left", &store_label).unwrap();
    assert!((3000.0..=3600.0).contains(&left), "{left}");
    let not_after = store.generation().certificate.as_ref().unwrap().identity.not_after;
    assert_eq!(value(&metrics, "trustwire_certificate_not_after_seconds", &store_label), Some(unix(not_after)));
    let ca_not_after = trustwire::tls::identity::PeerIdentity::from_der(&pki.trust().roots[0]).unwrap().not_after;
    assert_eq!(
        value(&metrics, "trustwire_trust_bundle_earliest_ca_expiry_seconds", &store_label),
        Some(unix(ca_not_after))
    );
    assert_eq!(value(&metrics, "trustwire_credential_generation", &store_label), Some(2.0));
    let loaded = value(&metrics, "trustwire_last_successful_reload_seconds", &store_label).unwrap();
    assert!((unix(SystemTime::now()) - loaded).abs() < 60.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_call_counters() {
    let pki = Pki::new();
    let server = echo_server(&pki.server_profile()).await;
    let addr = server.local_addr().to_string();
    let before = trustwire::telemetry::metrics_text();
    let count = |text: &str, prefix: &str| -> u64 {
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    };
    let c = client(&addr, &pki.client_profile());
    echo(&c, "x").await.unwrap();
    let rogue = DevCa::new("rogue.example").unwrap();
    let rogue_cred = rogue.issue(&client_usage("rogue", "spiffe://rogue.example/x")).unwrap();
    let _ = echo(&client(&addr, &TlsProfile::new(Some(identity(&rogue_cred)), pki.trust())), "y").await;
    wait_for("server-side refusal counted", || {
        let now = trustwire::telemetry::metrics_text();
        let p = "trustwire_handshakes_total{role=\"server\",result=\"refused\",verdict=\"unknown_issuer\",decided_by=\"local\"}";
        count(&now, p) > count(&before, p)
    })
    .await;
    let after = trustwire::telemetry::metrics_text();
    let p = "trustwire_calls_total{role=\"server\",service=\"example.EchoService\",method=\"Echo\",code=\"0\"}";
    assert!(count(&after, p) > count(&before, p), "{after}");
    let p =
        "trustwire_handshakes_total{role=\"client\",result=\"refused\",verdict=\"peer_alert\",decided_by=\"remote\"}";
    assert!(count(&after, p) > count(&before, p), "{after}");
}

/// One combined key+chain file (as SPIFFE's file delivery writes it) and a CA directory: both
/// rotate like separate files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_file_and_ca_directory_rotate() {
    let pki = Pki::new();
    let combined = pki.path("svid.pem");
    let ca_dir = pki.path("bundle");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("a.pem"), pki.ca.cert_pem()).unwrap();
    let write_combined = |c: &Credential| {
        trustwire::pki::write_atomic(&combined, format!("{}{}", c.key_pem, c.cert_pem).as_bytes(), true).unwrap()
    };
    write_combined(&pki.server);
    let store = CredentialStore::new(
        Use::Server,
        Sources {
            identity: IdentitySource::Combined(combined.clone()),
            trust: vec![PemSource::Path(ca_dir.clone())],
            crls: vec![],
            ..Sources::default()
        },
        template(),
        fast_options("combined"),
    )
    .unwrap();
    let server = serial_server(store.server_tls().unwrap()).await;
    let addr = server.local_addr().to_string();
    let c = client(&addr, &pki.client_profile());
    assert_eq!(echo(&c, "before").await.unwrap(), "before");

    let next = pki.ca.issue(&server_request(&pki)).unwrap();
    write_combined(&next);
    let serial = serial_of(&next);
    wait_for_serial(&store, &serial, "the combined file's new certificate").await;
    assert_eq!(server_serial_seen(&addr, &pki.client_profile()).await, serial);

    // A second CA dropped into the directory is trusted from the next generation on.
    let other = DevCa::new("example.org").unwrap();
    let before = store.generation().number;
    std::fs::write(ca_dir.join("b.pem"), other.cert_pem()).unwrap();
    wait_for("the new CA in the bundle", || store.generation().number > before).await;
    let other_client = other.issue(&client_usage("other", "spiffe://example.org/ns/test/other")).unwrap();
    let both = format!("{}{}", pki.ca.cert_pem(), other.cert_pem());
    let profile =
        TlsProfile::new(Some(identity(&other_client)), trustwire::tls::TrustBundle::from_pem(both.as_bytes()).unwrap());
    assert_eq!(echo(&client(&addr, &profile), "other CA").await.unwrap(), "other CA");
    assert_eq!(echo(&c, "still").await.unwrap(), "still");
}
