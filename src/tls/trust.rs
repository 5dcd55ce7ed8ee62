//! Trust material organised by SPIFFE trust domain.
//!
//! A [`TrustBundle`] holds our own CAs (`roots`), the CAs of federated trust domains, and the
//! CRLs. Before a handshake can use it, it is resolved into one CA set per trust domain plus the
//! set for peers that carry no SPIFFE ID (DNS identities, e.g. a stock brpc service):
//!
//! - a CA in `roots` vouches for our trust domain and for peers without a SPIFFE ID — unless its
//!   certificate names a trust domain itself (`spiffe://T`, as SPIFFE signing certificates do),
//!   in which case it vouches for T only;
//! - a federated CA vouches for its own trust domain only, never for peers without a SPIFFE ID;
//! - every entry must be a CA certificate (basicConstraints CA:TRUE).
//!
//! The verifiers then pick the CA set from the peer's SPIFFE ID before path validation, so a CA
//! never vouches for a trust domain it was not configured for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DistinguishedName, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::error::{Error, Verdict};
use crate::tls::identity::CertificateInfo;
use crate::tls::spiffe::TrustDomain;
use crate::tls::{parse_certs, pem_files, provider, read};

/// The CAs we trust, by trust domain, and the CRLs in force.
#[derive(Clone, Debug, Default)]
pub struct TrustBundle {
    /// Our CAs: they vouch for our trust domain and for peers without a SPIFFE ID (a CA whose
    /// certificate names another trust domain vouches for that one only).
    pub roots: Vec<CertificateDer<'static>>,
    /// Our trust domain. When unset it is taken from our own SPIFFE ID, or from the server
    /// SPIFFE ID a client pins; with none of them, `roots` vouch only for peers without a SPIFFE
    /// ID and for trust domains their certificates name.
    pub trust_domain: Option<TrustDomain>,
    /// Other trust domains' CAs (SPIFFE federation); each vouches for its own domain only.
    pub federated: BTreeMap<TrustDomain, Vec<CertificateDer<'static>>>,
    /// The `spiffe_sequence` of each trust domain's SPIFFE bundle, when one was read.
    pub sequences: BTreeMap<TrustDomain, u64>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Refuse peers whose issuer's CRL is past its next-update time (`crl_stale`). Off by
    /// default: a CA with no CRL configured is not checked for revocation either way.
    pub require_fresh_crls: bool,
}

impl TrustBundle {
    /// From PEM bytes holding one or more CA certificates.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        Ok(TrustBundle { roots: parse_ca_bundle(pem, "CA bundle")?, ..Default::default() })
    }

    /// From CA files and directories (every `.pem`/`.crt`/`.cer` file in a directory).
    pub fn from_paths<P: AsRef<std::path::Path>>(paths: &[P]) -> Result<Self, Error> {
        let mut roots = Vec::new();
        for p in paths {
            for file in pem_files(p.as_ref())? {
                roots.extend(parse_ca_bundle(&read(&file, "CA bundle")?, &file.display().to_string())?);
            }
        }
        if roots.is_empty() {
            return Err(Error::credentials(None, "the trust bundle holds no CA certificate"));
        }
        Ok(TrustBundle { roots, ..Default::default() })
    }

    /// Binds `roots` to this trust domain.
    pub fn with_trust_domain(mut self, td: TrustDomain) -> Self {
        self.trust_domain = Some(td);
        self
    }

    /// Adds (or extends) a federated trust domain's CAs.
    pub fn federate(mut self, td: TrustDomain, cas: Vec<CertificateDer<'static>>) -> Self {
        self.federated.entry(td).or_default().extend(cas);
        self
    }

    /// Adds CRLs from PEM bytes.
    pub fn add_crls_pem(&mut self, pem: &[u8]) -> Result<(), Error> {
        for crl in CertificateRevocationListDer::pem_slice_iter(pem) {
            self.crls.push(
                crl.map_err(|e| Error::credentials(Some(Verdict::BadPem), format!("CRL is not valid PEM: {e}")))?,
            );
        }
        Ok(())
    }

    /// Every CA, ours and federated (for summaries and expiry gauges).
    pub fn all_cas(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.roots.iter().chain(self.federated.values().flatten())
    }

    /// One CA set per trust domain, and the set for peers without a SPIFFE ID. `local` is our
    /// trust domain when the bundle does not say it.
    pub(crate) fn resolve(&self, local: Option<&TrustDomain>) -> Result<ResolvedTrust, Error> {
        let local = self.trust_domain.as_ref().or(local).cloned();
        let mut out = ResolvedTrust::default();
        for (i, der) in self.roots.iter().enumerate() {
            let info = check_ca(der, &format!("trust bundle certificate #{}", i + 1))?;
            let ca = TrustedCa { der: der.clone(), info };
            match ca.info.named_trust_domain() {
                Some(named) => {
                    if local.as_ref() == Some(&named) {
                        out.without_domain.push(ca.clone());
                    }
                    out.domains.entry(named).or_default().push(ca);
                }
                None => {
                    if let Some(l) = &local {
                        out.domains.entry(l.clone()).or_default().push(ca.clone());
                    }
                    out.without_domain.push(ca);
                }
            }
        }
        for (td, cas) in &self.federated {
            for (i, der) in cas.iter().enumerate() {
                let info = check_ca(der, &format!("trust domain {td}: certificate #{}", i + 1))?;
                if let Some(named) = info.named_trust_domain().filter(|n| n != td) {
                    return Err(Error::credentials(
                        Some(Verdict::BadKeyUsage),
                        format!(
                            "the CA '{}' is configured for trust domain {td}, but its certificate names \
                             trust domain {named}; a CA vouches only for the trust domain it names",
                            info.identity.subject
                        ),
                    ));
                }
                out.domains.entry(td.clone()).or_default().push(TrustedCa { der: der.clone(), info });
            }
        }
        if out.domains.is_empty() && out.without_domain.is_empty() {
            return Err(Error::credentials(None, "the trust bundle holds no CA certificate"));
        }
        Ok(out)
    }
}

