"""Test helpers: a development PKI that issues certificates and CRLs in memory, and a SPIFFE
Workload API server (what a SPIRE agent serves) that hands out its SVIDs and pushes rotations.

Keys are generated at test time; nothing here is meant for production.
"""

from __future__ import annotations

import base64
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from . import _native

__all__ = ["Credential", "TestPKI", "WorkloadApiServer"]

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


def _der_blocks(pem: str) -> List[bytes]:
    """The DER bytes of each PEM block, in order."""
    blocks: List[bytes] = []
    lines: List[str] = []
    inside = False
    for line in pem.splitlines():
        if line.startswith("-----BEGIN "):
            inside, lines = True, []
        elif line.startswith("-----END "):
            blocks.append(base64.b64decode("".join(lines)))
            inside = False
        elif inside:
            lines.append(line.strip())
    return blocks


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    n, size = len(data), b""
    while True:
        byte = n & 0x7F
        n >>= 7
        size += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return bytes([tag << 3 | 2]) + size + data


@dataclass
class _Svid:
    spiffe_id: str
    hint: Optional[str]
    credential: Credential


class WorkloadApiServer:
    """A SPIFFE Workload API (``FetchX509SVID``) on a Unix socket, serving SVIDs issued by a
    :class:`TestPKI`, for testing services configured with ``TlsConfig(workload_api=...)`` as
    they would run under SPIRE::

        pki = TestPKI("example.org")
        with WorkloadApiServer(pki) as agent:
            agent.add_svid("spiffe://example.org/ns/test/echo", hint="echo")
            tls = trustwire.TlsConfig(workload_api=agent.address, svid_hint="echo")
            ...
            agent.rotate()          # new certificates for every SVID, pushed on open streams

    Like a real agent it refuses requests without the ``workload.spiffe.io: true`` metadata.
    Needs ``grpcio`` (``pip install trustwire[testing]``).
    """

    def __init__(self, pki: TestPKI, socket_path: Optional[PathLike] = None) -> None:
        try:
            import grpc  # type: ignore[import-untyped]
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("WorkloadApiServer needs grpcio: pip install 'trustwire[testing]'") from e
        self.pki = pki
        self._grpc: Any = grpc
        self._dir: Optional[tempfile.TemporaryDirectory[str]] = None
        if socket_path is None:
            self._dir = tempfile.TemporaryDirectory(prefix="trustwire-wl-")
            socket_path = os.path.join(self._dir.name, "agent.sock")
        self.socket_path = os.fspath(socket_path)
        self._svids: List[_Svid] = []
        self._federated: Dict[str, str] = {}
        self._crls: List[str] = []
        self._version = 0
        self._changed = threading.Condition()
        self._closed = False
        self._server: Any = None
        self.streams_opened = 0

    @property
    def address(self) -> str:
        """The address for ``TlsConfig(workload_api=...)``."""
        return f"unix://{self.socket_path}"

    def add_svid(self, spiffe_id: str, hint: Optional[str] = None, **issue: Any) -> Credential:
        """Issues a certificate for ``spiffe_id`` (``issue`` goes to :meth:`TestPKI.issue`) and
        serves it after the SVIDs added before; pushed at once on open streams."""
        name = spiffe_id.rsplit("/", 1)[-1] or "svid"
        cred = self.pki.issue(name, spiffe_id=spiffe_id, **issue)
        self._svids.append(_Svid(spiffe_id, hint, cred))
        self.push()
        return cred

    def rotate(self) -> List[Credential]:
        """Reissues every SVID (new key and serial) and pushes them; returns the new ones."""
        for svid in self._svids:
            name = svid.spiffe_id.rsplit("/", 1)[-1] or "svid"
            svid.credential = self.pki.issue(name, spiffe_id=svid.spiffe_id)
        self.push()
        return [s.credential for s in self._svids]

    def federate(self, trust_domain: str, ca_pem: Optional[str]) -> None:
        """Serves ``ca_pem`` as the federated bundle of ``trust_domain`` (None withdraws it)."""
        if ca_pem is None:
            self._federated.pop(trust_domain, None)
        else:
            self._federated[trust_domain] = ca_pem
        self.push()

    def set_crls(self, crls_pem: Iterable[str]) -> None:
        """Serves these CRLs (e.g. ``[pki.crl_pem()]``)."""
        self._crls = list(crls_pem)
        self.push()

    def push(self) -> None:
        """Sends the current SVIDs, bundles and CRLs on every open stream."""
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _response(self) -> bytes:
        bundle = b"".join(_der_blocks(self.pki.ca_pem))
        out = b""
        for s in self._svids:
            svid = (
                _field(1, s.spiffe_id.encode())
                + _field(2, b"".join(_der_blocks(s.credential.cert_pem)))
                + _field(3, _der_blocks(s.credential.key_pem)[0])
                + _field(4, bundle)
            )
            if s.hint:
                svid += _field(5, s.hint.encode())
            out += _field(1, svid)
        for crl in self._crls:
            out += b"".join(_field(2, der) for der in _der_blocks(crl))
        for td, pem in sorted(self._federated.items()):
            out += _field(3, _field(1, f"spiffe://{td}".encode()) + _field(2, b"".join(_der_blocks(pem))))
        return out

    def _fetch(self, request: bytes, context: Any) -> Iterator[bytes]:
        metadata = dict(context.invocation_metadata())
        if metadata.get("workload.spiffe.io") != "true":
            context.abort(self._grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        self.streams_opened += 1
        seen = -1
        while context.is_active():
            with self._changed:
                if self._version == seen and not self._closed:
                    self._changed.wait(0.2)
                if self._closed:
                    return
                if self._version == seen or not self._svids:
                    continue
                seen, response = self._version, self._response()
            yield response

    def start(self) -> "WorkloadApiServer":
        from concurrent.futures import ThreadPoolExecutor

        grpc = self._grpc
        handler = grpc.method_handlers_generic_handler(
            "SpiffeWorkloadAPI",
            {
                "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                    self._fetch, request_deserializer=lambda b: b, response_serializer=lambda b: b
                )
            },
        )
        self._server = grpc.server(ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((handler,))
        if self._server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise OSError(f"cannot listen on {self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        """Closes every stream and stops serving (a client keeps its last SVID)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "WorkloadApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
