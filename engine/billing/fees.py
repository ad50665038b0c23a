"""The fee modules a provider sells (subscription, pay-per-trade, volume), the platform fee, keys.

The performance fee lives in ``hwm.py`` beside its high-water mark. Every function is pure:
ledger facts and plan terms in, integer minor units out, each rounding named where it happens.
"""

from __future__ import annotations

import calendar
import enum
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal

import msgspec

from engine.billing.facts import ClosedVolume, CopiedTrade
from engine.billing.windows import BillingWindow
from engine.core.calendar import utc_datetime
from engine.core.money import Exact, amount_for, divide, exact, multiply

_SECOND_NS = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FeeModule(enum.StrEnum):
    SUBSCRIPTION = "subscription"
    PAY_PER_TRADE = "pay_per_trade"
    PERFORMANCE = "performance"
    VOLUME = "volume"


# --- idempotency ---------------------------------------------------------------------------


def _key_part(part: str) -> str:
    if not isinstance(part, str) or not part:
        raise ValueError(f"an idempotency key part is a non-empty string, not {part!r}")
    # Escaping ':' (and the escape itself) keeps the key one-to-one: follower "a:b" with plan
    # "c" and follower "a" with plan "b:c" must never share a key, or one of them goes uncharged.
    return part.replace("%", "%25").replace(":", "%3A")


def idempotency_key(module: FeeModule, follower: str, plan: str, window: str) -> str:
    """``module:follower:plan:window``: the same charge always gets the same key.

    ``window`` is the weekly window id (``2026-W13``) for the performance and volume fees, the
    period start (``period_id``) for a subscription charge, the purchase id for a pay-per-trade
    allowance.
    """
    return ":".join(_key_part(p) for p in (FeeModule(module).value, follower, plan, window))


# --- platform fee --------------------------------------------------------------------------


class PlatformSplit(msgspec.Struct, frozen=True, kw_only=True):
    """One provider charge divided between the platform and the provider."""

    total_minor: int
    application_fee_minor: int
    """Stripe's ``application_fee_amount``: the platform's part."""
    provider_minor: int
    """What reaches the provider's connected account: always total − application fee."""


def platform_fee(total_minor: int, platform_percent: Exact) -> PlatformSplit:
    """``total × platform %`` rounded *down*, the provider getting the rest.

    Down, not half-even: the operator's plan promises providers a fee of at most that
    percentage, and rounding down keeps every single charge within the promise. The provider's
    part is the difference, so the two parts always sum to the total.
    """
    if not isinstance(total_minor, int) or isinstance(total_minor, bool) or total_minor < 0:
        raise ValueError(f"a charge total is a non-negative int of minor units: {total_minor!r}")
    percent = exact(platform_percent)
    if not 0 <= percent <= 100:
        raise ValueError(f"a platform fee is between 0 and 100 %, not {platform_percent!r}")
    fee = multiply(total_minor, percent / 100, ROUND_DOWN)
    return PlatformSplit(
        total_minor=total_minor, application_fee_minor=fee, provider_minor=total_minor - fee
    )


# --- subscription --------------------------------------------------------------------------


class BillingPeriod(enum.StrEnum):
    MONTHLY = "monthly"
    QUARTERLY = "quarterly"
    YEARLY = "yearly"

    @property
    def months(self) -> int:
        return {"monthly": 1, "quarterly": 3, "yearly": 12}[self.value]


class SubscriptionPlan(msgspec.Struct, frozen=True, kw_only=True):
    plan_id: str
    price_minor: int
    period: BillingPeriod


class PlanChange(msgspec.Struct, frozen=True, kw_only=True):
    """An upgrade or downgrade mid-period, as two invoice lines and the period that follows."""

    credit_minor: int
    """The unused part of the old plan, credited."""
    charge_minor: int
    """The new plan from the change to the end of the period that now runs."""
    net_minor: int
    """charge − credit: negative on a downgrade, carried as credit to the next invoice."""
    anchor_ns: int
    """The anchor renewals now count from (moves to the change when the period length changes)."""
    period_start_ns: int
    period_end_ns: int


