"""Test helpers: a development PKI that issues certificates and CRLs in memory.

Keys are generated at test time; nothing here is meant for production.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple, Union

from . import _native

__all__ = ["Credential", "TestPKI"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Credential:
    """An issued certificate and its private key (PEM), and the certificate's serial (hex)."""

    name: str
    cert_pem: str
    key_pem: str
    serial: str

    def write(self, directory: PathLike, name: Optional[str] = None) -> Tuple[str, str]:
        """Writes ``DIR/NAME.pem`` and ``DIR/NAME.key`` (mode 0600), each replaced atomically;
        returns both paths."""
        base = os.path.join(os.fspath(directory), name or self.name)
        cert, key = base + ".pem", base + ".key"
        _write_atomic(cert, self.cert_pem, 0o644)
        _write_atomic(key, self.key_pem, 0o600)
        return cert, key


def _write_atomic(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class TestPKI:
    """A throwaway CA for a trust domain, issuing SPIFFE-style certificates."""

    __test__ = False  # not a pytest test class, whatever its name says

    trust_domain: str = "example.org"
    _ca: _native.DevCa = field(init=False, repr=False)
    _revoked: List[str] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._ca = _native.DevCa(self.trust_domain)

    @property
    def ca_pem(self) -> str:
        return self._ca.ca_pem

    def issue(
        self,
        name: str,
        spiffe_id: Optional[str] = None,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        not_before: Optional[float] = None,
        not_after: Optional[float] = None,
        usage: str = "both",
    ) -> Credential:
        """Issues a certificate for ``name``. ``spiffe_id`` defaults to
        ``spiffe://TRUST_DOMAIN/ns/test/NAME``; times are Unix timestamps; ``usage`` is
        "both", "server" or "client"."""
        if spiffe_id is None:
            spiffe_id = f"spiffe://{self.trust_domain}/ns/test/{name}"
        cert, key, serial = self._ca.issue(
            name,
            spiffe_id=spiffe_id,
            dns=list(dns),
            ips=list(ips),
            not_before=not_before,
            not_after=not_after,
            usage=usage,
        )
        return Credential(name, cert, key, serial)

    def revoke(self, credential: Credential) -> None:
        """Lists the credential in the next :meth:`crl_pem`."""
        if credential.serial not in self._revoked:
            self._revoked.append(credential.serial)

    def crl_pem(self, next_update: Optional[float] = None) -> str:
        """A CRL revoking everything :meth:`revoke` was given (valid a day unless told)."""
        return self._ca.crl_pem(list(self._revoked), next_update if next_update is not None else time.time() + 86400)
