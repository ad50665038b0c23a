"""The ledger service against real servers: JetStream streams in, PostgreSQL rows out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from conftest import wait_until
from test_ledger_store import NOW_NS, decision, filled, follower_open, opened, state

from engine.ledger import store
from engine.ledger.config import LedgerConfig
from engine.ledger.records import Kind
from engine.ledger.service import SOURCES, Ledger
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsserver import EmbeddedNats
from schemas import codec, subjects
from schemas.orders import FollowerOrderBatch
from schemas.streams import FOLLOWER_ORDERS_STREAM


@pytest.fixture
async def ready(database_url: str, js: Any) -> tuple[str, Any, dict[str, Any]]:
    await ensure_streams(js, 4)
    buckets = await ensure_buckets(js)
    await store.migrate(database_url)
    return database_url, js, buckets


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


def config(server: EmbeddedNats, instance: str = "t1", **overrides: Any) -> LedgerConfig:
    return LedgerConfig(nats_url=server.url, instance=instance, metrics_port=None, **overrides)


async def started(server: EmbeddedNats, url: str, instance: str = "t1", **kw: Any) -> Ledger:
    ledger = Ledger(config(server, instance, **kw), url)
    await ledger.start()
    return ledger


async def count(pg: Any, kind: Kind) -> int:
    return int(await pg.fetchval(f"SELECT count(*) FROM {store.TABLES[kind]}"))


async def publish(js: Any, subject: str, message: Any, msg_id: str | None = None) -> None:
    headers = None if msg_id is None else {"Nats-Msg-Id": msg_id}
    await js.publish(subject, codec.encode(message), headers=headers)


async def test_every_kind_of_message_is_stored_once_and_acknowledged(
    ready: tuple[str, Any, dict[str, Any]], nats_server: EmbeddedNats, pg: Any
) -> None:
    url, js, buckets = ready
    ledger = await started(nats_server, url)
    try:
        await publish(js, subjects.master_events("m1"), opened("e1"))
        orders = [follower_open(f"o{i}", follower=f"f{i}") for i in range(50)]
        batch = FollowerOrderBatch(
            batch_id="e1@c1", connector="c1", master="m1", master_event_id="e1",
            ts_ns=NOW_NS, orders=orders,
        )  # fmt: skip
        await publish(js, subjects.connector_orders("c1"), batch)
        await publish(js, subjects.follower_orders("f99"), follower_open("o99", follower="f99"))
        await publish(js, subjects.execution_reports("f1"), filled("o1"))
        await publish(js, subjects.decisions("f1", "l-f1"), decision("d1"))
        await buckets[subjects.KV_ACCOUNTS].put("f1", codec.encode(state("f1", NOW_NS)))
        want = {Kind.MASTER_EVENT: 1, Kind.FOLLOWER_ORDER: 51, Kind.EXECUTION_REPORT: 1,
                Kind.DECISION: 1, Kind.ACCOUNT_STATE: 1}  # fmt: skip

        async def all_stored() -> bool:
            return all([await count(pg, kind) == n for kind, n in want.items()])

        await wait_until(all_stored, "every message stored")
        for source in SOURCES:

            async def settled(source: Any = source) -> bool:
                info = await js.consumer_info(source.stream, source.durable)
                return info.num_pending == 0 and info.num_ack_pending == 0

            await wait_until(settled, f"{source.durable} acknowledged everything")
    finally:
        await ledger.stop()


async def test_a_republished_id_and_a_second_instance_store_nothing_twice(
    ready: tuple[str, Any, dict[str, Any]], nats_server: EmbeddedNats, pg: Any
) -> None:
    url, js, _ = ready
    ledgers = [await started(nats_server, url, f"t{i}") for i in range(2)]
    try:
        for i in range(300):
            order = follower_open(f"o{i}", follower=f"f{i % 7}")
            await publish(js, subjects.follower_orders(order.follower), order)
            if i % 3 == 0:
                # Outside JetStream's dedup (no Nats-Msg-Id): the ledger's key catches it.
                await publish(js, subjects.follower_orders(order.follower), order)

        async def done() -> bool:
            info = await js.consumer_info(FOLLOWER_ORDERS_STREAM, "ledger-follower-orders")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_until(done, "every order message acknowledged")
        assert await count(pg, Kind.FOLLOWER_ORDER) == 300
        assert sum(ledger.messages_stored for ledger in ledgers) == 400
    finally:
        for ledger in ledgers:
            await ledger.stop()


async def test_a_bad_message_is_dropped_and_the_rest_of_its_batch_stored(
    ready: tuple[str, Any, dict[str, Any]], nats_server: EmbeddedNats, pg: Any
) -> None:
    url, js, _ = ready
    await js.publish(subjects.decisions("f1", "l1"), b"\xc1 not msgpack")
    await publish(js, subjects.decisions("f1", "l1"), decision("d\x00nul"))
    await publish(js, subjects.decisions("f1", "l1"), decision("d-good"))
    ledger = await started(nats_server, url)
    try:

        async def good_stored() -> bool:
            return await count(pg, Kind.DECISION) == 1

        await wait_until(good_stored, "the good decision stored")

        async def settled() -> bool:
            info = await js.consumer_info("TC_DECISIONS", "ledger-decisions")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_until(settled, "the bad messages terminated, nothing left pending")
        assert [r[0] for r in await pg.fetch("SELECT decision_id FROM ledger_decisions")] == [
            "d-good"
        ]
        assert ledger.health()["ok"] is True
    finally:
        await ledger.stop()


async def test_a_batch_waits_for_the_database_and_is_stored_when_it_returns(
    ready: tuple[str, Any, dict[str, Any]], nats_server: EmbeddedNats, pg: Any
) -> None:
    url, js, _ = ready
    ledger = await started(nats_server, url, write_attempts=20)
    try:
        # Hold the table: the ledger's insert waits on the lock, then commits after it.
        async with pg.transaction():
            await pg.execute("LOCK TABLE ledger_execution_reports IN ACCESS EXCLUSIVE MODE")
            await publish(js, subjects.execution_reports("f1"), filled("o1"))
            await asyncio.sleep(0.5)
            info = await js.consumer_info("TC_EXECUTION_REPORTS", "ledger-execution-reports")
            assert info.num_ack_pending == 1  # fetched, not acknowledged before its commit
        await wait_until(
            lambda: count(pg, Kind.EXECUTION_REPORT), "the report stored after the lock"
        )
    finally:
        await ledger.stop()


async def test_a_consumer_stuck_behind_a_held_table_turns_health_unhealthy_until_it_moves(
    ready: tuple[str, Any, dict[str, Any]], nats_server: EmbeddedNats, pg: Any
) -> None:
    url, js, _ = ready
    ledger = await started(
        nats_server, url, write_attempts=20, stall_after_s=0.5, health_poll_s=0.1
    )
    try:
        await wait_until(lambda: ledger.health()["ok"], "a healthy ledger")
        async with pg.transaction():
            await pg.execute("LOCK TABLE ledger_decisions IN ACCESS EXCLUSIVE MODE")
            await publish(js, subjects.decisions("f1", "l1"), decision("d-stuck"))

            def stuck() -> bool:
                return not ledger.health()["ok"]

            await wait_until(stuck, "the decisions consumer reported stuck")
            health = ledger.health()
            assert health["stalled_consumers"] == [Kind.DECISION.value], health
            assert "without progress" in str(health["reason"])
            assert health["nats_connected"] is True and health["database_ok"] is True
            assert ledger.stall_s(Kind.MASTER_EVENT) == 0.0  # an idle consumer is not stuck
        await wait_until(lambda: ledger.health()["ok"], "healthy again once the row is stored")
        assert await count(pg, Kind.DECISION) == 1
    finally:
        await ledger.stop()


async def test_messages_beyond_one_batch_are_all_stored_in_batches_of_at_most_batch_max(
    ready: tuple[str, Any, dict[str, Any]], nats_server: EmbeddedNats, pg: Any
) -> None:
    """A backlog larger than a pull request and a batch: the pull requests are renewed as it
    drains, and no transaction holds more than ``batch_max`` messages of a stream."""
    from prometheus_client import REGISTRY

    def batches_over(bound: float) -> float:
        labels = {"kind": Kind.EXECUTION_REPORT.value}
        count_ = REGISTRY.get_sample_value("tradecopy_ledger_batch_messages_count", labels)
        within = REGISTRY.get_sample_value(
            "tradecopy_ledger_batch_messages_bucket", {**labels, "le": str(bound)}
        )
        return (count_ or 0.0) - (within or 0.0)

    url, js, _ = ready
    before = batches_over(20.0)
    for i in range(250):
        await publish(js, subjects.execution_reports(f"f{i % 5}"), filled(f"o{i}", f"f{i % 5}"))
    ledger = await started(nats_server, url, batch_max=20)
    try:

        async def all_stored() -> bool:
            return await count(pg, Kind.EXECUTION_REPORT) == 250

        await wait_until(all_stored, "every report of the backlog stored", timeout=30)
        # The count moves once the writer is past its commit (a moment after the rows show).
        await wait_until(lambda: ledger.messages_stored == 250, "the stored count at 250")
        await asyncio.sleep(0.2)
        assert ledger.messages_stored == 250  # and no more: nothing was written twice
        assert batches_over(20.0) == before
    finally:
        await ledger.stop()
