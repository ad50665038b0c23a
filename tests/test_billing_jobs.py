"""Billing's jobs on real PostgreSQL and the local Stripe peer: one charge per follower per window,
whatever runs concurrently, crashes or comes late."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg
import msgspec
import pytest
import stripe_peer
from stripe_peer import StripePeer

from engine.billing import store
from engine.billing.config import (
    ENV_BILLING_KEY,
    ENV_STRIPE_API_KEY_SEALED,
    ENV_WEBHOOK_SECRET_SEALED,
    BillingConfig,
    BillingConfigError,
    StripeMode,
    seal_secret,
    stripe_api_key,
    webhook_secret,
)
from engine.billing.gateway import StripeGateway
from engine.billing.jobs import (
    JobContext,
    Scheduler,
    due_subscription_periods,
    issue_weekly_charges,
    renew_allowance,
    run_job,
)
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.service import parse_at, run_billing_job
from engine.billing.store import ChargeState
from engine.billing.windows import window_by_id
from engine.ledger.store import migrate as migrate_ledger
from schemas.account import AccountState
from schemas.codec import encode
from schemas.common import Side
from schemas.orders import FollowerClose
from schemas.reports import OrderFilled

W13 = window_by_id("2026-W13")
W14 = window_by_id("2026-W14")
START_EQUITY = 1_000_000  # 10,000.00 USD


@dataclass
class World:
    """A migrated database, the Stripe peer, one provider on a 12.5 % platform fee, and a
    performance plan at 20 % that followers are on."""

    database_url: str
    pool: asyncpg.Pool
    peer: StripePeer
    gateway: StripeGateway
    account: str = ""
    followers: list[str] = field(default_factory=list)
    seq: int = 0

    def context(self, pool: asyncpg.Pool | None = None) -> JobContext:
        pool = pool or self.pool
        return JobContext(
            pool=pool, gateway=self.gateway, facts=LedgerViewFacts(pool), send_lease_s=30
        )

    async def follower(
        self, name: str, card: str = stripe_peer.SUCCEEDS, started_ns: int = W13.start_ns
    ) -> None:
        customer = await self.gateway.create_customer(follower=name, email=f"{name}@x.test")
        pm = await self.gateway.attach_payment_method(customer, card)
        async with self.pool.acquire() as conn:
            await store.upsert_customer(
                conn, follower=name, stripe_customer=customer, payment_method=pm
            )
            await store.subscribe(
                conn,
                follower=name,
                plan_id="perf20",
                started_ns=started_ns,
                start_equity_minor=START_EQUITY,
            )
        self.followers.append(name)

    async def equity(self, follower: str, equity_minor: int, ts_ns: int) -> None:
        """An account state in the ledger, as the ledger stores it."""
        self.seq += 1
        state = AccountState(
            account=follower,
            ts_ns=ts_ns,
            currency="USD",
            balance=equity_minor / 100,
            equity=equity_minor / 100,
        )
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO ledger_account_states (account, ts_ns, tenant, currency,"
                " balance_minor, equity_minor, stream_seq, payload)"
                " VALUES ($1, $2, 'default', 'USD', $3, $3, $4, $5)",
                follower,
                ts_ns,
                equity_minor,
                self.seq,
                encode(state),
            )

    async def charges(self) -> list[store.Charge]:
        async with self.pool.acquire() as conn:
            return await store.charges(conn)


async def make_world(database_url: str) -> World:
    await migrate_ledger(database_url)
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    world = World(database_url=database_url, pool=pool, peer=peer, gateway=gateway)
    world.account = await gateway.create_express_account(
        provider="p1", email="p1@x.test", country="DE"
    )
    async with pool.acquire() as conn:
        await store.upsert_operator_plan(
            conn,
            plan_id="pro",
            currency="USD",
            platform_fee_percent="12.5",
            account_pool_limit=50,
            modules=["performance", "volume"],
        )
        await store.upsert_provider(
            conn, provider="p1", operator_plan="pro", stripe_account=world.account
        )
        await store.upsert_follower_plan(
            conn,
            plan_id="perf20",
            provider="p1",
            currency="USD",
            modules=["performance"],
            performance_rate="0.20",
        )
    return world


async def close_world(world: World) -> None:
    await world.gateway.close()
    await world.peer.stop()
    await world.pool.close()


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    world = await make_world(database_url)
    try:
        yield world
    finally:
        await close_world(world)


async def profitable_week(world: World, *names: str) -> None:
    """Each follower ends W13 at 10,500.00: 0.20 x 500.00 = 100.00, the platform 12.50."""
    for name in names:
        await world.follower(name)
        await world.equity(name, 1_050_000, W13.end_ns - 3600 * 10**9)


# --------------------------------------------------------------------------- the tests


async def test_five_concurrent_runs_charge_each_follower_once(world: World) -> None:
    await profitable_week(world, "f1", "f2", "f3")
    pools = [
        await asyncpg.create_pool(world.database_url, min_size=1, max_size=3) for _ in range(5)
    ]
    try:
        await asyncio.gather(*(run_job(world.context(p), "weekly_fees", W13.end_ns) for p in pools))
    finally:
        for p in pools:
            await p.close()
    charges = await world.charges()
    assert sorted(c.follower for c in charges) == ["f1", "f2", "f3"]
    assert {(c.amount_minor, c.platform_fee_minor, c.state) for c in charges} == {
        (10_000, 1_250, ChargeState.SUCCEEDED)
    }
    assert len(world.peer.payment_intents) == 3
    assert sorted(sent_keys(world)) == sorted(c.idempotency_key for c in charges)  # one send each
    assert {pi["metadata"]["charge_key"] for pi in world.peer.payment_intents.values()} == {
        f"performance:{f}:perf20:2026-W13" for f in ("f1", "f2", "f3")
    }


_PROCESS = """
import asyncio, sys
import asyncpg
from engine.billing.gateway import StripeGateway
from engine.billing.jobs import JobContext, run_job
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.service import parse_at, run_billing_job

