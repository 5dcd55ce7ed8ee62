//! A development PKI: a CA and the certificates it issues, for tests, demos and trials.
//! Not for production: keys are written to plain files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::error::Error;

/// Key algorithm for a new key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa2048,
}

impl KeyType {
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "p256" | "ecdsa-p256" | "ec" => KeyType::EcdsaP256,
            "p384" | "ecdsa-p384" => KeyType::EcdsaP384,
            "ed25519" => KeyType::Ed25519,
            "rsa" | "rsa2048" => KeyType::Rsa2048,
            other => {
                return Err(Error::config(format!("key type '{other}': use p256 (default), p384, ed25519 or rsa2048")))
            }
        })
    }

    fn generate(self) -> Result<KeyPair, Error> {
        let r = match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
        };
        r.map_err(pki_err)
    }
}

/// What a certificate may be used for (its extended key usage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Usage {
    /// Both TLS server and client authentication: a service that serves and calls.
    #[default]
    Both,
    Server,
    Client,
}

impl Usage {
    pub fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "both" => Usage::Both,
            "server" => Usage::Server,
            "client" => Usage::Client,
            other => return Err(Error::config(format!("usage '{other}': use both, server or client"))),
        })
    }
}

/// What to put in an issued certificate.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    /// Subject common name, and the file name `pki issue` writes.
    pub name: String,
    pub spiffe_id: Option<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Further URI SANs beside the SPIFFE ID (for testing how peers treat them).
    pub uris: Vec<String>,
    /// Default: five minutes ago (tolerates small clock differences).
    pub not_before: Option<SystemTime>,
    /// Default: `days` from now.
    pub not_after: Option<SystemTime>,
    pub days: u32,
    pub usage: Usage,
    pub key_type: KeyType,
}

impl IssueRequest {
    pub fn new(name: impl Into<String>) -> Self {
        IssueRequest {
            name: name.into(),
            spiffe_id: None,
            dns: Vec::new(),
            ips: Vec::new(),
            uris: Vec::new(),
            not_before: None,
            not_after: None,
            days: 30,
            usage: Usage::Both,
            key_type: KeyType::EcdsaP256,
        }
    }

    pub fn spiffe_id(mut self, id: impl Into<String>) -> Self {
        self.spiffe_id = Some(id.into());
        self
    }

    pub fn dns(mut self, name: impl Into<String>) -> Self {
        self.dns.push(name.into());
        self
    }

    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }

    pub fn uri(mut self, uri: impl Into<String>) -> Self {
        self.uris.push(uri.into());
        self
    }

    pub fn usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    pub fn validity(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = Some(not_before);
        self.not_after = Some(not_after);
        self
    }

    pub fn key_type(mut self, k: KeyType) -> Self {
        self.key_type = k;
        self
    }
}

