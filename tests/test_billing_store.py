"""Billing's store on a real PostgreSQL: charges once per key, forward-only states, revenue."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.billing import store
from engine.billing.store import ChargeDraft, ChargeState, IllegalChargeTransition

WEEK_END_NS = 1_774_648_800_000_000_000  # 2026-W13 ends: Friday 27 March 23:00 Berlin


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


def draft(
    key: str,
    *,
    follower: str = "f1",
    amount: int = 1000,
    fee: int = 100,
    issued_ns: int = WEEK_END_NS,
    currency: str = "USD",
) -> ChargeDraft:
    return ChargeDraft(
        idempotency_key=key,
        module="performance",
        follower=follower,
        provider="p1",
        plan_id="plan1",
        window_id="2026-W13",
        currency=currency,
        amount_minor=amount,
        platform_fee_minor=fee,
        destination="acct_1",
        lines=({"module": "performance", "amount_minor": amount},),
        issued_ns=issued_ns,
    )


async def test_migrations_apply_once(database_url: str) -> None:
    assert await store.migrate(database_url) == [
        "0001_billing",
        "0002_pool_limits",
        "0003_enforcement",
        "0004_plans_api",
        "0005_disputes_and_purchases",
        "0006_api_reads",
        "0007_account_status_and_one_open_checkout",
        "0008_plan_changes",
    ]
    assert await store.migrate(database_url) == []


async def test_concurrent_inserts_of_one_key_store_one_charge(pool: asyncpg.Pool) -> None:
    async def insert(conn: asyncpg.Connection) -> bool:
        return await store.insert_charge(conn, draft("performance:f1:plan1:2026-W13"))

    created = await asyncio.gather(*(store.serializable(pool, insert) for _ in range(10)))
    assert created.count(True) == 1
    async with pool.acquire() as conn:
        assert len(await store.charges(conn)) == 1
        assert await conn.fetchval("SELECT count(*) FROM billing_invoices") == 1


async def test_serializable_retries_a_read_modify_write_conflict(pool: asyncpg.Pool) -> None:
    """Ten transactions each read a counter and write it + 1: at SERIALIZABLE without retry
    most would fail; with the retry every increment lands exactly once."""
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE counter (n int NOT NULL)")
        await conn.execute("INSERT INTO counter VALUES (0)")
    barrier = asyncio.Barrier(10)
    first_round: set[int] = set()

    async def increment(conn: asyncpg.Connection, me: int) -> None:
        n = await conn.fetchval("SELECT n FROM counter")
        if me not in first_round:
            first_round.add(me)
            await barrier.wait()  # every transaction has read before any writes: a conflict
        await conn.execute("UPDATE counter SET n = $1", n + 1)

    await asyncio.gather(
        *(store.serializable(pool, lambda c, i=i: increment(c, i)) for i in range(10))
    )
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT n FROM counter") == 10


async def test_serializable_gives_up_after_its_bound(pool: asyncpg.Pool) -> None:
    calls = 0

    async def always_conflicts(conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.SerializationError("could not serialize access")

    with pytest.raises(store.SerializableRetriesExhausted):
        await store.serializable(pool, always_conflicts, attempts=3, base_delay_s=0.0)
    assert calls == 3


async def test_refunded_charge_never_goes_back_to_succeeded(pool: asyncpg.Pool) -> None:
    key = "performance:f1:plan1:2026-W13"
    async with pool.acquire() as conn:
        await store.insert_charge(conn, draft(key))
        await store.transition_charge(conn, key, ChargeState.SUCCEEDED, cause="t")
        await store.transition_charge(conn, key, ChargeState.REFUNDED, cause="t")
        with pytest.raises(IllegalChargeTransition):
            await store.transition_charge(conn, key, ChargeState.SUCCEEDED, cause="t")
        with pytest.raises(IllegalChargeTransition):
            await store.transition_charge(conn, key, ChargeState.PENDING, cause="t")
        charge = await store.charge_by_key(conn, key)
        assert charge is not None and charge.state is ChargeState.REFUNDED


async def test_a_repeated_transition_changes_nothing(pool: asyncpg.Pool) -> None:
    key = "performance:f1:plan1:2026-W13"
    async with pool.acquire() as conn:
        await store.insert_charge(conn, draft(key))
        outcomes = [
            await store.transition_charge(conn, key, ChargeState.SUCCEEDED, cause="t")
            for _ in range(3)
        ]
        assert outcomes == ["applied", "unchanged", "unchanged"]
        assert await store.charge_transitions(conn, key) == [
            (None, "pending"),
            ("pending", "succeeded"),
        ]


async def test_any_order_of_the_same_events_ends_in_the_same_state(pool: asyncpg.Pool) -> None:
    events = [
        ChargeState.REQUIRES_ACTION,
        ChargeState.FAILED,
        ChargeState.SUCCEEDED,
        ChargeState.DISPUTED,
    ]
    finals = set()
    async with pool.acquire() as conn:
        for n, order in enumerate(itertools.permutations(events)):
            key = f"performance:f{n}:plan1:2026-W13"
            await store.insert_charge(conn, draft(key, follower=f"f{n}"))
            for target in order:
                # A stale event (the charge is already past it) is refused and changes nothing.
                with contextlib.suppress(IllegalChargeTransition):
                    await store.transition_charge(conn, key, target, cause="event")
            charge = await store.charge_by_key(conn, key)
            assert charge is not None
            finals.add(charge.state)
    assert finals == {ChargeState.DISPUTED}


async def test_revenue_per_month_splits_paid_unpaid_and_fees(pool: asyncpg.Pool) -> None:
    march = WEEK_END_NS
    april = WEEK_END_NS + 14 * 86_400 * 10**9  # 2026-04-10
    async with pool.acquire() as conn:
        await store.insert_charge(conn, draft("a", amount=1000, fee=125, issued_ns=march))
        await store.insert_charge(conn, draft("b", amount=999, fee=124, issued_ns=march))
        await store.insert_charge(conn, draft("c", amount=500, fee=50, issued_ns=april))
        await store.insert_charge(
            conn, draft("d", amount=300, fee=30, issued_ns=april, currency="JPY")
        )
        await store.transition_charge(conn, "a", ChargeState.SUCCEEDED, cause="t")
        await store.transition_charge(conn, "b", ChargeState.FAILED, cause="t")
        await store.transition_charge(conn, "c", ChargeState.REFUNDED, cause="t")
        revenue = await store.operator_revenue(conn)
        history = await store.follower_history(conn, "f1")
    assert [(r.month, r.currency) for r in revenue] == [
        ("2026-03", "USD"),
        ("2026-04", "JPY"),
        ("2026-04", "USD"),
    ]
    march_usd, april_jpy, april_usd = revenue
    assert (march_usd.total_minor, march_usd.paid_minor, march_usd.unpaid_minor) == (
        1999,
        1000,
        999,
    )
    assert march_usd.platform_fee_minor == 125
    assert (april_usd.reversed_minor, april_usd.platform_fee_minor) == (500, 0)
    assert april_jpy.unpaid_minor == 300
    assert [h.idempotency_key for h in history] == ["d", "c", "b", "a"]
    assert history[-1].provider_minor == 875


async def test_money_columns_refuse_a_fee_above_the_amount(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await store.insert_charge(conn, draft("x", amount=100, fee=101))


async def test_events_are_stored_once_by_id(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        stored = [
            await store.insert_event(
                conn,
                event_id="evt_1",
                type_="payment_intent.succeeded",
                created_s=1,
                payload=b'{"id": "evt_1"}',
                source="webhook",
            )
            for _ in range(2)
        ]
        assert stored == [True, False]
        assert await store.unprocessed_event_count(conn) == 1
