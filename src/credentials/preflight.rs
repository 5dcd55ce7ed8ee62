//! Pre-flight handshakes: before new material goes live, run a real TLS handshake in memory
//! between the new identity and a peer that verifies it against the new trust bundle, in each
//! role the store serves. What passes has been proven to sign, to chain to a trusted CA, and
//! to carry the right key usage.

use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::error::{Error, Verdict};
use crate::tls::identity::PeerIdentity;
use crate::tls::verify::verdict_for_tls_error;
use crate::tls::{provider, Identity, TlsProfile, TrustBundle};

/// Records the first verification failure with a message naming the certificate.
#[derive(Debug, Default)]
struct Failure(Mutex<Option<Error>>);

impl Failure {
    fn record(&self, err: &TlsError, end_entity: &CertificateDer<'_>, role: &str, trust: &TrustBundle) {
        let who = PeerIdentity::from_der(end_entity).ok();
        let name = who.as_ref().map(|p| p.display_name()).unwrap_or_else(|| "?".into());
        let verdict = verdict_for_tls_error(err).0;
        let detail = match (verdict, &who) {
            (Verdict::UnknownIssuer, Some(p)) => format!(
                "it was issued by '{}', which is not among the CAs in the new trust bundle [{}]",
                p.issuer,
                trust_subjects(trust)
            ),
            (Verdict::BadKeyUsage, _) => {
                let eku = if role == "server" { "serverAuth" } else { "clientAuth" };
                format!("its extended key usage lacks {eku}")
            }
            _ => err.to_string(),
        };
        let message = format!("our new certificate for {name} cannot be used as a {role}: {detail}");
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(Error::credentials(Some(verdict), message));
    }

    fn take(&self) -> Option<Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn trust_subjects(trust: &TrustBundle) -> String {
    trust
        .roots
        .iter()
        .filter_map(|c| PeerIdentity::from_der(c).ok())
        .map(|p| format!("'{}'", p.subject))
        .collect::<Vec<_>>()
        .join(", ")
}

fn roots(trust: &TrustBundle) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for ca in &trust.roots {
        store
            .add(ca.clone())
            .map_err(|e| Error::credentials(Some(Verdict::UnsupportedCertificate), format!("trust bundle: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// Verifies the server chain like a client of ours would, except for the name: the names
/// clients will ask for are theirs to choose.
#[derive(Debug)]
struct ServerChainCheck {
    inner: Arc<WebPkiServerVerifier>,
    failure: Arc<Failure>,
    trust: TrustBundle,
}

impl ServerCertVerifier for ServerChainCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                self.failure.record(&e, end_entity, "server", &self.trust);
                Err(e)
            }
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies a client chain with the new trust, recording why it fails.
#[derive(Debug)]
struct ClientChainCheck {
    inner: Arc<dyn ClientCertVerifier>,
    failure: Arc<Failure>,
    trust: TrustBundle,
}

impl ClientCertVerifier for ClientChainCheck {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner.verify_client_cert(end_entity, intermediates, now).inspect_err(|e| {
            self.failure.record(e, end_entity, "client", &self.trust);
        })
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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
        rustls::crypto::verify_tls12_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config_error(e: TlsError) -> Error {
    Error::credentials(None, format!("the new identity cannot be used: {e}"))
}

/// Our identity as a server, verified by a client holding the new trust bundle.
pub(super) fn server(identity: &Identity, trust: &TrustBundle, template: &TlsProfile) -> Result<(), Error> {
    let failure = Arc::new(Failure::default());
    let versions = template.versions();
    let server = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_config_error)?;
    let inner = WebPkiServerVerifier::builder_with_provider(roots(trust)?, Arc::new(provider()))
        .build()
        .map_err(|e| Error::credentials(None, format!("trust bundle: {e}")))?;
    let client = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerChainCheck {
            inner,
            failure: failure.clone(),
            trust: trust.clone(),
        }))
        .with_no_client_auth();
    run(client, server, &failure, "server")
}

/// Our identity as a client, verified by a server holding the new trust bundle.
pub(super) fn client(identity: &Identity, trust: &TrustBundle, template: &TlsProfile) -> Result<(), Error> {
    let failure = Arc::new(Failure::default());
    let versions = template.versions();
    let (peer_cert, peer_key) = throwaway_server()?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots(trust)?, Arc::new(provider()))
        .build()
        .map_err(|e| Error::credentials(None, format!("trust bundle: {e}")))?;
    let server = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .with_client_cert_verifier(Arc::new(ClientChainCheck { inner, failure: failure.clone(), trust: trust.clone() }))
        .with_single_cert(vec![peer_cert.clone()], peer_key.clone_key())
        .map_err(tls_config_error)?;
    let client = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(versions)
        .map_err(tls_config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer(peer_cert)))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_config_error)?;
    run(client, server, &failure, "client")
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
fn run(client: ClientConfig, server: ServerConfig, failure: &Failure, role: &str) -> Result<(), Error> {
    let name = ServerName::try_from("preflight.trustwire.invalid").expect("a valid DNS name");
    let mut c = ClientConnection::new(Arc::new(client), name).map_err(tls_config_error)?;
    let mut s = ServerConnection::new(Arc::new(server)).map_err(tls_config_error)?;
    let mut buf = Vec::with_capacity(16 * 1024);
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
            return Err(failure.take().unwrap_or_else(|| {
                Error::credentials(
                    Some(verdict_for_tls_error(&e).0),
                    format!("the pre-flight handshake of our new identity as a {role} failed: {e}"),
                )
            }));
        }
    }
    Err(Error::credentials(None, format!("the pre-flight handshake as a {role} did not finish")))
}
