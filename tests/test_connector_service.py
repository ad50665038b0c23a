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

import zmq

from connectors.bridge.paper_terminal import PaperBridgeTerminal
from connectors.paper.venue import PaperVenue

SECRET_ENV = "TRADECOPY_BRIDGE_SECRET_KEY"


def _pair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


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
    (server_public, server_secret), (terminal_public, terminal_secret) = _pair(), _pair()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'connector_id = "farm-1"\nendpoint = "tcp://127.0.0.1:{zmq_port}"\n'
        f'public_key = "{server_public}"\n'
        '[[terminals]]\naccount = "acc-1"\nrole = "follower"\ntoken_env = "ACC1_TOKEN"\n'
        f'curve_public_key = "{terminal_public}"\n'
    )
    token = "a-token-from-the-secret-store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "bridge", "run", "--config", str(config),
         "--nats-url", nats_server.url, "--metrics-port", str(http_port),
         "--state", str(tmp_path / "bridge.state")],
        env={**os.environ, "ACC1_TOKEN": token, SECRET_ENV: server_secret},
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
        assert body["curve"] is True
        venue = PaperVenue()
        venue.open_account("acc-1", "USD", 10_000.0)
        terminal = PaperBridgeTerminal(f"tcp://127.0.0.1:{zmq_port}", "acc-1", token, venue,
                                       server_key=server_public, public_key=terminal_public,
                                       secret_key=terminal_secret)  # fmt: skip
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


def test_bridge_run_with_curve_on_and_no_secret_names_the_variable(tmp_path: Path) -> None:
    public, _ = _pair()
    config = tmp_path / "bridge.toml"
    config.write_text(
        'connector_id = "farm-1"\n[[terminals]]\naccount = "acc-1"\nrole = "master"\n'
        f'token_env = "ACC1_TOKEN"\ncurve_public_key = "{public}"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env["ACC1_TOKEN"] = "a-token-from-the-secret-store"
    argv = [sys.executable, "-m", "engine.cli", "bridge", "run", "--config", str(config),
            "--nats-url", "nats://127.0.0.1:1"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"${SECRET_ENV} is not set" in done.stderr
    # A secret key in the file is refused by name, whatever else the file says.
    config.write_text(config.read_text() + f'secret_key = "{_pair()[1]}"\n')
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "`secret_key` must not be in the config file" in done.stderr


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

    from connectors.bridge.config import BridgeConfig, check_curve_config
    from connectors.service import refuse_secret_keys, with_tokens_from_env

    path = Path(__file__).resolve().parent.parent / "docs/examples/connectors/bridge.toml"
    monkeypatch.setenv("TC_TOKEN_ALPARI_1001", "secret-token-alpari-1001")
    monkeypatch.setenv("TC_TOKEN_ICM_2002", "secret-token-icm-2002-xx")
    raw = refuse_secret_keys(tomllib.loads(path.read_text()))
    config = msgspec.convert(with_tokens_from_env(raw), BridgeConfig)
    assert [(t.account, t.role) for t in config.terminals] == [
        ("alpari-1001", "master"),
        ("icm-2002", "follower"),
    ]
    # Encrypted, on loopback, every terminal keyed: it runs once the secret is in the variable.
    assert config.plaintext is False and config.endpoint.startswith("tcp://127.0.0.1:")
    assert config.secret_key_env == SECRET_ENV
    check_curve_config(config, _pair()[1])


async def test_bridge_run_logs_in_as_its_connector_and_serves_ops_on_loopback(
    tmp_path: Path,
) -> None:
    """On a secured server the connector gets in with the seed from its environment; without
    one it stops at once naming the variable. /healthz listens on 127.0.0.1 by default. (Its
    bridge runs plaintext, which it must say as a warning when it starts.)"""
    from engine.runtime.jetstream import ensure_buckets, ensure_streams
    from engine.runtime.natsauth import NatsUser, Role
    from engine.runtime.natsconn import connect
    from engine.runtime.natsserver import EmbeddedNats

    admin = NatsUser.generate(Role.ADMIN)
    farm = NatsUser.connector("farm-1", followers=["acc-1"])
    server = EmbeddedNats(store_dir=tmp_path / "nats", users=[admin, farm])
    await server.start()
    try:
        nc = await connect(server.url, "bootstrap", credentials=admin.credentials)
        await ensure_streams(nc.jetstream())
        await ensure_buckets(nc.jetstream())
        await nc.close()
        zmq_port, http_port = _port(), _port()
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'connector_id = "farm-1"\nendpoint = "tcp://127.0.0.1:{zmq_port}"\n'
            "plaintext = true\n"
            '[[terminals]]\naccount = "acc-1"\nrole = "follower"\ntoken_env = "ACC1_TOKEN"\n'
        )
        argv = [sys.executable, "-m", "engine.cli", "bridge", "run", "--config", str(config),
                "--nats-url", server.url, "--metrics-port", str(http_port),
                "--state", str(tmp_path / "bridge.state")]  # fmt: skip
        bare = {k: v for k, v in os.environ.items() if not k.startswith("TRADECOPY_NATS_")}
        bare["ACC1_TOKEN"] = "a-token-from-the-secret-store"
        refused = await asyncio.to_thread(
            subprocess.run, argv, env=bare, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 2 and "TRADECOPY_NATS_SEED" in refused.stderr
        log = tmp_path / "bridge.log"
        proc = subprocess.Popen(
            argv, env={**bare, **farm.credentials.env()},
            stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    status, _ = await asyncio.to_thread(_health, http_port)
                    break
                except OSError:
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, "the bridge never served /healthz"
                    await asyncio.sleep(0.1)
            assert status == 200
            listening = [json.loads(line) for line in log.read_text().splitlines()
                         if '"ops_listening"' in line]  # fmt: skip
            assert listening and listening[0]["host"] == "127.0.0.1"
            plaintext = [json.loads(line) for line in log.read_text().splitlines()
                         if '"bridge_plaintext"' in line]  # fmt: skip
            assert plaintext and plaintext[0]["level"] == "warning"
        finally:
            proc.terminate()
            assert proc.wait(timeout=15) == 0
        # Its start (streams looked up, states published, its order consumer) was all allowed.
        assert "permissions violation" not in log.read_text().lower()
    finally:
        await server.stop()


def test_a_bad_token_from_a_variable_names_token_env_and_the_variable(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import pytest

    from connectors.service import load_bridge_config
    from engine.core.errors import TradecopyError

    config = tmp_path / "bridge.toml"
    config.write_text(
        'connector_id = "farm-1"\nplaintext = true\n'
        '[[terminals]]\naccount = "acc-1"\nrole = "master"\ntoken = "a-token-in-the-file"\n'
        '[[terminals]]\naccount = "acc-2"\nrole = "master"\ntoken_env = "ACC2_TOKEN"\n'
    )
    monkeypatch.setenv("ACC2_TOKEN", "s3cr3t!")
    with pytest.raises(TradecopyError) as raised:
        load_bridge_config(config)
    message = str(raised.value)
    assert "`$.terminals[1].token_env` (the token in $ACC2_TOKEN)" in message
    assert "s3cr3t!" not in message  # never the secret itself
    # A token written in the file is still named as `token`.
    config.write_text(config.read_text().replace("a-token-in-the-file", "x"))
    monkeypatch.setenv("ACC2_TOKEN", "a-token-from-the-secret-store")
    with pytest.raises(TradecopyError, match=r"`\$\.terminals\[0\]\.token`"):
        load_bridge_config(config)
