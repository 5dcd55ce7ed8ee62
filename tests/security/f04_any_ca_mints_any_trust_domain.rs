//! Finding 4: Any CA in the bundle can mint any trust domain's identity.
//!
//! Trust is organised by SPIFFE trust domain: a peer whose certificate says `spiffe://T/…` is
//! verified against T's CAs only, so a partner's CA cannot mint our identities, however the
//! operator put it in the bundle.

use std::path::Path;

use trustwire::pki::{DevCa, IssueRequest};
use trustwire::tls::{Policy, TlsProfile, TrustBundle};
use trustwire::{Error, Verdict};

use crate::common::peers::{recording_server, server_verdict};
use crate::common::*;

const FORGED_ADMIN: &str = "spiffe://example.org/ns/prod/admin";

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Our server: CA A for example.org, partner CA B federated for partner.example, allowing
/// `spiffe://example.org/ns/prod/*` and `spiffe://partner.example/*`.
fn federated_server(pki: &Pki, partner: &DevCa) -> TlsProfile {
    let dir = pki.dir.path();
    write(dir, "partner-ca.pem", partner.cert_pem());
    let toml = write(
        dir,
        "server.toml",
        r#"
[identity]
cert = "server.pem"
key = "server.key"

[trust]
trust_domain = "example.org"
ca = ["ca.pem"]

[trust.federation."partner.example"]
ca = "partner-ca.pem"

[policy]
allow = ["spiffe://example.org/ns/prod/*", "spiffe://partner.example/*"]
"#,
    );
    TlsProfile::from_file(toml).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_partner_ca_cannot_vouch_for_our_trust_domain() {
    let pki = Pki::new();
    let partner = DevCa::new("partner.example").unwrap();
    let (server, seen) = recording_server(&federated_server(&pki, &partner)).await;
    let addr = server.local_addr();

    let forged = partner.issue(&IssueRequest::new("forged").spiffe_id(FORGED_ADMIN)).unwrap();
    echo_as(addr, &pki, &forged).await.expect_err("a partner CA minted our admin identity");
    assert_eq!(server_verdict(&seen).await, Verdict::UnknownIssuer);
    let refusal = seen.lock().unwrap()[0].clone();
    let Error::Handshake { message, .. } = &refusal else { panic!("{refusal:?}") };
    assert!(message.contains("trust domain example.org"), "the refusal names the trust domain: {message}");

    // The same CA is trusted for its own trust domain.
    let partner_peer = partner.issue(&IssueRequest::new("p").spiffe_id("spiffe://partner.example/billing")).unwrap();
    assert_eq!(echo_as(addr, &pki, &partner_peer).await.unwrap(), "hi");
    // And our CA still vouches for ours.
    let ours = pki.issue(IssueRequest::new("web").spiffe_id("spiffe://example.org/ns/prod/web"));
    assert_eq!(echo_as(addr, &pki, &ours).await.unwrap(), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_ca_in_our_own_ca_list_still_vouches_only_for_its_trust_domain() {
    // The operator appended the partner's CA to our flat bundle. The CA certificate names its
    // trust domain (as SPIFFE signing certificates do), so it is bound to that domain.
    let pki = Pki::new();
    let partner = DevCa::new("partner.example").unwrap();
    let mut sp = pki.server_profile();
    let mut roots = pki.trust().roots;
    roots.extend(TrustBundle::from_pem(partner.cert_pem().as_bytes()).unwrap().roots);
    sp.trust.roots = roots;
    sp.policy = Policy::from_patterns(&["spiffe://example.org/ns/prod/*"]).unwrap();
    let (server, seen) = recording_server(&sp).await;

    let forged = partner.issue(&IssueRequest::new("forged").spiffe_id(FORGED_ADMIN)).unwrap();
    echo_as(server.local_addr(), &pki, &forged).await.expect_err("a partner CA minted our admin identity");
    assert_eq!(server_verdict(&seen).await, Verdict::UnknownIssuer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_ca_cannot_mint_another_trust_domains_identity() {
    // Our CA vouches for example.org. A certificate it issued for another trust domain names a
    // domain we have no bundle for, and is refused by that name.
    let pki = Pki::new();
    let (server, seen) = recording_server(&pki.server_profile()).await;
    let other = pki.issue(IssueRequest::new("other").spiffe_id("spiffe://partner.example/billing"));
    echo_as(server.local_addr(), &pki, &other).await.expect_err("our CA vouched for another trust domain");
    assert_eq!(server_verdict(&seen).await, Verdict::UnknownIssuer);
    let refusal = seen.lock().unwrap()[0].clone();
    let Error::Handshake { message, .. } = &refusal else { panic!("{refusal:?}") };
    assert!(message.contains("partner.example has no trust bundle"), "{message}");
}