async def main(url, api_base, at):
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    gateway = StripeGateway("sk_test_peer", api_base=api_base)
    try:
        ctx = JobContext(pool=pool, gateway=gateway, facts=LedgerViewFacts(pool))
        await run_job(ctx, "weekly_fees", int(at))
    finally:
        await gateway.close()
        await pool.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_five_processes_charge_each_follower_once(world: World) -> None:
    await profitable_week(world, "f1", "f2", "f3", "f4")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROCESS, world.database_url, world.peer.url, str(W13.end_ns)
        )
        for _ in range(5)
    ]
    codes = await asyncio.gather(*(p.wait() for p in procs))
    assert codes == [0] * 5
    charges = await world.charges()
    assert sorted(c.follower for c in charges) == ["f1", "f2", "f3", "f4"]
    assert all(c.state is ChargeState.SUCCEEDED for c in charges)
    assert len(world.peer.payment_intents) == 4
    assert sorted(sent_keys(world)) == sorted(c.idempotency_key for c in charges)  # one send each


def sent_keys(world: World) -> list[str | None]:
    """The idempotency key of every PaymentIntent request the peer received."""
    return [key for method, path, key in world.peer.requests if path == "/v1/payment_intents"]


async def test_a_crash_after_issuing_is_sent_by_the_next_run(world: World) -> None:
    await profitable_week(world, "f1")
    issued = await issue_weekly_charges(world.context(), W13)  # the job dies here
    assert issued == ["performance:f1:perf20:2026-W13"]
    assert world.peer.payment_intents == {}
    world.peer.lose_responses = 1  # the next run's call reaches Stripe, its answer is lost
    ctx = dataclasses.replace(world.context(), send_lease_s=0.3)
    await run_job(ctx, "weekly_fees", W13.end_ns)
    (charge,) = await world.charges()
    assert charge.state is ChargeState.PENDING and charge.stripe_payment_intent is None
    await run_job(ctx, "weekly_fees", W13.end_ns)  # still leased: not sent again yet
    assert (await world.charges())[0].attempts == 1
    await asyncio.sleep(0.4)
    await run_job(ctx, "weekly_fees", W13.end_ns + 86_400 * 10**9)  # Saturday
    (charge,) = await world.charges()
    assert charge.state is ChargeState.SUCCEEDED
    assert charge.attempts == 2
    assert len(world.peer.payment_intents) == 1
    assert charge.stripe_payment_intent in world.peer.payment_intents


