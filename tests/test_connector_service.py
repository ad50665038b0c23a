"""Terminal connectors run as processes: ``tradecopy bridge run`` and ``tradecopy mt5 run``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from connectors.bridge.paper_terminal import PaperBridgeTerminal
from connectors.paper.venue import PaperVenue


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_bridge_run_serves_terminals_and_reports_them_in_healthz(
    nats_server: Any, tmp_path: Path
) -> None:
    zmq_port, http_port = _port(), _port()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'connector_id = "farm-1"\nendpoint = "tcp://127.0.0.1:{zmq_port}"\n'
        '[[terminals]]\naccount = "acc-1"\nrole = "follower"\ntoken_env = "ACC1_TOKEN"\n'
    )
    token = "a-token-from-the-secret-store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "bridge", "run", "--config", str(config),
         "--nats-url", nats_server.url, "--metrics-port", str(http_port),
         "--state", str(tmp_path / "bridge.state")],
        env={**os.environ, "ACC1_TOKEN": token},
        # A file, not a pipe: an unread pipe fills up and blocks the process on its logs.
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "bridge.log").open("wb"),
    )  # fmt: skip
    terminal = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = await asyncio.to_thread(_health, http_port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the bridge never served /healthz"
                await asyncio.sleep(0.1)
        assert status == 200 and body["terminals"]["acc-1"]["connected"] is False
        venue = PaperVenue()
        venue.open_account("acc-1", "USD", 10_000.0)
        terminal = PaperBridgeTerminal(f"tcp://127.0.0.1:{zmq_port}", "acc-1", token, venue)
        await terminal.start()
        deadline = time.monotonic() + 10
        while not (await asyncio.to_thread(_health, http_port))[1]["terminals"]["acc-1"][
            "connected"
        ]:
            assert time.monotonic() < deadline, "the terminal never showed as connected"
            await asyncio.sleep(0.1)
    finally:
        if terminal is not None:
            await terminal.stop()
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_bridge_run_with_a_missing_token_variable_says_which(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        'connector_id = "farm-1"\n[[terminals]]\naccount = "acc-1"\nrole = "master"\n'
        'token_env = "NOT_SET_ANYWHERE"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bridge", "run", "--config", str(config),
         "--nats-url", "nats://127.0.0.1:1"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "NOT_SET_ANYWHERE" in done.stderr


def test_mt5_run_off_windows_names_the_extra(tmp_path: Path) -> None:
    config = tmp_path / "mt5.toml"
    config.write_text(
        'connector_id = "mt5-1"\naccount_id = "acc-9"\nrole = "follower"\nlogin = 123\n'
        'server = "Broker-Demo"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "mt5", "run", "--config", str(config),
         "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "tradecopy[mt5]" in done.stderr


def test_the_example_bridge_config_is_valid(monkeypatch: Any) -> None:
    import tomllib

    import msgspec

    from connectors.bridge.config import BridgeConfig
    from connectors.service import with_tokens_from_env

    path = Path(__file__).resolve().parent.parent / "docs/examples/connectors/bridge.toml"
    monkeypatch.setenv("TC_TOKEN_ALPARI_1001", "secret-token-alpari-1001")
    monkeypatch.setenv("TC_TOKEN_ICM_2002", "secret-token-icm-2002-xx")
    config = msgspec.convert(with_tokens_from_env(tomllib.loads(path.read_text())), BridgeConfig)
    assert [(t.account, t.role) for t in config.terminals] == [
        ("alpari-1001", "master"),
        ("icm-2002", "follower"),
    ]
