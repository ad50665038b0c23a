"""Billing's jobs (weekly fees, period charges, allowances, syncs, pruning) and their scheduler.

Every job is safe to run twice, late, or on several instances at once. The weekly fee is two
steps: *issue* stores each follower's invoice and pending charge, under its deterministic key,
in one serializable transaction with the fee state it moved (the high-water mark); *send*
leases each pending charge and calls Stripe with that key. A crash between the two leaves a
pending charge that the next run (of any job that sends) sends again under the same key, so
Stripe answers with the first PaymentIntent if there was one. One instance leads the schedule
(a PostgreSQL advisory lock); a leader that starts after a missed Friday runs it first.

Subscription renewals and pay-per-trade purchases are charged by period (``period_charges``:
every period that started and is not charged, under the same deterministic keys), and the
leader counts pay-per-trade copies from the ledger (``allowance_sync``): a used-up allowance
raises its cause, and the ``Enforcer`` stops the follower's links after the commit.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import asyncpg
import msgspec
import structlog

from engine.billing import enforcement, metrics, notifications, store
from engine.billing.enforcement import Enforcer
from engine.billing.facts import CopiedTrade, EquitySample
from engine.billing.fees import (
    BillingPeriod,
    FeeModule,
    PayPerTradeAllowance,
    count_copied_trades,
    idempotency_key,
    period_bounds,
    period_id,
    platform_fee,
    prorate,
    volume_fee,
)
from engine.billing.gateway import PaymentOutcome, PaymentResult, StripeGateway
from engine.billing.hwm import HighWaterMark, settle_window
from engine.billing.ledgerfacts import FactsSource
from engine.billing.store import ChargeDraft, ChargeState, IllegalChargeTransition
from engine.billing.webhooks import charge_moved, process_stored_events, recover_missed_events
from engine.billing.windows import (
    BillingWindow,
    completed_windows_since,
    last_completed_window,
    next_run_at,
)

log = structlog.get_logger("tradecopy.billing.jobs")

#: ``pg_try_advisory_lock`` key of the scheduler's leadership (any fixed 64-bit number that no
#: other lock of the database uses; this is "tcbill01" in ASCII).
LEADER_LOCK = 0x7463_6269_6C6C_3031
_HOUR_NS = 3600 * 10**9
_DAY_NS = 24 * _HOUR_NS


class Job(enum.StrEnum):
    WEEKLY_FEES = "weekly_fees"
    HOURLY_SYNC = "hourly_sync"
    DAILY_RECHECK = "daily_recheck"
    PRUNE = "prune"
    PERIOD_CHARGES = "period_charges"
    """Subscription renewals and pay-per-trade purchases whose period has started."""
    ALLOWANCE_SYNC = "allowance_sync"
    """Pay-per-trade copies counted from the ledger; a used-up allowance stops the links."""


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """What the jobs need: the database, Stripe, the ledger facts, and timing settings."""

    pool: asyncpg.Pool
    gateway: StripeGateway
    facts: FactsSource
    send_lease_s: float = 120.0
    event_retention_days: int = 90
    enforcer: Enforcer | None = None
    """Writes the links' stops; None where billing runs without NATS (one-off jobs): the
    causes are still recorded and the service applies them."""
    trades: CopiedTradesSource | None = None
    """Where pay-per-trade copies are read; None: ``facts`` (``LedgerViewFacts`` reads both)."""
    allowance_sync_s: float = 60.0
    """How often the leader counts pay-per-trade copies (a used-up allowance stops soon)."""
    portal_url: str | None = None
    """Where a follower whose allowance is used up buys another (``…/plans/<plan>``); None:
    no email is queued."""

    def copied_trades_source(self) -> CopiedTradesSource:
        if self.trades is not None:
            return self.trades
        if not hasattr(self.facts, "copied_trades"):
            raise TypeError("the facts source reads no copied trades: give JobContext.trades")
        return cast("CopiedTradesSource", self.facts)


class JobSummary(msgspec.Struct, frozen=True, kw_only=True):
    job: str
    run_key: str
    issued: int = 0
    sent: dict[str, int] = {}
    events: int = 0
    pruned: int = 0
    allowances_used_up: int = 0


# --------------------------------------------------------------- weekly fees: issue


async def _issue_for(
    ctx: JobContext, sub: store.WeeklySubscription, window: BillingWindow
) -> list[str]:
    """Issue the weekly charges of one subscription for ``window``; the keys stored now."""
    modules = set(sub.modules)
    equity: EquitySample | None = None
    flows: list[Any] = []
    closes: list[Any] = []
    # Facts are read before the transaction: it may run several times, and the ledger's
    # facts of a finished window do not change under it.
    if FeeModule.PERFORMANCE in modules and sub.hwm_settled_end_ns < window.end_ns:
        equity = await ctx.facts.closing_equity(sub.follower, window.end_ns)
        if equity is not None and sub.hwm_flows_through_ns is not None:
            flows = await ctx.facts.cash_flows(sub.follower, sub.hwm_flows_through_ns, equity.ts_ns)
    if FeeModule.VOLUME in modules and sub.volume_settled_end_ns < window.end_ns:
        # Volume closed before the follower was on the plan is not the plan's to charge.
        closes = [
            c
            for c in await ctx.facts.closed_volume(sub.follower, window)
            if c.closed_ns >= sub.started_ns
        ]

    async def issue(conn: asyncpg.Connection) -> list[str]:
        # The state is read again inside the transaction: a concurrent run may have settled
        # the window since, and then this one must store nothing.
        current = await store.weekly_subscription(conn, sub.follower, sub.plan_id)
        if current is None or current.destination is None:
            return []
        drafts: list[ChargeDraft] = []
        hwm_state = (
            current.hwm_mark_minor,
            current.hwm_flows_through_ns,
            current.hwm_settled_window,
            current.hwm_settled_end_ns,
        )
        volume_end = current.volume_settled_end_ns
        if (
            FeeModule.PERFORMANCE in modules
            and current.hwm_settled_end_ns < window.end_ns
            and equity is not None
            and current.hwm_mark_minor is not None
            and current.hwm_flows_through_ns is not None
            and current.performance_rate is not None
            and equity.ts_ns >= current.hwm_flows_through_ns
        ):
            mark = HighWaterMark(
                follower=current.follower,
                mark_minor=current.hwm_mark_minor,
                flows_through_ns=current.hwm_flows_through_ns,
                settled_window=current.hwm_settled_window,
                settled_end_ns=current.hwm_settled_end_ns,
            )
            settled = settle_window(
                mark, window=window, equity=equity, cash_flows=flows, rate=current.performance_rate
            )
            state = settled.state
            hwm_state = (
                state.mark_minor,
                state.flows_through_ns,
                state.settled_window,
                state.settled_end_ns,
            )
            if settled.fee_minor > 0:
                drafts.append(
                    _draft(
                        current,
                        window,
                        FeeModule.PERFORMANCE,
                        settled.fee_minor,
                        {
                            "profit_minor": settled.profit_minor,
                            "equity_minor": equity.equity_minor,
                            "rate": str(current.performance_rate),
                        },
                    )
                )
        if (
            FeeModule.VOLUME in modules
            and volume_end < window.end_ns
            and current.volume_rate_per_lot_minor is not None
        ):
            charge = volume_fee(
                closes,
                follower=current.follower,
                window=window,
                rate_per_lot_minor=current.volume_rate_per_lot_minor,
            )
            volume_end = window.end_ns
            if charge.fee_minor > 0:
                drafts.append(
                    _draft(
                        current,
                        window,
                        FeeModule.VOLUME,
                        charge.fee_minor,
                        {
                            "lots": str(charge.lots),
                            "orders": list(charge.order_ids),
                            "rate_per_lot_minor": str(current.volume_rate_per_lot_minor),
                        },
                    )
                )
        await store.save_weekly_state(
            conn,
            follower=current.follower,
            plan_id=current.plan_id,
            hwm_mark_minor=hwm_state[0],
            hwm_flows_through_ns=hwm_state[1],
            hwm_settled_window=hwm_state[2],
            hwm_settled_end_ns=hwm_state[3],
            volume_settled_end_ns=volume_end,
        )
        stored = [d.idempotency_key for d in drafts if await store.insert_charge(conn, d)]
        return stored

    keys = await store.serializable(ctx.pool, issue)
    for key in keys:
        metrics.CHARGES_ISSUED.labels(module=key.split(":", 1)[0]).inc()
        log.info("charge_issued", key=key, window=window.window_id)
    return keys


def _draft(
    sub: store.WeeklySubscription | store.PeriodSubscription,
    window: BillingWindow,
    module: FeeModule,
    amount: int,
    detail: dict[str, Any],
    *,
    key_window: str | None = None,
) -> ChargeDraft:
    """One charge of ``sub`` issued at ``window``'s end; its key names ``key_window`` (the
    window itself unless a purchase has an id of its own)."""
    split = platform_fee(amount, sub.platform_fee_percent)
    key = idempotency_key(module, sub.follower, sub.plan_id, key_window or window.window_id)
    return ChargeDraft(
        idempotency_key=key,
        module=module.value,
        follower=sub.follower,
        provider=sub.provider,
        plan_id=sub.plan_id,
        window_id=window.window_id,
        currency=sub.currency,
        amount_minor=amount,
        platform_fee_minor=split.application_fee_minor,
        destination=sub.destination or "",
        lines=({"module": module.value, "amount_minor": amount, **detail},),
        issued_ns=window.end_ns,
    )


async def issue_weekly_charges(ctx: JobContext, window: BillingWindow) -> list[str]:
    """Issue every active subscription's weekly charges for ``window``; the keys stored now."""
    async with ctx.pool.acquire() as conn:
        subscriptions = await store.weekly_subscriptions(conn)
    issued: list[str] = []
    for sub in subscriptions:
        if sub.destination is None:
            log.warning("provider_not_onboarded", provider=sub.provider, follower=sub.follower)
            continue
        issued += await _issue_for(ctx, sub, window)
    return issued