async def test_the_mark_moves_and_a_loss_week_charges_nothing(world: World) -> None:
    await profitable_week(world, "f1")
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    await world.equity("f1", 1_040_000, W14.end_ns - 10**9)  # below the new mark 10,500
    summary = await run_job(world.context(), "weekly_fees", W14.end_ns)
    assert summary.issued == 0
    assert len(await world.charges()) == 1
    async with world.pool.acquire() as conn:
        sub = await store.weekly_subscription(conn, "f1", "perf20")
    assert sub is not None
    assert (sub.hwm_mark_minor, sub.hwm_settled_window) == (1_050_000, "2026-W14")


async def test_declines_fail_and_authentication_asks_the_follower(world: World) -> None:
    await world.follower("declined", stripe_peer.DECLINED)
    await world.follower("sca", stripe_peer.AUTHENTICATION_REQUIRED)
    for name in ("declined", "sca"):
        await world.equity(name, 1_050_000, W13.end_ns - 10**9)
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    states = {c.follower: (c.state, c.failure_code) for c in await world.charges()}
    assert states == {
        "declined": (ChargeState.FAILED, "card_declined"),
        "sca": (ChargeState.REQUIRES_ACTION, "authentication_required"),
    }
    async with world.pool.acquire() as conn:
        assert await store.notifications(conn, "sca") == [
            ("authentication_required", "performance:sca:perf20:2026-W13")
        ]
        assert await store.notifications(conn, "declined") == [
            ("payment_failed", "performance:declined:perf20:2026-W13")
        ]


async def test_a_missed_friday_runs_when_the_leader_starts(world: World) -> None:
    await profitable_week(world, "f1")
    wednesday_after = W13.end_ns + 5 * 86_400 * 10**9
    schedulers = [
        Scheduler(
            world.context(), world.database_url, clock=lambda: wednesday_after, retry_leader_s=0.05
        )
        for _ in range(2)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in schedulers]
    try:
        for _ in range(200):
            charges = await world.charges()
            if charges and charges[0].state is ChargeState.SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        assert [s.leader for s in schedulers].count(True) == 1
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    (charge,) = await world.charges()
    assert (charge.window_id, charge.state) == ("2026-W13", ChargeState.SUCCEEDED)
    async with world.pool.acquire() as conn:
        assert await store.last_finished_run(conn, "weekly_fees") == "2026-W13"


async def test_an_operator_runs_a_job_from_the_config(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_BILLING_KEY, base64.b64encode(bytes(range(32))).decode())
    config = BillingConfig(
        database_url=world.database_url,
        stripe_api_key_sealed=seal_secret(world.peer.api_key),
        stripe_api_base=world.peer.url,
    )
    assert world.peer.api_key not in msgspec.json.encode(config).decode()  # sealed at rest
    await profitable_week(world, "f1")
    summary = await run_billing_job(config, "weekly_fees", parse_at("2026-03-28T09:00:00+01:00"))
    assert (summary.run_key, summary.issued) == ("2026-W13", 1)
    (charge,) = await world.charges()
    assert charge.state is ChargeState.SUCCEEDED


