"""The platform API: an aiohttp application over PostgreSQL (the API's tables) and NATS (the
buckets the CLI writes), and ``run_api`` to serve it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats.errors
import structlog
from aiohttp import web

from engine.api import metrics, openapi, stream
from engine.api.auth import Caller, Role, same_digest, token_hash
from engine.api.config import (
    ENV_JWT_SECRET,
    ENV_MASTER_KEY,
    ENV_MASTER_KEY_ID,
    ApiConfig,
    ApiSecrets,
    MasterKey,
    secrets_from_env,
    with_environment,
)
from engine.api.errors import RateLimited, Unauthorized
from engine.api.handling import STATE_KEY, api_middleware, endpoint
from engine.api.outbox import EmailSender
from engine.api.ratelimit import TokenBuckets
from engine.api.routes import ROUTES
from engine.api.store import PLATFORM, Store, migrate, register_local_tenant
from engine.core.errors import TradecopyError
from engine.runtime.files import write_new_secret
from engine.runtime.http import OpsServer
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.natsconn import connect
from engine.runtime.postgres import ENV_DATABASE_URL, start_database
from engine.runtime.processes import stop_process
from schemas import subjects

log = structlog.get_logger("tradecopy.api")

_BUCKETS = (subjects.KV_LINKS, subjects.KV_CONTROL, subjects.KV_ACCOUNTS, subjects.KV_SYMBOLS,
            subjects.KV_LINK_STATE, subjects.KV_SIGNAL_DEPLOYMENTS)  # fmt: skip
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
        self.mailer = EmailSender(self)
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Any) -> None:
        """Run ``work`` after the answer (held here until done, awaited at shutdown): an
        endpoint that must answer alike whatever happens, like a password reset request."""
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def limit(self, request: web.Request, what: str) -> None:
        """Spend one auth attempt of this client (IP) for ``what``; 429 when none is left."""
        wait = self.auth_limits.take(f"{request.remote}|{what}")
        if wait > 0:
            metrics.RATE_LIMITED.labels(what.partition(":")[0]).inc()
            raise RateLimited(wait)

    async def caller_of_api_key(self, key: str) -> Caller:
        digest = token_hash(key)
        async with self.store.read(PLATFORM) as conn:  # every API-key request: keep it short
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
    app[stream.STREAMS_KEY] = live_streams = stream.OpenStreams()
    app.on_shutdown.append(live_streams.close_all)  # live streams end before connections
    for route in ROUTES:
        app.router.add_route(route.method, route.path, endpoint(route))

    async def on_startup(_: web.Application) -> None:
        await state.open_buckets()

    async def start_mailer(_: web.Application) -> None:
        state.mailer.start()

    async def stop_mailer(_: web.Application) -> None:
        if state.background:
            await asyncio.gather(*state.background, return_exceptions=True)
        await state.mailer.stop()

    app.on_startup.append(on_startup)
    app.on_startup.append(start_mailer)
    app.on_cleanup.append(stop_mailer)
    return app


async def run_api(config: ApiConfig, *, dev: bool = False) -> None:
    """Serve until SIGINT/SIGTERM. ``dev``: ephemeral secrets when none are set (loudly)."""
    secrets = secrets_from_env(dev=dev)
    config = with_environment(config)  # smtp, public_url: where the secrets are set
    url, embedded = await start_database(config.database_url)
    nc = None
    pool = None
    runner = None
    ops = None
    try:
        if config.migrate:
            await migrate(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=10, reset=reset_pooled)
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


async def reset_pooled(conn: Any) -> None:
    """What a connection needs before the pool hands it out again: no open transaction.
    Everything ``Store.tx`` sets is transaction-local (``set_config(..., true)``), so
    asyncpg's default reset (``RESET ALL``, ``CLOSE ALL``, ``UNLISTEN *``, a round trip per
    request) has nothing to undo."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _health(state: ApiState) -> dict[str, object]:
    connected = state.nc is not None and state.nc.is_connected
    return {"ok": connected and bool(state.buckets), "nats_connected": connected}


# ------------------------------------------------------------ local stacks (up, demo, bench)


