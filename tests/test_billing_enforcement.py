"""Billing enforcement on a real nats-server and PostgreSQL: exactly the links of a cause stop
(close-only: ``enabled = false``), lifting restores only what billing stopped, concurrent edits
survive, a NATS outage is retried, recorded and healed by the daily recheck.

That a disabled link still passes closes, partial closes and SL/TP changes is the replicator's
rule, proven by ``test_disabled_link_skips_opens_but_copies_closes_and_changes`` in
``tests/test_rules.py``; it is not tested again here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from conftest import wait_until
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from engine.billing import enforcement, store
from engine.billing.config import BillingConfig
from engine.billing.enforcement import (
    DeletionEvent,
    DeletionState,
    EnforcementFailed,
    Enforcer,
    IllegalDeletionTransition,
    next_deletion_state,
)
from engine.billing.gateway import StripeGateway
from engine.billing.jobs import JobContext, renew_allowance, run_job
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.service import BillingService
from engine.billing.store import ChargeDraft, ChargeState
from engine.billing.webhooks import charge_moved, process_stored_events, store_event
from engine.ledger.store import migrate as migrate_ledger
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.links import apply_links
from engine.runtime.natsserver import EmbeddedNats
from schemas import codec, subjects
from schemas.common import Side
from schemas.links import CopyLink
from schemas.orders import FollowerOpen
from schemas.reports import OrderFilled

#: account → (provider, follower). P1 sells m1; P2 sells m2. Follower F1 copies on both.
OWNERS: dict[str, tuple[str, str | None]] = {
    "m1": ("P1", None),
    "m2": ("P2", None),
    "a1": ("P1", "F1"),
    "a3": ("P1", "F1"),
    "a2": ("P1", "F2"),
    "c1": ("P2", "F1"),
    "x1": ("P2", "F3"),
}
LINKS = [
    CopyLink(link_id="l1", master="m1", follower="a1"),
    CopyLink(link_id="l2", master="m1", follower="a2"),
    CopyLink(link_id="l3", master="m2", follower="c1"),
    # The provider disabled this one on purpose: billing must never turn it back on.
    CopyLink(link_id="l4", master="m1", follower="a3", enabled=False),
    CopyLink(link_id="l5", master="m2", follower="x1"),
]
F1_AT_P1 = store.EnforcementCause(scope="follower", subject="F1", cause="charge:k1", provider="P1")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    async with pool.acquire() as conn:
        for account, (provider, follower) in OWNERS.items():
            await store.upsert_account_owner(
                conn, account_id=account, provider=provider, follower=follower
            )
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def links_kv(js: JetStreamContext) -> KeyValue:
    kv = (await ensure_buckets(js))[subjects.KV_LINKS]
    await apply_links(kv, LINKS)
    return kv


def make_enforcer(pool: asyncpg.Pool, js: JetStreamContext, kv: Any) -> Enforcer:
    return Enforcer(pool, js, kv, base_delay_s=0.02, op_timeout_s=0.5)


async def enabled(kv: KeyValue) -> dict[str, bool]:
    found = {}
    for link in LINKS:
        entry = await kv.get(link.link_id)
        assert entry.value is not None
        found[link.link_id] = codec.copy_link_decoder.decode(entry.value).enabled
    return found


ALL_ON = {"l1": True, "l2": True, "l3": True, "l4": False, "l5": True}


async def test_an_unpaid_follower_stops_only_its_links_to_that_provider(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    enforcer = make_enforcer(pool, js, links_kv)
    assert await enforcer.stop_for(F1_AT_P1) == []
    # F1's link from P1 stops; its link from P2 (l3), F2's and F3's links copy on.
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    async with pool.acquire() as conn:
        held = await store.enforced_links(conn)
    assert {k: v.billing_disabled for k, v in held.items()} == {"l1": True, "l4": False}


async def test_an_unpaid_provider_stops_every_link_of_its_accounts(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    enforcer = make_enforcer(pool, js, links_kv)
    await enforcer.stop_for(enforcement.provider_cause("P2", "operator:2026-04"))
    assert await enabled(links_kv) == {**ALL_ON, "l3": False, "l5": False}
    await enforcer.stop_for(enforcement.provider_cause("P1", "operator:2026-04"))
    assert await enabled(links_kv) == {k: False for k in ALL_ON}


async def test_lifting_restores_exactly_what_billing_stopped(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    enforcer = make_enforcer(pool, js, links_kv)
    provider = enforcement.provider_cause("P1", "operator:2026-04")
    await enforcer.stop_for(F1_AT_P1)
    await enforcer.stop_for(provider)
    assert await enabled(links_kv) == {**ALL_ON, "l1": False, "l2": False}
    # l1 is still held by the provider's cause: lifting the follower's changes nothing yet.
    await enforcer.lift(F1_AT_P1)
    assert await enabled(links_kv) == {**ALL_ON, "l1": False, "l2": False}
    await enforcer.lift(provider)
    # Everything billing stopped copies again; l4, disabled by its provider, stays disabled.
    assert await enabled(links_kv) == ALL_ON
    async with pool.acquire() as conn:
        assert await store.enforced_links(conn) == {}
    # A recheck after the lift is a no-op.
    assert (await enforcer.recheck())["held"] == 0
    assert await enabled(links_kv) == ALL_ON


class EditsBetweenReadAndWrite:
    """The ``tc_links`` bucket, where the API changes ``link_id``'s sizing through its own
    connection just before billing's first write: a real concurrent edit."""

    def __init__(self, kv: KeyValue, other: KeyValue, link_id: str) -> None:
        self.kv = kv
        self.other = other
        self.link_id = link_id
        self.edited = False
        self.conflicts = 0

    async def get(self, key: str) -> Any:
        return await self.kv.get(key)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if key == self.link_id and not self.edited:
            self.edited = True
            entry = await self.other.get(key)
            assert entry.value is not None
            link = codec.copy_link_decoder.decode(entry.value)
            await self.other.put(key, codec.encode(msgspec.structs.replace(link, max_lot=0.5)))
        try:
            return await self.kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            self.conflicts += 1
            raise