def test_a_key_of_the_other_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BILLING_KEY, base64.b64encode(bytes(range(32))).decode())
    live = BillingConfig(stripe_api_key_sealed=seal_secret("sk_live_abc"))
    with pytest.raises(BillingConfigError, match="live Stripe key given in test mode"):
        stripe_api_key(live)
    test_in_live = BillingConfig(
        stripe_mode=StripeMode.LIVE, stripe_api_key_sealed=seal_secret("sk_test_abc")
    )
    with pytest.raises(BillingConfigError):
        stripe_api_key(test_in_live)
    tampered = seal_secret("sk_test_abc")
    tampered = tampered[:-4] + ("AAAA" if not tampered.endswith("AAAA") else "BBBB")
    with pytest.raises(BillingConfigError):
        stripe_api_key(BillingConfig(stripe_api_key_sealed=tampered))


async def test_the_volume_fee_reads_copied_closes_from_the_ledger_views(world: World) -> None:
    """README row 10 through the ledger: 0.33 + 0.33 + 0.34 lots copied and closed in W13
    at 2.50 a lot is 2.50; a manual close and a close in the weekend gap are not charged."""
    async with world.pool.acquire() as conn:
        await store.upsert_follower_plan(
            conn,
            plan_id="vol",
            provider="p1",
            currency="USD",
            modules=["volume"],
            volume_rate_per_lot_minor="250",
        )
    customer = await world.gateway.create_customer(follower="f1", email="f1@x.test")
    pm = await world.gateway.attach_payment_method(customer, stripe_peer.SUCCEEDS)
    async with world.pool.acquire() as conn:
        await store.upsert_customer(
            conn, follower="f1", stripe_customer=customer, payment_method=pm
        )
        await store.subscribe(conn, follower="f1", plan_id="vol", started_ns=W13.start_ns)
    hour = 3600 * 10**9
    closes = [
        ("c1", 0.33, False, W13.start_ns + hour),
        ("c2", 0.33, False, W13.start_ns + 2 * hour),
        ("c3", 0.34, False, W13.end_ns - hour),
        ("m1", 1.0, True, W13.end_ns - hour),
        ("gap", 1.0, False, W13.end_ns),
    ]
    for seq, (order_id, lots, manual, ts) in enumerate(closes, start=1):
        await ledger_close(world, order_id, lots, manual, ts, seq)
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    (charge,) = await world.charges()
    assert (charge.module, charge.amount_minor, charge.platform_fee_minor) == ("volume", 250, 31)
    assert charge.state is ChargeState.SUCCEEDED


async def ledger_close(
    world: World, order_id: str, lots: float, manual: bool, ts: int, seq: int
) -> None:
    """A close order sent to f1 and its fill report, stored as the ledger stores them."""
    order = FollowerClose(
        order_id=order_id,
        link_id="l1",
        follower="f1",
        master="m",
        master_event_id=f"e-{order_id}",
        symbol="EURUSD",
        ts_ns=ts - 10**6,
        master_position_id="mp1",
        manual=manual,
    )
    fill = OrderFilled(
        order_id=order_id,
        link_id="l1",
        follower="f1",
        ts_ns=ts,
        symbol="EURUSD",
        position_id="fp1",
        side=Side.BUY,
        volume=lots,
        price=1.1,
    )
    async with world.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO ledger_follower_orders (order_id, tenant, follower, master, link_id,"
            " master_event_id, type, symbol, ts_ns, stream_seq, payload)"
            " VALUES ($1, 'default', 'f1', 'm', 'l1', $2, 'close', 'EURUSD', $3, $4, $5)",
            order_id,
            f"e-{order_id}",
            ts - 10**6,
            seq,
            encode(order),
        )
        await conn.execute(
            "INSERT INTO ledger_execution_reports (order_id, status, tenant, follower, link_id,"
            " symbol, position_id, ts_ns, stream_seq, payload)"
            " VALUES ($1, 'filled', 'default', 'f1', 'l1', 'EURUSD', 'fp1', $2, $3, $4)",
            order_id,
            ts,
            seq,
            encode(fill),
        )