# --------------------------------------------------------------- subscription, pay-per-trade


class CopiedTradesSource(Protocol):
    async def copied_trades(self, follower: str, window: BillingWindow) -> list[CopiedTrade]:
        """Copies that opened (filled) on the follower during ``window``."""
        ...


def subscription_charge_minor(sub: store.PeriodSubscription, window: BillingWindow) -> int:
    """The subscription's price for the seconds of ``window`` the follower was on the plan.

    ``price × subscribed seconds / seconds of the period they start in`` (``fees.prorate``,
    by the second, half-even): a window is billed the share of the period it covers.
    """
    if sub.subscription_price_minor is None or sub.subscription_period is None:
        return 0
    start = max(window.start_ns, sub.started_ns)
    if start >= window.end_ns:
        return 0
    period_start, period_end = period_bounds(
        sub.anchor_ns, BillingPeriod(sub.subscription_period), start
    )
    return prorate(sub.subscription_price_minor, window.end_ns - start, period_end - period_start)


async def _issue_period_for(
    ctx: JobContext,
    sub: store.PeriodSubscription,
    window: BillingWindow,
    trades: CopiedTradesSource,
) -> list[str]:
    """Issue one subscription's subscription and pay-per-trade charges for ``window``.

    The pay-per-trade allowance is bought once per window (its purchase id is the window id):
    its price is charged once, and the window's copies are counted against it.
    """
    copies: list[CopiedTrade] = []
    if FeeModule.PAY_PER_TRADE in sub.modules:
        # Read before the transaction, as the weekly facts are: it may run several times.
        copies = [
            c for c in await trades.copied_trades(sub.follower, window)
            if c.opened_ns >= sub.started_ns
        ]  # fmt: skip

    async def issue(conn: asyncpg.Connection) -> list[str]:
        current = await store.period_subscription(conn, sub.follower, sub.plan_id)
        if current is None or current.destination is None:
            return []
        drafts: list[ChargeDraft] = []
        if FeeModule.SUBSCRIPTION in current.modules:
            amount = subscription_charge_minor(current, window)
            if amount > 0:
                drafts.append(
                    _draft(
                        current,
                        window,
                        FeeModule.SUBSCRIPTION,
                        amount,
                        {
                            "price_minor": current.subscription_price_minor,
                            "period": current.subscription_period,
                            "from_ns": max(window.start_ns, current.started_ns),
                            "to_ns": window.end_ns,
                        },
                    )
                )
        if (
            FeeModule.PAY_PER_TRADE in current.modules
            and current.ppt_trades is not None
            and current.ppt_price_minor is not None
        ):
            purchase = window.window_id
            if current.ppt_purchase_id == purchase:
                allowance = PayPerTradeAllowance(
                    follower=current.follower,
                    purchase_id=purchase,
                    trades_bought=current.ppt_trades_bought,
                    counted=current.ppt_counted,
                    over_allowance=current.ppt_over,
                )
            else:
                allowance = PayPerTradeAllowance(
                    follower=current.follower,
                    purchase_id=purchase,
                    trades_bought=current.ppt_trades,
                )
            use = count_copied_trades(allowance, copies)
            await store.save_allowance(
                conn,
                follower=current.follower,
                plan_id=current.plan_id,
                purchase_id=purchase,
                trades_bought=use.allowance.trades_bought,
                counted=use.allowance.counted,
                over=use.allowance.over_allowance,
            )
            if current.ppt_price_minor > 0:
                drafts.append(
                    _draft(
                        current,
                        window,
                        FeeModule.PAY_PER_TRADE,
                        current.ppt_price_minor,
                        {
                            "trades_bought": use.allowance.trades_bought,
                            "counted": list(use.allowance.counted),
                            "over_allowance": list(use.allowance.over_allowance),
                        },
                        key_window=purchase,
                    )
                )
        return [d.idempotency_key for d in drafts if await store.insert_charge(conn, d)]

    keys = await store.serializable(ctx.pool, issue)
    for key in keys:
        metrics.CHARGES_ISSUED.labels(module=key.split(":", 1)[0]).inc()
        log.info("charge_issued", key=key, window=window.window_id)
    return keys


