//! The failure catalogue and the one error type every layer returns.
//!
//! A [`Verdict`] is a stable name for why a handshake or an authorization failed. The same names
//! are the C result codes, the Python exception classes, the metric labels and the log fields, so
//! they are added to and never renamed or renumbered.

use std::fmt;
use std::time::Duration;

/// Why a handshake or an authorization failed. Numbers are stable and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
#[non_exhaustive]
pub enum Verdict {
    /// The chain does not lead to a trusted CA.
    UnknownIssuer = 1,
    /// A signature in the chain or the handshake does not verify.
    BadSignature = 2,
    /// The certificate's not-after is in the past.
    Expired = 3,
    /// The certificate's not-before is in the future.
    NotYetValid = 4,
    /// Listed in a CRL in force.
    Revoked = 5,
    /// A CRL needed for the decision is past its next-update time.
    CrlStale = 6,
    /// The server certificate does not cover the name the client asked for.
    NameMismatch = 7,
    /// The certificate is not valid for this role (e.g. a server certificate used by a client).
    BadKeyUsage = 8,
    /// Algorithm or encoding not accepted.
    UnsupportedCertificate = 9,
    /// The peer presented no certificate.
    NoPeerCertificate = 10,
    /// Verified, but the peer's identity is not in the allow-list.
    PeerNotAllowed = 11,
    /// Verified and allowed to connect, but not to call this service/method.
    MethodNotAllowed = 12,
    /// No protocol version in common.
    ProtocolVersion = 13,
    /// No cipher suite or key exchange group in common.
    NoSharedCipher = 14,
    /// The handshake did not finish in time.
    HandshakeTimeout = 15,
    /// The peer rejected us and said so with a TLS alert.
    PeerAlert = 16,
    /// The peer did not speak TLS (e.g. plaintext sent to the TLS port).
    NotTls = 17,
    /// The connection broke, or a credential file could not be read.
    Io = 18,
    /// Our new private key does not belong to our new certificate.
    KeyMismatch = 19,
    /// Credential material is not valid PEM, or is empty or cut short (e.g. half-written).
    BadPem = 20,
    /// A reload would change our own SPIFFE ID (or trust domain); refused unless allowed.
    IdentityChanged = 21,
    /// Our private key's token (PKCS#11) is absent, refuses login, lacks the key object, or
    /// failed while signing.
    KeyUnavailable = 22,
}

impl Verdict {
    /// Every verdict, in number order.
    pub const ALL: [Verdict; 22] = [
        Verdict::UnknownIssuer,
        Verdict::BadSignature,
        Verdict::Expired,
        Verdict::NotYetValid,
        Verdict::Revoked,
        Verdict::CrlStale,
        Verdict::NameMismatch,
        Verdict::BadKeyUsage,
        Verdict::UnsupportedCertificate,
        Verdict::NoPeerCertificate,
        Verdict::PeerNotAllowed,
        Verdict::MethodNotAllowed,
        Verdict::ProtocolVersion,
        Verdict::NoSharedCipher,
        Verdict::HandshakeTimeout,
        Verdict::PeerAlert,
        Verdict::NotTls,
        Verdict::Io,
        Verdict::KeyMismatch,
        Verdict::BadPem,
        Verdict::IdentityChanged,
        Verdict::KeyUnavailable,
    ];

    /// The stable snake_case name (`unknown_issuer`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::UnknownIssuer => "unknown_issuer",
            Verdict::BadSignature => "bad_signature",
            Verdict::Expired => "expired",
            Verdict::NotYetValid => "not_yet_valid",
            Verdict::Revoked => "revoked",
            Verdict::CrlStale => "crl_stale",
            Verdict::NameMismatch => "name_mismatch",
            Verdict::BadKeyUsage => "bad_key_usage",
            Verdict::UnsupportedCertificate => "unsupported_certificate",
            Verdict::NoPeerCertificate => "no_peer_certificate",
            Verdict::PeerNotAllowed => "peer_not_allowed",
            Verdict::MethodNotAllowed => "method_not_allowed",
            Verdict::ProtocolVersion => "protocol_version",
            Verdict::NoSharedCipher => "no_shared_cipher",
            Verdict::HandshakeTimeout => "handshake_timeout",
            Verdict::PeerAlert => "peer_alert",
            Verdict::NotTls => "not_tls",
            Verdict::Io => "io",
            Verdict::KeyMismatch => "key_mismatch",
            Verdict::BadPem => "bad_pem",
            Verdict::IdentityChanged => "identity_changed",
            Verdict::KeyUnavailable => "key_unavailable",
        }
    }

    /// The stable number (the C enum value).
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Looks a verdict up by its stable name.
    pub fn from_name(name: &str) -> Option<Verdict> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which end of the connection made the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// We refused the peer.
    Local,
    /// The peer refused us (usually with a TLS alert).
    Remote,
}