# --------------------------------------------------------------------------- period charges


def at(text: str) -> int:
    return parse_at(text)


async def monthly_follower(world: World, name: str, started: str) -> None:
    """``name`` on a 30.00 USD monthly subscription with a 10-trade, 15.00 USD allowance."""
    async with world.pool.acquire() as conn:
        await store.upsert_follower_plan(
            conn,
            plan_id="sub30",
            provider="p1",
            currency="USD",
            modules=["subscription", "pay_per_trade"],
            subscription_price_minor=3000,
            subscription_period="monthly",
            ppt_trades=10,
            ppt_price_minor=1500,
        )
    customer = await world.gateway.create_customer(follower=name, email=f"{name}@x.test")
    pm = await world.gateway.attach_payment_method(customer, stripe_peer.SUCCEEDS)
    async with world.pool.acquire() as conn:
        await store.upsert_customer(
            conn, follower=name, stripe_customer=customer, payment_method=pm
        )
        await store.subscribe(conn, follower=name, plan_id="sub30", started_ns=at(started))


async def keys_and_states(world: World) -> dict[str, ChargeState]:
    return {c.idempotency_key: c.state for c in await world.charges()}


async def test_two_schedulers_charge_a_due_renewal_once(world: World) -> None:
    await monthly_follower(world, "f1", "2026-04-01T00:00:00Z")
    await run_job(world.context(), "period_charges", at("2026-04-01T00:30:00Z"))
    assert await keys_and_states(world) == {
        "subscription:f1:sub30:20260401T000000Z": ChargeState.SUCCEEDED,
        "pay_per_trade:f1:sub30:20260401T000000Z": ChargeState.SUCCEEDED,
    }
    # A month later the renewal is due; two instances run the schedule.
    renewal = at("2026-05-01T00:00:05Z")
    schedulers = [
        Scheduler(world.context(), world.database_url, clock=lambda: renewal, retry_leader_s=0.05)
        for _ in range(2)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in schedulers]
    key = "subscription:f1:sub30:20260501T000000Z"
    try:
        for _ in range(200):
            if (await keys_and_states(world)).get(key) is ChargeState.SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        assert [s.leader for s in schedulers].count(True) == 1
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    # Both instances running the job by hand as well charges nothing more.
    await asyncio.gather(*(run_job(world.context(), "period_charges", renewal) for _ in range(2)))
    charges = await world.charges()
    assert sorted(c.idempotency_key for c in charges) == sorted(
        [
            "subscription:f1:sub30:20260401T000000Z",
            "pay_per_trade:f1:sub30:20260401T000000Z",
            key,
        ]
    )
    may = next(c for c in charges if c.idempotency_key == key)
    assert (may.amount_minor, may.platform_fee_minor, may.issued_ns) == (
        3000,
        375,
        at("2026-05-01T00:00:00Z"),
    )
    assert len(world.peer.payment_intents) == 3


async def test_a_late_start_charges_every_period_that_started_oldest_first(world: World) -> None:
    await monthly_follower(world, "f1", "2026-01-31T12:00:00Z")
    summary = await run_job(world.context(), "period_charges", at("2026-04-15T00:00:00Z"))
    assert summary.issued == 4  # three renewals that no one charged, and the one allowance
    subscription = sorted(c.window_id for c in await world.charges() if c.module == "subscription")
    # Anchored on the 31st: the day is clamped to the month's end, counted from the anchor.
    assert subscription == ["20260131T120000Z", "20260228T120000Z", "20260331T120000Z"]
    again = await run_job(world.context(), "period_charges", at("2026-04-15T00:00:00Z"))
    assert again.issued == 0
    assert len(world.peer.payment_intents) == 4


async def test_a_checkout_subscription_is_renewed_by_stripe_not_here(world: World) -> None:
    await monthly_follower(world, "f1", "2026-04-01T00:00:00Z")
    async with world.pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_subscriptions SET stripe_subscription = 'sub_1' WHERE follower = 'f1'"
        )
    await run_job(world.context(), "period_charges", at("2026-05-02T00:00:00Z"))
    assert [c.module for c in await world.charges()] == ["pay_per_trade"]


