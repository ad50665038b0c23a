"""One way to connect to NATS: reconnect forever, and log connection changes in one line each."""

from __future__ import annotations

from typing import Any

import nats
import structlog

log = structlog.get_logger("tradecopy.nats")


async def connect(url: str, name: str, **options: Any) -> Any:
    """A nats-py client that keeps reconnecting and logs state changes without tracebacks."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", client=name, error=repr(exc))

    async def on_disconnected() -> None:
        log.warning("nats_disconnected", client=name)

    async def on_reconnected() -> None:
        log.info("nats_reconnected", client=name)

    settings: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    settings.update(options)
    return await nats.connect(url, **settings)
