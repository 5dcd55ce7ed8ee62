//! One `FetchX509SVID` response, checked and turned into an [`X509Context`].
//!
//! Every field is parsed strictly: the concatenated DER certificates must split into whole
//! certificates with nothing left over, each CRL entry must be exactly one CRL, the key must be
//! PKCS#8 and belong to the leaf, the leaf must be an end-entity certificate for signing (not a
//! CA), and each SPIFFE ID must follow the SPIFFE ID standard and be the leaf's only URI SAN.
//! Anything else makes the whole response malformed: it is reported and the previous context
//! stays in use. Checks of validity windows and chains against trust are the credential
//! store's, as for every other source.

use std::collections::BTreeMap;
use std::fmt;

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::proto;
use crate::authz::truncate;
use crate::error::{Error, Verdict};
use crate::tls::{CertificateInfo, Identity, SpiffeId, TrustDomain};

/// Which SVID to use when the agent returns several.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SvidSelector {
    /// The first one, as the Workload API standard says (the default).
    #[default]
    First,
    /// The one with this SPIFFE ID.
    SpiffeId(String),
    /// The one with this hint (an operator-chosen label such as `internal`).
    Hint(String),
}

impl fmt::Display for SvidSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SvidSelector::First => f.write_str("the first position"),
            SvidSelector::SpiffeId(id) => write!(f, "SPIFFE ID {id}"),
            SvidSelector::Hint(h) => write!(f, "hint '{h}'"),
        }
    }
}

/// One X509-SVID: an identity the agent issued to this workload.
pub struct X509Svid {
    spiffe_id: String,
    trust_domain: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    bundle: Vec<CertificateDer<'static>>,
    hint: Option<String>,
}

impl Clone for X509Svid {
    fn clone(&self) -> Self {
        X509Svid {
            spiffe_id: self.spiffe_id.clone(),
            trust_domain: self.trust_domain.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            bundle: self.bundle.clone(),
            hint: self.hint.clone(),
        }
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain", &self.chain.len())
            .field("bundle", &self.bundle.len())
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    /// The SPIFFE ID, e.g. `spiffe://example.org/ns/prod/sa/api`.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// The trust domain of the SPIFFE ID, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The certificate chain, leaf first, DER.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key, PKCS#8 DER.
    pub fn key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    /// The CA certificates of this SVID's trust domain, DER.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The operator's hint, when the agent sent one.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// The leaf's serial number, lowercase hex (as `PeerIdentity::serial`).
    pub fn serial(&self) -> String {
        CertificateInfo::from_der(&self.chain[0]).map(|c| c.identity.serial).unwrap_or_default()
    }

    /// The chain and key as our TLS identity.
    pub fn identity(&self) -> Result<Identity, Error> {
        Identity::from_der(self.chain.clone(), PrivateKeyDer::Pkcs8(self.key.clone_key()))
    }
}

/// Everything one Workload API response carries: the SVIDs, the selected one and its trust
/// domain's bundle, the federated bundles and the CRLs.
#[derive(Clone, Debug)]
pub struct X509Context {
    svids: Vec<X509Svid>,
    selected: usize,
    federated: BTreeMap<String, Vec<CertificateDer<'static>>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl X509Context {
    /// The SVID chosen by the [`SvidSelector`].
    pub fn svid(&self) -> &X509Svid {
        &self.svids[self.selected]
    }

    /// Every SVID the agent returned, in its order.
    pub fn svids(&self) -> &[X509Svid] {
        &self.svids
    }

    /// The selected SVID's trust domain.
    pub fn trust_domain(&self) -> &str {
        self.svid().trust_domain()
    }

    /// The selected SVID's trust domain's CA certificates.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        self.svid().bundle()
    }

    /// CA certificates of foreign trust domains, by trust domain name (`partner.example`).
    pub fn federated_bundles(&self) -> &BTreeMap<String, Vec<CertificateDer<'static>>> {
        &self.federated
    }

    /// The CRLs, DER.
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }

    pub(super) fn from_response(r: proto::X509SvidResponse, select: &SvidSelector) -> Result<Self, Error> {
        if r.svids.is_empty() {
            return Err(malformed(None, "it holds no SVID"));
        }
        let svids = r.svids.into_iter().enumerate().map(|(i, s)| svid(i, s)).collect::<Result<Vec<_>, _>>()?;
        let selected = pick(&svids, select)?;
        let mut federated = BTreeMap::new();
        for (key, der) in r.federated_bundles {
            let td = key.strip_prefix("spiffe://").unwrap_or(&key);
            TrustDomain::parse(td)
                .map_err(|why| malformed(None, format!("federated bundle key '{}': {why}", truncate(&key))))?;
            if svids.iter().any(|s| s.trust_domain == td) {
                return Err(malformed(
                    None,
                    format!("a federated bundle is given for {td}, a trust domain of our own SVIDs"),
                ));
            }
            let certs = split_certs(&der, &format!("federated bundle for {td}"))?;
            if federated.insert(td.to_string(), certs).is_some() {
                return Err(malformed(None, format!("the federated bundle for {td} is given twice")));
            }
        }
        let crls = r.crl.into_iter().enumerate().map(|(i, der)| crl(i, der)).collect::<Result<Vec<_>, _>>()?;
        Ok(X509Context { svids, selected, federated, crls })
    }
}

