"""Shared fixtures and helpers: a private JetStream-enabled nats-server per test, ``wait_until``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from engine.runtime.natsserver import EmbeddedNats

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
