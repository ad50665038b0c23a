"""Operator HTTP endpoint: Prometheus metrics and a health check."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Self

import orjson
import prometheus_client
import structlog
from aiohttp import web

__all__ = ["OpsServer"]

_log = structlog.get_logger(__name__)


class OpsServer:
    """Serves ``GET /metrics`` (default Prometheus registry) and ``GET /healthz``.

    ``health`` is called per request; the response is 200 when its ``"ok"`` entry
    is truthy and 503 otherwise, so load balancers and k8s probes need no parsing.
    """

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, object]]) -> None:
        self._host = host
        self._port = port
        self._health = health
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port once started (resolves a requested port of 0)."""
        return self._port

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError(f"OpsServer already listening on {self._host}:{self._port}")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        # No access log: scrapers and probes hit this every few seconds and would
        # drown the trading logs; no signal handling: the owning process does that.
        # /metrics and /healthz requests are tiny: a stop need not wait a minute (aiohttp's
        # default) for idle keep-alive connections of a scraper.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _metrics(self, _: web.Request) -> web.Response:
        # Set the header directly: aiohttp rejects a charset inside content_type=.
        return web.Response(
            body=prometheus_client.generate_latest(prometheus_client.REGISTRY),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        try:
            status = self._health()
        except Exception as exc:
            # A broken health callback means we cannot vouch for the process.
            _log.exception("health check failed")
            status = {"ok": False, "error": repr(exc)}
        body = orjson.dumps(status, default=str, option=orjson.OPT_NON_STR_KEYS)
        return web.Response(
            status=200 if status.get("ok") else 503,
            body=body,
            content_type="application/json",
        )
