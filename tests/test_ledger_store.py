"""The ledger's rows and tables: what a message becomes, idempotent inserts, tenants, the facts
of one account in time order, and retention (against a real PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.ledger import store
from engine.ledger.records import BadMessage, Kind, rows_of
from engine.ledger.retention import months_before, prune
from schemas import codec
from schemas.account import AccountState
from schemas.common import Side
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.master import PositionClosed, PositionOpened
from schemas.orders import FollowerClose, FollowerOpen, FollowerOrderBatch
from schemas.rejections import MasterEventRejected, RejectionReason
from schemas.reports import OrderFilled, OrderUnknown

DAY_NS = 86_400 * 10**9
NOW_NS = 1_780_000_000 * 10**9  # 2026-05-28


def opened(event_id: str, master: str = "m1", ts_ns: int = NOW_NS) -> PositionOpened:
    return PositionOpened(
        event_id=event_id, master=master, symbol="XAUUSD", ts_ns=ts_ns, position_id="p1",
        side=Side.BUY, volume=0.1, price=2000.0,
    )  # fmt: skip


def follower_open(order_id: str, follower: str = "f1", ts_ns: int = NOW_NS) -> FollowerOpen:
    return FollowerOpen(
        order_id=order_id, link_id=f"l-{follower}", follower=follower, master="m1",
        master_event_id="e1", symbol="XAUUSD", ts_ns=ts_ns, master_position_id="p1",
        side=Side.BUY, volume=0.2,
    )  # fmt: skip


def filled(order_id: str, follower: str = "f1", ts_ns: int = NOW_NS) -> OrderFilled:
    return OrderFilled(
        order_id=order_id, link_id=f"l-{follower}", follower=follower, ts_ns=ts_ns,
        symbol="XAUUSD", position_id="fp1", side=Side.BUY, volume=0.2, price=2000.5,
    )  # fmt: skip


def decision(decision_id: str, ts_ns: int = NOW_NS) -> CopyDecision:
    return CopyDecision(
        decision_id=decision_id, link_id="l-f1", master="m1", follower="f1",
        outcome=DecisionOutcome.SKIPPED, rule=DecisionRule.MAX_LOT, message="too big",
        ts_ns=ts_ns, master_event_id="e1",
    )  # fmt: skip


def state(account: str, ts_ns: int, balance: float = 10_000.25) -> AccountState:
    return AccountState(
        account=account, ts_ns=ts_ns, currency="USD", balance=balance, equity=balance + 1.5
    )


def rows(kind: Kind, message: Any, subject: str = "tc.v1.follower.f1.orders", seq: int = 1):
    return rows_of(kind, subject, codec.encode(message), seq)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[Any]:
    await store.migrate(database_url)
    connection = await store.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


# ------------------------------------------------------------------------ records


def test_a_follower_order_batch_becomes_one_row_per_order_each_with_its_own_payload() -> None:
    orders = [follower_open(f"o{i}", follower=f"f{i}") for i in range(3)]
    batch = FollowerOrderBatch(
        batch_id="e1@c1", connector="c1", master="m1", master_event_id="e1", ts_ns=NOW_NS,
        orders=orders,
    )  # fmt: skip
    out = rows(Kind.FOLLOWER_ORDER, batch, subject="tc.v1.connector.c1.orders", seq=7)
    assert [(r[0], r[1], r[8], r[9]) for r in out] == [
        (f"o{i}", f"f{i}", 7, "e1@c1") for i in range(3)
    ]
    assert [codec.follower_order_decoder.decode(r[10]) for r in out] == orders


def test_messages_postgres_cannot_store_are_bad_and_delete_markers_are_nothing() -> None:
    with pytest.raises(BadMessage) as nul:
        rows(Kind.FOLLOWER_ORDER, follower_open("o\x00"))
    assert nul.value.reason == "nul_in_text"
    with pytest.raises(BadMessage) as late:
        rows(Kind.FOLLOWER_ORDER, follower_open("o1", ts_ns=2**63))
    assert late.value.reason == "timestamp_out_of_range"
    with pytest.raises(BadMessage) as garbage:
        rows_of(Kind.DECISION, "tc.v1.decision.f1.l1", b"\xc1not msgpack", 1)
    assert garbage.value.reason == "undecodable"
    assert rows_of(Kind.ACCOUNT_STATE, "$KV.tc_accounts.a1", b"", 3) == []


def test_every_kind_s_rows_match_its_column_list_and_timestamp_position() -> None:
    from engine.ledger.records import TS_INDEX

    samples = {
        Kind.MASTER_EVENT: opened("e1"),
        Kind.FOLLOWER_ORDER: follower_open("o1"),
        Kind.EXECUTION_REPORT: filled("o1"),
        Kind.DECISION: decision("d1"),
        Kind.ACCOUNT_STATE: state("f1", NOW_NS),
    }
    for kind, message in samples.items():
        [row] = rows(kind, message)
        assert len(row) == len(store.ROW_COLUMNS[kind]), kind
        assert store.ROW_COLUMNS[kind][TS_INDEX[kind]] == "ts_ns", kind
        assert row[TS_INDEX[kind]] == NOW_NS, kind


def test_account_state_money_is_stored_in_minor_units() -> None:
    [row] = rows(Kind.ACCOUNT_STATE, state("a1", NOW_NS, balance=1234.56))
    assert row[3:5] == (123_456, 123_606)
    [jpy] = rows(Kind.ACCOUNT_STATE, msgspec_replace(state("a1", NOW_NS, 150_000.0), "JPY"))
    assert jpy[3] == 150_000
    [broken] = rows(Kind.ACCOUNT_STATE, state("a1", NOW_NS, balance=float("nan")))
    assert broken[3] is None


def msgspec_replace(s: AccountState, currency: str) -> AccountState:
    import msgspec

    return msgspec.structs.replace(s, currency=currency)


# ------------------------------------------------------------------------ tables


async def test_storing_the_same_ids_again_inserts_nothing(conn: Any) -> None:
    first = rows(Kind.FOLLOWER_ORDER, follower_open("o1")) + rows(
        Kind.FOLLOWER_ORDER, follower_open("o2")
    )
    assert await store.insert_rows(conn, Kind.FOLLOWER_ORDER, first, "default") == 2
    again = first + rows(Kind.FOLLOWER_ORDER, follower_open("o3"))
    assert await store.insert_rows(conn, Kind.FOLLOWER_ORDER, again, "default") == 1
    assert await conn.fetchval("SELECT count(*) FROM ledger_follower_orders") == 3


async def test_an_order_is_reported_once_per_status(conn: Any) -> None:
    unknown = OrderUnknown(order_id="o1", link_id="l-f1", follower="f1", ts_ns=NOW_NS, reason="t")
    batch = rows(Kind.EXECUTION_REPORT, unknown) + rows(Kind.EXECUTION_REPORT, filled("o1"))
    assert await store.insert_rows(conn, Kind.EXECUTION_REPORT, batch * 2, "default") == 2


async def test_rows_carry_the_tenant_of_their_account_or_the_default(conn: Any) -> None:
    await store.set_account_tenant(conn, "f2", "provider-a")
    batch = rows(Kind.FOLLOWER_ORDER, follower_open("o1", follower="f1")) + rows(
        Kind.FOLLOWER_ORDER, follower_open("o2", follower="f2")
    )
    await store.insert_rows(conn, Kind.FOLLOWER_ORDER, batch, "solo")
    tenants = await conn.fetch("SELECT order_id, tenant FROM ledger_follower_orders ORDER BY 1")
    assert [tuple(r) for r in tenants] == [("o1", "solo"), ("o2", "provider-a")]
    assert await store.account_tenant(conn, "f2", "solo") == "provider-a"
    assert await store.account_tenant(conn, "f9", "solo") == "solo"


async def test_account_facts_are_every_kind_of_one_account_decoded_in_time_order(
    conn: Any,
) -> None:
    closed = PositionClosed(
        event_id="e2", master="f1", symbol="XAUUSD", ts_ns=NOW_NS + 5, position_id="p1",
        side=Side.BUY, volume=0.1, price=2001.0,
    )  # fmt: skip
    close = FollowerClose(
        order_id="o2", link_id="l-f1", follower="f1", master="m1", master_event_id="e2",
        symbol="XAUUSD", ts_ns=NOW_NS + 3, master_position_id="p1",
    )  # fmt: skip
    writes = [
        (Kind.ACCOUNT_STATE, state("f1", NOW_NS + 4), 9),
        (Kind.MASTER_EVENT, closed, 2),
        (Kind.FOLLOWER_ORDER, close, 3),
        (Kind.FOLLOWER_ORDER, follower_open("o1", ts_ns=NOW_NS + 1), 2),
        (Kind.EXECUTION_REPORT, filled("o1", ts_ns=NOW_NS + 2), 1),
        # Same time as the open, later in its stream: after it.
        (Kind.ACCOUNT_STATE, state("f1", NOW_NS + 1), 5),
        # Another account's: not a fact of f1.
        (Kind.FOLLOWER_ORDER, follower_open("o9", follower="f9"), 4),
        # The copy decisions about f1 are its facts too (the earliest here).
        (Kind.DECISION, decision("d1"), 1),
    ]
    for kind, message, seq in writes:
        await store.insert_rows(conn, kind, rows(kind, message, seq=seq), "default")
    facts = await store.account_facts(conn, "f1")
    assert facts == [
        decision("d1"),
        follower_open("o1", ts_ns=NOW_NS + 1),
        state("f1", NOW_NS + 1),
        filled("o1", ts_ns=NOW_NS + 2),
        close,
        state("f1", NOW_NS + 4),
        closed,
    ]


async def test_every_kind_is_stored_with_its_payload(conn: Any) -> None:
    rejection = MasterEventRejected(
        rejection_id="rejected:4", master="m1", subject="tc.v1.master.m1.events",
        reason=RejectionReason.INVALID_PRICE, message="nan", ts_ns=NOW_NS,
    )  # fmt: skip
    messages = {
        Kind.MASTER_EVENT: opened("e1"),
        Kind.FOLLOWER_ORDER: follower_open("o1"),
        Kind.EXECUTION_REPORT: filled("o1"),
        Kind.DECISION: decision("d1"),
        Kind.REJECTION: rejection,
        Kind.ACCOUNT_STATE: state("f1", NOW_NS),
    }
    for kind, message in messages.items():
        assert await store.insert_rows(conn, kind, rows(kind, message), "default") == 1
    assert await store.stored_counts(conn) == dict.fromkeys(Kind, 1)
    payload = await conn.fetchval("SELECT payload FROM ledger_rejections")
    assert codec.rejection_decoder.decode(payload) == rejection


# ------------------------------------------------------------------------ retention


def test_months_before_counts_calendar_months_and_clamps_the_day() -> None:
    from datetime import UTC, datetime

    def ns(*args: int) -> int:
        return int(datetime(*args, tzinfo=UTC).timestamp()) * 10**9

    assert months_before(ns(2026, 5, 31, 12), 3) == ns(2026, 2, 28, 12)
    assert months_before(ns(2026, 1, 15), 12) == ns(2025, 1, 15)
    assert months_before(ns(2026, 2, 10) + 7, 3) == ns(2025, 11, 10) + 7


async def test_pruning_deletes_only_old_orders_and_decisions_even_run_twice_at_once(
    database_url: str, conn: Any
) -> None:
    old, recent = NOW_NS - 100 * DAY_NS, NOW_NS - 80 * DAY_NS
    orders = [follower_open(f"old{i}", ts_ns=old) for i in range(30)]
    orders += [follower_open(f"new{i}", ts_ns=recent) for i in range(5)]
    await store.insert_rows(
        conn, Kind.FOLLOWER_ORDER, [r for o in orders for r in rows(Kind.FOLLOWER_ORDER, o)], "d"
    )
    decisions = [decision("d-old", ts_ns=old), decision("d-new", ts_ns=recent)]
    await store.insert_rows(
        conn, Kind.DECISION, [r for d in decisions for r in rows(Kind.DECISION, d)], "d"
    )
    # History is kept whatever its age.
    await store.insert_rows(conn, Kind.EXECUTION_REPORT, rows(Kind.EXECUTION_REPORT,
                            filled("old0", ts_ns=old)), "d")  # fmt: skip
    runs = await asyncio.gather(
        prune(database_url, NOW_NS, chunk=4), prune(database_url, NOW_NS, chunk=4)
    )
    assert sum(run["follower_order"] for run in runs) == 30
    assert sum(run["decision"] for run in runs) == 1
    remaining = await conn.fetch("SELECT order_id FROM ledger_follower_orders ORDER BY 1")
    assert [r[0] for r in remaining] == [f"new{i}" for i in range(5)]
    assert await conn.fetchval("SELECT decision_id FROM ledger_decisions") == "d-new"
    assert await conn.fetchval("SELECT count(*) FROM ledger_execution_reports") == 1
    assert await prune(database_url, NOW_NS) == {"follower_order": 0, "decision": 0}


async def test_a_longer_retention_keeps_what_the_default_would_prune(
    database_url: str, conn: Any
) -> None:
    await store.insert_rows(conn, Kind.FOLLOWER_ORDER, rows(Kind.FOLLOWER_ORDER,
                            follower_open("o1", ts_ns=NOW_NS - 100 * DAY_NS)), "d")  # fmt: skip
    assert await prune(database_url, NOW_NS, orders_months=12) == {
        "follower_order": 0,
        "decision": 0,
    }
    assert await prune(database_url, NOW_NS) == {"follower_order": 1, "decision": 0}
