"""Replicator processes killed with SIGKILL at random moments lose and duplicate nothing."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.account import AccountState, SymbolSpec
from schemas.common import Side
from schemas.links import CopyLink, Multiplier
from schemas.master import MasterEvent, PositionClosed, PositionModified, PositionOpened
from schemas.streams import FOLLOWER_ORDERS_STREAM

PARTITIONS = 4
MASTERS = 3
FOLLOWERS_PER_MASTER = 40
EVENTS_PER_MASTER = 45  # 15 open → modify → close cycles
ACK_WAIT_S = 1.0
MIN_KILLS = 8


def _spawn(url: str, name: str, shard: str | None = None) -> subprocess.Popen[bytes]:
    """One replicator instance; ``shard`` ("i/n") plans only that link shard."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "engine.cli", "replicator", "run", "--nats-url", url),
            *("--partitions", str(PARTITIONS), "--ack-wait", str(ACK_WAIT_S)),
            *("--metrics-port", "-1", "--instance", name, "--log-level", "error"),
            *(() if shard is None else ("--shard", shard)),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _master_event(master: str, seq: int) -> MasterEvent:
    position = f"{master}-pos-{seq // 3}"
    common = {
        "event_id": f"{master}-{seq:04d}",
        "master": master,
        "symbol": "XAUUSD",
        "ts_ns": time.time_ns(),
        "position_id": position,
        "side": Side.BUY,
    }
    step = seq % 3
    if step == 0:
        return PositionOpened(**common, volume=0.1 * (1 + seq % 4), price=2000.0, sl=1990.0)
    if step == 1:
        return PositionModified(**common, sl=1995.0, tp=2050.0)
    return PositionClosed(**common, volume=0.1, price=2010.0)


async def _seed(buckets: dict[str, Any]) -> list[CopyLink]:
    links = []
    for m in range(MASTERS):
        for f in range(FOLLOWERS_PER_MASTER):
            follower = f"fo-{m}-{f:03d}"
            link = CopyLink(
                link_id=f"ln-{m}-{f:03d}",
                master=f"ma-{m}",
                follower=follower,
                sizing=Multiplier(factor=1.0 + f % 3),
            )
            links.append(link)
            state = AccountState(account=follower, ts_ns=1, currency="USD", balance=1e4, equity=1e4)
            spec = SymbolSpec(
                account=follower, symbol="XAUUSD", contract_size=100, tick_size=0.01,
                tick_value=1.0, digits=2, volume_min=0.01, volume_max=50, volume_step=0.01,
            )  # fmt: skip
            await buckets[subjects.KV_ACCOUNTS].put(follower, codec.encode(state))
            await buckets[subjects.KV_SYMBOLS].put(
                subjects.symbol_key(follower, "XAUUSD"), codec.encode(spec)
            )
            await buckets[subjects.KV_LINKS].put(link.link_id, codec.encode(link))
    return links


async def _burst_under_kills(
    nats_server: Any, js: Any, shards: dict[str, str | None], seed: int, settle_s: float
) -> None:
    """Every master's events published while instances (name → shard) are SIGKILLed and
    respawned at random; then every order is stored once, and in event order per follower."""
    await ensure_streams(js, PARTITIONS)
    links = await _seed(await ensure_buckets(js))
    links_by_master: dict[str, list[CopyLink]] = defaultdict(list)
    for link in links:
        links_by_master[link.master].append(link)

    rng = random.Random(seed)
    instances = {name: _spawn(nats_server.url, name, shard) for name, shard in shards.items()}
    kills = 0
    stop_killing = asyncio.Event()

    async def killer() -> None:
        nonlocal kills
        await asyncio.sleep(settle_s)  # let the first instances come up
        while not (stop_killing.is_set() and kills >= MIN_KILLS):
            await asyncio.sleep(rng.uniform(0.15, 0.6))
            name = rng.choice(sorted(instances))
            instances[name].kill()  # SIGKILL: no cleanup, no ack, no goodbye
            instances[name].wait()
            kills += 1
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            instances[name] = _spawn(nats_server.url, name, shards[name])

    killing = asyncio.create_task(killer())
    expected: list[str] = []
    try:
        for seq in range(EVENTS_PER_MASTER):
            for m in range(MASTERS):
                event = _master_event(f"ma-{m}", seq)
                await js.publish(
                    subjects.master_events(event.master),
                    codec.encode(event),
                    headers={"Nats-Msg-Id": event.event_id},
                )
                expected += [
                    f"{event.event_id}:{link.link_id}" for link in links_by_master[event.master]
                ]
            await asyncio.sleep(rng.uniform(0.02, 0.08))
    finally:
        stop_killing.set()
        await killing

    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            info = await js.stream_info(FOLLOWER_ORDERS_STREAM)
            if info.state.messages >= len(expected):
                break
            await asyncio.sleep(0.25)
        # Give any late duplicate a chance to show up before counting.
        await asyncio.sleep(ACK_WAIT_S * 2)
        info = await js.stream_info(FOLLOWER_ORDERS_STREAM)

        received: list[Any] = []
        done = asyncio.Event()

        async def collect(msg: Any) -> None:
            received.append(codec.follower_order_decoder.decode(msg.data))
            if len(received) >= info.state.messages:
                done.set()

        sub = await js.subscribe(
            subjects.FOLLOWER_ORDERS,
            stream=FOLLOWER_ORDERS_STREAM,
            cb=collect,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        await asyncio.wait_for(done.wait(), timeout=30)
        await sub.unsubscribe()
    finally:
        for proc in instances.values():
            proc.kill()
            proc.wait()

    assert kills >= MIN_KILLS
    ids = [order.order_id for order in received]
    assert len(ids) == len(set(ids)), "an order was stored twice"
    assert sorted(ids) == sorted(expected), "orders missing or unexpected"
    # Per master and follower, orders follow the master's event order.
    seen: dict[tuple[str, str], list[str]] = defaultdict(list)
    for order in received:
        seen[(order.master, order.follower)].append(order.master_event_id)
    for key, event_ids in seen.items():
        assert event_ids == sorted(event_ids), f"out of order for {key}"
        assert len(event_ids) == EVENTS_PER_MASTER


@pytest.mark.slow
async def test_sigkilled_replicators_lose_and_duplicate_no_order(nats_server: Any, js: Any) -> None:
    await _burst_under_kills(nats_server, js, {"r1": None, "r2": None}, 20261121, 1.5)


SHARDS = 2


@pytest.mark.slow
async def test_sigkilled_sharded_replicators_lose_and_duplicate_no_order(
    nats_server: Any, js: Any
) -> None:
    """The same, with every master's links split over two link shards, two instances each:
    a killed instance's shard is taken over by its twin, and per follower the order holds."""
    shards = {f"r{i}": f"{i % SHARDS}/{SHARDS}" for i in range(2 * SHARDS)}
    await _burst_under_kills(nats_server, js, shards, 20261129, 2.5)