/// Parses a PEM CA bundle, refusing entries that are not CA certificates.
pub(crate) fn parse_ca_bundle(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = parse_certs(pem, what)?;
    for (i, c) in certs.iter().enumerate() {
        let label = if certs.len() == 1 { what.to_string() } else { format!("{what}, certificate #{}", i + 1) };
        check_ca(c, &label)?;
    }
    Ok(certs)
}

/// A trust anchor must be a CA: a leaf added "to trust it" would let its key mint any identity.
pub(crate) fn check_ca(der: &CertificateDer<'_>, what: &str) -> Result<CertificateInfo, Error> {
    let info = CertificateInfo::from_der(der).map_err(|e| {
        Error::credentials(Some(Verdict::UnsupportedCertificate), format!("{what}: not valid X.509 ({e})"))
    })?;
    if !info.is_ca {
        return Err(Error::credentials(
            Some(Verdict::BadKeyUsage),
            format!(
                "{what}: '{}' is not a CA certificate (no basicConstraints CA:TRUE), so it cannot be a \
                 trust anchor; to trust a peer, trust the CA that issued its certificate",
                info.identity.subject
            ),
        ));
    }
    Ok(info)
}

#[derive(Clone, Debug)]
pub(crate) struct TrustedCa {
    pub der: CertificateDer<'static>,
    pub info: CertificateInfo,
}

/// A bundle resolved for verification.
#[derive(Clone, Debug, Default)]
pub(crate) struct ResolvedTrust {
    pub domains: BTreeMap<TrustDomain, Vec<TrustedCa>>,
    pub without_domain: Vec<TrustedCa>,
}

impl ResolvedTrust {
    /// The earliest not-after among every CA in service.
    pub fn earliest_ca_expiry(&self) -> Option<SystemTime> {
        self.domains.values().flatten().chain(&self.without_domain).map(|c| c.info.identity.not_after).min()
    }

    /// Per trust domain: CA count and earliest CA expiry (for gauges).
    pub fn domain_summaries(&self) -> Vec<(String, usize, Option<SystemTime>)> {
        self.domains
            .iter()
            .map(|(td, cas)| (td.to_string(), cas.len(), cas.iter().map(|c| c.info.identity.not_after).min()))
            .collect()
    }
}

/// Which CAs a verifier used, for messages that say whom we trust.
#[derive(Clone, Debug, Default)]
pub(crate) struct TrustSummary {
    /// `Some(td)` for a trust domain's CAs, `None` for the CAs for peers without a SPIFFE ID.
    pub domain: Option<String>,
    pub ca_subjects: Vec<String>,
}

impl TrustSummary {
    pub fn describe(&self) -> String {
        let list = if self.ca_subjects.is_empty() {
            "none".into()
        } else {
            self.ca_subjects.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
        };
        match &self.domain {
            Some(td) => format!("the CAs of trust domain {td} [{list}]"),
            None => format!("the CAs for peers without a SPIFFE ID [{list}]"),
        }
    }
}

