//! TLS profiles: our identity, the trust bundle and the peer policy, turned into rustls configs.
//!
//! Secure by default: servers require and verify a client certificate; clients verify the
//! server's chain and name; TLS 1.3 only unless TLS 1.2 is asked for; no session resumption
//! unless asked for, so every connection is verified against the material in force. With
//! `resumption`, TLS 1.3 tickets are bounded (see [`resume`]) and a resumed connection is
//! checked again by the transport (validity, pin, policy and hooks).

pub(crate) mod chains;
pub mod identity;
pub mod policy;
pub(crate) mod resume;
pub mod spiffe;
pub(crate) mod tracker;
pub(crate) mod trust;
pub(crate) mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use identity::{CertificateInfo, PeerIdentity};
pub use policy::{MethodDecision, Pattern, Policy};
pub use spiffe::{SpiffeId, TrustDomain};
pub use trust::TrustBundle;

use crate::error::{Error, Verdict};
use arc_swap::ArcSwap;
pub(crate) use tracker::Tracker;
use verify::{ClientVerifier, ServerVerifier};

/// Default time allowed for a TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The lowest TLS version a profile accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MinVersion {
    /// TLS 1.3 only (the default).
    #[default]
    Tls13,
    /// TLS 1.3 preferred, TLS 1.2 accepted. Only when asked for.
    Tls12,
}

/// Our certificate chain (leaf first) and its private key: key material in memory, or a key
/// that signs elsewhere (a PKCS#11 token) and never shows itself.
#[derive(Clone, Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    /// The chain with its signing key, checked to belong together.
    certified: Arc<CertifiedKey>,
}

impl Identity {
    /// From PEM bytes: a chain (leaf first) and a private key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let chain = parse_certs(chain_pem, "certificate chain")?;
        let key = parse_key(key_pem, "private key")?;
        Self::from_der(chain, key)
    }

    /// From one PEM holding the key and the chain, as SPIFFE's file delivery writes them.
    pub fn from_combined_pem(pem: &[u8]) -> Result<Self, Error> {
        Self::from_pem(pem, pem)
    }

    /// From PEM files.
    pub fn from_files(chain: &Path, key: &Path) -> Result<Self, Error> {
        Self::from_pem(&read(chain, "certificate chain")?, &read(key, "private key")?)
    }

    /// From a DER chain and key; checks the key is usable and belongs to the leaf certificate.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, Error> {
        let signing = provider().key_provider.load_private_key(key).map_err(|e| {
            Error::credentials(Some(Verdict::UnsupportedCertificate), format!("the private key cannot be used: {e}"))
        })?;
        Self::from_signing_key(chain, signing, "the private key")
    }

    /// From a chain and a key that signs on our behalf (e.g. on a PKCS#11 token). The key must
    /// state its public half, and it must be the leaf certificate's: `what` names the key in
    /// the error when it is not.
    pub fn from_signing_key(
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn rustls::sign::SigningKey>,
        what: &str,
    ) -> Result<Self, Error> {
        if chain.is_empty() {
            return Err(Error::credentials(Some(Verdict::BadPem), "the certificate chain is empty"));
        }
        let certified = CertifiedKey::new(chain.clone(), key);
        certified.keys_match().map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => Error::credentials(
                Some(Verdict::KeyMismatch),
                format!(
                    "{what} does not match the certificate's public key (key and certificate from different \
                     issuances?)"
                ),
            ),
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown) => Error::credentials(
                Some(Verdict::KeyMismatch),
                format!("{what} does not state its public key, so it cannot be checked against the certificate"),
            ),
            other => Error::credentials(
                Some(Verdict::UnsupportedCertificate),
                format!("{what} cannot be used with the certificate: {other}"),
            ),
        })?;
        Ok(Identity { chain, certified: Arc::new(certified) })
    }

    /// The leaf certificate's fields.
    pub fn leaf_info(&self) -> Result<CertificateInfo, Error> {
        CertificateInfo::from_der(&self.chain[0])
    }

    /// The chain and key as rustls resolves them for every handshake.
    pub(crate) fn resolver(&self) -> Arc<rustls::sign::SingleCertAndKey> {
        Arc::new(rustls::sign::SingleCertAndKey::from(self.certified.clone()))
    }
}

