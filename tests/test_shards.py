"""Link shards: one master's links split across replicator instances, each planning its own.

Unit checks of the split, then real replicators (two shards, in this process) on a real
nats-server: every link gets its orders exactly once, in the master's event order, batches of
two shards for one connector both arrive, and a shard's instance only plans its own links.
Large fan-outs on one instance store every order once, through NATS failures too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from test_replicator_service import PARTITIONS, Env, _silence_orders_of, closed, opened

from engine.replicator.config import ReplicatorConfig, link_shard, owns_link
from engine.replicator.live import LiveView
from engine.replicator.service import consumer_name, deliver_group, deliver_subject
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec
from schemas.links import CopyLink
from schemas.orders import FollowerOrderBatch
from schemas.streams import FOLLOWER_ORDERS_STREAM, MASTER_EVENTS_STREAM, replicator_consumer


def test_every_link_is_in_exactly_one_shard_and_always_the_same() -> None:
    ids = [f"link-{i}" for i in range(1_000)]
    for shards in (1, 2, 3, 7):
        configs = [ReplicatorConfig(shard=i, shards=shards) for i in range(shards)]
        for link_id in ids:
            assert sum(owns_link(c, link_id) for c in configs) == 1
    # A stable hash (crc32), not Python's per-process one: every instance agrees.
    assert [link_shard(f"link-{i}", 2) for i in range(6)] == [
        link_shard(f"link-{i}", 2) for i in range(6)
    ]
    assert link_shard("gold-x2", 4) == 3724385615 % 4  # crc32(b"gold-x2")
    counts = [sum(link_shard(i, 2) == s for i in ids) for s in (0, 1)]
    assert min(counts) > 400  # an even split, roughly


def test_a_shard_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="shard 2"):
        ReplicatorConfig(shard=2, shards=2)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"shard": 0, "shards": 0}, ReplicatorConfig)


def test_unsharded_names_are_the_contracts_and_sharded_ones_are_their_own() -> None:
    assert consumer_name(3) == replicator_consumer(3)
    assert deliver_subject(3) == "tc.v1.deliver.replicator.p3"
    assert deliver_group() == "tc-replicators"
    names = {consumer_name(3, s, 2) for s in (0, 1)} | {replicator_consumer(3)}
    assert len(names) == 3
    assert deliver_subject(3, 1, 2) == "tc.v1.deliver.replicator.p3.s1of2"
    assert deliver_group(1, 2) != deliver_group(0, 2)


def test_a_shards_live_view_keeps_only_its_own_links() -> None:
    config = ReplicatorConfig(shard=1, shards=2)
    live = LiveView({}, lambda link_id: owns_link(config, link_id))
    links = [CopyLink(link_id=f"l{i}", master="m1", follower=f"f{i}") for i in range(20)]
    for n, link in enumerate(links, 1):
        live._apply_link(link.link_id, codec.encode(link), n)
    mine = sorted(link.link_id for link in links if link_shard(link.link_id, 2) == 1)
    assert 0 < len(mine) < 20
    assert sorted(live.links) == mine
    assert [cl.link_id for cl in live.links_by_master["m1"]] == mine
    fan_out = live.fan_outs.get("m1", "EURUSD")
    assert fan_out is not None and [p.link_id for p in fan_out.programs] == mine


@pytest.fixture
async def env(nats_server: Any, js: Any) -> AsyncIterator[Env]:
    await ensure_streams(js, PARTITIONS)
    environment = Env(nats_server.url, js, await ensure_buckets(js))
    await environment.collect()
    yield environment
    await environment.stop_all()


async def _idle(env: Env, shards: int) -> None:
    async def all_done() -> bool:
        for partition in range(PARTITIONS):
            for shard in range(shards):
                info = await env.js.consumer_info(
                    MASTER_EVENTS_STREAM, consumer_name(partition, shard, shards)
                )
                if info.num_pending or info.num_ack_pending:
                    return False
        return True

    await env.wait(all_done, "every shard to acknowledge every master event")


@pytest.mark.parametrize("batched", [False, True], ids=["per-order", "batched"])
async def test_two_shards_copy_every_link_once_in_event_order(env: Env, batched: bool) -> None:
    links = [CopyLink(link_id=f"ln-{i:02d}", master="m1", follower=f"f{i:02d}") for i in range(12)]
    for link in links:
        await env.follower(link, connector="conn-a" if batched else "")
    shards = [link_shard(link.link_id, 2) for link in links]
    assert set(shards) == {0, 1}  # both shards have work
    for shard in (0, 1):
        await env.start(shard=shard, shards=2, batch_by_connector=batched)
    events = []
    for n in range(3):
        events += [opened(f"ev-{n}-open", "m1", f"p{n}"), closed(f"ev-{n}-close", "m1", f"p{n}")]
    for event in events:
        await env.publish(event)
    expected = sorted(f"{e.event_id}:{link.link_id}" for e in events for link in links)
    await env.wait(lambda: len(env.order_ids()) >= len(expected), "every order")
    await _idle(env, 2)
    assert sorted(env.order_ids()) == expected  # each exactly once
    # Per follower, the master's event order.
    for link in links:
        seen = [
            o.master_event_id
            for _, message in env.orders
            for o in (message.orders if isinstance(message, FollowerOrderBatch) else [message])
            if o.link_id == link.link_id
        ]
        assert seen == [e.event_id for e in events], link.link_id
    # Each instance planned only its own shard.
    for shard, replicator in enumerate(env.replicators):
        assert replicator.live is not None
        assert sorted(replicator.live.links) == sorted(
            link.link_id for link, s in zip(links, shards, strict=True) if s == shard
        )
    if batched:
        batches = [m for _, m in env.orders if isinstance(m, FollowerOrderBatch)]
        # One batch per shard and event for the one connector, under ids of their own.
        assert len(batches) == 2 * len(events)
        assert len({b.batch_id for b in batches}) == len(batches)


async def test_a_new_shard_layout_takes_over_where_the_old_one_stopped(env: Env) -> None:
    """Moving from one instance to two link shards (or changing the number of shards) copies
    the events the old layout had not acknowledged, and never again those it had."""
    links = [CopyLink(link_id=f"ln-{i:02d}", master="m1", follower=f"f{i:02d}") for i in range(6)]
    for link in links:
        await env.follower(link)
    await env.start()
    await env.publish(opened("ev-before", "m1", "p1"))
    await env.wait(lambda: len(env.order_ids()) >= len(links), "the first layout's orders")
    await _idle(env, 1)
    await env.stop_all()
    await env.publish(closed("ev-between", "m1", "p1"))  # published while nobody runs
    for shard in (0, 1):
        await env.start(shard=shard, shards=2)
    await env.publish(opened("ev-after", "m1", "p2"))
    expected = sorted(f"{e}:{link.link_id}" for e in ("ev-before", "ev-between", "ev-after")
                      for link in links)  # fmt: skip
    await env.wait(lambda: len(env.order_ids()) >= len(expected), "every order")
    await _idle(env, 2)
    assert sorted(env.order_ids()) == expected  # ev-between once
    # The stream's dedup would hide a replayed order: count what each shard was given.
    assert [r.events_processed for r in env.replicators] == [2, 2]  # ev-before not again


@pytest.mark.parametrize("batched", [False, True], ids=["per-order", "batched"])
async def test_a_fan_out_over_several_connectors_stores_every_order_once(
    env: Env, batched: bool
) -> None:
    # Three connectors and followers without one.
    links = [CopyLink(link_id=f"gr-{i:03d}", master="m1", follower=f"g{i:03d}") for i in range(300)]
    for i, link in enumerate(links):
        await env.follower(link, connector="" if i % 7 == 0 else f"conn-{i % 3}")
    await env.start(batch_by_connector=batched)
    events = [opened("ev-open", "m1", "p1"), closed("ev-close", "m1", "p1")]
    for event in events:
        await env.publish(event)
    expected = sorted(f"{e.event_id}:{link.link_id}" for e in events for link in links)
    await env.wait(lambda: len(env.order_ids()) >= len(expected), "every order")
    await env.idle()
    assert sorted(env.order_ids()) == expected
    batches = [m for _, m in env.orders if isinstance(m, FollowerOrderBatch)]
    if batched:
        # One batch per connector and event, each with all of that connector's orders.
        assert sorted(b.batch_id for b in batches) == sorted(
            f"{e.event_id}@conn-{c}" for e in events for c in range(3)
        )
    else:
        assert batches == []


async def test_a_large_fan_out_nats_does_not_store_is_sent_again_and_nothing_twice(
    env: Env, nc: Any
) -> None:
    # 200 single orders; until the undo, the stream takes none and one's ack never comes.
    links = [CopyLink(link_id=f"gr-{i:03d}", master="m1", follower=f"g{i:03d}") for i in range(200)]
    for link in links:
        await env.follower(link)
    await env.start(
        publish_timeout_s=0.3, publish_attempts=2, redelivery_delay_s=0.1, max_deliveries=1_000
    )
    undo = await _silence_orders_of(env, nc, "g150")
    await env.publish(opened("ev-1", "m1", "p1"))
    await env.wait(lambda: len(env.silenced) >= 4, "the silenced order sent again and again")
    assert set(env.silenced) == {"ev-1:gr-150"}
    await undo()
    expected = sorted(f"ev-1:{link.link_id}" for link in links)
    await env.wait(lambda: len(env.order_ids()) >= len(expected), "every order")
    await env.idle()
    assert sorted(env.order_ids()) == expected
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == len(expected)
    assert env.rejections == []
