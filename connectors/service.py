"""Run a terminal connector as a process: ``tradecopy bridge run`` and ``tradecopy mt5 run``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from engine.core.errors import TradecopyError
from engine.runtime.files import load_toml
from engine.runtime.natsconn import connect

log = structlog.get_logger("tradecopy.connector")


def with_tokens_from_env(data: dict[str, Any]) -> dict[str, Any]:
    """Terminal tokens may be given as ``token_env = "VAR"``: secrets stay out of files."""
    for terminal in data.get("terminals", []):
        name = terminal.pop("token_env", None)
        if name is not None:
            value = os.environ.get(name)
            if not value:
                raise TradecopyError(f"terminal {terminal.get('account')}: ${name} is not set")
            terminal["token"] = value
    return data


async def serve(
    name: str,
    nats_url: str,
    metrics_port: int | None,
    start: Callable[[Any], Awaitable[Any]],
    stop: Callable[[], Awaitable[None]],
    health: Callable[[], dict[str, object]],
) -> None:
    """Connect, start, serve /metrics and /healthz, run until SIGINT/SIGTERM, stop cleanly."""
    from engine.runtime.http import OpsServer

    nc = await connect(nats_url, f"tradecopy-{name}")
    ops = None
    try:
        await start(nc)
        if metrics_port is not None and metrics_port >= 0:
            ops = OpsServer("0.0.0.0", metrics_port, health)
            await ops.start()
            log.info("ops_listening", port=ops.port)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, done.set)
        await done.wait()
    finally:
        if ops is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ops.stop(), 5)
        try:
            await asyncio.wait_for(stop(), 20)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)


async def run_bridge(config_path: Path, nats_url: str, metrics_port: int | None,
                     state_path: Path | None) -> None:  # fmt: skip
    from connectors.bridge.config import BridgeConfig
    from connectors.bridge.connector import BridgeConnector

    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        config = msgspec.convert(with_tokens_from_env(raw), BridgeConfig)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise TradecopyError(f"{config_path}: {exc}") from exc
    bridge = BridgeConnector(config, state_path)
    try:
        await serve(f"bridge-{config.connector_id}", nats_url, metrics_port, bridge.start,
                    bridge.stop, bridge.health)  # fmt: skip
    finally:
        import zmq.asyncio

        # Nothing may keep the process alive after a stop: drop whatever is still queued.
        zmq.asyncio.Context.instance().destroy(linger=0)


async def run_mt5(config_path: Path, nats_url: str, metrics_port: int | None) -> None:
    from connectors.mt5.config import Mt5Config
    from connectors.mt5.connector import Mt5Connector, Mt5Terminal

    config = load_toml(config_path, Mt5Config)
    terminal = Mt5Terminal.open(config)  # TerminalUnavailable off Windows, naming the extra
    connector: Mt5Connector | None = None

    async def start(nc: Any) -> None:
        nonlocal connector
        connector = Mt5Connector(nc, terminal)
        await connector.start()

    async def stop() -> None:
        if connector is not None:
            await connector.stop()

    def health() -> dict[str, object]:
        return {"ok": connector is not None, "account": config.account_id}

    await serve(f"mt5-{config.connector_id}", nats_url, metrics_port, start, stop, health)
