"""The platform API: an aiohttp application over PostgreSQL (the API's tables) and NATS (the
buckets the CLI writes), and ``run_api`` to serve it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import asyncpg
import nats.errors
import structlog
from aiohttp import web

from engine.api import metrics, openapi
from engine.api.auth import Caller, Role, same_digest, token_hash
from engine.api.config import ApiConfig, ApiSecrets, secrets_from_env
from engine.api.errors import RateLimited, Unauthorized
from engine.api.handling import STATE_KEY, api_middleware, endpoint
from engine.api.ratelimit import TokenBuckets
from engine.api.routes import ROUTES
from engine.api.store import PLATFORM, Store, migrate
from engine.core.errors import TradecopyError
from engine.runtime.http import OpsServer
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.natsconn import connect
from engine.runtime.postgres import start_database
from schemas import subjects

log = structlog.get_logger("tradecopy.api")

_BUCKETS = (subjects.KV_LINKS, subjects.KV_CONTROL, subjects.KV_ACCOUNTS)
#: How long after a failed attempt to open the buckets a request may try again.
_BUCKET_RETRY_S = 5.0


class ApiState:
    """What handlers share: configuration, secrets, the store, NATS and the rate limits."""

    def __init__(self, config: ApiConfig, secrets: ApiSecrets, store: Store, nc: Any) -> None:
        self.config = config
        self.secrets = secrets
        self.store = store
        self.nc = nc
        self.js = None if nc is None else nc.jetstream()
        self.buckets: dict[str, Any] = {}
        self._retry_at = 0.0
        self.cors_origins = frozenset(config.cors_origins)
        per_s = config.auth_rate_per_minute / 60.0
        self.auth_limits = TokenBuckets(per_s, config.auth_burst)
        self.openapi = openapi.document(ROUTES)

    def limit(self, request: web.Request, what: str) -> None:
        """Spend one auth attempt of this client (IP) for ``what``; 429 when none is left."""
        wait = self.auth_limits.take(f"{request.remote}|{what}")
        if wait > 0:
            metrics.RATE_LIMITED.labels(what.partition(":")[0]).inc()
            raise RateLimited(wait)

    async def caller_of_api_key(self, key: str) -> Caller:
        digest = token_hash(key)
        async with self.store.tx(PLATFORM) as conn:
            row = await self.store.api_key_owner(conn, digest)
        if row is None or not same_digest(bytes(row["key_hash"]), digest):
            metrics.AUTH_FAILURES.labels("api_key").inc()
            raise Unauthorized("unknown or revoked API key")
        return Caller(
            user_id=row["user_id"], role=Role(row["role"]), tenant_id=row["tenant_id"],
            key_id=row["key_id"],
        )  # fmt: skip

    async def bucket(self, name: str) -> Any:
        """An open bucket, or None while NATS cannot be reached (tried again on each call,
        so an API started before NATS heals without a restart)."""
        if name not in self.buckets:
            now = time.monotonic()
            if self.nc is not None and self.nc.is_connected and now >= self._retry_at:
                self._retry_at = now + _BUCKET_RETRY_S
                await self.open_buckets()
        return self.buckets.get(name)

    async def open_buckets(self) -> None:
        if self.js is None:
            return
        try:
            opened = await ensure_buckets(self.js)
        except (nats.errors.Error, TradecopyError, TimeoutError) as exc:
            log.error("api_nats_buckets_unavailable", error=str(exc))
            return
        self.buckets = {name: opened[name] for name in _BUCKETS}


def build_app(
    config: ApiConfig,
    pool: Any,
    nc: Any,
    *,
    secrets: ApiSecrets | None = None,
    app_scoping: bool = True,
) -> web.Application:
    """The application: routes, middleware, and the state handlers share. ``secrets``
    default to the environment's; ``app_scoping=False`` exists for the test that shows
    row-level security refuses on its own."""
    store = Store(pool, role=config.database_role, app_scoping=app_scoping)
    state = ApiState(config, secrets or secrets_from_env(), store, nc)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[api_middleware])
    app[STATE_KEY] = state
    for route in ROUTES:
        app.router.add_route(route.method, route.path, endpoint(route))

    async def on_startup(_: web.Application) -> None:
        await state.open_buckets()

    app.on_startup.append(on_startup)
    return app


async def run_api(config: ApiConfig, *, dev: bool = False) -> None:
    """Serve until SIGINT/SIGTERM. ``dev``: ephemeral secrets when none are set (loudly)."""
    secrets = secrets_from_env(dev=dev)
    url, embedded = await start_database(config.database_url)
    nc = None
    pool = None
    runner = None
    ops = None
    try:
        if config.migrate:
            await migrate(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=10)
        nc = await connect(config.nats_url, "tradecopy-api")
        app = build_app(config, pool, nc, secrets=secrets)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        state = app[STATE_KEY]
        if config.metrics_port is not None:
            ops = OpsServer(config.metrics_host, config.metrics_port, lambda: _health(state))
            await ops.start()
        log.info("api_started", host=config.host, port=config.port, ephemeral=secrets.ephemeral)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if ops is not None:
            await ops.stop()
        if runner is not None:
            await runner.cleanup()
        if nc is not None and not nc.is_closed:
            await nc.close()
        if pool is not None:
            await pool.close()
        if embedded is not None:
            await embedded.stop()
        log.info("api_stopped")


def _health(state: ApiState) -> dict[str, object]:
    connected = state.nc is not None and state.nc.is_connected
    return {"ok": connected and bool(state.buckets), "nats_connected": connected}
