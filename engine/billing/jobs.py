"""Billing's jobs (weekly fees, hourly sync, daily recheck, pruning) and their scheduler.

Every job is safe to run twice, late, or on several instances at once. The weekly fee is two
steps: *issue* stores each follower's invoice and pending charge, under its deterministic key,
in one serializable transaction with the fee state it moved (the high-water mark); *send*
leases each pending charge and calls Stripe with that key. A crash between the two leaves a
pending charge that the next run (of any job that sends) sends again under the same key, so
Stripe answers with the first PaymentIntent if there was one. One instance leads the schedule
(a PostgreSQL advisory lock); a leader that starts after a missed Friday runs it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import msgspec
import structlog

from engine.billing import metrics, store
from engine.billing.enforcement import Enforcer
from engine.billing.facts import CopiedTrade, EquitySample
from engine.billing.fees import (
    BillingPeriod,
    FeeModule,
    PayPerTradeAllowance,
    count_copied_trades,
    idempotency_key,
    period_bounds,
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


class JobSummary(msgspec.Struct, frozen=True, kw_only=True):
    job: str
    run_key: str
    issued: int = 0
    sent: dict[str, int] = {}
    events: int = 0
    pruned: int = 0


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
    step = _HOUR_NS if job is Job.HOURLY_SYNC else _DAY_NS
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
        # Start-up and recovery are one path: a missed Friday is charged before anything else.
        await self.catch_up()
        next_hour = self.clock() // _HOUR_NS * _HOUR_NS + _HOUR_NS
        next_day = self.clock() // _DAY_NS * _DAY_NS + _DAY_NS
        while not stop.is_set():
            now = self.clock()
            if now >= next_day:
                await run_job(self.ctx, Job.DAILY_RECHECK.value, now)
                await run_job(self.ctx, Job.PRUNE.value, now)
                next_day += _DAY_NS
            if now >= next_hour:
                await run_job(self.ctx, Job.HOURLY_SYNC.value, now)
                next_hour += _HOUR_NS
            await self.catch_up()
            wake = min(next_run_at(now), next_hour, next_day)
            # Sleep at most a minute at a time: a clock jump or a lost lock is noticed soon.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(max((wake - now) / 1e9, 0.01), 60.0))
            # The session's lock is lost with its connection; a cheap query notices.
            await conn.fetchval("SELECT 1")