/// Everything that decides how we handshake: identity, trust, policy and TLS settings.
#[derive(Clone, Debug)]
pub struct TlsProfile {
    /// Required for servers; clients without one can only probe.
    pub identity: Option<Identity>,
    pub trust: TrustBundle,
    pub policy: Policy,
    /// Client: the name to verify and send as SNI (defaults to the host being dialled).
    pub server_name: Option<String>,
    /// Client: the server's SPIFFE ID must be exactly this. Without `server_name`, the pinned
    /// ID then stands for the server's name too: a certificate naming no host is accepted.
    pub server_spiffe_id: Option<String>,
    pub min_version: MinVersion,
    /// Cipher suites in order of preference, by name (e.g. `TLS13_AES_256_GCM_SHA384`); empty
    /// for the default order (see [`provider`]). Suites of versions below `min_version` are
    /// never offered whatever the list says.
    pub cipher_suites: Vec<String>,
    pub handshake_timeout: Duration,
    /// TLS 1.3 session resumption between trustwire peers, with tickets usable for at most this
    /// long (1 s to 24 h); `None` (the default): every connection is a full handshake. TLS 1.3
    /// only: refused with `min_version = Tls12`. See [`resume`] for what invalidates a ticket.
    pub resumption: Option<Duration>,
}

/// The longest `resumption` a profile may ask for.
pub const MAX_RESUMPTION_AGE: Duration = Duration::from_secs(86_400);

impl TlsProfile {
    pub fn new(identity: Option<Identity>, trust: TrustBundle) -> Self {
        TlsProfile {
            identity,
            trust,
            policy: Policy::default(),
            server_name: None,
            server_spiffe_id: None,
            min_version: MinVersion::Tls13,
            cipher_suites: Vec::new(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            resumption: None,
        }
    }

    /// Builds the server side of this profile (fixed material; see
    /// [`crate::credentials::CredentialStore`] for material that rotates).
    pub fn server(&self) -> Result<ServerTls, Error> {
        Ok(self.server_tls_from(self.server_generation(0)?))
    }

    pub(crate) fn server_tls_from(&self, generation: ServerGeneration) -> ServerTls {
        ServerTls {
            current: Arc::new(ArcSwap::from_pointee(generation)),
            handshake_timeout: self.handshake_timeout,
            policy: Arc::new(self.policy.clone()),
            tracker: Arc::new(Tracker::default()),
        }
    }

    pub(crate) fn server_generation(&self, number: u64) -> Result<ServerGeneration, Error> {
        let identity = self
            .identity
            .as_ref()
            .ok_or_else(|| Error::config("a server needs an identity: set a certificate chain and private key"))?;
        let resolved = self.trust.resolve(self.local_trust_domain().as_ref())?;
        let verifiers = trust::client_verifiers(&resolved, &self.trust)?;
        let crl_deadline = chains::fresh_crl_deadline(&self.trust);
        let verifier = Arc::new(ClientVerifier {
            verifiers,
            policy: Arc::new(self.policy.clone()),
            chains: chains::VerifiedChains::new(crl_deadline),
        });
        let mut config = ServerConfig::builder_with_provider(self.crypto()?)
            .with_protocol_versions(self.versions())
            .map_err(|e| Error::config(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(identity.resolver());
        // No session cache ever. Without `resumption` no tickets either: every connection is
        // verified against the trust material in force, and no tickets are sent that nobody
        // (brpc included) would use. With it, a ticketer of this generation's own: tickets from
        // before a change of identity, trust or CRLs do not decrypt, and cost a full handshake.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        if let Some(max_age) = self.resumption {
            config.ticketer = resume::BoundedTickets::for_generation(max_age, crl_deadline)?;
            config.send_tls13_tickets = 1;
        }
        let our_not_after = identity.leaf_info().ok().map(|i| i.identity.not_after);
        Ok(ServerGeneration { config: Arc::new(config), verifier, number, our_not_after })
    }

    /// Builds the client side of this profile (fixed material).
    pub fn client(&self) -> Result<ClientTls, Error> {
        self.client_tls_from(self.client_generation(0)?)
    }

    pub(crate) fn client_tls_from(&self, generation: ClientGeneration) -> Result<ClientTls, Error> {
        let server_name = match &self.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|_| Error::config(format!("server_name '{n}' is not a valid DNS name or IP")))?,
            ),
            None => None,
        };
        Ok(ClientTls {
            current: Arc::new(ArcSwap::from_pointee(generation)),
            server_name,
            handshake_timeout: self.handshake_timeout,
            tracker: Arc::new(Tracker::default()),
        })
    }

    pub(crate) fn client_generation(&self, number: u64) -> Result<ClientGeneration, Error> {
        let resolved = self.trust.resolve(self.local_trust_domain().as_ref())?;
        let verifiers = trust::server_verifiers(&resolved, &self.trust)?;
        let pinned_spiffe_id = match &self.server_spiffe_id {
            Some(id) => Some(
                SpiffeId::parse(id).map_err(|e| Error::config(format!("server_spiffe_id: {e}")))?.as_str().to_string(),
            ),
            None => None,
        };
        let name_optional = pinned_spiffe_id.is_some() && self.server_name.is_none();
        let verifier = Arc::new(ServerVerifier {
            verifiers,
            policy: Arc::new(self.policy.clone()),
            pinned_spiffe_id,
            name_optional,
            chains: chains::VerifiedChains::for_bundle(&self.trust),
        });
        let builder = ClientConfig::builder_with_provider(self.crypto()?)
            .with_protocol_versions(self.versions())
            .map_err(|e| Error::config(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let leaf = self.identity.as_ref().and_then(|id| id.leaf_info().ok());
        let mut config = match &self.identity {
            Some(id) => builder.with_client_cert_resolver(id.resolver()),
            None => builder.with_no_client_auth(),
        };
        // The key-exchange group each server chose is kept: the next connection to it sends that
        // share first, so a server that takes only P-256 (stock brpc) costs a HelloRetryRequest
        // once, not always. TLS 1.3 tickets only with `resumption`, in a store of this
        // generation's own (a change of our material forgets them); TLS 1.2 sessions never.
        config.resumption = rustls::client::Resumption::store(Arc::new(resume::ClientSessions::new(self.resumption)))
            .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
        Ok(ClientGeneration {
            config: Arc::new(config),
            verifier,
            our_identity: leaf.as_ref().map(|i| i.identity.display_name()),
            our_not_after: leaf.map(|i| i.identity.not_after),
            number,
        })
    }

    /// Our trust domain: the bundle's, else our own SPIFFE ID's, else the pinned server's.
    pub(crate) fn local_trust_domain(&self) -> Option<TrustDomain> {
        if let Some(td) = &self.trust.trust_domain {
            return Some(td.clone());
        }
        let ours = self.identity.as_ref().and_then(|id| id.leaf_info().ok()).and_then(|i| i.identity.spiffe_id);
        ours.or_else(|| self.server_spiffe_id.clone())
            .and_then(|id| SpiffeId::parse(&id).ok())
            .map(|id| id.trust_domain())
    }

    /// The provider with this profile's cipher suites, in its order.
    pub(crate) fn crypto(&self) -> Result<Arc<CryptoProvider>, Error> {
        self.check_resumption()?;
        let mut p = provider();
        if !self.cipher_suites.is_empty() {
            p.cipher_suites = cipher_suites(&self.cipher_suites)?;
        }
        let tls13 = p.cipher_suites.iter().any(|s| s.version() == &rustls::version::TLS13);
        if self.min_version == MinVersion::Tls13 && !tls13 {
            return Err(Error::config(
                "tls.cipher_suites names no TLS 1.3 suite, and TLS 1.3 is the only version allowed",
            ));
        }
        Ok(Arc::new(p))
    }

    /// `resumption` within bounds, and only where TLS 1.3 is the only version: a TLS 1.2
    /// session would resume without the checks a resumed TLS 1.3 connection gets.
    pub(crate) fn check_resumption(&self) -> Result<(), Error> {
        let Some(age) = self.resumption else { return Ok(()) };
        if age < Duration::from_secs(1) || age > MAX_RESUMPTION_AGE {
            return Err(Error::config(format!(
                "tls.resumption max_age_s = {}: use 1 to {}",
                age.as_secs(),
                MAX_RESUMPTION_AGE.as_secs()
            )));
        }
        if self.min_version == MinVersion::Tls12 {
            return Err(Error::config(
                "tls.resumption is TLS 1.3 only: remove it, or min_version = \"1.2\" (TLS 1.2 sessions are never \
                 resumed)",
            ));
        }
        Ok(())
    }

    pub(crate) fn versions(&self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static TLS13_AND_12: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        match self.min_version {
            MinVersion::Tls13 => &TLS13_ONLY,
            MinVersion::Tls12 => &TLS13_AND_12,
        }
    }
}

/// The server side of a profile, ready to accept. Cloning shares the material: when it comes
/// from a credential store, every clone sees each new generation.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub(crate) current: Arc<ArcSwap<ServerGeneration>>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) policy: Arc<Policy>,
    pub(crate) tracker: Arc<Tracker>,
}