def spawn_api(
    nats_url: str,
    database_url: str,
    secrets: ApiSecrets,
    *,
    port: int,
    host: str = "127.0.0.1",
    log_level: str = "warning",
    env: Mapping[str, str] | None = None,
    quiet: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``tradecopy api run`` with this interpreter, on ``host:port``, without /metrics.
    ``env`` (default: ours) carries its NATS credentials; the database URL and the secrets go
    there too, never on the command line."""
    args = [sys.executable, "-P", "-m", "engine.cli", "api", "run", "--host", host,
            "--port", str(port), "--nats-url", nats_url, "--metrics-port", "-1",
            "--log-level", log_level]  # fmt: skip
    child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    child_env[ENV_DATABASE_URL] = database_url
    child_env[ENV_JWT_SECRET] = secrets.jwt_secret.decode()
    child_env[ENV_MASTER_KEY] = base64.b64encode(secrets.master_key.key).decode()
    child_env[ENV_MASTER_KEY_ID] = secrets.master_key.key_id
    return subprocess.Popen(
        args, env=child_env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
    )  # fmt: skip


async def wait_for_api(
    base_url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Until the API answers ``GET /v1/openapi.json``; fails early if ``proc`` exits."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the API exited with status {proc.returncode}")
            try:
                async with http.get(f"{base_url}/v1/openapi.json", timeout=2) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not answer at {base_url} within {timeout:g} s")
            await asyncio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class LocalApi:
    """The API a local stack runs: its process, where it listens, and the key files."""

    proc: subprocess.Popen[bytes]
    url: str
    key_files: dict[str, Path]
    """Follower account → the file holding its follower's API key (0600)."""
    secrets: ApiSecrets


async def start_local_api(
    nats_url: str,
    database_url: str,
    state_dir: Path,
    *,
    port: int,
    masters: list[str],
    followers: list[str],
    env: Mapping[str, str] | None = None,
    tenant_id: str = "local",
    quiet: bool = True,
) -> LocalApi:
    """``up`` and ``demo``: the API's migrations, a tenant owning the paper accounts (under
    their venue ids, so the ledger's facts are theirs), a new API key per follower written to
    ``state_dir/<account>.key`` (0600), and ``tradecopy api run`` on 127.0.0.1:``port``.
    The secrets are kept in ``state_dir`` (0600) so what was sealed stays readable across
    restarts of the stack."""
    await migrate(database_url)
    state_dir.mkdir(parents=True, exist_ok=True)
    secrets = _local_secrets_in(state_dir / "secrets.json")
    keys = await register_local_tenant(
        database_url, secrets.master_key, tenant_id=tenant_id, masters=masters,
        followers=followers,
    )  # fmt: skip
    key_files = {}
    for account, key in keys.items():
        path = state_dir / f"{account}.key"
        path.unlink(missing_ok=True)  # the previous run's key still works; this one is new
        key_files[account] = write_new_secret(path, key + "\n")
    proc = spawn_api(nats_url, database_url, secrets, port=port, env=env, quiet=quiet)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for_api(url, proc)
    except BaseException:
        stop_process(proc)
        raise
    return LocalApi(proc=proc, url=url, key_files=key_files, secrets=secrets)


def _local_secrets_in(path: Path) -> ApiSecrets:
    if path.exists():
        saved = msgspec.json.decode(path.read_bytes())
        return ApiSecrets(
            jwt_secret=saved["jwt_secret"].encode(),
            master_key=MasterKey.parse(saved["key_id"], saved["master_key"]),
        )
    secrets = local_secrets()
    write_new_secret(path, msgspec.json.encode({
        "jwt_secret": secrets.jwt_secret.decode(), "key_id": secrets.master_key.key_id,
        "master_key": base64.b64encode(secrets.master_key.key).decode(),
    }).decode())  # fmt: skip
    return secrets


def local_secrets() -> ApiSecrets:
    """Fresh secrets for an API a local stack starts (kept by the stack, not the process:
    tokens and credentials stay readable across the API's restarts within the run)."""
    import secrets as random_secrets

    return ApiSecrets(
        jwt_secret=random_secrets.token_urlsafe(48).encode(),
        master_key=MasterKey.generate("local"),
    )
