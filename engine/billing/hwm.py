"""The performance fee on a per-follower high-water mark, as a pure fold over ledger facts.

The mark starts at the equity when copying starts, moves by every deposit (+) and withdrawal
(−), and moves up to the equity only when a fee is charged; pauses and restarts do not touch
it (it lives in the billing store, not in the link). Equity at or below the mark is a loss not
yet recovered, so recovering a loss is never charged.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from engine.billing.facts import CashFlow, EquitySample
from engine.billing.windows import BillingWindow
from engine.core.money import Exact, exact, multiply


class HighWaterMark(msgspec.Struct, frozen=True, kw_only=True):
    """One follower's mark and how far the facts have been folded into it."""

    follower: str
    mark_minor: int
    flows_through_ns: int
    """Cash flows at or before this instant are in the mark; later ones are not yet."""
    settled_window: str | None = None
    """The last window settled (charged or found without profit): re-running it is a no-op."""
    settled_end_ns: int = 0


class PerformanceCharge(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of settling one window: the fee (0 if none) and the state to store."""

    fee_minor: int
    profit_minor: int
    """Equity − mark at the window's end (≤ 0: nothing to charge)."""
    state: HighWaterMark
    already_settled: bool = False


def fee_rate(rate: Exact) -> Exact:
    """``rate`` checked to be an exact share in [0, 1] (``"0.20"`` is 20 %)."""
    if not 0 <= exact(rate) <= 1:
        raise ValueError(f"a fee rate is a share between 0 and 1, not {rate!r}")
    return rate


def performance_fee(mark_minor: int, equity_minor: int, rate: Exact) -> int:
    """``rate × (equity − mark)`` rounded half-even, or 0 when equity ≤ mark."""
    profit = equity_minor - mark_minor
    if profit <= 0:
        return 0
    return multiply(profit, fee_rate(rate))


def start_mark(sample: EquitySample) -> HighWaterMark:
    """The mark when copying starts: the follower's equity at that moment."""
    return HighWaterMark(
        follower=sample.follower, mark_minor=sample.equity_minor, flows_through_ns=sample.ts_ns
    )


def fold_cash_flows(
    state: HighWaterMark, flows: Iterable[CashFlow], until_ns: int
) -> HighWaterMark:
    """The mark moved by every cash flow after ``flows_through_ns`` and at or before ``until_ns``.

    Flows already folded (at or before ``flows_through_ns``) are skipped, so folding the same
    facts twice moves the mark once.
    """
    if until_ns < state.flows_through_ns:
        raise ValueError("cash flows cannot be folded backwards in time")
    moved = 0
    for flow in flows:
        if flow.follower != state.follower:
            raise ValueError(f"cash flow of {flow.follower!r} folded into {state.follower!r}")
        if state.flows_through_ns < flow.ts_ns <= until_ns:
            moved += flow.signed_minor
    return msgspec.structs.replace(
        state, mark_minor=state.mark_minor + moved, flows_through_ns=until_ns
    )


def settle_window(
    state: HighWaterMark,
    *,
    window: BillingWindow,
    equity: EquitySample,
    cash_flows: Iterable[CashFlow],
    rate: Exact,
) -> PerformanceCharge:
    """Charge the performance fee for ``window`` from its closing equity ``equity``.

    ``equity`` is the last sample before the window's end; the cash flows folded are those up to
    that sample's instant, so a deposit the sample does not show yet is not in the mark either
    (a withdrawal folded without its equity drop would charge a fee on the withdrawn money).
    Settling a window that is not after the last settled one changes nothing.
    """
    rate = fee_rate(rate)
    if window.end_ns <= state.settled_end_ns:
        return PerformanceCharge(fee_minor=0, profit_minor=0, state=state, already_settled=True)
    if equity.follower != state.follower:
        raise ValueError(f"equity of {equity.follower!r} settled for {state.follower!r}")
    if not state.flows_through_ns <= equity.ts_ns < window.end_ns:
        raise ValueError(
            "the closing equity must be sampled before the window's end and not before the "
            "facts already folded into the mark"
        )
    folded = fold_cash_flows(state, cash_flows, equity.ts_ns)
    profit = equity.equity_minor - folded.mark_minor
    fee = performance_fee(folded.mark_minor, equity.equity_minor, rate)
    # The mark moves up only with a charge: a profit too small to round to one minor unit
    # stays above the mark and is charged once it has grown, instead of being forgiven.
    mark = equity.equity_minor if fee > 0 else folded.mark_minor
    settled = msgspec.structs.replace(
        folded,
        mark_minor=mark,
        settled_window=window.window_id,
        settled_end_ns=window.end_ns,
    )
    return PerformanceCharge(fee_minor=fee, profit_minor=profit, state=settled)
