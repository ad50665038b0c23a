"""The demo's fees: billing's own jobs over the demo's window, checked against the pure modules."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from engine.billing import demo as billing_demo
from engine.billing import store
from engine.billing.fees import (
    BillingPeriod,
    FeeModule,
    PayPerTradeAllowance,
    count_copied_trades,
    period_bounds,
    platform_fee,
    prorate,
    volume_fee,
)
from engine.billing.hwm import performance_fee
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.windows import BillingWindow
from engine.demo import KINDS, run_demo


@pytest.fixture
async def demo_run(database_url: str) -> dict[str, Any]:
    return await run_demo(6.0, 4, 60.0, as_json=True, database_url=database_url)


async def test_demo_fees_are_billings_charges_over_the_demo_window(
    demo_run: dict[str, Any], database_url: str
) -> None:
    fees = demo_run["fees"]
    assert [f["module"] for f in fees] == ["SUB", "PPT", "PERF", "VOL"]
    assert all(
        set(f) == {"follower", "module", "amount_minor", "currency", "platform_fee_minor"}
        for f in fees
    )
    w = demo_run["fees_window"]
    window = BillingWindow(window_id=w["window_id"], start_ns=w["start_ns"], end_ns=w["end_ns"])
    by_module = {f["module"]: f for f in fees}
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        facts = LedgerViewFacts(pool)
        async with pool.acquire() as conn:
            charges = {c.follower: c for c in await store.charges(conn)}

        sub = by_module["SUB"]
        start, end = period_bounds(window.start_ns, BillingPeriod.MONTHLY, window.start_ns)
        assert sub["amount_minor"] == prorate(
            billing_demo.SUB_PRICE_MINOR, window.end_ns - window.start_ns, end - start
        )

        ppt = by_module["PPT"]
        copies = await facts.copied_trades(ppt["follower"], window)
        use = count_copied_trades(
            PayPerTradeAllowance(
                follower=ppt["follower"],
                purchase_id=window.window_id,
                trades_bought=billing_demo.PPT_TRADES,
            ),
            copies,
        )
        assert use.newly_counted, "the demo's copies are counted against the allowance"
        assert ppt["amount_minor"] == billing_demo.PPT_PRICE_MINOR
        async with pool.acquire() as conn:
            allowance = await store.period_subscription(
                conn, ppt["follower"], billing_demo.plan_id(FeeModule.PAY_PER_TRADE)
            )
        assert allowance is not None
        assert allowance.ppt_counted == use.allowance.counted
        assert allowance.ppt_over == use.allowance.over_allowance

        perf = by_module["PERF"]
        index = [f["follower"] for f in fees].index(perf["follower"])
        mark = round(KINDS[index].balance * 100)
        equity = await facts.closing_equity(perf["follower"], window.end_ns)
        assert equity is not None and equity.ts_ns >= window.start_ns
        assert perf["amount_minor"] == performance_fee(
            mark, equity.equity_minor, billing_demo.PERFORMANCE_RATE
        )

        vol = by_module["VOL"]
        closes = await facts.closed_volume(vol["follower"], window)
        charge = volume_fee(
            closes,
            follower=vol["follower"],
            window=window,
            rate_per_lot_minor=billing_demo.VOLUME_RATE_PER_LOT_MINOR,
        )
        assert charge.lots > 0, "the demo closes copied volume"
        assert vol["amount_minor"] == charge.fee_minor

        for fee in fees:
            split = platform_fee(fee["amount_minor"], billing_demo.PLATFORM_FEE_PERCENT)
            assert fee["platform_fee_minor"] == split.application_fee_minor
            assert split.application_fee_minor + split.provider_minor == fee["amount_minor"]
            stored = charges.get(fee["follower"])
            if fee["amount_minor"] == 0:
                assert stored is None
                continue
            assert stored is not None
            assert stored.amount_minor == fee["amount_minor"]
            assert stored.platform_fee_minor == fee["platform_fee_minor"]
            # No Stripe in the demo: issued, never sent.
            assert stored.state is store.ChargeState.PENDING
            assert stored.attempts == 0 and stored.stripe_payment_intent is None

        # The same window issued again adds no charge and no invoice.
        before = await pool.fetchval("SELECT count(*) FROM billing_invoices")
        assert await billing_demo.issue(database_url, window) == []
        assert await pool.fetchval("SELECT count(*) FROM billing_invoices") == before
        assert await pool.fetchval("SELECT count(*) FROM billing_charges") == len(charges)
    finally:
        await pool.close()


async def test_a_second_demo_on_the_same_database_marks_from_its_new_accounts(
    demo_run: dict[str, Any], database_url: str
) -> None:
    # The paper accounts start over on every run: the performance fee of the second run is
    # measured from its own starting equity, not from the first run's mark.
    again = await run_demo(6.0, 4, 60.0, as_json=True, database_url=database_url)
    w = again["fees_window"]
    assert w["window_id"] != demo_run["fees_window"]["window_id"]
    window = BillingWindow(window_id=w["window_id"], start_ns=w["start_ns"], end_ns=w["end_ns"])
    perf = next(f for f in again["fees"] if f["module"] == "PERF")
    index = [f["follower"] for f in again["fees"]].index(perf["follower"])
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        facts = LedgerViewFacts(pool)
        equity = await facts.closing_equity(perf["follower"], window.end_ns)
        assert equity is not None and equity.ts_ns >= window.start_ns
        assert perf["amount_minor"] == performance_fee(
            round(KINDS[index].balance * 100), equity.equity_minor, billing_demo.PERFORMANCE_RATE
        )
        ppt = next(f for f in again["fees"] if f["module"] == "PPT")
        async with pool.acquire() as conn:
            allowance = await store.period_subscription(
                conn, ppt["follower"], billing_demo.plan_id(FeeModule.PAY_PER_TRADE)
            )
            windows = await conn.fetchval(
                "SELECT count(DISTINCT window_id) FROM billing_charges WHERE module = $1",
                FeeModule.PAY_PER_TRADE.value,
            )
        assert allowance is not None and allowance.ppt_purchase_id == window.window_id
        async with pool.acquire() as conn:
            marked = await store.weekly_subscription(
                conn, perf["follower"], billing_demo.plan_id(FeeModule.PERFORMANCE)
            )
        assert marked is not None and marked.started_ns == window.start_ns
        assert marked.hwm_settled_window == window.window_id
        assert windows == 2, "each run bought (and was charged) its own allowance"
    finally:
        await pool.close()
