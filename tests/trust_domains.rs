//! Trust organised by SPIFFE trust domain: SPIFFE bundles (JWKS), bundle maps, federation that
//! reloads, and SPIFFE IDs held to the standard at config load and at the handshake.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use trustwire::credentials::{CredentialStore, StoreOptions, Use};
use trustwire::pki::{DevCa, IssueRequest};
use trustwire::profile::ProfileFile;
use trustwire::rpc::Server;
use trustwire::Verdict;

use common::peers::{recording_server, server_verdict};
use common::*;

/// A SPIFFE bundle (JWKS) holding `ca` as its one x509-svid key.
fn spiffe_bundle(ca: &DevCa, sequence: u64) -> serde_json::Value {
    let der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
    serde_json::json!({
        "keys": [
            {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": [base64::engine::general_purpose::STANDARD.encode(der.as_ref())]},
            {"use": "jwt-svid", "kty": "EC", "kid": "ignored", "crv": "P-256", "x": "AA", "y": "AA"}
        ],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": 300
    })
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    trustwire::pki::write_atomic(&p, text.as_bytes(), false).unwrap();
    p
}

fn server_profile_toml(trust: &str) -> String {
    format!(
        "[identity]\ncert = \"server.pem\"\nkey = \"server.key\"\n\n[trust]\ntrust_domain = \"example.org\"\nca = \"ca.pem\"\n{trust}\n"
    )
}

fn gauge(name: &str, store: &str, td: &str) -> Option<String> {
    let prefix = format!("{name}{{store=\"{store}\",trust_domain=\"{td}\"}} ");
    trustwire::telemetry::metrics_text().lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_spiffe_bundle_vouches_for_its_trust_domain_only() {
    let pki = Pki::new();
    let partner = DevCa::new("partner.example").unwrap();
    write(pki.dir.path(), "partner.json", &spiffe_bundle(&partner, 7).to_string());
    let toml = write(
        pki.dir.path(),
        "server.toml",
        &server_profile_toml("\n[trust.federation.\"partner.example\"]\nbundle = \"partner.json\"\n"),
    );
    let (server, seen) = recording_server(&trustwire::tls::TlsProfile::from_file(&toml).unwrap()).await;
    let ok = partner.issue(&IssueRequest::new("p").spiffe_id("spiffe://partner.example/billing")).unwrap();
    assert_eq!(echo_as(server.local_addr(), &pki, &ok).await.unwrap(), "hi");
    let forged = partner.issue(&IssueRequest::new("f").spiffe_id(CLIENT_ID)).unwrap();
    echo_as(server.local_addr(), &pki, &forged).await.unwrap_err();
    assert_eq!(server_verdict(&seen).await, Verdict::UnknownIssuer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_map_added_then_removed_admits_then_refuses_and_closes_the_partner() {
    let pki = Pki::new();
    let partner = DevCa::new("partner.example").unwrap();
    let dir = pki.dir.path();
    let empty_map = serde_json::json!({"trust_domains": {}});
    let with_partner = serde_json::json!({"trust_domains": {"partner.example": spiffe_bundle(&partner, 42)}});
    write(dir, "bundles.json", &empty_map.to_string());
    let toml = write(dir, "server.toml", &server_profile_toml("bundle_map = \"bundles.json\""));
    let name = "bundle-map-reload";
    let options = StoreOptions { name: name.into(), watch: false, poll_interval: None, ..StoreOptions::default() };
    let store = CredentialStore::from_file(&toml, Use::Server, options).unwrap();
    let mut server = Server::new(store.server_tls().unwrap());
    trustwire::echo::register(&mut server);
    let running = server.bind("127.0.0.1:0").await.unwrap();
    let addr = running.local_addr();

    let cred = partner.issue(&IssueRequest::new("p").spiffe_id("spiffe://partner.example/billing")).unwrap();
    echo_as(addr, &pki, &cred).await.expect_err("partner.example has no bundle yet");

    write(dir, "bundles.json", &with_partner.to_string());
    store.reload().unwrap();
    assert_eq!(gauge("trustwire_trust_domain_bundle_sequence", name, "partner.example").as_deref(), Some("42"));
    assert_eq!(gauge("trustwire_trust_domain_cas", name, "partner.example").as_deref(), Some("1"));
    let mut cp = pki.client_profile();
    cp.identity = Some(identity(&cred));
    let live = client(addr, &cp);
    assert_eq!(echo(&live, "admitted").await.unwrap(), "admitted");
    let ours = client(addr, &pki.client_profile());
    assert_eq!(echo(&ours, "ours").await.unwrap(), "ours");

    write(dir, "bundles.json", &empty_map.to_string());
    store.reload().unwrap();
    assert_eq!(gauge("trustwire_trust_domain_cas", name, "partner.example"), None, "the domain's gauges go");
    // The partner's live connection is closed; a new one is refused. Ours is untouched.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if echo(&live, "again").await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "the partner's connection stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(echo(&ours, "still").await.unwrap(), "still");
}

#[test]
fn malformed_bundles_are_refused_with_the_file_named() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let partner = DevCa::new("partner.example").unwrap();
    let mut two_x5c = spiffe_bundle(&partner, 1);
    let first = two_x5c["keys"][0]["x5c"][0].clone();
    two_x5c["keys"][0]["x5c"] = serde_json::json!([first.clone(), first]);
    let leaf = CertificateDer::from_pem_slice(pki.client.cert_pem.as_bytes()).unwrap();
    let leaf_bundle = serde_json::json!({"keys": [{"use": "x509-svid", "x5c": [base64::engine::general_purpose::STANDARD.encode(leaf.as_ref())]}]});
    for (text, why) in [
        ("{\"keys\": [", "not a SPIFFE bundle"),
        ("{\"keys\": []}", "holds no x509-svid key"),
        (two_x5c.to_string().as_str(), "exactly one"),
        (leaf_bundle.to_string().as_str(), "not a CA certificate"),
    ] {
        write(dir, "partner.json", text);
        let toml = write(
            dir,
            "server.toml",
            &server_profile_toml("\n[trust.federation.\"partner.example\"]\nbundle = \"partner.json\"\n"),
        );
        let err = trustwire::tls::TlsProfile::from_file(&toml).expect_err(why).to_string();
        assert!(err.contains("partner.json") && err.contains(why), "{why}: {err}");
    }
}

#[test]
fn spiffe_ids_in_a_profile_are_held_to_the_standard() {
    for (toml, why) in [
        ("[policy]\nallow = [\"spiffe://example.org/ns/prod/x/../../admin\"]", "'..' segment"),
        ("[policy]\nallow = [\"spiffe://Example.org/ns/*\"]", "lower case"),
        ("[policy]\nallow = [\"spiffe://example.org/ns/%2e%2e/*\"]", "percent-encoding"),
        ("[client]\nserver_spiffe_id = \"spiffe://example.org/a?b\"", "query"),
        ("[trust]\ntrust_domain = \"Example.org\"", "lower case"),
        ("[trust.federation.\"bad domain\"]\nca = \"x.pem\"", "not ' '"),
    ] {
        let err = ProfileFile::parse(toml).and_then(|f| f.settings().and_then(|_| f.sources().map(|_| ())));
        let err = err.expect_err(toml).to_string();
        assert!(err.contains(why), "{toml}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_dot_path_cannot_reach_a_prefix_it_climbs_out_of() {
    // Confirmed before: spiffe://example.org/ns/prod/x/../../admin was admitted by ns/prod/*.
    // Such a certificate is not a valid X509-SVID and is refused before policy is consulted.
    let pki = Pki::new();
    let mut sp = pki.server_profile();
    sp.policy = trustwire::tls::Policy::from_patterns(&["spiffe://example.org/ns/prod/*"]).unwrap();
    let (server, seen) = recording_server(&sp).await;
    let sneaky = pki.issue(IssueRequest::new("sneaky").spiffe_id("spiffe://example.org/ns/prod/x/../../admin"));
    echo_as(server.local_addr(), &pki, &sneaky).await.unwrap_err();
    assert_eq!(server_verdict(&seen).await, Verdict::UnsupportedCertificate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_two_uri_sans_is_not_an_svid() {
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let cred = pki.ca.issue(&IssueRequest::new("two").spiffe_id(CLIENT_ID).uri("https://example.org/other")).unwrap();
    echo_as(server.local_addr(), &pki, &cred).await.unwrap_err();
    assert_eq!(server_verdict(&seen).await, Verdict::UnsupportedCertificate);
    let refusal = seen.lock().unwrap()[0].to_string();
    assert!(refusal.contains("2 URI SANs"), "{refusal}");
}
