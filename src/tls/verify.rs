//! Peer verification with precise verdicts.
//!
//! The chain checks themselves are rustls/webpki's. These verifiers wrap them to apply the
//! allow-list, pin SPIFFE IDs, and — when something fails — record a diagnosis that names the
//! catalogue verdict and says what to fix. The standard rustls error is still returned, so the
//! peer gets the precise TLS alert (unknown_ca, certificate_expired, access_denied, …).
//!
//! The diagnosis travels through a thread-local: verification runs synchronously inside the
//! poll of the handshake future, and [`Diagnosed`] clears the slot before each poll and takes
//! it when the handshake fails, so a diagnosis can only belong to the connection being polled.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, PeerIncompatible,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::{Error, Side, Verdict};
use crate::tls::chains::{chain_key, VerifiedChains};
use crate::tls::identity::{rfc3339, CertificateInfo, PeerIdentity};
use crate::tls::policy::Policy;
use crate::tls::spiffe::SpiffeId;
use crate::tls::trust::{TrustSummary, VerifierSet};

/// What went wrong in verification, in words a user can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    pub verdict: Verdict,
    pub message: String,
}

thread_local! {
    static DIAGNOSIS: RefCell<Option<Diagnosis>> = const { RefCell::new(None) };
    /// The identity a verifier accepted during this poll, with the leaf it was read from: the
    /// connection takes it instead of parsing the certificate again.
    static VERIFIED: RefCell<Option<Verified>> = const { RefCell::new(None) };
}

/// A peer identity as a verifier accepted it, and the certificate it was read from.
#[derive(Debug)]
pub(crate) struct Verified {
    leaf: Vec<u8>,
    peer: Arc<PeerIdentity>,
}

impl Verified {
    /// The identity, if it was read from exactly this certificate.
    pub(crate) fn of(self, leaf: &CertificateDer<'_>) -> Option<Arc<PeerIdentity>> {
        (self.leaf == leaf.as_ref()).then_some(self.peer)
    }
}

fn hand_off(leaf: &CertificateDer<'_>, peer: Arc<PeerIdentity>) {
    VERIFIED.with(|v| *v.borrow_mut() = Some(Verified { leaf: leaf.as_ref().to_vec(), peer }));
}

pub(crate) fn take_verified() -> Option<Verified> {
    VERIFIED.with(|v| v.borrow_mut().take())
}

pub(crate) fn record(verdict: Verdict, message: String) {
    DIAGNOSIS.with(|d| *d.borrow_mut() = Some(Diagnosis { verdict, message }));
}

pub(crate) fn take_diagnosis() -> Option<Diagnosis> {
    DIAGNOSIS.with(|d| d.borrow_mut().take())
}

/// Drives a handshake future and returns its output with the diagnosis recorded while it ran,
/// and the identity its verifier accepted.
pub(crate) struct Diagnosed<F> {
    future: F,
    verified: Option<Verified>,
    /// When the session this handshake resumes was verified in full (see [`super::resume`]).
    verified_at: Option<u64>,
}

impl<F> Diagnosed<F> {
    pub(crate) fn new(future: F) -> Self {
        Diagnosed { future, verified: None, verified_at: None }
    }
}

impl<F: Future + Unpin> Future for Diagnosed<F> {
    type Output = (F::Output, Option<Diagnosis>, Option<Verified>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        crate::tls::resume::set_verified_at(this.verified_at);
        let out = Pin::new(&mut this.future).poll(cx);
        this.verified_at = crate::tls::resume::take_verified_at();
        // Whatever the verifier left belongs to this connection: it ran inside this poll.
        if let Some(v) = take_verified() {
            this.verified = Some(v);
        }
        match out {
            Poll::Ready(out) => Poll::Ready((out, take_diagnosis(), this.verified.take())),
            Poll::Pending => {
                take_diagnosis();
                Poll::Pending
            }
        }
    }
}

