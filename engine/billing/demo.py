"""The demo's billing: four follower plans, one fee module each, charged over the demo's window."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import msgspec
import structlog

from engine.billing import store
from engine.billing.fees import FeeModule, idempotency_key, period_id
from engine.billing.gateway import StripeGateway
from engine.billing.jobs import JobContext, issue_period_charges, issue_weekly_charges
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.windows import BillingWindow

log = structlog.get_logger("tradecopy.billing.demo")

OPERATOR_PLAN = "demo-operator"
PLATFORM_FEE_PERCENT = Decimal("20")
CURRENCY = "USD"
#: The demo provider's charge destination. No Stripe account is configured in the demo, so this
#: names none: the charges are issued and stay pending, never sent.
DESTINATION = "acct_demo_no_stripe"
NOT_SENT = "not sent: no Stripe account configured"

SUB_PRICE_MINOR = 4_900  # 49.00 USD a month
PPT_TRADES = 10
PPT_PRICE_MINOR = 1_500  # 15.00 USD for 10 copies
PERFORMANCE_RATE = Decimal("0.20")
VOLUME_RATE_PER_LOT_MINOR = Decimal("500")  # 5.00 USD per lot closed

#: The order the demo's first four followers are put on the plans, and the short names the
#: demo's output uses.
MODULES = (
    ("SUB", FeeModule.SUBSCRIPTION),
    ("PPT", FeeModule.PAY_PER_TRADE),
    ("PERF", FeeModule.PERFORMANCE),
    ("VOL", FeeModule.VOLUME),
)


def plan_id(module: FeeModule) -> str:
    return f"demo-{module.value}"


class DemoFee(msgspec.Struct, frozen=True, kw_only=True):
    """One follower's fee over the demo's window, as stored (or zero, and why)."""

    follower: str
    module: str
    amount_minor: int
    currency: str
    platform_fee_minor: int
    provider_minor: int
    idempotency_key: str
    state: str | None
    """The stored charge's state (``pending``); None when the fee is zero and none was stored."""
    note: str


def demo_window(start_ns: int, end_ns: int) -> BillingWindow:
    """The demo's own window ``[start, end)``, named by its start (a key part, never a week)."""
    return BillingWindow(window_id=f"demo-{period_id(start_ns)}", start_ns=start_ns, end_ns=end_ns)


async def set_up(
    database_url: str, *, provider: str, followers: dict[str, int], started_ns: int
) -> dict[str, FeeModule]:
    """Billing's tables, the operator plan, the provider, and the first four of ``followers``
    (account → equity in minor units when copying starts) on one plan each; who is on what."""
    await store.migrate(database_url)
    on_plan = dict(zip(followers, (module for _, module in MODULES), strict=False))
    conn = await asyncpg.connect(database_url)
    try:
        await store.upsert_operator_plan(
            conn,
            plan_id=OPERATOR_PLAN,
            currency=CURRENCY,
            platform_fee_percent=PLATFORM_FEE_PERCENT,
            account_pool_limit=100,
            modules=[module.value for _, module in MODULES],
        )
        await store.upsert_provider(
            conn, provider=provider, operator_plan=OPERATOR_PLAN, stripe_account=DESTINATION
        )
        for _, module in MODULES:
            await store.upsert_follower_plan(
                conn,
                plan_id=plan_id(module),
                provider=provider,
                currency=CURRENCY,
                modules=[module.value],
                subscription_price_minor=SUB_PRICE_MINOR,
                subscription_period="monthly",
                ppt_trades=PPT_TRADES,
                ppt_price_minor=PPT_PRICE_MINOR,
                performance_rate=PERFORMANCE_RATE,
                volume_rate_per_lot_minor=VOLUME_RATE_PER_LOT_MINOR,
            )
        for follower, module in on_plan.items():
            # The high-water mark starts at the equity when copying starts.
            plan, equity = plan_id(module), followers[follower]
            if not await store.subscribe(
                conn,
                follower=follower,
                plan_id=plan,
                started_ns=started_ns,
                start_equity_minor=equity,
            ):
                # A database kept from an earlier run (``--database-url``): the paper accounts
                # are new, so the fee state of the old ones must not carry over.
                await store.restart_subscription(
                    conn,
                    follower=follower,
                    plan_id=plan,
                    started_ns=started_ns,
                    start_equity_minor=equity,
                )
    finally:
        await conn.close()
    return on_plan


async def issue(database_url: str, window: BillingWindow) -> list[str]:
    """Issue every charge of ``window`` through the jobs' own code; the keys stored now.

    Nothing is sent: the demo has no Stripe account, so the gateway is never called (its
    client holds no key) and the charges stay pending.
    """
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    gateway = StripeGateway("")
    try:
        facts = LedgerViewFacts(pool)
        ctx = JobContext(pool=pool, gateway=gateway, facts=facts)
        keys = await issue_weekly_charges(ctx, window)
        keys += await issue_period_charges(ctx, window, facts)
    finally:
        await gateway.close()
        await pool.close()
    log.info("demo_fees_issued", window=window.window_id, keys=keys)
    return keys


async def fees(
    database_url: str,
    window: BillingWindow,
    on_plan: dict[str, FeeModule],
    start_equity: dict[str, int],
) -> list[DemoFee]:
    """Each follower's stored charge of ``window`` (or zero, with the reason)."""
    short = {module: name for name, module in MODULES}
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        facts = LedgerViewFacts(pool)
        result: list[DemoFee] = []
        for follower, module in on_plan.items():
            # Every module's key ends in the window id (pay-per-trade: the allowance bought
            # for this window).
            key = idempotency_key(module, follower, plan_id(module), window.window_id)
            async with pool.acquire() as conn:
                charge = await store.charge_by_key(conn, key)
            amount = 0 if charge is None else charge.amount_minor
            fee = 0 if charge is None else charge.platform_fee_minor
            note = NOT_SENT if charge is not None else "nothing to charge"
            if module is FeeModule.PAY_PER_TRADE:
                async with pool.acquire() as conn:
                    sub = await store.period_subscription(conn, follower, plan_id(module))
                if sub is not None:
                    used = f"{len(sub.ppt_counted)} of {sub.ppt_trades_bought} copies used"
                    if sub.ppt_over:
                        used += f", {len(sub.ppt_over)} over the allowance"
                    note = f"{note} ({used})"
            if module is FeeModule.PERFORMANCE and charge is None:
                equity = await facts.closing_equity(follower, window.end_ns)
                if equity is None:
                    note = "no equity sample in the window: nothing to charge"
                else:
                    profit = equity.equity_minor - start_equity[follower]
                    note = f"profit {profit / 100:+.2f} is not positive: no fee"
            elif module is FeeModule.VOLUME and charge is None:
                note = "no copied volume closed in the window"
            elif module is FeeModule.SUBSCRIPTION and charge is None:
                seconds = (window.end_ns - window.start_ns) // 10**9
                note = f"{seconds} s of a month round to less than one cent"
            result.append(
                DemoFee(
                    follower=follower,
                    module=short[module],
                    amount_minor=amount,
                    currency=CURRENCY if charge is None else charge.currency,
                    platform_fee_minor=fee,
                    provider_minor=amount - fee,
                    idempotency_key=key,
                    state=None if charge is None else charge.state.value,
                    note=note,
                )
            )
        return result
    finally:
        await pool.close()
