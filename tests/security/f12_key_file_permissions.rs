//! Finding 12, first part: group/world-readable private key files go unnoticed.
//!
//! A key file other users can read is reported: a warning in the log, an `InsecureKeyFile`
//! event and the `trustwire_insecure_key_file` gauge.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use trustwire::credentials::{CredentialStore, Event, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::pki::IssueRequest;
use trustwire::tls::{TlsProfile, TrustBundle};

use crate::common::*;

fn gauge(store: &str) -> Option<String> {
    let text = trustwire::telemetry::metrics_text();
    let prefix = format!("trustwire_insecure_key_file{{store=\"{store}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

#[test]
fn a_key_file_readable_by_others_is_reported() {
    let pki = Pki::new();
    let key = pki.path("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let name = "f12-key-permissions";
    let sources = Sources {
        identity: IdentitySource::Files { chain: pki.path("server.pem"), key: key.clone() },
        trust: vec![PemSource::Path(pki.path("ca.pem"))],
        ..Sources::default()
    };
    let options = StoreOptions { name: name.into(), watch: false, poll_interval: None, ..StoreOptions::default() };
    let store =
        CredentialStore::new(Use::Server, sources, TlsProfile::new(None, TrustBundle::default()), options).unwrap();
    assert_eq!(gauge(name).as_deref(), Some("0"), "a 0600 key file is fine");
    assert!(store.generation().insecure_key_file.is_none());

    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let sink = events.clone();
    store.subscribe(move |e| sink.lock().unwrap().push(e.clone()));
    // Rotation writes the new key world-readable.
    let next = pki.issue(IssueRequest::new("server").spiffe_id(SERVER_ID).ip(localhost()));
    std::fs::write(pki.path("server.pem"), &next.cert_pem).unwrap();
    std::fs::write(&key, &next.key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    store.reload().unwrap();

    assert_eq!(gauge(name).as_deref(), Some("1"));
    assert_eq!(store.generation().insecure_key_file, Some((key.clone(), 0o644)));
    let events = events.lock().unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::InsecureKeyFile { path, mode: 0o644, .. } if *path == key)),
        "{events:?}"
    );
}
