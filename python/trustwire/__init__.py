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
    CallMetadata,
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
    KeyUnavailable,
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
from . import aio
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
    #: The proxy route that issued the token.
    audience: str = ""


class IdentityTokenError(TrustwireError):
    """A token that does not verify. ``reason`` is its stable name; each reason has its own
    subclass (``TokenBadMac`` for ``bad_mac``, …), so a handler can catch just one."""

    reason = "identity_token"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class TokenBadFormat(IdentityTokenError):
    """Not a trustwire identity token."""


class TokenUnsupportedVersion(IdentityTokenError):
    """A trustwire token of another format version (``tw1`` tokens carry no audience)."""


class TokenUnknownKey(IdentityTokenError):
    """Signed with a key id this verifier was not given."""


class TokenBadMac(IdentityTokenError):
    """The MAC does not verify: the wrong secret, or a tampered token."""


class TokenWrongAudience(IdentityTokenError):
    """Issued by another proxy route than the one in front of this service."""


class TokenExpired(IdentityTokenError):
    """The caller's certificate has expired."""


class TokenTooOld(IdentityTokenError):
    """Issued longer ago than ``max_age``."""


class TokenIssuedInFuture(IdentityTokenError):
    """Issued more than a minute ahead of this clock."""


_TOKEN_ERRORS: dict[str, type[IdentityTokenError]] = {
    "bad_format": TokenBadFormat,
    "unsupported_version": TokenUnsupportedVersion,
    "unknown_key": TokenUnknownKey,
    "bad_mac": TokenBadMac,
    "wrong_audience": TokenWrongAudience,
    "expired": TokenExpired,
    "too_old": TokenTooOld,
    "issued_in_future": TokenIssuedInFuture,
}

#: A sensible ``max_age`` (seconds), and the one a proxy route assumes unless configured.
DEFAULT_TOKEN_MAX_AGE = 300.0


def verify_identity_token(
    token: bytes, keys: _Mapping[str, bytes], *, audience: str, max_age: float = DEFAULT_TOKEN_MAX_AGE
) -> IdentityToken:
    """Verifies the ``authentication_data`` a trustwire proxy put into a baidu_std request.

    ``keys`` maps key ids to secrets; ``audience`` is the name of the proxy route in front of
    this service (a token minted for another route is refused); ``max_age`` is how many seconds
    old a token may be. Raises the :class:`IdentityTokenError` subclass naming the reason.
    """
    if not audience:
        raise ValueError("audience must be the proxy route's name")
    if not max_age > 0 or max_age == float("inf"):
        raise ValueError(f"max_age must be a positive number of seconds, not {max_age!r}")
    reason, message, key_id, aud, spiffe_id, fingerprint, not_after, issued_at = _verify_identity_token(
        bytes(token), dict(keys), audience, float(max_age)
    )
    if reason is not None:
        raise _TOKEN_ERRORS.get(reason, IdentityTokenError)(reason, message)
    return IdentityToken(key_id, spiffe_id, fingerprint, not_after, issued_at, aud)

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
    "CallMetadata",
    "PeerIdentity",
    "metrics_text",
    # proxy mode and the brpc identity bridge
    "Proxy",
    "IdentityToken",
    "IdentityTokenError",
    "TokenBadFormat",
    "TokenUnsupportedVersion",
    "TokenUnknownKey",
    "TokenBadMac",
    "TokenWrongAudience",
    "TokenExpired",
    "TokenTooOld",
    "TokenIssuedInFuture",
    "DEFAULT_TOKEN_MAX_AGE",
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
    "KeyUnavailable",
]
