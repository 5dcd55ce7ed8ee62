//! Finding 5: A non-CA certificate in a trust bundle becomes a trust anchor.
//!
//! A peer's own leaf added "to trust it" would let that peer's key mint any identity. Bundle
//! entries without basicConstraints CA:TRUE are refused, with a message naming the file and the
//! certificate.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use trustwire::credentials::{CredentialStore, IdentitySource, PemSource, Sources, StoreOptions, Use};
use trustwire::tls::{TlsProfile, TrustBundle};
use trustwire::Verdict;

use crate::common::*;

fn options() -> StoreOptions {
    StoreOptions { watch: false, poll_interval: None, ..StoreOptions::default() }
}

#[test]
fn a_leaf_in_the_trust_bundle_is_refused_naming_file_and_subject() {
    let pki = Pki::new();
    let sources = Sources {
        identity: IdentitySource::Files { chain: pki.path("server.pem"), key: pki.path("server.key") },
        trust: vec![PemSource::Path(pki.path("ca.pem")), PemSource::Path(pki.path("client.pem"))],
        ..Sources::default()
    };
    let err = CredentialStore::new(Use::Server, sources, TlsProfile::new(None, TrustBundle::default()), options())
        .expect_err("a leaf certificate became a trust anchor");
    assert_eq!(err.verdict(), Some(Verdict::BadKeyUsage), "{err}");
    let text = err.to_string();
    assert!(text.contains("client.pem"), "names the file: {text}");
    assert!(text.contains("CN=client"), "names the certificate: {text}");
    assert!(text.contains("not a CA certificate"), "{text}");
}

#[test]
fn a_leaf_is_refused_on_every_path_that_reads_a_bundle() {
    let pki = Pki::new();
    let err = TrustBundle::from_pem(pki.client.cert_pem.as_bytes()).expect_err("from_pem took a leaf");
    assert_eq!(err.verdict(), Some(Verdict::BadKeyUsage), "{err}");
    let err = TrustBundle::from_paths(&[pki.path("client.pem")]).expect_err("from_paths took a leaf");
    assert!(err.to_string().contains("client.pem"), "{err}");
    // A bundle built in code and handed to a profile is checked when the profile is built.
    let mut sp = pki.server_profile();
    sp.trust.roots.push(CertificateDer::from_pem_slice(pki.client.cert_pem.as_bytes()).unwrap());
    let err = sp.server().expect_err("a profile with a leaf as anchor was built");
    assert_eq!(err.verdict(), Some(Verdict::BadKeyUsage), "{err}");
}
