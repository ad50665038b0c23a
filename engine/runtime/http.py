"""Operator HTTP endpoint: Prometheus metrics and a health check, and the progress watch
that lets a health check tell a working process from one that is merely up."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import orjson
import prometheus_client
import structlog
from aiohttp import web

__all__ = ["OpsServer", "ProgressWatch"]

_log = structlog.get_logger(__name__)


class OpsServer:
    """Serves ``GET /metrics`` (default Prometheus registry) and ``GET /healthz``.

    ``exposition``, when given, returns more of ``/metrics`` already in the text format: for
    a family too large to render on every scrape (the replicator's per-link series).

    ``health`` is called per request; the response is 200 when its ``"ok"`` entry
    is truthy and 503 otherwise, so load balancers and k8s probes need no parsing. A health
    that is not ok says why in ``"reason"`` (the services' checks do; a check that raises
    gets one here).
    """

    def __init__(
        self,
        host: str,
        port: int,
        health: Callable[[], dict[str, object]],
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._health = health
        self._exposition = exposition
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
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
        if self._exposition is not None:
            body += self._exposition()
        # Set the header directly: aiohttp rejects a charset inside content_type=.
        return web.Response(
            body=body,
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        try:
            status = self._health()
        except Exception as exc:
            # A broken health callback means we cannot vouch for the process.
            _log.exception("health check failed")
            status = {"ok": False, "reason": "the health check failed", "error": repr(exc)}
        body = orjson.dumps(status, default=str, option=orjson.OPT_NON_STR_KEYS)
        return web.Response(
            status=200 if status.get("ok") else 503,
            body=body,
            content_type="application/json",
        )


class ProgressWatch:
    """Liveness by progress: how long work has been pending without advancing.

    A process can be up, connected and answering ``/healthz`` while one of its tasks waits
    forever; only progress tells them apart. Fed either by events (``working`` when work
    arrives, ``advanced`` when some of it is done) or by polling (``observe`` with a mark that
    moves with progress, e.g. a consumer's ack floor). Idle is never stalled.
    """

    __slots__ = ("_clock", "_mark", "_since")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._mark: object = None
        self._since: float | None = None
        """Since when work has been pending without progress; None while idle."""

    def working(self) -> None:
        """Work is pending (a no-op when it already was: the clock keeps running)."""
        if self._since is None:
            self._since = self._clock()

    def advanced(self, still_pending: bool) -> None:
        """Some work was done; ``still_pending`` says whether more is waiting."""
        self._since = self._clock() if still_pending else None

    def observe(self, pending: bool, mark: object) -> None:
        """A poll: whether work is pending, and a mark that changes whenever work is done."""
        if not pending:
            self._since = None
        elif self._since is None or mark != self._mark:
            self._since = self._clock()
        self._mark = mark

    def stalled_for(self) -> float:
        """Seconds of pending work without progress; 0.0 while idle."""
        return 0.0 if self._since is None else max(self._clock() - self._since, 0.0)