fn now_system(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Turns a chain-verification failure into a diagnosis naming the certificate involved.
fn diagnose_chain(
    err: &TlsError,
    end_entity: &CertificateDer<'_>,
    trust: &TrustSummary,
    now: UnixTime,
    role: &str,
) -> Diagnosis {
    let who = PeerIdentity::from_der(end_entity).ok();
    let name = who.as_ref().map(|p| p.display_name()).unwrap_or_else(|| "?".into());
    let verdict = verdict_for_tls_error(err).0;
    let message = match err {
        TlsError::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => format!(
                "the {role} certificate for {name} was issued by '{}', which is not among {}; add \
                 that CA to the trust bundle, send the intermediate certificates with the leaf, or \
                 use a certificate from a trusted CA",
                who.as_ref().map(|p| p.issuer.as_str()).unwrap_or("?"),
                trust.describe(),
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "a certificate in the {role}'s chain for {name} has expired: not after {}, now {}; \
                 renew it",
                who.as_ref().map(|p| rfc3339(p.not_after)).unwrap_or_default(),
                rfc3339(now_system(now)),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "a certificate in the {role}'s chain for {name} is not valid yet: not before {}, \
                 now {}; check the clocks or wait",
                who.as_ref().map(|p| rfc3339(p.not_before)).unwrap_or_default(),
                rfc3339(now_system(now)),
            ),
            CertificateError::Revoked => format!(
                "the {role} certificate for {name} (serial {}) is revoked by a CRL in force",
                who.as_ref().map(|p| p.serial.as_str()).unwrap_or("?")
            ),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                let needed = if role == "client" { "clientAuth" } else { "serverAuth" };
                format!(
                    "the certificate for {name} is not valid for a {role}: its extended key usage \
                     lacks {needed} (e.g. a server certificate used as a client certificate); \
                     issue one for the {role} role"
                )
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                // The server verifier builds its own message with the asked-for name.
                format!("the server certificate for {name} does not cover the requested name")
            }
            CertificateError::BadSignature => format!(
                "a signature in the {role}'s chain for {name} does not verify \
                 (forged, corrupted, or signed by a different key with the same CA name)"
            ),
            CertificateError::UnknownRevocationStatus
            | CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => format!(
                "no usable CRL for the issuer of {name}: the CRL is missing or past its \
                 next-update time"
            ),
            other => format!("the {role} certificate for {name} was not accepted: {other}"),
        },
        other => format!("the {role} certificate for {name} was not accepted: {other}"),
    };
    Diagnosis { verdict, message }
}

fn diagnosis_of(result: Result<(), TlsError>) -> Option<Diagnosis> {
    let err = result.err()?;
    Some(
        take_diagnosis()
            .unwrap_or_else(|| Diagnosis { verdict: verdict_for_tls_error(&err).0, message: err.to_string() }),
    )
}

/// Refuses a verified peer the policy does not admit (allow-list, then the connection hook).
fn admit_by(policy: &Policy, peer: &PeerIdentity) -> Result<(), TlsError> {
    if let Err(why) = policy.admit(peer) {
        record(Verdict::PeerNotAllowed, why);
        return Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
    }
    Ok(())
}