impl Side {
    pub const fn name(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "we refused the peer",
            Side::Remote => "the peer refused us",
        })
    }
}

/// brpc error codes a server puts in `error_code` (src/brpc/errno.proto).
pub mod codes {
    pub const ENOSERVICE: i32 = 1001;
    pub const ENOMETHOD: i32 = 1002;
    pub const EREQUEST: i32 = 1003;
    pub const ERPCAUTH: i32 = 1004;
    pub const ERPCTIMEDOUT: i32 = 1008;
    pub const EFAILEDSOCKET: i32 = 1009;
    pub const EOVERCROWDED: i32 = 1011;
    pub const EEOF: i32 = 1014;
    pub const ESSL: i32 = 1016;
    pub const EINTERNAL: i32 = 2001;
    pub const ERESPONSE: i32 = 2002;
    pub const ELOGOFF: i32 = 2003;
    pub const ELIMIT: i32 = 2004;

    /// The brpc name of a code, e.g. `ENOMETHOD`, when it is one of brpc's.
    pub fn name(code: i32) -> Option<&'static str> {
        Some(match code {
            ENOSERVICE => "ENOSERVICE",
            ENOMETHOD => "ENOMETHOD",
            EREQUEST => "EREQUEST",
            ERPCAUTH => "ERPCAUTH",
            ERPCTIMEDOUT => "ERPCTIMEDOUT",
            EFAILEDSOCKET => "EFAILEDSOCKET",
            EOVERCROWDED => "EOVERCROWDED",
            EEOF => "EEOF",
            ESSL => "ESSL",
            EINTERNAL => "EINTERNAL",
            ERESPONSE => "ERESPONSE",
            ELOGOFF => "ELOGOFF",
            ELIMIT => "ELIMIT",
            _ => return None,
        })
    }
}

/// Every error trustwire reports. Each says what happened and, where it can, what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TLS handshake failed, or the peer was refused by policy at the handshake.
    #[error("handshake failed [{verdict}] ({side}){}: {message}", alert.map(|a| format!(", alert {a}")).unwrap_or_default())]
    Handshake {
        verdict: Verdict,
        side: Side,
        /// The TLS alert received (side = Remote) or sent, when there was one.
        alert: Option<&'static str>,
        message: String,
    },
    /// The server answered the call with an error (brpc code and text).
    #[error("server returned error {code}{}: {text}", codes::name(*code).map(|n| format!(" ({n})")).unwrap_or_default())]
    Rpc { code: i32, text: String },
    /// The call did not complete in time.
    #[error("timed out after {}ms: {message}", after.as_millis())]
    Timeout { after: Duration, message: String },
    /// The connection broke after the handshake, or could not be opened.
    #[error("transport error: {message}")]
    Transport { message: String },
    /// The peer sent bytes that are not valid baidu_std.
    #[error("protocol error: {message}")]
    Protocol { message: String },
    /// Certificates, keys or trust material could not be used.
    #[error("credentials rejected{}: {message}", verdict.map(|v| format!(" [{v}]")).unwrap_or_default())]
    Credentials { verdict: Option<Verdict>, message: String },
    /// A setting is invalid.
    #[error("invalid configuration: {message}")]
    Config { message: String },
    /// The client or server has been shut down.
    #[error("shut down: {message}")]
    Shutdown { message: String },
}

impl Error {
    /// The catalogue verdict, for handshake and authorization failures.
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Error::Handshake { verdict, .. } => Some(*verdict),
            Error::Credentials { verdict, .. } => *verdict,
            Error::Rpc { code, text } if *code == codes::ERPCAUTH => {
                text.contains(Verdict::MethodNotAllowed.name()).then_some(Verdict::MethodNotAllowed)
            }
            _ => None,
        }
    }

    /// Who decided, for handshake failures.
    pub fn side(&self) -> Option<Side> {
        match self {
            Error::Handshake { side, .. } => Some(*side),
            _ => None,
        }
    }

    /// The server's brpc error code, for errors the server answered with.
    pub fn rpc_code(&self) -> Option<i32> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A stable short name of the error's kind (`handshake`, `rpc`, `timeout`, …).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Handshake { .. } => "handshake",
            Error::Rpc { .. } => "rpc",
            Error::Timeout { .. } => "timeout",
            Error::Transport { .. } => "transport",
            Error::Protocol { .. } => "protocol",
            Error::Credentials { .. } => "credentials",
            Error::Config { .. } => "config",
            Error::Shutdown { .. } => "shutdown",
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config { message: message.into() }
    }

    pub(crate) fn credentials(verdict: Option<Verdict>, message: impl Into<String>) -> Self {
        Error::Credentials { verdict, message: message.into() }
    }

    pub(crate) fn transport(message: impl Into<String>) -> Self {
        Error::Transport { message: message.into() }
    }
}

/// Result with trustwire's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