impl ServerTls {
    /// The peer policy (used for per-method decisions after the handshake).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The generation new handshakes use now (0 for fixed material).
    pub fn generation(&self) -> u64 {
        self.current.load().number
    }
}

/// The client side of a profile, ready to connect. Clones share rotating material.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub(crate) current: Arc<ArcSwap<ClientGeneration>>,
    pub(crate) server_name: Option<ServerName<'static>>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) tracker: Arc<Tracker>,
}

impl ClientTls {
    /// The generation new handshakes use now (0 for fixed material).
    pub fn generation(&self) -> u64 {
        self.current.load().number
    }
}

/// One generation of server material, as rustls uses it.
#[derive(Debug)]
pub(crate) struct ServerGeneration {
    pub config: Arc<ServerConfig>,
    pub verifier: Arc<ClientVerifier>,
    pub number: u64,
    /// Our certificate's not-after: no connection made with this generation outlives it.
    pub our_not_after: Option<std::time::SystemTime>,
}

/// One generation of client material.
#[derive(Debug)]
pub(crate) struct ClientGeneration {
    pub config: Arc<ClientConfig>,
    pub verifier: Arc<ServerVerifier>,
    pub our_identity: Option<String>,
    pub number: u64,
    pub our_not_after: Option<std::time::SystemTime>,
}