/// What a verifier says of a peer on a resumed session, whose chain it verified when the session
/// was made: only what may have changed since is checked again — every certificate's validity
/// now, then `admit` (pin, allow-list, hook) — with the verdicts and messages of a full check.
fn check_resumed(
    chain: &[CertificateDer<'static>],
    peer: &PeerIdentity,
    role: &str,
    admit: impl FnOnce(&PeerIdentity) -> Result<(), TlsError>,
) -> Result<(), Diagnosis> {
    let (leaf, rest) = chain.split_first().ok_or_else(|| Diagnosis {
        verdict: Verdict::NoPeerCertificate,
        message: format!("the resumed session holds no {role} certificate"),
    })?;
    let now = UnixTime::now();
    let outside = match crate::tls::chains::validity(leaf, rest) {
        Some((from, _)) if now.as_secs() < from => Some(CertificateError::NotValidYet),
        Some((_, until)) if now.as_secs() > until => Some(CertificateError::Expired),
        Some(_) => None,
        None => Some(CertificateError::BadEncoding),
    };
    if let Some(ce) = outside {
        return Err(diagnose_chain(&TlsError::InvalidCertificate(ce), leaf, &TrustSummary::default(), now, role));
    }
    take_diagnosis();
    diagnosis_of(admit(peer)).map_or(Ok(()), Err)
}

impl ClientVerifier {
    fn admit(&self, peer: &PeerIdentity) -> Result<(), TlsError> {
        admit_by(&self.policy, peer)
    }

    /// Checks the client of a resumed session again (see [`check_resumed`]).
    pub(crate) fn check_resumed(
        &self,
        chain: &[CertificateDer<'static>],
        peer: &PeerIdentity,
    ) -> Result<(), Diagnosis> {
        check_resumed(chain, peer, "client", |p| self.admit(p))
    }

    /// Verifies an already-presented client chain again (after the trust material changed).
    pub(crate) fn recheck(&self, chain: &[CertificateDer<'static>]) -> Option<Diagnosis> {
        let (leaf, rest) = chain.split_first()?;
        take_diagnosis();
        let result = self.verify_client_cert(leaf, rest, UnixTime::now()).map(|_| ());
        take_verified();
        diagnosis_of(result)
    }
}

impl ServerVerifier {
    /// The pinned SPIFFE ID, then the policy.
    fn admit(&self, peer: &PeerIdentity) -> Result<(), TlsError> {
        if let Some(pinned) = &self.pinned_spiffe_id {
            if peer.spiffe_id.as_deref() != Some(pinned.as_str()) {
                record(
                    Verdict::PeerNotAllowed,
                    format!(
                        "the server's SPIFFE ID is {}, but this client pins {pinned}",
                        peer.spiffe_id.as_deref().unwrap_or("absent")
                    ),
                );
                return Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
            }
        }
        admit_by(&self.policy, peer)
    }

    /// Checks the server of a resumed session again (see [`check_resumed`]). Its name was
    /// checked when the session was made, and the session is only offered to that name.
    pub(crate) fn check_resumed(
        &self,
        chain: &[CertificateDer<'static>],
        peer: &PeerIdentity,
    ) -> Result<(), Diagnosis> {
        check_resumed(chain, peer, "server", |p| self.admit(p))
    }

    /// Verifies an already-presented server chain again, for the name it was dialled by.
    pub(crate) fn recheck(&self, chain: &[CertificateDer<'static>], name: &ServerName<'static>) -> Option<Diagnosis> {
        let (leaf, rest) = chain.split_first()?;
        take_diagnosis();
        let result = self.verify_server_cert(leaf, rest, name, &[], UnixTime::now()).map(|_| ());
        take_verified();
        diagnosis_of(result)
    }

    /// The chain check proper (webpki, then our diagnosis of a failure), for a cache miss.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<Arc<PeerIdentity>, TlsError> {
        let (peer, (inner, trust)) = preselect(&self.verifiers, end_entity, "server")?;
        let verified = inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        // With `name_optional` the pin is set, and checked next.
        let verified = match verified {
            Err(e) if is_name_error(&e) && self.name_optional => Ok(ServerCertVerified::assertion()),
            other => other,
        };
        if let Err(e) = verified {
            let mut d = diagnose_chain(&e, end_entity, trust, now, "server");
            if d.verdict == Verdict::NameMismatch {
                let mut n = peer.dns_sans.iter().map(|d| format!("dns:{d}")).collect::<Vec<_>>();
                n.extend(peer.ip_sans.iter().map(|i| format!("ip:{i}")));
                d.message = format!(
                    "asked for server name '{}', but the server's certificate covers only [{}]; \
                         set server_name to one of those, or reissue the certificate with that name",
                    server_name.to_str(),
                    n.join(", ")
                );
            }
            record(d.verdict, d.message);
            return Err(e);
        }
        Ok(Arc::new(peer))
    }
}

/// What a verifier knows about a peer's leaf before path validation: its identity, and the CA
/// set its trust domain selects. A leaf that is not a valid X509-SVID although it claims a
/// SPIFFE identity, or whose trust domain has no CAs here, is refused before webpki runs.
fn preselect<'a, V: ?Sized>(
    verifiers: &'a VerifierSet<V>,
    end_entity: &CertificateDer<'_>,
    role: &str,
) -> Result<(PeerIdentity, &'a (Arc<V>, TrustSummary)), TlsError> {
    let info = CertificateInfo::from_der(end_entity).map_err(|e| {
        record(Verdict::UnsupportedCertificate, format!("the {role} certificate is not valid X.509: {e}"));
        TlsError::InvalidCertificate(CertificateError::BadEncoding)
    })?;
    let name = info.identity.display_name();
    if let Some(why) = &info.svid_error {
        record(
            Verdict::UnsupportedCertificate,
            format!("the {role} certificate for {name} claims a SPIFFE identity but is not a valid X509-SVID: {why}"),
        );
        return Err(TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(InvalidSvid)))));
    }
    let domain = info.identity.spiffe_id.as_deref().and_then(|id| SpiffeId::parse(id).ok());
    match verifiers.select(domain.as_ref().map(|d| d.trust_domain_name())) {
        Ok(v) => Ok((info.identity, v)),
        Err(why) => {
            record(Verdict::UnknownIssuer, format!("the {role} certificate for {name} cannot be verified: {why}"));
            Err(TlsError::InvalidCertificate(CertificateError::UnknownIssuer))
        }
    }
}