def _ns(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _add_months(moment: datetime, months: int) -> datetime:
    # Day clamped to the month's last day, counted from the anchor each time (not chained), so
    # a subscription anchored on 31 January renews on 28/29 February and then 31 March.
    year, month0 = divmod(moment.month - 1 + months, 12)
    year += moment.year
    day = min(moment.day, calendar.monthrange(year, month0 + 1)[1])
    return moment.replace(year=year, month=month0 + 1, day=day)


def period_bounds(anchor_ns: int, period: BillingPeriod, at_ns: int) -> tuple[int, int]:
    """The billing period ``[start, end)`` containing ``at_ns``, counted in UTC from the anchor."""
    if at_ns < anchor_ns:
        raise ValueError("a subscription period cannot be asked for before its anchor")
    anchor = utc_datetime(anchor_ns)
    # The datetime drops the anchor's sub-microsecond part: add it back so every edge is an
    # exact whole number of months after the anchor.
    sub_us = anchor_ns % 1000
    step = period.months

    def edge(k: int) -> int:
        return _ns(_add_months(anchor, k * step)) + sub_us

    at = utc_datetime(at_ns)
    k = max(((at.year - anchor.year) * 12 + at.month - anchor.month) // step, 0)
    # The month count can be one period off (day of month, clamping): settle it exactly.
    while k > 0 and edge(k) > at_ns:
        k -= 1
    while edge(k + 1) <= at_ns:
        k += 1
    return edge(k), edge(k + 1)


def period_id(period_start_ns: int) -> str:
    """``20260401T000000Z``: a subscription period named by its start, for its charge key.

    ISO 8601 basic format, so the key needs no escaping (it has no ``:``).
    """
    return utc_datetime(period_start_ns).strftime("%Y%m%dT%H%M%SZ")


def prorate(price_minor: int, remaining_ns: int, period_ns: int) -> int:
    """``price × remaining / period`` in whole seconds, rounded half-even.

    By the second, as Stripe prorates: a second that has started counts as used.
    """
    remaining_s = remaining_ns // _SECOND_NS
    period_s = period_ns // _SECOND_NS
    return divide(price_minor, remaining_s, period_s)


def change_plan(
    old: SubscriptionPlan, new: SubscriptionPlan, *, anchor_ns: int, at_ns: int
) -> PlanChange:
    """Credit the unused part of ``old`` and charge ``new`` for the period that now runs.

    Same period length: the anchor stays, and ``new`` is charged for the rest of the current
    period. Another length (monthly → quarterly): the new period starts at the change and is
    charged in full, as a renewal would be.
    """
    start, end = period_bounds(anchor_ns, old.period, at_ns)
    credit = prorate(old.price_minor, end - at_ns, end - start)
    if new.period is old.period:
        charge = prorate(new.price_minor, end - at_ns, end - start)
        new_anchor, new_start, new_end = anchor_ns, start, end
    else:
        charge = new.price_minor
        new_anchor = at_ns
        new_start, new_end = period_bounds(at_ns, new.period, at_ns)
    return PlanChange(
        credit_minor=credit,
        charge_minor=charge,
        net_minor=charge - credit,
        anchor_ns=new_anchor,
        period_start_ns=new_start,
        period_end_ns=new_end,
    )


# --- pay-per-trade -------------------------------------------------------------------------


class PayPerTradeAllowance(msgspec.Struct, frozen=True, kw_only=True):
    """N copied trades bought for a one-time price, and the order ids already seen."""

    follower: str
    purchase_id: str
    trades_bought: int
    counted: tuple[str, ...] = ()
    """Order ids counted against the allowance, in the order they were counted."""
    over_allowance: tuple[str, ...] = ()
    """Copies that opened after it was used up (the fan-out was already out); not charged."""

    @property
    def remaining(self) -> int:
        return self.trades_bought - len(self.counted)


class AllowanceUse(msgspec.Struct, frozen=True, kw_only=True):
    allowance: PayPerTradeAllowance
    newly_counted: tuple[str, ...]
    newly_over: tuple[str, ...]
    exhausted_by: str | None
    """The order id that used the last trade, when it was used in this batch."""
    stop_links: bool
    """Nothing left: the follower's links on this plan must stop opening copies."""


def count_copied_trades(
    allowance: PayPerTradeAllowance, trades: Iterable[CopiedTrade]
) -> AllowanceUse:
    """Count copies against the allowance: copy-only, once per order id, in time order.

    Copies of one fan-out can arrive in any order; sorting by (open time, order id) makes the
    order that used the last trade the same on every run.
    """
    seen = set(allowance.counted) | set(allowance.over_allowance)
    fresh: dict[str, CopiedTrade] = {}
    for trade in trades:
        if trade.follower != allowance.follower:
            raise ValueError(f"copy of {trade.follower!r} counted for {allowance.follower!r}")
        if trade.manual or trade.order_id in seen:
            continue
        fresh.setdefault(trade.order_id, trade)
    remaining = allowance.remaining
    counted: list[str] = []
    over: list[str] = []
    for trade in sorted(fresh.values(), key=lambda t: (t.opened_ns, t.order_id)):
        if remaining > 0:
            counted.append(trade.order_id)
            remaining -= 1
        else:
            over.append(trade.order_id)
    exhausted_by = counted[-1] if counted and remaining == 0 else None
    updated = msgspec.structs.replace(
        allowance,
        counted=allowance.counted + tuple(counted),
        over_allowance=allowance.over_allowance + tuple(over),
    )
    return AllowanceUse(
        allowance=updated,
        newly_counted=tuple(counted),
        newly_over=tuple(over),
        exhausted_by=exhausted_by,
        stop_links=remaining <= 0,
    )


# --- volume fee ----------------------------------------------------------------------------


class VolumeCharge(msgspec.Struct, frozen=True, kw_only=True):
    follower: str
    window_id: str
    lots: Decimal
    fee_minor: int
    order_ids: tuple[str, ...]
    """The closing orders counted, sorted: what the invoice line lists."""


def volume_fee(
    closes: Iterable[ClosedVolume],
    *,
    follower: str,
    window: BillingWindow,
    rate_per_lot_minor: Exact,
) -> VolumeCharge:
    """``rate per lot × copied lots closed in the window``, rounded half-even once.

    The lots are summed exactly first and the product rounded once, so five 0.01-lot partial
    closes cost what one 0.05-lot close costs. Manual closes and closes outside the window
    (including the weekend gap) are not counted; a redelivered close (same order id) once.
    """
    rate = exact(rate_per_lot_minor)
    if rate < 0:
        raise ValueError(f"a volume fee rate is not negative: {rate_per_lot_minor!r}")
    counted: dict[str, Decimal] = {}
    for close in closes:
        if close.follower != follower:
            raise ValueError(f"close of {close.follower!r} charged to {follower!r}")
        if close.manual or not window.contains(close.closed_ns):
            continue
        lots = exact(close.lots)
        if lots < 0:
            raise ValueError(f"closed volume is not negative: {close!r}")
        counted.setdefault(close.order_id, lots)
    lots_total = sum(counted.values(), Decimal(0))
    return VolumeCharge(
        follower=follower,
        window_id=window.window_id,
        lots=lots_total,
        fee_minor=amount_for(lots_total, rate),
        order_ids=tuple(sorted(counted)),
    )
