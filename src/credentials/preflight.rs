//! Pre-flight handshakes: before new material goes live, run a real TLS handshake in memory
//! between the new identity and a peer that verifies it with the same verifiers our handshakes
//! use (the CA set of our trust domain, the CRLs in force), in each role the store serves. What
//! passes has been proven to sign, to chain to a trusted CA of its trust domain, not to be
//! revoked, and to carry the right key usage.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, Error as TlsError, ServerConfig,
    ServerConnection, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Verdict};
use crate::tls::chains::VerifiedChains;
use crate::tls::policy::Policy;
use crate::tls::verify::{
    take_diagnosis, take_verified, tls12_signature, tls13_signature, verdict_for_tls_error, verify_schemes,
    ClientVerifier, ServerVerifier,
};
use crate::tls::{provider, trust, Identity, TlsProfile, TrustBundle};

/// The verifier a client of ours would use on our server certificate, except for the name: the
/// names clients will ask for are theirs to choose. Policy is left out too (it is the peer's).
#[derive(Debug)]
struct ServerChainCheck(ServerVerifier);

impl ServerCertVerifier for ServerChainCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                take_diagnosis();
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The new profile as our peers' verifiers see the material: our identity, the new trust, no
/// policy (who may connect is the peer's business).
fn peer_view(identity: &Identity, trust: &TrustBundle, template: &TlsProfile) -> TlsProfile {
    let mut p = template.clone();
    p.identity = Some(identity.clone());
    p.trust = trust.clone();
    p.policy = Policy::default();
    p.server_spiffe_id = None;
    p
}

/// Accepts exactly one certificate: the throwaway server of the client pre-flight.
#[derive(Debug)]
struct PinnedServer(CertificateDer<'static>);

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if end_entity.as_ref() == self.0.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        verify_schemes()
    }
}

fn tls_config_error(e: TlsError) -> Error {
    Error::credentials(None, format!("the new identity cannot be used: {e}"))
}

/// Our identity as a server, verified the way our clients verify servers (CA set of our trust
/// domain, CRLs in force), by a client holding the new trust bundle.
/// `Ok(true)` when our issuer is outside `trust` and `outside_ok` let that pass.
pub(super) fn server(
    identity: &Identity,
    trust: &TrustBundle,
    template: &TlsProfile,
    outside_ok: bool,
) -> Result<bool, Error> {
    outside_our_bundle(server_against(identity, trust, template), identity, trust, "server", outside_ok)
}

fn server_against(identity: &Identity, trust: &TrustBundle, template: &TlsProfile) -> Result<(), Error> {
    let view = peer_view(identity, trust, template);
    let versions = template.versions();
    let server = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .with_no_client_auth()
        .with_cert_resolver(identity.resolver());
    let resolved = trust.resolve(view.local_trust_domain().as_ref())?;
    let verifier = ServerVerifier {
        verifiers: trust::server_verifiers(&resolved, trust)?,
        policy: Arc::new(Policy::default()),
        pinned_spiffe_id: None,
        name_optional: false,
        chains: VerifiedChains::for_bundle(trust),
    };
    let client = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerChainCheck(verifier)))
        .with_no_client_auth();
    run(client, server, "server")
}

/// Our identity as a client, verified the way our servers verify clients, by a server holding
/// the new trust bundle.
pub(super) fn client(
    identity: &Identity,
    trust: &TrustBundle,
    template: &TlsProfile,
    outside_ok: bool,
) -> Result<bool, Error> {
    outside_our_bundle(client_against(identity, trust, template), identity, trust, "client", outside_ok)
}

fn client_against(identity: &Identity, trust: &TrustBundle, template: &TlsProfile) -> Result<(), Error> {
    let view = peer_view(identity, trust, template);
    let versions = template.versions();
    let (peer_cert, peer_key) = throwaway_server()?;
    let resolved = trust.resolve(view.local_trust_domain().as_ref())?;
    let verifier = ClientVerifier {
        verifiers: trust::client_verifiers(&resolved, trust)?,
        policy: Arc::new(Policy::default()),
        chains: VerifiedChains::for_bundle(trust),
    };
    let server = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![peer_cert.clone()], peer_key.clone_key())
        .map_err(tls_config_error)?;
    let client = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer(peer_cert)))
        .with_client_cert_resolver(identity.resolver());
    run(client, server, "client")
}

/// A self-signed certificate for the client pre-flight's in-memory server, made once.
fn throwaway_server() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
    static CELL: OnceLock<Result<(CertificateDer<'static>, Vec<u8>), String>> = OnceLock::new();
    let made = CELL.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let params = rcgen::CertificateParams::new(vec!["preflight.trustwire.invalid".to_string()])
            .map_err(|e| e.to_string())?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok((cert.der().clone(), key.serialize_der()))
    });
    match made {
        Ok((cert, key)) => Ok((cert.clone(), PrivateKeyDer::Pkcs8(key.clone().into()))),
        Err(e) => Err(Error::credentials(None, format!("cannot make the pre-flight peer: {e}"))),
    }
}

