"""Shared helpers for the Python suite. Tests that exercise the pytest plugin use its fixtures
(trustwire_pki, trustwire_server) and nothing from here."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import pytest

import trustwire
from trustwire.testing import Credential, TestPKI

ECHO = ("example.EchoService", "Echo")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = TestPKI("example.org")
        self.ca_path = str(tmp / "ca.pem")
        Path(self.ca_path).write_text(self.pki.ca_pem)

    def cred(self, name: str, **kw: object) -> Credential:
        kw.setdefault("dns", ["localhost"])
        kw.setdefault("ips", ["127.0.0.1"])
        return self.pki.issue(name, **kw)  # type: ignore[arg-type]

    def files(self, name: str, **kw: object) -> Tuple[str, str]:
        return self.cred(name, **kw).write(self.tmp)

    def tls(self, name: str, allow: Sequence[str] = (), server_name: Optional[str] = "localhost", **kw: object) -> trustwire.TlsConfig:
        cert, key = self.files(name)
        return trustwire.TlsConfig(cert=cert, key=key, ca=self.ca_path, allow=list(allow), server_name=server_name, **kw)  # type: ignore[arg-type]


def eventually_in_metrics(line: str, timeout: float = 5.0) -> bool:
    """A peer can see a refusal before the refusing side has counted it: wait for the count
    instead of racing it."""
    deadline = time.monotonic() + timeout
    while line not in trustwire.metrics_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def echo(payload: bytes, ctx: trustwire.CallContext) -> Tuple[bytes, bytes]:
    return payload, ctx.attachment


@pytest.fixture
def echo_server(env: Env):  # type: ignore[no-untyped-def]
    server = trustwire.Server(env.tls("server"))
    server.register(*ECHO, echo)
    server.start("127.0.0.1:0")
    yield server
    server.stop()


def target_binary() -> str:
    root = Path(__file__).resolve().parents[2]
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    return str(target / "release" / "trustwire")


def _workload_agent_binary() -> str:
    """tests/go/workloadapi (go-spiffe's generated Workload API server), built into the target
    directory as the Rust suites build it; skipped without Go unless TRUSTWIRE_REQUIRE_PEERS."""
    root = Path(__file__).resolve().parents[2]
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    binary = target / "go-bin" / "workloadapi"
    source = root / "tests" / "go" / "workloadapi"
    newest = max(p.stat().st_mtime for p in source.iterdir())
    if binary.exists() and binary.stat().st_mtime >= newest:
        return str(binary)
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        if os.environ.get("TRUSTWIRE_REQUIRE_PEERS"):
            pytest.fail("`go` is needed for the Workload API agent; run scripts/deps.sh")
        pytest.skip("`go` not found (the Workload API test agent); run scripts/deps.sh")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"workloadapi.{os.getpid()}")
    env = dict(
        os.environ,
        GOFLAGS="-mod=mod -buildvcs=false",
        GOTOOLCHAIN="local",
        GOCACHE=str(target / "go-cache"),
        GOPATH=str(target / "go-path"),
        GOMODCACHE=str(target / "go-path" / "pkg" / "mod"),
        XDG_CONFIG_HOME=str(target / "go-config"),
        CGO_ENABLED="0",
    )
    subprocess.run([go, "build", "-o", str(partial), "."], cwd=source, env=env, check=True, timeout=600)
    partial.replace(binary)
    return str(binary)


class WorkloadAgent:
    """The Go Workload API agent serving SVIDs this test issues (directory layout:
    tests/go/workloadapi/main.go); ``push()`` sends what is there now on every open stream."""

    def __init__(self, tmp: Path, pki: TestPKI) -> None:
        self.pki = pki
        self.dir = tmp / "agent"
        self.socket = tmp / "agent.sock"
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.proc: Optional[subprocess.Popen[str]] = None

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def svid(self, slot: str, cred: Credential, spiffe_id: str, hint: str) -> None:
        d = self.dir / "svids" / slot
        d.mkdir(parents=True, exist_ok=True)
        for name, text in [("id", spiffe_id), ("chain.pem", cred.cert_pem), ("key.pem", cred.key_pem),
                           ("bundle.pem", self.pki.ca_pem), ("hint", hint)]:
            (d / name).write_text(text)

    def start(self) -> "WorkloadAgent":
        cmd = [_workload_agent_binary(), "serve", "-dir", str(self.dir), "-unix", str(self.socket)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("listening unix")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def _expect(self, prefix: str) -> str:
        while True:
            line = self.lines.get(timeout=20)
            assert not line.startswith("push failed"), line
            if line.startswith(prefix):
                return line

    def push(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("push\n")
        self.proc.stdin.flush()
        self._expect("pushed to ")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workload_agent(env: Env) -> Iterator[WorkloadAgent]:
    agent = WorkloadAgent(env.tmp, env.pki)
    yield agent
    agent.close()