#[derive(Debug)]
struct InvalidSvid;

impl std::fmt::Display for InvalidSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a valid X509-SVID")
    }
}

impl std::error::Error for InvalidSvid {}

/// The provider's signature algorithms, built once: they are consulted on every handshake.
fn signature_algorithms() -> &'static rustls::crypto::WebPkiSupportedAlgorithms {
    static ALGORITHMS: std::sync::OnceLock<rustls::crypto::WebPkiSupportedAlgorithms> = std::sync::OnceLock::new();
    ALGORITHMS.get_or_init(|| crate::tls::provider().signature_verification_algorithms)
}

/// Handshake signatures do not depend on the CA set: every set uses the same provider.
pub(crate) fn tls12_signature(
    m: &[u8],
    c: &CertificateDer<'_>,
    d: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, TlsError> {
    rustls::crypto::verify_tls12_signature(m, c, d, signature_algorithms())
}

pub(crate) fn tls13_signature(
    m: &[u8],
    c: &CertificateDer<'_>,
    d: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, TlsError> {
    rustls::crypto::verify_tls13_signature(m, c, d, signature_algorithms())
}

pub(crate) fn verify_schemes() -> Vec<SignatureScheme> {
    signature_algorithms().supported_schemes()
}

/// Server side: requires a client certificate, verifies it against the CAs of its trust
/// domain, and applies the allow-list.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub verifiers: VerifierSet<dyn ClientCertVerifier>,
    pub policy: Arc<Policy>,
    pub chains: VerifiedChains,
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.verifiers.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let key = chain_key(None, end_entity, intermediates);
        let peer = match self.chains.get(&key, now) {
            Some(peer) => peer,
            None => {
                let (peer, (inner, trust)) = preselect(&self.verifiers, end_entity, "client")?;
                if let Err(e) = inner.verify_client_cert(end_entity, intermediates, now) {
                    let d = diagnose_chain(&e, end_entity, trust, now, "client");
                    record(d.verdict, d.message);
                    return Err(e);
                }
                let peer = Arc::new(peer);
                self.chains.insert(key, peer.clone(), end_entity, intermediates, now);
                peer
            }
        };
        self.admit(&peer)?;
        hand_off(end_entity, peer);
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// Client side: verifies the server's chain (against the CAs of its trust domain) and name,
/// then the pinned SPIFFE ID and allow-list.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub verifiers: VerifierSet<dyn ServerCertVerifier>,
    pub policy: Arc<Policy>,
    pub pinned_spiffe_id: Option<String>,
    /// The pinned SPIFFE ID is the server's identity and no server name was configured: a
    /// certificate naming no host (an X509-SVID usually names none) passes without one, as
    /// SPIFFE's own TLS authorizers do. The chain, its validity and its revocation are checked
    /// all the same (webpki checks the name last, once the chain has verified).
    pub name_optional: bool,
    pub chains: VerifiedChains,
}

fn is_name_error(e: &TlsError) -> bool {
    matches!(
        e,
        TlsError::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let key = chain_key(Some(&server_name.to_str()), end_entity, intermediates);
        let peer = match self.chains.get(&key, now) {
            Some(peer) => peer,
            None => {
                let peer = self.verify_chain(end_entity, intermediates, server_name, ocsp_response, now)?;
                self.chains.insert(key, peer.clone(), end_entity, intermediates, now);
                peer
            }
        };
        self.admit(&peer)?;
        hand_off(end_entity, peer);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

/// The catalogue verdict, side and alert name for a rustls error.
pub(crate) fn verdict_for_tls_error(err: &TlsError) -> (Verdict, Side, Option<&'static str>) {
    use CertificateError as C;
    let local = |v| (v, Side::Local, None);
    match err {
        TlsError::InvalidCertificate(ce) => local(match ce {
            C::UnknownIssuer => Verdict::UnknownIssuer,
            C::BadSignature => Verdict::BadSignature,
            C::Expired | C::ExpiredContext { .. } => Verdict::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => Verdict::NotYetValid,
            C::Revoked => Verdict::Revoked,
            C::UnknownRevocationStatus | C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => {
                Verdict::CrlStale
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => Verdict::NameMismatch,
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => Verdict::BadKeyUsage,
            C::ApplicationVerificationFailure => Verdict::PeerNotAllowed,
            _ => Verdict::UnsupportedCertificate,
        }),
        TlsError::NoCertificatesPresented => local(Verdict::NoPeerCertificate),
        TlsError::AlertReceived(alert) => (Verdict::PeerAlert, Side::Remote, Some(alert_name(*alert))),
        TlsError::PeerIncompatible(pi) => local(match pi {
            PeerIncompatible::NoCipherSuitesInCommon
            | PeerIncompatible::NoKxGroupsInCommon
            | PeerIncompatible::NoSignatureSchemesInCommon
            | PeerIncompatible::NoCertificateRequestSignatureSchemesInCommon => Verdict::NoSharedCipher,
            _ => Verdict::ProtocolVersion,
        }),
        TlsError::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType | rustls::InvalidMessage::UnknownProtocolVersion,
        ) => local(Verdict::NotTls),
        TlsError::DecryptError => local(Verdict::BadSignature),
        _ => local(Verdict::Io),
    }
}

/// The alert's name as in RFC 8446 (`unknown_ca`, `certificate_required`, …).
pub(crate) fn alert_name(alert: AlertDescription) -> &'static str {
    use AlertDescription as A;
    match alert {
        A::CloseNotify => "close_notify",
        A::UnexpectedMessage => "unexpected_message",
        A::BadRecordMac => "bad_record_mac",
        A::RecordOverflow => "record_overflow",
        A::HandshakeFailure => "handshake_failure",
        A::BadCertificate => "bad_certificate",
        A::UnsupportedCertificate => "unsupported_certificate",
        A::CertificateRevoked => "certificate_revoked",
        A::CertificateExpired => "certificate_expired",
        A::CertificateUnknown => "certificate_unknown",
        A::IllegalParameter => "illegal_parameter",
        A::UnknownCA => "unknown_ca",
        A::AccessDenied => "access_denied",
        A::DecodeError => "decode_error",
        A::DecryptError => "decrypt_error",
        A::ProtocolVersion => "protocol_version",
        A::InsufficientSecurity => "insufficient_security",
        A::InternalError => "internal_error",
        A::MissingExtension => "missing_extension",
        A::UnsupportedExtension => "unsupported_extension",
        A::UnrecognisedName => "unrecognized_name",
        A::CertificateRequired => "certificate_required",
        A::NoApplicationProtocol => "no_application_protocol",
        _ => "other",
    }
}

/// What a peer's alert most likely means about our own configuration.
fn alert_hint(alert: &str) -> &'static str {
    match alert {
        "unknown_ca" => "the peer does not trust the CA that issued our certificate",
        "certificate_required" => "the peer requires a client certificate and we sent none",
        "access_denied" => "the peer verified our certificate but its policy does not allow our identity",
        "certificate_expired" => "the peer says our certificate is expired or not yet valid",
        "certificate_revoked" => "the peer says our certificate is revoked",
        "bad_certificate" | "unsupported_certificate" => {
            "the peer rejected our certificate (wrong key usage, encoding or name)"
        }
        "decrypt_error" => "a signature did not verify on the peer's side",
        "protocol_version" => "no TLS version in common (we speak TLS 1.3 unless 1.2 is enabled)",
        "handshake_failure" | "insufficient_security" => {
            "no cipher suite, key exchange group or signature scheme in common"
        }
        _ => "the peer refused the handshake",
    }
}

/// Builds the user-facing error for a failed handshake.
pub(crate) fn handshake_error(io: &std::io::Error, diag: Option<Diagnosis>, ours: Option<&str>) -> Error {
    let tls = io.get_ref().and_then(|e| e.downcast_ref::<TlsError>());
    match (tls, diag) {
        (Some(e), Some(d)) => {
            let (_, side, alert) = verdict_for_tls_error(e);
            Error::Handshake { verdict: d.verdict, side, alert, message: d.message }
        }
        (Some(e), None) => tls_error(e, ours),
        (None, _) => io_handshake_error(io),
    }
}

/// A rustls error seen outside a verifier (e.g. an alert received after the handshake).
pub(crate) fn tls_error(e: &TlsError, ours: Option<&str>) -> Error {
    let (verdict, side, alert) = verdict_for_tls_error(e);
    let message = match (verdict, alert) {
        (Verdict::PeerAlert, Some(a)) => {
            format!("{}{}", alert_hint(a), ours.map(|o| format!(" (our certificate: {o})")).unwrap_or_default())
        }
        (Verdict::NoPeerCertificate, _) => "the peer presented no certificate; a client certificate is required".into(),
        (Verdict::NotTls, _) => "the peer did not speak TLS (plaintext on a TLS port?)".into(),
        (Verdict::ProtocolVersion, _) => format!(
            "no TLS version in common ({e}); trustwire speaks TLS 1.3, and TLS 1.2 only when \
             min_version = \"1.2\""
        ),
        (Verdict::NoSharedCipher, _) => format!("nothing in common to negotiate: {e}"),
        _ => e.to_string(),
    };
    Error::Handshake { verdict, side, alert, message }
}

fn io_handshake_error(io: &std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    let message = match io.kind() {
        K::UnexpectedEof => "the peer closed the connection during the handshake \
                             (it may have refused us without an alert, or not speak TLS)"
            .to_string(),
        _ => format!("the connection broke during the handshake: {io}"),
    };
    Error::Handshake { verdict: Verdict::Io, side: Side::Local, alert: None, message }
}