/// A verifier per CA set, chosen by the peer's trust domain.
#[derive(Debug)]
pub(crate) struct VerifierSet<V: ?Sized> {
    pub by_domain: BTreeMap<String, (Arc<V>, TrustSummary)>,
    pub without_domain: Option<(Arc<V>, TrustSummary)>,
    /// Subjects of every CA (the server's certificate_authorities hint).
    pub hints: Vec<DistinguishedName>,
}

impl<V: ?Sized> VerifierSet<V> {
    fn build(
        resolved: &ResolvedTrust,
        mut make: impl FnMut(Arc<RootCertStore>) -> Result<Arc<V>, Error>,
    ) -> Result<Self, Error> {
        let mut hints = Vec::new();
        let mut one = |domain: Option<String>, cas: &[TrustedCa]| -> Result<(Arc<V>, TrustSummary), Error> {
            let mut store = RootCertStore::empty();
            for ca in cas {
                store.add(ca.der.clone()).map_err(|e| {
                    Error::credentials(
                        Some(Verdict::UnsupportedCertificate),
                        format!("the CA '{}' cannot be used as a trust anchor: {e}", ca.info.identity.subject),
                    )
                })?;
            }
            hints.extend(store.subjects());
            let summary =
                TrustSummary { domain, ca_subjects: cas.iter().map(|c| c.info.identity.subject.clone()).collect() };
            Ok((make(Arc::new(store))?, summary))
        };
        let mut by_domain = BTreeMap::new();
        for (td, cas) in &resolved.domains {
            by_domain.insert(td.to_string(), one(Some(td.to_string()), cas)?);
        }
        let without_domain =
            if resolved.without_domain.is_empty() { None } else { Some(one(None, &resolved.without_domain)?) };
        hints.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        hints.dedup_by(|a, b| a.as_ref() == b.as_ref());
        Ok(VerifierSet { by_domain, without_domain, hints })
    }

    /// The verifier for a peer with this SPIFFE trust domain (`None`: no SPIFFE ID), or a message
    /// saying why there is none.
    pub fn select(&self, trust_domain: Option<&str>) -> Result<&(Arc<V>, TrustSummary), String> {
        match trust_domain {
            Some(td) => self.by_domain.get(td).ok_or_else(|| {
                format!(
                    "its trust domain {td} has no trust bundle here (trust domains with bundles: [{}]); \
                     federate {td} ([trust.federation.\"{td}\"]) to trust its identities, or set \
                     [trust] trust_domain = \"{td}\" if our CAs issue them",
                    self.by_domain.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
            None => self.without_domain.as_ref().ok_or_else(|| {
                "it has no SPIFFE ID, and only SPIFFE trust domains have CAs here (federated CAs \
                 never vouch for peers without a SPIFFE ID)"
                    .to_string()
            }),
        }
    }
}

/// Client-certificate verifiers (server side), one per CA set.
pub(crate) fn client_verifiers(
    resolved: &ResolvedTrust,
    bundle: &TrustBundle,
) -> Result<VerifierSet<dyn ClientCertVerifier>, Error> {
    VerifierSet::build(resolved, |roots| {
        let mut b = WebPkiClientVerifier::builder_with_provider(roots, Arc::new(provider()))
            .with_crls(bundle.crls.clone())
            .allow_unknown_revocation_status();
        if bundle.require_fresh_crls {
            b = b.enforce_revocation_expiration();
        }
        let v = b.build().map_err(|e| Error::credentials(None, format!("cannot build the client verifier: {e}")))?;
        Ok(v as Arc<dyn ClientCertVerifier>)
    })
}

/// Server-certificate verifiers (client side), one per CA set.
pub(crate) fn server_verifiers(
    resolved: &ResolvedTrust,
    bundle: &TrustBundle,
) -> Result<VerifierSet<dyn ServerCertVerifier>, Error> {
    VerifierSet::build(resolved, |roots| {
        let mut b = WebPkiServerVerifier::builder_with_provider(roots, Arc::new(provider()))
            .with_crls(bundle.crls.clone())
            .allow_unknown_revocation_status();
        if bundle.require_fresh_crls {
            b = b.enforce_revocation_expiration();
        }
        let v = b.build().map_err(|e| Error::credentials(None, format!("cannot build the server verifier: {e}")))?;
        Ok(v as Arc<dyn ServerCertVerifier>)
    })
}