/// Drives both ends in memory until the handshake completes or fails.
fn run(client: ClientConfig, server: ServerConfig, role: &str) -> Result<(), Error> {
    let result = drive(client, server, role);
    // No connection takes the identity the verifiers handed off here.
    take_verified();
    result
}

fn drive(client: ClientConfig, server: ServerConfig, role: &str) -> Result<(), Error> {
    let name = ServerName::try_from("preflight.trustwire.invalid").expect("a valid DNS name");
    let mut c = ClientConnection::new(Arc::new(client), name).map_err(tls_config_error)?;
    let mut s = ServerConnection::new(Arc::new(server)).map_err(tls_config_error)?;
    let mut buf = Vec::with_capacity(16 * 1024);
    // The verifiers record why they refuse; start from a clean slot on this thread.
    take_diagnosis();
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            return Ok(());
        }
        let step = (|| -> Result<(), TlsError> {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).map_err(|e| TlsError::General(e.to_string()))?;
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).map_err(|e| TlsError::General(e.to_string()))?;
                s.process_new_packets()?;
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).map_err(|e| TlsError::General(e.to_string()))?;
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).map_err(|e| TlsError::General(e.to_string()))?;
                c.process_new_packets()?;
            }
            Ok(())
        })();
        if let Err(e) = step {
            return Err(match take_diagnosis() {
                Some(d) => Error::credentials(
                    Some(d.verdict),
                    format!("our new certificate cannot be used as a {role}: {}", d.message),
                ),
                None => Error::credentials(
                    Some(verdict_for_tls_error(&e).0),
                    format!("the pre-flight handshake of our new identity as a {role} failed: {e}"),
                ),
            });
        }
    }
    Err(Error::credentials(None, format!("the pre-flight handshake as a {role} did not finish")))
}

/// Our certificate may come from another CA than the ones we trust for peers (separate client
/// and server CAs are common): when the pre-flight's only objection is an issuer outside our
/// bundle, and no CA in the bundle has that issuer's name (which would mean a missing
/// intermediate, a mistake every peer would hit too), check what we can without the issuer:
/// each certificate in the chain signed by the next, every one within its validity window, the
/// leaf's extended key usage for `role`; the key was checked against the certificate already.
/// Then the peer side must trust our issuer, which is logged. Only when `outside_ok`: a store
/// whose certificate chained to its bundle keeps refusing a reload that would break that.
fn outside_our_bundle(
    checked: Result<(), Error>,
    identity: &Identity,
    trust: &TrustBundle,
    role: &str,
    outside_ok: bool,
) -> Result<bool, Error> {
    let Err(e) = checked else { return Ok(false) };
    if e.verdict() != Some(Verdict::UnknownIssuer) || !outside_ok {
        return Err(e);
    }
    let parsed = identity
        .chain
        .iter()
        .map(|c| X509Certificate::from_der(c.as_ref()).map(|(_, x)| x))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| e.clone())?;
    let Some(top) = parsed.last() else { return Err(e) };
    let issuer = top.issuer().as_raw();
    let ours = trust.roots.iter().chain(trust.federated.values().flatten());
    let named_in_bundle =
        ours.filter_map(|c| X509Certificate::from_der(c.as_ref()).ok()).any(|(_, ca)| ca.subject().as_raw() == issuer);
    if named_in_bundle {
        return Err(e);
    }
    let fail = |verdict, why: String| {
        Err(Error::credentials(Some(verdict), format!("our new certificate cannot be used as a {role}: {why}")))
    };
    for pair in parsed.windows(2) {
        if pair[0].verify_signature(Some(pair[1].public_key())).is_err() {
            return fail(
                Verdict::BadSignature,
                format!(
                    "'{}' in our chain is not signed by the next certificate, '{}'",
                    pair[0].subject(),
                    pair[1].subject()
                ),
            );
        }
    }
    for c in &parsed {
        let v = c.validity();
        if !v.is_valid() {
            let verdict = match v.time_to_expiration() {
                None if v.not_before.timestamp() > UnixTime::now().as_secs() as i64 => Verdict::NotYetValid,
                _ => Verdict::Expired,
            };
            return fail(verdict, format!("'{}' is valid from {} to {}", c.subject(), v.not_before, v.not_after));
        }
    }
    if let Ok(Some(eku)) = parsed[0].extended_key_usage() {
        let eku = eku.value;
        let allowed = eku.any || if role == "server" { eku.server_auth } else { eku.client_auth };
        if !allowed {
            return fail(
                Verdict::BadKeyUsage,
                format!("the certificate's extended key usage does not allow {role} authentication"),
            );
        }
    }
    tracing::warn!(
        role,
        issuer = %top.issuer(),
        "our certificate's issuer is not in our trust bundle: peers must trust it to accept us as a {role}"
    );
    Ok(true)
}