async def test_a_concurrent_edit_between_read_and_write_is_not_lost(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue, nats_server: EmbeddedNats
) -> None:
    api = await nats.connect(nats_server.url)
    try:
        other = (await ensure_buckets(api.jetstream()))[subjects.KV_LINKS]
        racing = EditsBetweenReadAndWrite(links_kv, other, "l1")
        await make_enforcer(pool, js, racing).stop_for(F1_AT_P1)
        assert racing.conflicts == 1  # billing's first write was refused, not applied over it
        entry = await links_kv.get("l1")
        assert entry.value is not None
        link = codec.copy_link_decoder.decode(entry.value)
        assert (link.enabled, link.max_lot) == (False, 0.5)
    finally:
        await api.close()


class OutageOnFirstWrite:
    """The bucket, where the NATS server goes down just before billing's first link write."""

    def __init__(self, kv: KeyValue, server: EmbeddedNats) -> None:
        self.kv = kv
        self.server = server
        self.down = False

    async def get(self, key: str) -> Any:
        return await self.kv.get(key)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if not self.down:
            self.down = True
            await self.server.stop()
        return await self.kv.update(key, value, last=last)


async def test_a_nats_outage_is_retried_recorded_and_healed_by_the_recheck(
    pool: asyncpg.Pool,
    js: JetStreamContext,
    links_kv: KeyValue,
    nats_server: EmbeddedNats,
    nc: nats.aio.client.Client,
) -> None:
    outage = OutageOnFirstWrite(links_kv, nats_server)
    failed = await make_enforcer(pool, js, outage).stop_for(F1_AT_P1)
    assert failed == ["l1", "l4"]  # every link of the cause, each after its 5 attempts
    async with pool.acquire() as conn:
        held = await store.enforced_links(conn)
    assert {k: (v.status, v.attempts) for k, v in held.items()} == {
        "l1": ("failed", 5),
        "l4": ("failed", 5),
    }
    # Still down: the next pass cannot even read the links, and says so.
    with pytest.raises(EnforcementFailed):
        await make_enforcer(pool, js, links_kv).recheck()
    await nats_server.start()
    for _ in range(200):
        if nc.is_connected:
            break
        await asyncio.sleep(0.05)
    assert nc.is_connected
    summary = await make_enforcer(pool, js, links_kv).recheck()
    assert summary == {"causes": 1, "held": 2, "failed": 0}
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    async with pool.acquire() as conn:
        held = await store.enforced_links(conn)
    assert {k: (v.status, v.billing_disabled) for k, v in held.items()} == {
        "l1": ("applied", True),
        "l4": ("applied", False),  # disabled by its provider: billing will not resume it
    }