/// The crypto provider: aws-lc-rs with TLS 1.3's suites and X25519, P-256, P-384 and the
/// X25519+ML-KEM hybrid. P-256 matters: stock brpc servers accept nothing else.
pub fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1, kx_group::X25519MLKEM768];
    // AES-128-GCM before AES-256-GCM (the provider's own order): its key schedule uses SHA-256,
    // not SHA-384, which makes a full handshake cheaper; per byte the two measure alike (the
    // `rpc` bench, rows 5a/5b). Both are TLS 1.3's strongest class; a profile can reorder.
    p.cipher_suites.sort_by_key(|s| suite_rank(s.suite()));
    p
}

fn suite_rank(s: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match s {
        S::TLS13_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384 => 1,
        S::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    }
}

/// The suites a name list asks for, in its order. Names are rustls' (`TLS13_AES_128_GCM_SHA256`,
/// `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`); TLS 1.3 suites also answer to their RFC 8446
/// names (`TLS_AES_128_GCM_SHA256`).
pub fn cipher_suites(names: &[String]) -> Result<Vec<rustls::SupportedCipherSuite>, Error> {
    let all = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
    let name_of = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
    let mut out = Vec::new();
    for name in names {
        let wanted = name.trim().to_ascii_uppercase();
        let found = all.iter().find(|s| {
            let n = name_of(s);
            n == wanted || n.strip_prefix("TLS13_").map(|rest| format!("TLS_{rest}")) == Some(wanted.clone())
        });
        match found {
            Some(s) if !out.iter().any(|o: &rustls::SupportedCipherSuite| o.suite() == s.suite()) => out.push(*s),
            Some(_) => return Err(Error::config(format!("tls.cipher_suites names {name} twice"))),
            None => {
                return Err(Error::config(format!(
                    "tls.cipher_suites: unknown cipher suite '{name}'; known: {}",
                    all.iter().map(name_of).collect::<Vec<_>>().join(", ")
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(Error::config("tls.cipher_suites is empty: leave it out for the default order"));
    }
    Ok(out)
}

pub(crate) fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::credentials(Some(Verdict::Io), format!("cannot read {what} {}: {e}", path.display())))
}

pub(crate) fn pem_files(path: &Path) -> Result<Vec<PathBuf>, Error> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::credentials(None, format!("cannot list {}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("pem" | "crt" | "cer")))
        .collect();
    files.sort();
    Ok(files)
}

pub(crate) fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::credentials(Some(Verdict::BadPem), format!("{what}: {}", pem_problem(pem, &e))))?;
    if certs.is_empty() {
        return Err(Error::credentials(
            Some(Verdict::BadPem),
            format!("{what}: no \"BEGIN CERTIFICATE\" block found (empty or half-written file?)"),
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        CertificateInfo::from_der(c).map_err(|e| {
            Error::credentials(
                Some(Verdict::UnsupportedCertificate),
                format!("{what}: certificate #{} is not valid X.509 ({e})", i + 1),
            )
        })?;
    }
    Ok(certs)
}

pub(crate) fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => Error::credentials(
            Some(Verdict::BadPem),
            format!("{what}: no private key block found (empty or half-written file?)"),
        ),
        other => Error::credentials(Some(Verdict::BadPem), format!("{what}: {}", pem_problem(pem, &other))),
    })
}

/// What is wrong with PEM text, in words: which block, on which line.
pub(crate) fn pem_problem(pem: &[u8], e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(end_marker);
            let begin = format!("-----BEGIN {label}-----");
            let line = pem
                .split(|b| *b == b'\n')
                .enumerate()
                .filter(|(_, l)| l.starts_with(begin.as_bytes()))
                .map(|(i, _)| i + 1)
                .last();
            let blocks = pem.split(|b| *b == b'\n').filter(|l| l.starts_with(b"-----BEGIN ")).count();
            format!(
                "the \"BEGIN {label}\" block{} (block {blocks}) has no \"END {label}\" line: the file is cut short \
                 or still being written",
                line.map(|l| format!(" at line {l}")).unwrap_or_default()
            )
        }
        E::IllegalSectionStart { line } => {
            format!("a PEM block starts inside another: '{}'", String::from_utf8_lossy(line).trim())
        }
        E::Base64Decode(why) => format!("a PEM block's base64 does not decode ({why})"),
        other => format!("not valid PEM ({other})"),
    }
}
