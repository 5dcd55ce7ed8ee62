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
    IdentityChanged,
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
from ._native import Proxy
from ._native import verify_identity_token as _verify_identity_token
from ._rpc import Client, Response, Server

import dataclasses as _dataclasses
from typing import Mapping as _Mapping


@_dataclasses.dataclass(frozen=True)
class IdentityToken:
    """The caller a trustwire server-side proxy vouched for (see the README's token format)."""

    key_id: str
    spiffe_id: str | None
    fingerprint_sha256: str
    not_after: int
    issued_at: int


class IdentityTokenError(TrustwireError):
    """A token that does not verify; ``reason`` is ``bad_format``, ``unknown_key``, ``bad_mac``
    or ``expired``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def verify_identity_token(token: bytes, keys: _Mapping[str, bytes]) -> IdentityToken:
    """Verifies the ``authentication_data`` a trustwire proxy put into a baidu_std request.

    ``keys`` maps key ids to secrets. Raises :class:`IdentityTokenError` naming the reason.
    """
    reason, message, key_id, spiffe_id, fingerprint, not_after, issued_at = _verify_identity_token(
        bytes(token), dict(keys)
    )
    if reason is not None:
        raise IdentityTokenError(reason, message)
    return IdentityToken(key_id, spiffe_id, fingerprint, not_after, issued_at)

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
    # proxy mode and the brpc identity bridge
    "Proxy",
    "IdentityToken",
    "IdentityTokenError",
    "verify_identity_token",
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
    "IdentityChanged",
]