def charge(key: str, follower: str = "F1", provider: str = "P1") -> ChargeDraft:
    return ChargeDraft(
        idempotency_key=key,
        module="performance",
        follower=follower,
        provider=provider,
        plan_id="plan1",
        window_id="2026-W13",
        currency="USD",
        amount_minor=1000,
        platform_fee_minor=100,
        destination="acct_1",
        lines=({"module": "performance", "amount_minor": 1000},),
        issued_ns=1_774_648_800_000_000_000,
    )


async def test_a_failed_charge_stops_and_its_payment_lifts_through_the_worker(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    enforcer = make_enforcer(pool, js, links_kv)

    async def move(target: ChargeState) -> None:
        async def step(conn: asyncpg.Connection) -> None:
            await store.transition_charge(conn, "k1", target, cause="test")
            stored = await store.charge_by_key(conn, "k1")
            assert stored is not None
            await charge_moved(conn, stored, target, None)

        await store.serializable(pool, step)

    async with pool.acquire() as conn:
        await store.insert_charge(conn, charge("k1"))
    await move(ChargeState.FAILED)
    assert await enabled(links_kv) == ALL_ON  # recorded in the transaction, not yet applied
    assert await enforcer.apply_pending() == 1
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    await move(ChargeState.SUCCEEDED)
    assert await enforcer.apply_pending() == 1
    assert await enabled(links_kv) == ALL_ON
    async with pool.acquire() as conn:
        kinds = [kind for kind, _ in await store.notifications(conn, "F1")]
    assert kinds == ["payment_failed", "payment_succeeded"]


async def test_a_cancelled_subscription_and_a_used_up_allowance_stop_until_lifted(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    enforcer = make_enforcer(pool, js, links_kv)
    async with pool.acquire() as conn:
        await store.upsert_operator_plan(
            conn,
            plan_id="op",
            currency="USD",
            platform_fee_percent="10",
            account_pool_limit=10,
            modules=["subscription"],
        )
        await store.upsert_provider(conn, provider="P2", operator_plan="op", stripe_account=None)
        await store.upsert_follower_plan(
            conn,
            plan_id="gold",
            provider="P2",
            currency="USD",
            modules=["subscription", "pay_per_trade"],
            subscription_price_minor=3000,
            subscription_period="monthly",
            ppt_trades=10,
            ppt_price_minor=500,
        )
        await store.subscribe(conn, follower="F1", plan_id="gold", started_ns=1)
        assert await enforcement.cancel_subscription(conn, "F1", "gold")
        assert await enforcement.allowance_used_up(conn, "F1", "gold")
    await enforcer.apply_pending()
    assert await enabled(links_kv) == {**ALL_ON, "l3": False}  # F1's link to P2 only
    async with pool.acquire() as conn:
        assert await enforcement.reactivate_subscription(conn, "F1", "gold")
    await enforcer.apply_pending()
    assert await enabled(links_kv) == {**ALL_ON, "l3": False}  # the allowance still holds it
    async with pool.acquire() as conn:
        assert await enforcement.allowance_renewed(conn, "F1", "gold")
    await enforcer.apply_pending()
    assert await enabled(links_kv) == ALL_ON


async def test_a_stripe_failure_event_stops_the_follower_through_the_event_worker(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    async with pool.acquire() as conn:
        await store.insert_charge(conn, charge("k1"))
    event = {
        "id": "evt_1",
        "type": "payment_intent.payment_failed",
        "created": 1_774_649_000,
        "data": {
            "object": {
                "id": "pi_1",
                "object": "payment_intent",
                "metadata": {"charge_key": "k1"},
                "last_payment_error": {"code": "card_declined"},
            }
        },
    }
    await store_event(pool, msgspec.json.encode(event), source="webhook")
    assert [o.result for o in await process_stored_events(pool)] == ["applied"]
    assert await make_enforcer(pool, js, links_kv).apply_pending() == 1
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}


def test_the_deletion_state_machine() -> None:
    s = DeletionState.ACTIVE
    s = next_deletion_state(s, DeletionEvent.REQUESTED)
    assert s is DeletionState.DELETE_PENDING
    assert next_deletion_state(s, DeletionEvent.REQUESTED) is DeletionState.DELETE_PENDING
    assert next_deletion_state(s, DeletionEvent.FAILED) is DeletionState.DELETE_FAILED
    s = next_deletion_state(s, DeletionEvent.LINKS_STOPPED)
    assert s is DeletionState.DISABLED
    assert next_deletion_state(s, DeletionEvent.FAILED) is DeletionState.DELETE_FAILED
    s = next_deletion_state(s, DeletionEvent.REMOVED)
    assert s is DeletionState.DELETED
    retry = next_deletion_state(DeletionState.DELETE_FAILED, DeletionEvent.REQUESTED)
    assert retry is DeletionState.DELETE_PENDING
    for state, event in [
        (DeletionState.ACTIVE, DeletionEvent.REMOVED),
        (DeletionState.ACTIVE, DeletionEvent.LINKS_STOPPED),
        (DeletionState.DELETE_PENDING, DeletionEvent.REMOVED),
        (DeletionState.DELETED, DeletionEvent.REQUESTED),
        (DeletionState.DELETED, DeletionEvent.FAILED),
    ]:
        with pytest.raises(IllegalDeletionTransition):
            next_deletion_state(state, event)


async def test_deleting_an_account_stops_its_links_and_ends_deleted(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    enforcer = make_enforcer(pool, js, links_kv)
    assert await enforcer.delete_account("m2") is DeletionState.DELETED
    assert await enabled(links_kv) == {**ALL_ON, "l3": False, "l5": False}
    async with pool.acquire() as conn:
        assert "m2" not in await store.account_owners(conn)
        assert await store.deletion_state(conn, "m2") == "deleted"
    assert await enforcer.delete_account("m2") is DeletionState.DELETED


async def test_the_billing_service_applies_a_stripe_failure_to_the_links(
    database_url: str,
    pool: asyncpg.Pool,
    nats_server: EmbeddedNats,
    js: JetStreamContext,
    links_kv: KeyValue,
) -> None:
    config = BillingConfig(
        webhook_port=0,
        event_poll_s=0.05,
        metrics_port=None,
        nats_url=nats_server.url,
        enforcement_base_delay_s=0.05,
    )
    # Stripe is never called here (no charge is due); the gateway points nowhere reachable.
    gateway = StripeGateway("sk_test_unused", api_base="http://127.0.0.1:9")
    service = BillingService(config, database_url, gateway, "whsec_test")
    await service.start()
    try:
        async with pool.acquire() as conn:
            await store.insert_charge(conn, charge("k1"))
        event = {
            "id": "evt_1",
            "type": "charge.dispute.created",
            "created": 1_774_649_000,
            "data": {"object": {"id": "dp_1", "object": "dispute", "payment_intent": "pi_1"}},
        }
        async with pool.acquire() as conn:
            await store.record_payment_intent(conn, "k1", "pi_1")
        await store_event(pool, msgspec.json.encode(event), source="webhook")

        async def stopped() -> bool:
            return (await enabled(links_kv))["l1"] is False

        await wait_until(stopped, "the disputed charge's link to stop")
        assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    finally:
        await service.stop()
        await gateway.close()


# --------------------------------------------------------------------------- used-up allowance

HOUR = 3600 * 10**9
PURCHASED = 1_775_000_000 * 10**9  # 2026-03-31T23:33:20Z


async def ledger_open(
    pool: asyncpg.Pool, account: str, link: str, order_id: str, ts: int, *, manual: bool = False
) -> None:
    """A copy opened on ``account`` and its fill, stored as the ledger stores them."""
    order = FollowerOpen(
        order_id=order_id,
        link_id=link,
        follower=account,
        master="m1",
        master_event_id=f"e-{order_id}",
        symbol="EURUSD",
        ts_ns=ts - 10**6,
        master_position_id=f"mp-{order_id}",
        side=Side.BUY,
        volume=0.1,
        manual=manual,
    )
    fill = OrderFilled(
        order_id=order_id,
        link_id=link,
        follower=account,
        ts_ns=ts,
        symbol="EURUSD",
        position_id=f"fp-{order_id}",
        side=Side.BUY,
        volume=0.1,
        price=1.1,
    )
    async with pool.acquire() as conn:
        seq = await conn.fetchval("SELECT count(*) + 1 FROM ledger_follower_orders")
        await conn.execute(
            "INSERT INTO ledger_follower_orders (order_id, tenant, follower, master, link_id,"
            " master_event_id, type, symbol, ts_ns, stream_seq, payload)"
            " VALUES ($1, 'default', $2, 'm1', $3, $4, 'open', 'EURUSD', $5, $6, $7)",
            order_id,
            account,
            link,
            f"e-{order_id}",
            ts - 10**6,
            seq,
            codec.encode(order),
        )
        await conn.execute(
            "INSERT INTO ledger_execution_reports (order_id, status, tenant, follower, link_id,"
            " symbol, position_id, ts_ns, stream_seq, payload)"
            " VALUES ($1, 'filled', 'default', $2, $3, 'EURUSD', $4, $5, $6, $7)",
            order_id,
            account,
            link,
            f"fp-{order_id}",
            ts,
            seq,
            codec.encode(fill),
        )


async def test_a_used_up_allowance_stops_its_links_by_itself_until_renewed(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue, database_url: str
) -> None:
    await migrate_ledger(database_url)
    async with pool.acquire() as conn:
        await store.upsert_operator_plan(
            conn,
            plan_id="op",
            currency="USD",
            platform_fee_percent="10",
            account_pool_limit=10,
            modules=["pay_per_trade"],
        )
        await store.upsert_provider(conn, provider="P1", operator_plan="op", stripe_account=None)
        await store.upsert_follower_plan(
            conn,
            plan_id="ppt3",
            provider="P1",
            currency="USD",
            modules=["pay_per_trade"],
            ppt_trades=3,
            ppt_price_minor=900,
        )
        await store.subscribe(conn, follower="F1", plan_id="ppt3", started_ns=PURCHASED)
        assert await renew_allowance(conn, "F1", "ppt3", PURCHASED) == "20260331T233320Z"
    ctx = JobContext(
        pool=pool,
        gateway=StripeGateway(""),
        facts=LedgerViewFacts(pool),
        enforcer=make_enforcer(pool, js, links_kv),
        portal_url="https://copy.example/billing",
    )
    async with pool.acquire() as conn:
        await store.save_contact(conn, "F1", "f1@example.de", "de")
    # Two copies on F1's account at P1, a manual trade, and copies F1 made at P2 (whose
    # allowance is not this one) and before the purchase: two of three used.
    await ledger_open(pool, "a1", "l1", "o1", PURCHASED + HOUR)
    await ledger_open(pool, "a1", "l1", "o2", PURCHASED + 2 * HOUR)
    await ledger_open(pool, "a1", "l1", "m1", PURCHASED + 2 * HOUR, manual=True)
    await ledger_open(pool, "c1", "l3", "p2-1", PURCHASED + 2 * HOUR)
    await ledger_open(pool, "a1", "l1", "old", PURCHASED - HOUR)
    summary = await run_job(ctx, "allowance_sync", PURCHASED + 3 * HOUR)
    assert summary.allowances_used_up == 0
    assert await enabled(links_kv) == ALL_ON
    # The third copy uses it up: billing stops F1's links from P1 on its own.
    await ledger_open(pool, "a1", "l1", "o3", PURCHASED + 4 * HOUR)
    summary = await run_job(ctx, "allowance_sync", PURCHASED + 5 * HOUR)
    assert summary.allowances_used_up == 1
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    async with pool.acquire() as conn:
        (row,) = await store.enforcement_rows(conn, state="active")
        assert (row.subject, row.cause, row.provider) == ("F1", "allowance:ppt3", "P1")
        sub = await store.period_subscription(conn, "F1", "ppt3")
    assert sub is not None and sub.ppt_counted == ("o1", "o2", "o3")
    # Again, with a copy that was already in flight: counted over the allowance, nothing else.
    await ledger_open(pool, "a1", "l1", "o4", PURCHASED + 5 * HOUR)
    await run_job(ctx, "allowance_sync", PURCHASED + 6 * HOUR)
    await run_job(ctx, "allowance_sync", PURCHASED + 6 * HOUR)
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    async with pool.acquire() as conn:
        sub = await store.period_subscription(conn, "F1", "ppt3")
        assert sub is not None and sub.ppt_over == ("o4",)
        # The follower is told once, in German, where to buy another allowance.
        ((email_id, _, _, _),) = await store.outbox_state(conn)
        assert email_id == "allowance_used_up:F1:ppt3:20260331T233320Z"
        body = await conn.fetchval("SELECT body_text FROM billing_email_outbox")
        assert "https://copy.example/billing/plans/ppt3" in body
        # A new allowance lifts the stop; the copies before it do not count against it.
        await renew_allowance(conn, "F1", "ppt3", PURCHASED + 7 * HOUR)
    await run_job(ctx, "allowance_sync", PURCHASED + 8 * HOUR)
    assert await enabled(links_kv) == ALL_ON
    async with pool.acquire() as conn:
        sub = await store.period_subscription(conn, "F1", "ppt3")
    assert sub is not None and (sub.ppt_counted, sub.ppt_trades_bought) == ((), 3)


async def test_an_allowance_bought_through_checkout_counts_from_its_purchase(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue, database_url: str
) -> None:
    """Checkout names the purchase by its session and says no instant: the row is stamped
    with the transaction's time, and only copies opened since then count."""
    await migrate_ledger(database_url)
    async with pool.acquire() as conn:
        await store.upsert_operator_plan(
            conn,
            plan_id="op",
            currency="USD",
            platform_fee_percent="10",
            account_pool_limit=10,
            modules=["pay_per_trade"],
        )
        await store.upsert_provider(conn, provider="P1", operator_plan="op", stripe_account=None)
        await store.upsert_follower_plan(
            conn,
            plan_id="ppt2",
            provider="P1",
            currency="USD",
            modules=["pay_per_trade"],
            ppt_trades=2,
            ppt_price_minor=900,
        )
        before = time.time_ns()
        await store.subscribe(conn, follower="F1", plan_id="ppt2", started_ns=before - 10 * HOUR)
        await store.save_allowance(
            conn,
            follower="F1",
            plan_id="ppt2",
            purchase_id="cs_test_a1",
            trades_bought=2,
            counted=(),
            over=(),
        )
        sub = await store.period_subscription(conn, "F1", "ppt2")
    assert sub is not None and sub.ppt_purchased_ns is not None
    assert before - HOUR < sub.ppt_purchased_ns < time.time_ns() + HOUR
    ctx = JobContext(
        pool=pool,
        gateway=StripeGateway(""),
        facts=LedgerViewFacts(pool),
        enforcer=make_enforcer(pool, js, links_kv),
    )
    await ledger_open(pool, "a1", "l1", "before", before - 2 * HOUR)
    await ledger_open(pool, "a1", "l1", "o1", sub.ppt_purchased_ns + HOUR)
    await run_job(ctx, "allowance_sync", sub.ppt_purchased_ns + 2 * HOUR)
    assert await enabled(links_kv) == ALL_ON
    await ledger_open(pool, "a1", "l1", "o2", sub.ppt_purchased_ns + 3 * HOUR)
    await run_job(ctx, "allowance_sync", sub.ppt_purchased_ns + 4 * HOUR)
    assert await enabled(links_kv) == {**ALL_ON, "l1": False}
    async with pool.acquire() as conn:
        sub = await store.period_subscription(conn, "F1", "ppt2")
    assert sub is not None and sub.ppt_counted == ("o1", "o2")