/// An issued certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Credential {
    /// Writes `DIR/NAME.pem` and `DIR/NAME.key` (mode 0600), each replaced atomically.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), Error> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        write_atomic(&cert, self.cert_pem.as_bytes(), false)?;
        write_atomic(&key, self.key_pem.as_bytes(), true)?;
        Ok((cert, key))
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl DevCa {
    /// A new self-signed CA named after `trust_domain`, valid for ten years.
    pub fn new(trust_domain: &str) -> Result<Self, Error> {
        Self::with_key_type(trust_domain, KeyType::EcdsaP256)
    }

    pub fn with_key_type(trust_domain: &str, key_type: KeyType) -> Result<Self, Error> {
        let key = key_type.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "trustwire dev PKI");
        dn.push(DnType::CommonName, format!("trustwire dev CA {trust_domain} {}", short_id()));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Like a SPIFFE signing certificate, the CA names its trust domain, so it vouches for
        // that domain only wherever it is trusted.
        let td = crate::tls::TrustDomain::parse(trust_domain).map_err(|e| Error::config(e.to_string()))?;
        params.subject_alt_names.push(SanType::URI(td.id().try_into().map_err(pki_err)?));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(pki_err)?;
        Ok(DevCa { cert_pem: cert.pem(), key_pem: key.serialize_pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA written by [`DevCa::write`] (or any CA certificate and its key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(pki_err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(pki_err)?;
        let key_pem = key_pem.to_string();
        Ok(DevCa { issuer, cert_pem: cert_pem.to_string(), key_pem })
    }

    /// Loads `DIR/ca.pem` and `DIR/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).map_err(|e| {
                Error::config(format!(
                    "cannot read {}: {e} (run `trustwire pki init --dir {}` first)",
                    dir.join(f).display(),
                    dir.display()
                ))
            })
        };
        Self::from_pem(&read("ca.pem")?, &read("ca.key")?)
    }

    /// Writes `DIR/ca.pem` and `DIR/ca.key` (mode 0600).
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::config(format!("cannot create {}: {e}", dir.display())))?;
        write_atomic(&dir.join("ca.pem"), self.cert_pem.as_bytes(), false)?;
        write_atomic(&dir.join("ca.key"), self.key_pem.as_bytes(), true)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate with a fresh key.
    pub fn issue(&self, req: &IssueRequest) -> Result<Credential, Error> {
        let key = req.key_type.generate()?;
        let params = self.leaf_params(req, req.key_type == KeyType::Rsa2048)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_err)?;
        Ok(Credential { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a leaf certificate for a key held elsewhere (a PKCS#11 token, say), from its
    /// public key as DER SubjectPublicKeyInfo; returns the certificate PEM. `req.key_type` is
    /// not used: the key is the one given.
    pub fn issue_for_public_key(&self, req: &IssueRequest, spki_der: &[u8]) -> Result<String, Error> {
        use x509_parser::prelude::FromDer;
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| Error::config(format!("not a usable public key (SubjectPublicKeyInfo): {e}")))?;
        let is_rsa = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
            .is_ok_and(|(_, k)| k.algorithm.algorithm.to_id_string() == "1.2.840.113549.1.1.1");
        let params = self.leaf_params(req, is_rsa)?;
        Ok(params.signed_by(&public, &self.issuer).map_err(pki_err)?.pem())
    }

    fn leaf_params(&self, req: &IssueRequest, rsa: bool) -> Result<CertificateParams, Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.name.clone());
        params.distinguished_name = dn;
        if let Some(id) = &req.spiffe_id {
            if !id.starts_with("spiffe://") {
                return Err(Error::config(format!("SPIFFE ID '{id}' must start with spiffe://")));
            }
            params.subject_alt_names.push(SanType::URI(id.clone().try_into().map_err(pki_err)?));
        }
        for d in &req.dns {
            params.subject_alt_names.push(SanType::DnsName(d.clone().try_into().map_err(pki_err)?));
        }
        for ip in &req.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for uri in &req.uris {
            params.subject_alt_names.push(SanType::URI(uri.clone().try_into().map_err(pki_err)?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if rsa {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = match req.usage {
            Usage::Both => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = to_offset(req.not_before.unwrap_or(now - Duration::from_secs(300)));
        params.not_after =
            to_offset(req.not_after.unwrap_or(now + Duration::from_secs(86_400 * u64::from(req.days.max(1)))));
        params.serial_number = Some(random_serial());
        Ok(params)
    }
}

impl DevCa {
    /// A CRL signed by this CA revoking the certificates with the given serials (hex, as in
    /// `PeerIdentity::serial`), valid from now until `next_update`.
    pub fn crl_pem(&self, revoked_serials: &[&str], next_update: SystemTime) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for serial in revoked_serials {
            let bytes = hex::decode(serial).map_err(|_| Error::config(format!("serial '{serial}' is not hex")))?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now - time::Duration::seconds(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: to_offset(next_update),
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).map_err(pki_err)?.pem().map_err(pki_err)
    }
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(crate::tls::identity::unix_secs(t)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("the system RNG is available");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&b)
}

fn short_id() -> String {
    let mut b = [0u8; 3];
    aws_lc_rs::rand::fill(&mut b).expect("the system RNG is available");
    hex::encode(b)
}

fn pki_err(e: rcgen::Error) -> Error {
    Error::config(format!("dev PKI: {e}"))
}

/// Writes a file through a temporary name and a rename, so readers never see half of it.
pub fn write_atomic(path: &Path, data: &[u8], private: bool) -> Result<(), Error> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let err = |e: std::io::Error| Error::config(format!("cannot write {}: {e}", path.display()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
