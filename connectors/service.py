"""Run a terminal connector as a process: ``tradecopy bridge run`` and ``tradecopy mt5 run``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
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

#: /metrics and /healthz are for this machine unless an operator opens them up.
DEFAULT_METRICS_HOST = "127.0.0.1"


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


def token_env_names(data: dict[str, Any]) -> dict[int, str]:
    """Which terminals (by index) take their token from a variable, and its name."""
    return {
        i: str(t["token_env"]) for i, t in enumerate(data.get("terminals", []))
        if isinstance(t, dict) and "token_env" in t
    }  # fmt: skip


def name_token_env(message: str, from_env: dict[int, str]) -> str:
    """A validation message about ``$.terminals[i].token`` names what the file really says,
    ``token_env``, and the variable the value came from (never the value)."""

    def named(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index not in from_env:
            return match.group(0)
        return f"`$.terminals[{index}].token_env` (the token in ${from_env[index]})"

    return re.sub(r"`\$\.terminals\[(\d+)\]\.token`", named, message)


def load_bridge_config(config_path: Path) -> Any:
    """The bridge connector's config file, tokens from their variables; errors name the file
    and what it says (``token_env`` and its variable where the token came from one)."""
    from connectors.bridge.config import BridgeConfig

    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        from_env = token_env_names(raw)
        data = with_tokens_from_env(refuse_secret_keys(raw))
    except (OSError, tomllib.TOMLDecodeError, TradecopyError) as exc:
        raise TradecopyError(f"{config_path}: {exc}") from exc
    try:
        return msgspec.convert(data, BridgeConfig)
    except msgspec.ValidationError as exc:
        raise TradecopyError(f"{config_path}: {name_token_env(str(exc), from_env)}") from exc


async def serve(
    name: str,
    nats_url: str,
    metrics_port: int | None,
    start: Callable[[Any], Awaitable[Any]],
    stop: Callable[[], Awaitable[None]],
    health: Callable[[], dict[str, object]],
    metrics_host: str = DEFAULT_METRICS_HOST,
) -> None:
    """Connect, start, serve /metrics and /healthz, run until SIGINT/SIGTERM, stop cleanly.

    NATS credentials come from the environment (``engine.runtime.natsconn``): the connector's
    own user, which may touch only its accounts. The ops endpoints listen on ``metrics_host``,
    loopback unless told otherwise (a container passes 0.0.0.0 explicitly)."""
    from engine.runtime.http import OpsServer

    nc = await connect(nats_url, f"tradecopy-{name}")
    ops = None
    try:
        await start(nc)
        if metrics_port is not None and metrics_port >= 0:
            ops = OpsServer(metrics_host, metrics_port, health)
            await ops.start()
            log.info("ops_listening", host=metrics_host, port=ops.port)
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


def mt5_health(connector: Any, account: str) -> dict[str, object]:
    """An MT5 connector's ``/healthz``: the runtime's (NATS, progress) and the terminal's; not
    ok while the terminal cannot trade (IPC lost, server offline, AutoTrading off)."""
    if connector is None:
        return {"ok": False, "reason": "not started", "account": account}
    runtime, terminal = connector.runtime.health(), connector.terminal.health()
    reasons = [str(runtime["reason"])] if runtime.get("reason") else []
    if not terminal["terminal_ready"]:
        reasons.append(f"the terminal cannot trade: {terminal['terminal_reason'] or 'not ready'}")
    return {**runtime, **terminal, "ok": not reasons, "reason": "; ".join(reasons),
            "account": account}  # fmt: skip


def refuse_secret_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A CURVE secret key in the config file is refused by name, not as an unknown field: the
    connector's comes from the environment or a 0600 key file, a terminal's stays in its EA."""
    from connectors.bridge.config import DEFAULT_SECRET_KEY_ENV, SECRET_FIELDS

    places = [(data, "the connector")] + [
        (t, f"terminal {t.get('account')}") for t in data.get("terminals", [])
        if isinstance(t, dict)
    ]  # fmt: skip
    for table, owner in places:
        for name in SECRET_FIELDS:
            if name in table:
                raise TradecopyError(
                    f"{owner}: `{name}` must not be in the config file. The connector's secret "
                    f"key goes in ${DEFAULT_SECRET_KEY_ENV} (or a 0600 file named by "
                    "secret_key_file); a terminal's only in its EA's InpSecretKey"
                )
    return data


async def run_bridge(config_path: Path, nats_url: str, metrics_port: int | None,
                     state_path: Path | None,
                     metrics_host: str = DEFAULT_METRICS_HOST) -> None:  # fmt: skip
    from connectors.bridge.connector import BridgeConnector

    config = load_bridge_config(config_path)
    # CURVE keys are read and checked here, before NATS: a missing secret names its variable.
    bridge = BridgeConnector(config, state_path)
    try:
        await serve(f"bridge-{config.connector_id}", nats_url, metrics_port, bridge.start,
                    bridge.stop, bridge.health, metrics_host)  # fmt: skip
    finally:
        import zmq.asyncio

        # Nothing may keep the process alive after a stop: drop whatever is still queued.
        zmq.asyncio.Context.instance().destroy(linger=0)


async def run_mt5(
    config_path: Path,
    nats_url: str,
    metrics_port: int | None,
    metrics_host: str = DEFAULT_METRICS_HOST,
) -> None:
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
        return mt5_health(connector, config.account_id)

    await serve(
        f"mt5-{config.connector_id}", nats_url, metrics_port, start, stop, health, metrics_host
    )
