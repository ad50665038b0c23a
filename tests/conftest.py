"""Shared fixtures and helpers: a private JetStream-enabled nats-server per test, ``wait_until``,
and a fresh PostgreSQL database per test (``database_url``)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from engine.runtime.natsserver import EmbeddedNats
from engine.runtime.postgres import EmbeddedPostgres

#: How long a test waits for something that should happen within milliseconds.
WAIT_S = 10.0


async def wait_until(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = WAIT_S,
    details: Callable[[], object] | None = None,
) -> None:
    """Poll ``predicate`` (sync or async) until it holds; fail naming ``what`` on timeout.

    Import it as ``from conftest import wait_until``: pytest puts ``tests/`` on the path.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            extra = "" if details is None else f"\n{details()}"
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{extra}")
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs the CLI configures logging onto the stderr pytest captured for it, and
    that stream is closed afterwards: the next test gets the configuration it started with."""
    import logging

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(store_dir=tmp_path / "jetstream")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        # A test may have killed the server; draining would then wait on a dead link.
        if client.is_connected:
            await client.drain()
        else:
            await client.close()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


# ------------------------------------------------------------------------ PostgreSQL

#: The machine's PostgreSQL, used when it answers (trust authentication).
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _with_database(url: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _answers(url: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server tests may create databases on: ``DATABASE_URL`` if set, else the local one
    on 127.0.0.1:5432 if it answers, else an embedded PostgreSQL for the whole session."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    if asyncio.run(_answers(LOCAL_POSTGRES_URL)):
        yield LOCAL_POSTGRES_URL
        return
    server = EmbeddedPostgres(root=tmp_path_factory.mktemp("postgres"))
    asyncio.run(server.start())
    try:
        yield server.url
    finally:
        asyncio.run(server.stop())


@pytest.fixture
async def database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A database of this test's own (created empty, dropped after)."""
    import asyncpg

    name = f"tc_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(postgres_server_url, name)
    finally:
        admin = await asyncpg.connect(postgres_server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
