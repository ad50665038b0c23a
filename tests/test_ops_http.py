"""The operator HTTP endpoint: Prometheus exposition and health status codes, and the progress
watch health checks use to tell a working process from one that is merely up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import aiohttp
import prometheus_client
import pytest

from engine.runtime.http import OpsServer, ProgressWatch


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
            body = await resp.json()
            assert "replicator gone" in body["error"] and body["reason"]
    finally:
        await ops.stop()
        await ops.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_idle_is_never_stalled_and_pending_work_without_progress_is() -> None:
    clock = Clock()
    watch = ProgressWatch(clock)
    clock.now += 3600
    assert watch.stalled_for() == 0.0  # idle for an hour: nothing is stuck
    watch.working()
    clock.now += 5
    watch.working()  # more work arriving is not progress
    clock.now += 5
    assert watch.stalled_for() == 10.0
    watch.advanced(still_pending=True)
    clock.now += 2
    assert watch.stalled_for() == 2.0
    watch.advanced(still_pending=False)
    clock.now += 60
    assert watch.stalled_for() == 0.0


def test_a_polled_mark_that_stops_moving_while_work_is_pending_is_a_stall() -> None:
    clock = Clock()
    watch = ProgressWatch(clock)
    watch.observe(pending=True, mark=10)  # work seen for the first time: the clock starts
    clock.now += 4
    watch.observe(pending=True, mark=11)  # the ack floor moved: progress
    clock.now += 3
    watch.observe(pending=True, mark=11)
    clock.now += 3
    assert watch.stalled_for() == 6.0
    watch.observe(pending=False, mark=11)  # drained
    assert watch.stalled_for() == 0.0
    clock.now += 100
    watch.observe(pending=True, mark=11)  # new work after a quiet spell starts a new count
    clock.now += 1
    assert watch.stalled_for() == 1.0