async def issue_period_charges(
    ctx: JobContext, window: BillingWindow, trades: CopiedTradesSource
) -> list[str]:
    """Issue every active subscription's subscription and pay-per-trade charges for ``window``."""
    async with ctx.pool.acquire() as conn:
        subscriptions = await store.period_subscriptions(conn)
    issued: list[str] = []
    for sub in subscriptions:
        if sub.destination is None:
            log.warning("provider_not_onboarded", provider=sub.provider, follower=sub.follower)
            continue
        issued += await _issue_period_for(ctx, sub, window, trades)
    return issued


# --------------------------------------------------------------- scheduled period charges


def purchase_start_ns(purchase_id: str) -> int | None:
    """The instant a scheduled pay-per-trade purchase was opened (its id is ``period_id`` of
    it); None for a purchase of another form (the demo's, named by its window)."""
    try:
        moment = datetime.strptime(purchase_id, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return calendar.timegm(moment.utctimetuple()) * 10**9


def due_subscription_periods(
    sub: store.PeriodSubscription, last_charged_start_ns: int | None, now_ns: int
) -> list[BillingWindow]:
    """Every subscription period that has started by ``now_ns`` and comes after the last one
    charged, oldest first, each as a window named by ``period_id`` of its start.

    A renewal is charged in advance, at its period's start, as Stripe's subscriptions do; a
    scheduler that was down for two periods charges both when it comes back.
    """
    if sub.subscription_period is None or now_ns < sub.anchor_ns:
        return []
    period = BillingPeriod(sub.subscription_period)
    at = sub.anchor_ns if last_charged_start_ns is None else last_charged_start_ns
    start, end = period_bounds(sub.anchor_ns, period, max(at, sub.anchor_ns))
    if last_charged_start_ns is not None:
        start, end = period_bounds(sub.anchor_ns, period, end)
    due: list[BillingWindow] = []
    while start <= now_ns:
        due.append(BillingWindow(window_id=period_id(start), start_ns=start, end_ns=end))
        start, end = period_bounds(sub.anchor_ns, period, end)
    return due


async def issue_due_period_charges(ctx: JobContext, now_ns: int) -> list[str]:
    """The scheduled side of ``issue_period_charges``: each active subscription's renewals
    that have started and are not charged yet, and each pay-per-trade purchase not charged
    yet (the first one opens when the follower subscribes). Keys are the same deterministic
    ``module:follower:plan:period`` as everywhere: two runs, or two instances, store one
    charge. A plan bought through Stripe Checkout is renewed by Stripe's own subscription
    (``stripe_subscription`` is set) and never charged here."""
    async with ctx.pool.acquire() as conn:
        subscriptions = await store.period_subscriptions(conn)
        stripe_managed = await store.stripe_managed_subscriptions(conn)
    issued: list[str] = []
    for sub in subscriptions:
        if sub.destination is None:
            log.warning("provider_not_onboarded", provider=sub.provider, follower=sub.follower)
            continue
        if sub.started_ns > now_ns:
            continue
        issued += await _issue_due_for(
            ctx, sub, now_ns, stripe_managed=(sub.follower, sub.plan_id) in stripe_managed
        )
    return issued


async def _issue_due_for(
    ctx: JobContext, sub: store.PeriodSubscription, now_ns: int, *, stripe_managed: bool
) -> list[str]:
    async def issue(conn: asyncpg.Connection) -> list[str]:
        current = await store.period_subscription(conn, sub.follower, sub.plan_id)
        if current is None or current.destination is None:
            return []
        drafts: list[ChargeDraft] = []
        if (
            FeeModule.SUBSCRIPTION in current.modules
            and not stripe_managed
            and current.subscription_price_minor is not None
        ):
            last = await store.last_charged_period_start(
                conn, current.follower, current.plan_id, FeeModule.SUBSCRIPTION.value
            )
            # The id keeps whole seconds: a point inside that second is inside its period.
            last_ns = None if last is None else purchase_start_ns(last)
            last_ns = None if last_ns is None else last_ns + 10**9 - 1
            for period in due_subscription_periods(current, last_ns, now_ns):
                amount = subscription_charge_minor(current, period)
                if amount <= 0:
                    continue
                draft = _draft(
                    current,
                    period,
                    FeeModule.SUBSCRIPTION,
                    amount,
                    {
                        "price_minor": current.subscription_price_minor,
                        "period": current.subscription_period,
                        "from_ns": max(period.start_ns, current.started_ns),
                        "to_ns": period.end_ns,
                    },
                )
                # Charged in advance: the invoice is issued when its period starts.
                drafts.append(msgspec.structs.replace(draft, issued_ns=period.start_ns))
        if (
            FeeModule.PAY_PER_TRADE in current.modules
            and current.ppt_trades is not None
            and current.ppt_price_minor is not None
        ):
            purchase = current.ppt_purchase_id
            if purchase is None:
                # The first allowance is bought when the follower subscribes.
                purchase = period_id(current.started_ns)
                await store.save_allowance(
                    conn,
                    follower=current.follower,
                    plan_id=current.plan_id,
                    purchase_id=purchase,
                    trades_bought=current.ppt_trades,
                    counted=(),
                    over=(),
                    purchased_ns=current.started_ns,
                )
            # Only the purchases billing opened are charged here (named by their instant); one
            # bought through Checkout (named by its session) was paid there.
            opened = purchase_start_ns(purchase)
            if current.ppt_price_minor > 0 and opened is not None:
                window = BillingWindow(window_id=purchase, start_ns=opened, end_ns=opened)
                draft = _draft(
                    current,
                    window,
                    FeeModule.PAY_PER_TRADE,
                    current.ppt_price_minor,
                    {"trades_bought": current.ppt_trades_bought or current.ppt_trades},
                    key_window=purchase,
                )
                drafts.append(draft)
        return [d.idempotency_key for d in drafts if await store.insert_charge(conn, d)]

    keys = await store.serializable(ctx.pool, issue)
    for key in keys:
        metrics.CHARGES_ISSUED.labels(module=key.split(":", 1)[0]).inc()
        log.info("charge_issued", key=key, follower=sub.follower, plan=sub.plan_id)
    return keys


async def renew_allowance(
    conn: asyncpg.Connection, follower: str, plan_id: str, at_ns: int
) -> str | None:
    """The follower bought a new pay-per-trade allowance at ``at_ns``: a new purchase (named
    ``period_id(at_ns)``, so asking twice is one purchase) with the plan's trades, and the stop
    of a used-up allowance lifted. Its price is charged by the next ``period_charges`` run.
    The purchase id, or None when there is no such active pay-per-trade subscription."""
    current = await store.period_subscription(conn, follower, plan_id)
    if current is None or current.ppt_trades is None:
        return None
    purchase = period_id(at_ns)
    if current.ppt_purchase_id != purchase:
        await store.save_allowance(
            conn,
            follower=follower,
            plan_id=plan_id,
            purchase_id=purchase,
            trades_bought=current.ppt_trades,
            counted=(),
            over=(),
            purchased_ns=at_ns,
        )
    await enforcement.allowance_renewed(conn, follower, plan_id)
    log.info("allowance_renewed", follower=follower, plan=plan_id, purchase=purchase)
    return purchase


# --------------------------------------------------------------- used-up allowances


class AllowanceStatus(msgspec.Struct, frozen=True, kw_only=True):
    follower: str
    plan_id: str
    purchase_id: str
    counted: int
    trades_bought: int
    exhausted: bool


async def sync_allowances(
    ctx: JobContext, trades: CopiedTradesSource, now_ns: int
) -> list[AllowanceStatus]:
    """Count every active pay-per-trade purchase's copies from the ledger and stop the links
    of each one used up (``allowance:<plan>``, through the ``Enforcer`` after the commit).

    The copies counted are those opened since the purchase on the accounts the follower owns
    at the plan's provider (``billing_accounts`` and the API's ``api_billing_account_owners``;
    an account named like the follower itself when it owns none), copy-only and once per
    order id (``count_copied_trades``). Idempotent: a second pass counts nothing new and the
    cause is already active.
    """
    async with ctx.pool.acquire() as conn:
        subscriptions = await store.period_subscriptions(conn)
        owners = await store.all_account_owners(conn)
    statuses: list[AllowanceStatus] = []
    for sub in subscriptions:
        if FeeModule.PAY_PER_TRADE not in sub.modules or sub.ppt_purchase_id is None:
            continue
        # When it was bought: stamped on the row (``migrations/0005``), else the instant its id
        # names, else the subscription's start.
        opened = sub.ppt_purchased_ns
        if opened is None:
            opened = purchase_start_ns(sub.ppt_purchase_id) or sub.started_ns
        if opened > now_ns:
            continue
        accounts = sorted(
            account
            for account, (provider, follower) in owners.accounts.items()
            if follower == sub.follower and provider == sub.provider
        ) or [sub.follower]
        since = BillingWindow(window_id=sub.ppt_purchase_id, start_ns=opened, end_ns=now_ns + 1)
        copies: list[CopiedTrade] = []
        for account in accounts:
            for trade in await trades.copied_trades(account, since):
                if trade.opened_ns >= max(opened, sub.started_ns):
                    # Counted for the person billed, whichever of their accounts copied it.
                    copies.append(msgspec.structs.replace(trade, follower=sub.follower))
        statuses.append(await _count_allowance(ctx, sub, copies))
    if ctx.enforcer is not None:
        await ctx.enforcer.apply_pending()
    return statuses


async def _tell_allowance_used_up(
    ctx: JobContext, conn: asyncpg.Connection, sub: store.PeriodSubscription, trades: int
) -> None:
    """Queue the ``allowance_used_up`` email, once per purchase (its id names the email)."""
    if ctx.portal_url is None:
        return
    address = await store.contact(conn, sub.follower)
    if address is None:
        return  # no address yet: the links still stop
    email, language = address
    link = f"{ctx.portal_url.rstrip('/')}/plans/{sub.plan_id}"
    rendered = notifications.render(
        language, "allowance_used_up", to=email, trades=trades, provider=sub.provider, link=link
    )
    email_id = f"allowance_used_up:{sub.follower}:{sub.plan_id}:{sub.ppt_purchase_id}"
    await notifications.queue_email(
        conn, email_id, sub.provider, "allowance_used_up", language, rendered
    )


async def _count_allowance(
    ctx: JobContext, sub: store.PeriodSubscription, copies: list[CopiedTrade]
) -> AllowanceStatus:
    async def count(conn: asyncpg.Connection) -> AllowanceStatus:
        current = await store.period_subscription(conn, sub.follower, sub.plan_id)
        if current is None or current.ppt_purchase_id != sub.ppt_purchase_id:
            # Renewed meanwhile: the next pass counts against the new purchase.
            return AllowanceStatus(
                follower=sub.follower,
                plan_id=sub.plan_id,
                purchase_id=sub.ppt_purchase_id or "",
                counted=0,
                trades_bought=0,
                exhausted=False,
            )
        allowance = PayPerTradeAllowance(
            follower=current.follower,
            purchase_id=current.ppt_purchase_id,
            trades_bought=current.ppt_trades_bought,
            counted=current.ppt_counted,
            over_allowance=current.ppt_over,
        )
        use = count_copied_trades(allowance, copies)
        if use.newly_counted or use.newly_over:
            await store.save_allowance(
                conn,
                follower=current.follower,
                plan_id=current.plan_id,
                purchase_id=current.ppt_purchase_id,
                trades_bought=use.allowance.trades_bought,
                counted=use.allowance.counted,
                over=use.allowance.over_allowance,
            )
        if use.stop_links and await enforcement.allowance_used_up(
            conn, current.follower, current.plan_id
        ):
            log.info(
                "allowance_used_up",
                follower=current.follower,
                plan=current.plan_id,
                exhausted_by=use.exhausted_by,
            )
            await _tell_allowance_used_up(ctx, conn, current, use.allowance.trades_bought)
        return AllowanceStatus(
            follower=current.follower,
            plan_id=current.plan_id,
            purchase_id=current.ppt_purchase_id,
            counted=len(use.allowance.counted),
            trades_bought=use.allowance.trades_bought,
            exhausted=use.stop_links,
        )

    return await store.serializable(ctx.pool, count)


# --------------------------------------------------------------- sending charges


async def send_pending_charges(ctx: JobContext, keys: list[str] | None = None) -> dict[str, int]:
    """Send every pending charge no one is sending (or ``keys`` only); outcomes counted."""
    counts: dict[str, int] = {}
    while True:
        async with ctx.pool.acquire() as conn:
            claimed = await store.claim_charges_to_send(
                conn, lease_s=ctx.send_lease_s, limit=50, keys=keys or ()
            )
        if not claimed:
            return counts
        for charge in claimed:
            outcome = await _send(ctx, charge)
            counts[outcome] = counts.get(outcome, 0) + 1
        if keys is not None:
            return counts


async def _send(ctx: JobContext, charge: store.Charge) -> str:
    async with ctx.pool.acquire() as conn:
        saved = await store.customer(conn, charge.follower)
    if saved is None or saved[1] is None:
        result = PaymentResult(outcome=PaymentOutcome.FAILED, code="no_payment_method")
    else:
        result = await ctx.gateway.charge_off_session(
            charge, customer=saved[0], payment_method=saved[1]
        )
    metrics.CHARGE_SENDS.labels(outcome=result.outcome.value).inc()
    await record_result(ctx.pool, charge, result)
    log.info(
        "charge_sent",
        key=charge.idempotency_key,
        outcome=result.outcome.value,
        payment_intent=result.payment_intent,
        code=result.code,
    )
    return result.outcome.value


_OUTCOME_STATE = {
    PaymentOutcome.SUCCEEDED: ChargeState.SUCCEEDED,
    PaymentOutcome.FAILED: ChargeState.FAILED,
    PaymentOutcome.REQUIRES_ACTION: ChargeState.REQUIRES_ACTION,
}


async def record_result(pool: asyncpg.Pool, charge: store.Charge, result: PaymentResult) -> None:
    """Store what Stripe answered; an unknown outcome leaves the charge to be sent again."""

    async def record(conn: asyncpg.Connection) -> None:
        if result.outcome is PaymentOutcome.UNKNOWN:
            # The lease stays: the charge is sent again, same key, once it runs out, so a
            # Stripe outage is retried at the lease's pace rather than in a tight loop.
            return
        if result.payment_intent is not None:
            await store.record_payment_intent(conn, charge.idempotency_key, result.payment_intent)
        target = _OUTCOME_STATE.get(result.outcome)
        if target is None:
            return  # processing: the webhook settles it
        try:
            outcome = await store.transition_charge(
                conn,
                charge.idempotency_key,
                target,
                cause=f"gateway {result.outcome.value}",
                payment_intent=result.payment_intent,
                stripe_charge=result.stripe_charge,
                failure_code=result.code,
            )
        except IllegalChargeTransition:
            return  # a webhook already moved the charge further
        if outcome == "applied":
            # The follower is told, and a failure stops (a success lifts) the follower's links
            # to the provider; the links are written after the commit (``Enforcer``).
            await charge_moved(conn, charge, target, result.payment_intent)

    await store.serializable(pool, record)


# --------------------------------------------------------------- running a job


def _run_key(job: Job, at_ns: int) -> str:
    if job is Job.WEEKLY_FEES:
        return last_completed_window(at_ns).window_id
    hourly = (Job.HOURLY_SYNC, Job.PERIOD_CHARGES, Job.ALLOWANCE_SYNC)
    step = _HOUR_NS if job in hourly else _DAY_NS
    return str(at_ns - at_ns % step)


async def run_job(ctx: JobContext, name: str, at_ns: int) -> JobSummary:
    """Run ``name`` as of ``at_ns`` (UTC ns). Re-running a finished run is harmless: it
    issues nothing new and only sends what is still pending."""
    job = Job(name)
    run_key = _run_key(job, at_ns)
    started = time.perf_counter()
    async with ctx.pool.acquire() as conn:
        await store.start_job_run(conn, job.value, run_key)
    summary = JobSummary(job=job.value, run_key=run_key)
    try:
        if job is Job.WEEKLY_FEES:
            window = last_completed_window(at_ns)
            issued = await issue_weekly_charges(ctx, window)
            sent = await send_pending_charges(ctx)
            summary = msgspec.structs.replace(summary, issued=len(issued), sent=sent)
        elif job in (Job.HOURLY_SYNC, Job.DAILY_RECHECK):
            since_s = None if job is Job.HOURLY_SYNC else at_ns // 10**9 - 2 * 86_400
            new = await recover_missed_events(ctx.pool, ctx.gateway, since_s=since_s)
            applied = await process_stored_events(ctx.pool)
            sent = await send_pending_charges(ctx)
            summary = msgspec.structs.replace(summary, events=new + len(applied), sent=sent)
            if ctx.enforcer is not None:
                # Every active cause applied again and every link no cause holds released:
                # what a missed webhook or a NATS outage left undone is healed here.
                if job is Job.DAILY_RECHECK:
                    await ctx.enforcer.recheck()
                else:
                    await ctx.enforcer.apply_pending()
        elif job is Job.PERIOD_CHARGES:
            issued = await issue_due_period_charges(ctx, at_ns)
            sent = await send_pending_charges(ctx)
            summary = msgspec.structs.replace(summary, issued=len(issued), sent=sent)
        elif job is Job.ALLOWANCE_SYNC:
            statuses = await sync_allowances(ctx, ctx.copied_trades_source(), at_ns)
            used_up = sum(1 for s in statuses if s.exhausted)
            summary = msgspec.structs.replace(summary, allowances_used_up=used_up)
        else:
            before_s = at_ns // 10**9 - ctx.event_retention_days * 86_400
            async with ctx.pool.acquire() as conn:
                pruned = await store.prune_events(conn, before_s)
            summary = msgspec.structs.replace(summary, pruned=pruned)
    except Exception:
        metrics.JOB_RUNS.labels(job=job.value, result="error").inc()
        log.exception("billing_job_failed", job=job.value, run_key=run_key)
        raise
    async with ctx.pool.acquire() as conn:
        await store.finish_job_run(conn, job.value, run_key, msgspec.to_builtins(summary))
    metrics.JOB_RUNS.labels(job=job.value, result="ok").inc()
    metrics.JOB_SECONDS.labels(job=job.value).observe(time.perf_counter() - started)
    log.info("billing_job_done", **msgspec.to_builtins(summary))
    return summary


# --------------------------------------------------------------- the scheduler


def _now_ns() -> int:
    return time.time_ns()


class Scheduler:
    """Runs the jobs on time while it holds the leader lock; waits for it otherwise."""

    def __init__(
        self,
        ctx: JobContext,
        database_url: str,
        *,
        clock: Callable[[], int] = _now_ns,
        retry_leader_s: float = 5.0,
    ) -> None:
        self.ctx = ctx
        self.database_url = database_url
        self.clock = clock
        self.retry_leader_s = retry_leader_s
        self.leader = False

    async def catch_up(self) -> list[JobSummary]:
        """Every weekly window completed since the last finished run, oldest first."""
        async with self.ctx.pool.acquire() as conn:
            last = await store.last_finished_run(conn, Job.WEEKLY_FEES.value)
        summaries = []
        for window in completed_windows_since(last, self.clock()):
            summaries.append(await run_job(self.ctx, Job.WEEKLY_FEES.value, window.end_ns))
        return summaries

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            conn = await asyncpg.connect(self.database_url)
            try:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                    self.leader = True
                    metrics.LEADER.set(1)
                    log.info("billing_scheduler_leading")
                    await self._lead(conn, stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("billing_scheduler_lost_database", error=str(exc))
            except Exception:
                # A job that failed (Stripe refusing the key, a bug) must not end the schedule:
                # leadership is given up (the connection closes) and taken again after a pause,
                # and the job runs again from the start, which is safe for every job.
                log.exception("billing_scheduler_job_failed")
            finally:
                self.leader = False
                metrics.LEADER.set(0)
                with contextlib.suppress(Exception):
                    await conn.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.retry_leader_s)

    async def _lead(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        # Start-up and recovery are one path: a missed Friday is charged before anything else,
        # and every renewal or purchase that started while no one led is charged now.
        await self.catch_up()
        await run_job(self.ctx, Job.PERIOD_CHARGES.value, self.clock())
        next_hour = self.clock() // _HOUR_NS * _HOUR_NS + _HOUR_NS
        next_day = self.clock() // _DAY_NS * _DAY_NS + _DAY_NS
        allowance_step = max(int(self.ctx.allowance_sync_s * 1e9), 1)
        next_allowance = self.clock()
        while not stop.is_set():
            now = self.clock()
            if now >= next_day:
                await run_job(self.ctx, Job.DAILY_RECHECK.value, now)
                await run_job(self.ctx, Job.PRUNE.value, now)
                next_day += _DAY_NS
            if now >= next_hour:
                await run_job(self.ctx, Job.HOURLY_SYNC.value, now)
                await run_job(self.ctx, Job.PERIOD_CHARGES.value, now)
                next_hour += _HOUR_NS
            if now >= next_allowance:
                await run_job(self.ctx, Job.ALLOWANCE_SYNC.value, now)
                next_allowance = now + allowance_step
            await self.catch_up()
            wake = min(next_run_at(now), next_hour, next_day, next_allowance)
            # Sleep at most a minute at a time: a clock jump or a lost lock is noticed soon.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(max((wake - now) / 1e9, 0.01), 60.0))
            # The session's lock is lost with its connection; a cheap query notices.
            await conn.fetchval("SELECT 1")
