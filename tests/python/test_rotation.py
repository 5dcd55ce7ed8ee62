"""Credential rotation driven from Python: reload, events, generations, calls that never fail."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List

import pytest

import trustwire
from conftest import ECHO, Env, WorkloadAgent


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_rotation_under_calls_has_no_failures(env: Env) -> None:
    cert, key = env.files("server")
    server_tls = trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path)
    assert server_tls.roles == "both" and server_tls.generation == 1
    events: List[trustwire.Event] = []
    server_tls.on_event(events.append)
    server = trustwire.Server(server_tls)
    server.register(*ECHO, lambda p, c: p)
    client_tls = env.tls("client")
    stop = threading.Event()
    failures: List[BaseException] = []
    calls = [0]

    def caller() -> None:
        while not stop.is_set():
            # A new client now and then, so handshakes meet every generation.
            with trustwire.Client(f"127.0.0.1:{server.port}", client_tls) as client:
                for _ in range(20):
                    try:
                        assert client.call(*ECHO, b"ping", timeout=5) == b"ping"
                        calls[0] += 1
                    except BaseException as e:  # noqa: BLE001 (every failure counts)
                        failures.append(e)

    with server:
        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        serials = {server_tls.serial}
        for _ in range(5):
            time.sleep(0.15)
            env.cred("server").write(env.tmp, "server")
            server_tls.reload()
            serials.add(server_tls.serial)
        time.sleep(0.15)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert calls[0] > 100
    assert len(serials) == 6
    assert server_tls.generation >= 6
    assert wait_for(lambda: len([e for e in events if e.kind == "reloaded"]) >= 5)
    assert all(e.kind == "reloaded" for e in events)


def test_bad_material_is_rejected_and_last_good_stays(env: Env) -> None:
    cert, key = env.files("svc")
    tls = trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path)
    events: List[trustwire.Event] = []
    tls.on_event(events.append)
    serial, not_after = tls.serial, tls.not_after
    assert not_after is not None and not_after > time.time()
    Path(key).write_text(env.cred("other").key_pem)  # a key that is not the certificate's
    with pytest.raises(trustwire.CredentialsError) as e:
        tls.reload()
    assert e.value.verdict == "key_mismatch"
    assert (tls.generation, tls.serial) == (1, serial)
    assert wait_for(lambda: any(ev.kind == "rejected" and ev.verdict == "key_mismatch" for ev in events))


def test_expiring_event(env: Env) -> None:
    cred = env.cred("short", not_after=time.time() + 3600)
    cert, key = cred.write(env.tmp)
    tls = trustwire.TlsConfig(cert=cert, key=key, ca=env.ca_path)
    events: List[trustwire.Event] = []
    tls.on_event(events.append)
    # The warning window is a week: a load of this certificate says it is expiring.
    env.cred("short", not_after=time.time() + 7200).write(env.tmp, "short")
    tls.reload()
    assert wait_for(lambda: any(e.kind == "expiring" for e in events))
    expiring = [e for e in events if e.kind == "expiring"][0]
    assert expiring.seconds_left is not None and 0 < expiring.seconds_left <= 7200


def test_from_file(env: Env, tmp_path: Path) -> None:
    cert, key = env.files("svc")
    profile = tmp_path / "svc.toml"
    profile.write_text(
        f'[identity]\ncert = "{Path(cert).name}"\nkey = "{Path(key).name}"\n'
        f'[trust]\nca = ["ca.pem"]\n'
        f'[policy]\nallow = ["spiffe://example.org/ns/test/*"]\n'
        f'[client]\nserver_name = "localhost"\n'
    )
    tls = trustwire.TlsConfig.from_file(profile)
    server = trustwire.Server(tls)
    server.register(*ECHO, lambda p, c: p)
    with server, trustwire.Client(f"127.0.0.1:{server.port}", tls) as client:
        assert client.call(*ECHO, b"profile") == b"profile"
    (tmp_path / "bad.toml").write_text("[trust]\nca = []\ntypo = 1\n")
    with pytest.raises(trustwire.ConfigError):
        trustwire.TlsConfig.from_file(tmp_path / "bad.toml")


def test_configs_fed_by_the_workload_api_follow_pushed_rotations_without_a_failed_call(
    env: Env, workload_agent: WorkloadAgent
) -> None:
    server_id, client_id = "spiffe://example.org/ns/test/server", "spiffe://example.org/ns/test/client"
    # Both SVIDs come from one agent; each side picks its own by hint.
    workload_agent.svid("0", env.pki.issue("server", spiffe_id=server_id), server_id, "server")
    workload_agent.svid("1", env.pki.issue("client", spiffe_id=client_id), client_id, "client")
    workload_agent.start()
    server_tls = trustwire.TlsConfig(workload_api=workload_agent.address, svid_hint="server", allow=[client_id])
    client_tls = trustwire.TlsConfig(
        workload_api=workload_agent.address, svid_hint="client", server_spiffe_id=server_id
    )
    server = trustwire.Server(server_tls)
    server.register(*ECHO, lambda p, c: c.peer.serial.encode())  # answers with the caller's serial
    stop = threading.Event()
    failures: List[BaseException] = []
    calls = [0]

    with server:
        address = f"127.0.0.1:{server.port}"

        def caller() -> None:
            kept = trustwire.Client(address, client_tls)
            while not stop.is_set():
                for client in (kept, trustwire.Client(address, client_tls)):
                    try:
                        client.call(*ECHO, b"ping", timeout=5)
                        calls[0] += 1
                    except BaseException as e:  # noqa: BLE001 (every failure counts)
                        failures.append(e)

        threads = [threading.Thread(target=caller) for _ in range(2)]
        for t in threads:
            t.start()
        for round in range(3):
            server_cred = env.pki.issue("server", spiffe_id=server_id)
            client_cred = env.pki.issue("client", spiffe_id=client_id)
            workload_agent.svid("0", server_cred, server_id, "server")
            workload_agent.svid("1", client_cred, client_id, "client")
            workload_agent.push()
            assert wait_for(lambda: server_tls.serial == server_cred.serial, 10), f"round {round}: server"
            assert wait_for(lambda: client_tls.serial == client_cred.serial, 10), f"round {round}: client"
            # A new connection presents the client's new SVID to the server.
            with trustwire.Client(address, client_tls) as fresh:
                assert fresh.call(*ECHO, b"who", timeout=5).decode() == client_cred.serial
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert calls[0] > 0
    assert server_tls.generation == 4 and client_tls.generation == 4


def test_workload_api_settings_are_checked(env: Env) -> None:
    with pytest.raises(trustwire.ConfigError, match="svid_spiffe_id or svid_hint"):
        trustwire.TlsConfig(workload_api="unix:///tmp/x.sock", svid_spiffe_id="spiffe://example.org/a", svid_hint="a")
    with pytest.raises(trustwire.ConfigError, match="workload_api"):
        trustwire.TlsConfig(workload_api="http://agent")
    with pytest.raises(trustwire.ConfigError, match="not both"):
        cert, key = env.files("svc")
        trustwire.TlsConfig(workload_api="unix:///tmp/x.sock", cert=cert, key=key, ca=env.ca_path)


def test_the_testing_workload_api_server_serves_and_rotates_svids(env: Env) -> None:
    from trustwire.testing import WorkloadApiServer

    server_id, client_id = "spiffe://example.org/ns/test/api", "spiffe://example.org/ns/test/web"
    with WorkloadApiServer(env.pki) as agent:
        agent.add_svid(server_id, hint="api")
        agent.add_svid(client_id, hint="web")
        server_tls = trustwire.TlsConfig(workload_api=agent.address, svid_hint="api", allow=[client_id])
        client_tls = trustwire.TlsConfig(workload_api=agent.address, svid_hint="web", server_spiffe_id=server_id)
        server = trustwire.Server(server_tls)
        server.register(*ECHO, lambda p, c: c.peer.serial.encode())
        with server:
            address = f"127.0.0.1:{server.port}"
            for _ in range(3):
                new_server, new_client = agent.rotate()
                assert wait_for(lambda: (server_tls.serial, client_tls.serial) == (new_server.serial, new_client.serial), 10)
                with trustwire.Client(address, client_tls) as c:
                    assert c.call(*ECHO, b"who", timeout=5).decode() == new_client.serial
        assert agent.streams_opened == 2, "one stream per config carried every rotation"

        import grpc

        with grpc.insecure_channel(agent.address.replace("unix://", "unix:")) as channel:
            fetch = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(fetch(b"", timeout=5)))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
