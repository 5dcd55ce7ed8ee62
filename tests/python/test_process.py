"""Process-level behaviour: fork, the console script, metrics."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import trustwire
from conftest import ECHO, Env


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_a_clear_error(env: Env, echo_server: trustwire.Server) -> None:
    client = trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client"))
    assert client.call(*ECHO, b"parent") == b"parent"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what happened through the pipe, never return into pytest
        os.close(r)
        try:
            client.call(*ECHO, b"child", timeout=2)
            msg = b"worked"
        except trustwire.TrustwireError as e:
            msg = b"error: " + str(e).encode()
        except BaseException as e:  # noqa: BLE001
            msg = b"other: " + repr(e).encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read()
    os.waitpid(pid, 0)
    assert msg.startswith(b"error: ") and b"fork" in msg, msg
    assert client.call(*ECHO, b"parent again") == b"parent again"
    client.close()


FORK_AND_EXIT = """
import os, sys, trustwire
port, ca, cert, key = sys.argv[1:5]
tls = trustwire.TlsConfig(cert=cert, key=key, ca=ca, server_name="localhost")
client = trustwire.Client("127.0.0.1:" + port, tls)
assert client.call("example.EchoService", "Echo", b"parent") == b"parent"
pid = os.fork()
if pid == 0:
    # A normal exit: the interpreter finalizes and thread-local destructors run.
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
assert client.call("example.EchoService", "Echo", b"parent again", timeout=5) == b"parent again"
print("ok")
"""


SERVE_AND_EXIT = """
import asyncio, sys, threading, trustwire
ca, scert, skey, ccert, ckey = sys.argv[1:6]
seen = threading.Barrier(8, timeout=10)
# Configurations held until the interpreter drops them as it finalizes.
server_tls = trustwire.TlsConfig(cert=scert, key=skey, ca=ca, authorize_peer=lambda peer: True)
client_tls = trustwire.TlsConfig(cert=ccert, key=ckey, ca=ca, server_name="localhost")
server = trustwire.Server(server_tls)
server.authorize(lambda peer, service, method, metadata: True)

@server.method("example.EchoService", "Echo")
def echo(payload, ctx):
    if payload == b"x":
        seen.wait()
    return payload

port = server.start("127.0.0.1:0")
client = trustwire.Client(f"127.0.0.1:{port}", client_tls)

async def main():
    return await asyncio.gather(*(client.acall("example.EchoService", "Echo", b"x") for _ in range(8)))

assert asyncio.run(main()) == [b"x"] * 8
assert client.call("example.EchoService", "Echo", b"y", timeout=10) == b"y"
# The server left running: the interpreter exits with handler, hook, event and completion
# threads holding Python thread states.
print("ok")
"""


CALL_AND_EXIT = """
import sys, trustwire
port, ca, cert, key = sys.argv[1:5]
tls = trustwire.TlsConfig(cert=cert, key=key, ca=ca, server_name="localhost")
client = trustwire.Client("127.0.0.1:" + port, tls)
assert client.call("example.EchoService", "Echo", b"x") == b"x"
# tls is dropped as the interpreter finalizes, which ends its event thread then.
print("ok")
"""


def test_a_process_exits_cleanly_with_its_server_and_clients_still_there(env: Env, echo_server: trustwire.Server) -> None:
    scert, skey = env.files("server")
    ccert, ckey = env.files("client")
    scripts = [
        [SERVE_AND_EXIT, env.ca_path, scert, skey, ccert, ckey],
        [CALL_AND_EXIT, str(echo_server.port), env.ca_path, ccert, ckey],
    ]
    for script in scripts * 2:
        out = subprocess.run([sys.executable, "-c", *script], capture_output=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == b"ok", out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_exiting_normally_leaves_the_parents_connection_alone(env: Env, echo_server: trustwire.Server) -> None:
    # The child holds a copy of the calling thread's runtime. Dropping it at exit would wait for
    # the parent's threads (forever) or take the parent's socket out of the epoll set they share
    # (the parent's next call would wait for an answer it is never told about).
    cert, key = env.files("client")
    out = subprocess.run(
        [sys.executable, "-c", FORK_AND_EXIT, str(echo_server.port), env.ca_path, cert, key],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == b"ok", out


def test_console_script_runs_the_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    exe = os.path.join(os.path.dirname(sys.executable), "trustwire")
    assert os.path.exists(exe)
    out = subprocess.run([exe, "pki", "init", "--dir", str(tmp_path), "--trust-domain", "example.org"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ca.pem").exists()
    bad = subprocess.run([exe, "inspect", str(tmp_path / "missing.pem")], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "error" in bad.stderr
    assert subprocess.run([exe, "--no-such-flag"], capture_output=True, timeout=60).returncode == 2


def test_metrics_text_counts_calls(env: Env, echo_server: trustwire.Server) -> None:
    with trustwire.Client(f"127.0.0.1:{echo_server.port}", env.tls("client")) as client:
        client.call(*ECHO, b"x")
    text = trustwire.metrics_text()
    assert "trustwire_calls_total" in text
    assert 'service="example.EchoService"' in text
    assert 'store="python"' in text


def test_core_logs_reach_python_logging(env: Env, echo_server: trustwire.Server, caplog: pytest.LogCaptureFixture) -> None:
    import time

    tls = trustwire.TlsConfig(ca=env.ca_path, server_name="localhost")  # no client certificate
    with caplog.at_level(logging.INFO, logger="trustwire"):
        with trustwire.Client(f"127.0.0.1:{echo_server.port}", tls) as client:
            with pytest.raises(trustwire.PeerAlert):
                client.call(*ECHO, b"x")
        end = time.monotonic() + 5
        while time.monotonic() < end and not any("handshake refused" in r.getMessage() for r in caplog.records):
            time.sleep(0.02)
    refused = [r for r in caplog.records if "handshake refused" in r.getMessage()]
    assert refused, [r.getMessage() for r in caplog.records]
    assert refused[0].name.startswith("trustwire.")
    assert "verdict=no_peer_certificate" in refused[0].getMessage()


def test_ctrl_c_interrupts_a_blocking_call(env: Env) -> None:
    import signal
    import threading
    import time

    # The handler holds the call until the test releases it, so only the interrupt can end the
    # call early however slow the machine is.
    release = threading.Event()
    server = trustwire.Server(env.tls("server"))
    server.register("example.EchoService", "Slow", lambda p, c: release.wait(30) and p)
    # Python leaves SIGINT ignored when it starts with it ignored (a background job of a
    # non-interactive shell, as CI may run us); install the default Ctrl-C handler for the test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with server, trustwire.Client(f"127.0.0.1:{server.port}", env.tls("client")) as client:
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                client.call("example.EchoService", "Slow", b"", timeout=60)
            assert time.monotonic() - start < 20
        finally:
            release.set()
            timer.join()
            signal.signal(signal.SIGINT, previous)
