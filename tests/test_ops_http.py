"""The operator HTTP endpoint: Prometheus exposition and health status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import aiohttp
import prometheus_client
import pytest

from engine.runtime.http import OpsServer


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_metrics_exposes_the_default_registry(http: aiohttp.ClientSession) -> None:
    # Unique name: the default registry is process-wide and rejects duplicates.
    name = f"tradecopy_test_{uuid4().hex[:8]}_orders"
    counter = prometheus_client.Counter(name, "orders seen by the test")
    counter.inc(3)
    try:
        async with OpsServer("127.0.0.1", 0, lambda: {"ok": True}) as ops:
            assert ops.port != 0
            async with http.get(f"http://127.0.0.1:{ops.port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
                text = await resp.text()
    finally:
        prometheus_client.REGISTRY.unregister(counter)

    assert f"{name}_total 3.0" in text


async def test_healthz_reflects_ok_flag(http: aiohttp.ClientSession) -> None:
    state: dict[str, object] = {"ok": True, "links": 2}
    async with OpsServer("127.0.0.1", 0, lambda: state) as ops:
        url = f"http://127.0.0.1:{ops.port}/healthz"
        async with http.get(url) as resp:
            assert resp.status == 200
            assert await resp.json() == {"ok": True, "links": 2}

        state["ok"] = False
        async with http.get(url) as resp:
            assert resp.status == 503
            assert (await resp.json())["ok"] is False


async def test_healthz_is_503_when_the_check_raises(http: aiohttp.ClientSession) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("replicator gone")

    ops = OpsServer("127.0.0.1", 0, broken)
    await ops.start()
    try:
        async with http.get(f"http://127.0.0.1:{ops.port}/healthz") as resp:
            assert resp.status == 503
            assert "replicator gone" in (await resp.json())["error"]
    finally:
        await ops.stop()
        await ops.stop()
