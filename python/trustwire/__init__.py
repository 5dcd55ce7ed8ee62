"""trustwire: mutual-TLS RPC over brpc's baidu_std protocol.

The TLS handshake, peer verification, policy and credential rotation all happen in trustwire's
Rust core; this package gives it a Python shape: :class:`TlsConfig`, :class:`Server`,
:class:`Client`, and one exception class per failure-catalogue verdict.
"""

from __future__ import annotations

from ._native import (
    BadKeyUsage,
    BadPem,
    BadSignature,
    CallContext,
    ConfigError,
    CredentialsError,
    CrlStale,
    Event,
    Expired,
    HandshakeError,
    HandshakeTimeout,
    Io,
    KeyMismatch,
    MethodNotAllowed,
    NameMismatch,
    NoPeerCertificate,
    NoSharedCipher,
    NotTls,
    NotYetValid,
    PeerAlert,
    PeerIdentity,
    PeerNotAllowed,
    ProtocolVersion,
    Revoked,
    RpcError,
    Timeout,
    TlsConfig,
    TransportError,
    TrustwireError,
    UnknownIssuer,
    UnsupportedCertificate,
    __version__,
    metrics_text,
)
from ._rpc import Client, Response, Server

__all__ = [
    "__version__",
    # configuration
    "TlsConfig",
    "Event",
    # RPC
    "Server",
    "Client",
    "Response",
    "CallContext",
    "PeerIdentity",
    "metrics_text",
    # errors
    "TrustwireError",
    "HandshakeError",
    "RpcError",
    "Timeout",
    "CredentialsError",
    "ConfigError",
    "TransportError",
    # one HandshakeError subclass per verdict of the failure catalogue
    "UnknownIssuer",
    "BadSignature",
    "Expired",
    "NotYetValid",
    "Revoked",
    "CrlStale",
    "NameMismatch",
    "BadKeyUsage",
    "UnsupportedCertificate",
    "NoPeerCertificate",
    "PeerNotAllowed",
    "MethodNotAllowed",
    "ProtocolVersion",
    "NoSharedCipher",
    "HandshakeTimeout",
    "PeerAlert",
    "NotTls",
    "Io",
    "KeyMismatch",
    "BadPem",
]
