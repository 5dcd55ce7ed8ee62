//! What a certificate says about its holder: identities, validity, key type, fingerprint.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Verdict};
use crate::tls::spiffe::{SpiffeId, TrustDomain};

/// The verified identity of a peer, as its certificate states it. Handlers see it on every call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SPIFFE ID: the certificate's one URI SAN when it is a valid `spiffe://` ID (an
    /// X509-SVID carries exactly one; see [`CertificateInfo::svid_error`]).
    pub spiffe_id: Option<String>,
    pub dns_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub uri_sans: Vec<String>,
    /// Subject common name. Only consulted by policy when a pattern says `cn:`.
    pub common_name: Option<String>,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint_sha256: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub subject: String,
    pub issuer: String,
}

/// A certificate's fields beyond identity, for `trustwire inspect` and `probe`.
#[derive(Clone, Debug)]
pub struct CertificateInfo {
    pub identity: PeerIdentity,
    pub is_ca: bool,
    /// e.g. `ECDSA P-256`, `RSA 2048`, `Ed25519`.
    pub key_type: String,
    /// Extended key usages, e.g. `serverAuth`, `clientAuth`; empty when the extension is absent.
    pub extended_key_usage: Vec<&'static str>,
    pub self_signed: bool,
    /// Why the certificate is not a valid X509-SVID although it claims a SPIFFE identity (a
    /// `spiffe:` URI SAN beside other URI SANs, or an invalid SPIFFE ID). Such a certificate is
    /// refused at the handshake as `unsupported_certificate`.
    pub svid_error: Option<String>,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, Error> {
        Ok(CertificateInfo::from_der(der)?.identity)
    }

    /// The best short name for messages: SPIFFE ID, else first DNS SAN, else CN, else subject.
    pub fn display_name(&self) -> String {
        if let Some(id) = &self.spiffe_id {
            return id.clone();
        }
        if let Some(dns) = self.dns_sans.first() {
            return format!("dns:{dns}");
        }
        if let Some(cn) = &self.common_name {
            return format!("cn:{cn}");
        }
        self.subject.clone()
    }

    /// Seconds since the Unix epoch of not-after.
    pub fn not_after_unix(&self) -> i64 {
        unix_secs(self.not_after)
    }

    /// Every name the certificate covers, as `dns:…`, `ip:…`, `uri:…`, for messages.
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = self.dns_sans.iter().map(|d| format!("dns:{d}")).collect();
        out.extend(self.ip_sans.iter().map(|i| format!("ip:{i}")));
        out.extend(self.uri_sans.iter().map(|u| format!("uri:{u}")));
        out
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_name())
    }
}

impl CertificateInfo {
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, Error> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| {
            Error::credentials(
                Some(Verdict::UnsupportedCertificate),
                format!("certificate is not valid DER X.509: {e}"),
            )
        })?;
        let mut dns_sans = Vec::new();
        let mut ip_sans = Vec::new();
        let mut uri_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_sans.push((*d).to_string()),
                    GeneralName::URI(u) => uri_sans.push((*u).to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            ip_sans.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        let (spiffe_id, svid_error) = svid_identity(&uri_sans);
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let mut extended_key_usage = Vec::new();
        if let Ok(Some(eku)) = cert.extended_key_usage() {
            let e = eku.value;
            for (on, name) in [
                (e.any, "any"),
                (e.server_auth, "serverAuth"),
                (e.client_auth, "clientAuth"),
                (e.code_signing, "codeSigning"),
                (e.email_protection, "emailProtection"),
                (e.time_stamping, "timeStamping"),
                (e.ocsp_signing, "ocspSigning"),
            ] {
                if on {
                    extended_key_usage.push(name);
                }
            }
        }
        let identity = PeerIdentity {
            spiffe_id,
            dns_sans,
            ip_sans,
            uri_sans,
            common_name,
            fingerprint_sha256: sha256_hex(der.as_ref()),
            serial: hex::encode(cert.raw_serial()),
            not_before: asn1_to_system(cert.validity().not_before.timestamp()),
            not_after: asn1_to_system(cert.validity().not_after.timestamp()),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
        };
        Ok(CertificateInfo {
            is_ca: cert.is_ca(),
            key_type: key_type(&cert),
            extended_key_usage,
            self_signed: cert.subject() == cert.issuer(),
            svid_error,
            identity,
        })
    }
}

impl CertificateInfo {
    /// For a CA certificate naming a trust domain (`spiffe://T`, as SPIFFE signing certificates
    /// do): that trust domain. A CA that names one vouches for no other.
    pub fn named_trust_domain(&self) -> Option<TrustDomain> {
        let id = SpiffeId::parse(self.identity.spiffe_id.as_deref()?).ok()?;
        id.path().is_empty().then(|| id.trust_domain())
    }
}

/// The SPIFFE ID of a certificate with these URI SANs, or why it is not a valid X509-SVID. A
/// certificate with no `spiffe:` URI SAN makes no SPIFFE claim (a DNS identity) and is neither.
fn svid_identity(uri_sans: &[String]) -> (Option<String>, Option<String>) {
    let claims = |u: &&String| u.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("spiffe:"));
    if !uri_sans.iter().any(|u| claims(&u)) {
        return (None, None);
    }
    if uri_sans.len() > 1 {
        let list = uri_sans.iter().map(|u| crate::authz::truncate(u).into_owned()).collect::<Vec<_>>().join(", ");
        return (
            None,
            Some(format!(
                "it carries {} URI SANs ({list}); an X509-SVID carries exactly one, its SPIFFE ID",
                uri_sans.len()
            )),
        );
    }
    match SpiffeId::parse(&uri_sans[0]) {
        Ok(id) => (Some(id.as_str().to_string()), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.2.1" => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "ECDSA P-256".into(),
                Some("1.3.132.0.34") => "ECDSA P-384".into(),
                Some("1.3.132.0.35") => "ECDSA P-521".into(),
                Some(other) => format!("ECDSA curve {other}"),
                None => "ECDSA".into(),
            }
        }
        "1.2.840.113549.1.1.1" => match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
            _ => "RSA".into(),
        },
        "1.3.101.112" => "Ed25519".into(),
        "1.3.101.113" => "Ed448".into(),
        other => format!("unknown ({other})"),
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn asn1_to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// RFC 3339 UTC rendering of a time, for messages.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}