fn malformed(verdict: Option<Verdict>, what: impl fmt::Display) -> Error {
    Error::credentials(verdict, format!("malformed Workload API response: {what}"))
}

fn svid(index: usize, s: proto::X509Svid) -> Result<X509Svid, Error> {
    let what = format!("SVID #{} ({})", index + 1, truncate(&s.spiffe_id));
    let trust_domain = SpiffeId::parse(&s.spiffe_id)
        .map_err(|why| malformed(None, format!("{what}: SPIFFE ID: {why}")))?
        .trust_domain_name()
        .to_string();
    let chain = split_certs(&s.x509_svid, &format!("{what}: certificate chain"))?;
    check_leaf(&chain[0]).map_err(|why| malformed(Some(Verdict::BadKeyUsage), format!("{what}: {why}")))?;
    let leaf = CertificateInfo::from_der(&chain[0])?;
    match leaf.identity.uri_sans.as_slice() {
        [one] if *one == s.spiffe_id => {}
        [one] => {
            return Err(malformed(None, format!("{what}: the leaf certificate is for {}, not this ID", truncate(one))))
        }
        sans => {
            return Err(malformed(
                Some(Verdict::UnsupportedCertificate),
                format!("{what}: an X509-SVID has exactly one URI SAN, the leaf has {}", sans.len()),
            ))
        }
    }
    if s.x509_svid_key.is_empty() {
        return Err(malformed(None, format!("{what}: the private key is missing")));
    }
    let key = PrivatePkcs8KeyDer::from(s.x509_svid_key);
    // Also proves the bytes are a PKCS#8 key of a kind we can sign with.
    rustls::sign::CertifiedKey::from_der(chain.clone(), PrivateKeyDer::Pkcs8(key.clone_key()), &crate::tls::provider())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => malformed(
                Some(Verdict::KeyMismatch),
                format!("{what}: the private key does not belong to the leaf certificate"),
            ),
            other => malformed(
                Some(Verdict::UnsupportedCertificate),
                format!("{what}: the private key is not a usable PKCS#8 key ({other})"),
            ),
        })?;
    let bundle = split_certs(&s.bundle, &format!("{what}: bundle"))?;
    let hint = (!s.hint.is_empty()).then_some(s.hint);
    Ok(X509Svid { spiffe_id: s.spiffe_id, trust_domain, chain, key, bundle, hint })
}

/// The leaf rules of the X509-SVID standard (section 4): not a CA, signs, signs no certificates.
fn check_leaf(leaf: &CertificateDer<'_>) -> Result<(), String> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
    if cert.is_ca() {
        return Err("the leaf certificate is a CA certificate".into());
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.digital_signature() => {
            Err("the leaf certificate's key usage lacks digitalSignature".into())
        }
        Ok(Some(ku)) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            Err("the leaf certificate's key usage allows signing certificates or CRLs".into())
        }
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the leaf certificate has no key usage extension".into()),
        Err(e) => Err(format!("the leaf certificate's key usage cannot be read: {e}")),
    }
}

fn pick(svids: &[X509Svid], select: &SvidSelector) -> Result<usize, Error> {
    let found = match select {
        SvidSelector::First => Some(0),
        SvidSelector::SpiffeId(id) => svids.iter().position(|s| &s.spiffe_id == id),
        SvidSelector::Hint(h) => svids.iter().position(|s| s.hint.as_ref() == Some(h)),
    };
    found.ok_or_else(|| {
        let offered: Vec<String> = svids
            .iter()
            .map(|s| match &s.hint {
                Some(h) => format!("{} (hint '{}')", s.spiffe_id, truncate(h)),
                None => s.spiffe_id.clone(),
            })
            .collect();
        Error::credentials(
            None,
            format!("no SVID with {select} among those the Workload API returned: {}", offered.join(", ")),
        )
    })
}

/// Splits concatenated DER certificates; at least one, whole, nothing left over.
fn split_certs(der: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    if der.is_empty() {
        return Err(malformed(None, format!("{what}: empty (no certificate)")));
    }
    let mut certs = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        let after = match X509Certificate::from_der(rest) {
            Ok((after, _)) => after,
            Err(e) => {
                return Err(malformed(
                    Some(Verdict::UnsupportedCertificate),
                    format!(
                        "{what}: certificate #{} (at byte {}) is not DER X.509: {e}",
                        certs.len() + 1,
                        der.len() - rest.len()
                    ),
                ))
            }
        };
        let used = rest.len() - after.len();
        certs.push(CertificateDer::from(rest[..used].to_vec()));
        rest = after;
    }
    Ok(certs)
}

fn crl(index: usize, der: Vec<u8>) -> Result<CertificateRevocationListDer<'static>, Error> {
    match CertificateRevocationList::from_der(&der) {
        Ok(([], _)) => Ok(CertificateRevocationListDer::from(der)),
        Ok((rest, _)) => Err(malformed(
            Some(Verdict::UnsupportedCertificate),
            format!("CRL #{}: {} bytes after it", index + 1, rest.len()),
        )),
        Err(e) => {
            Err(malformed(Some(Verdict::UnsupportedCertificate), format!("CRL #{} is not a DER CRL: {e}", index + 1)))
        }
    }
}