async def test_a_renewed_allowance_is_charged_once_as_a_new_purchase(world: World) -> None:
    await monthly_follower(world, "f1", "2026-04-01T00:00:00Z")
    await run_job(world.context(), "period_charges", at("2026-04-01T00:30:00Z"))
    async with world.pool.acquire() as conn:
        first = await renew_allowance(conn, "f1", "sub30", at("2026-04-10T08:00:00Z"))
        second = await renew_allowance(conn, "f1", "sub30", at("2026-04-10T08:00:00Z"))
    assert first == second == "20260410T080000Z"
    await run_job(world.context(), "period_charges", at("2026-04-10T09:00:00Z"))
    await run_job(world.context(), "period_charges", at("2026-04-10T10:00:00Z"))
    ppt = sorted(c.window_id for c in await world.charges() if c.module == "pay_per_trade")
    assert ppt == ["20260401T000000Z", "20260410T080000Z"]


def test_due_periods_follow_the_anchor_from_the_last_one_charged() -> None:
    sub = store.PeriodSubscription(
        follower="f1",
        plan_id="q",
        provider="p1",
        currency="USD",
        modules=("subscription",),
        subscription_price_minor=9000,
        subscription_period="quarterly",
        ppt_trades=None,
        ppt_price_minor=None,
        platform_fee_percent=Decimal("10"),
        destination="acct_1",
        started_ns=at("2026-01-15T00:00:00Z"),
        anchor_ns=at("2026-01-15T00:00:00Z"),
        ppt_purchase_id=None,
        ppt_trades_bought=0,
        ppt_counted=(),
        ppt_over=(),
    )
    ids = [w.window_id for w in due_subscription_periods(sub, None, at("2026-07-15T00:00:00Z"))]
    assert ids == ["20260115T000000Z", "20260415T000000Z", "20260715T000000Z"]
    after = due_subscription_periods(sub, at("2026-04-15T00:00:00Z"), at("2026-07-14T23:59:59Z"))
    assert after == []
    assert due_subscription_periods(sub, None, at("2026-01-14T00:00:00Z")) == []


def test_sealed_stripe_keys_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment keeps its config in a ConfigMap and the sealed keys in a Secret's env."""
    monkeypatch.setenv(ENV_BILLING_KEY, base64.b64encode(bytes(range(32))).decode())
    monkeypatch.setenv(ENV_STRIPE_API_KEY_SEALED, seal_secret("sk_test_from_env"))
    monkeypatch.setenv(ENV_WEBHOOK_SECRET_SEALED, seal_secret("whsec_from_env"))
    assert stripe_api_key(BillingConfig()) == "sk_test_from_env"
    assert webhook_secret(BillingConfig()) == "whsec_from_env"
    # The config file's own value wins.
    assert stripe_api_key(BillingConfig(stripe_api_key_sealed=seal_secret("sk_test_file"))) == (
        "sk_test_file"
    )
    monkeypatch.delenv(ENV_STRIPE_API_KEY_SEALED)
    with pytest.raises(BillingConfigError, match=ENV_STRIPE_API_KEY_SEALED):
        stripe_api_key(BillingConfig())


async def test_an_allowance_bought_through_checkout_is_not_charged_again(world: World) -> None:
    await monthly_follower(world, "f1", "2026-04-01T00:00:00Z")
    async with world.pool.acquire() as conn:
        await store.save_allowance(
            conn,
            follower="f1",
            plan_id="sub30",
            purchase_id="cs_test_paid",
            trades_bought=10,
            counted=(),
            over=(),
        )
    await run_job(world.context(), "period_charges", at("2026-04-01T00:30:00Z"))
    assert [c.module for c in await world.charges()] == ["subscription"]
