"""The gates: whether a master event may be copied on one link, and if not, which rule says no.

A new copy passes every filter and protection of its link, in a fixed order (the first rule
that holds it back is the one the follower is told about). Follow-ups of an existing copy —
modifications, closes, pending changes — are held back only by an emergency stop or by the
link's own choice not to copy that kind of change: a copy must always be able to close.
"""

from __future__ import annotations

from engine.core.calendar import within_trading_hours
from engine.replicator.facts import EMPTY_LINK_STATE, CompiledLink, EventFacts, MarketView
from engine.replicator.notes import RuleNote
from engine.replicator.protection import check_equity
from engine.replicator.state import LinkState
from schemas.account import AccountState, SymbolSpec, TradeMode
from schemas.common import Side
from schemas.decisions import DecisionRule
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionModified,
    PositionOpened,
    PositionReduced,
)

#: A new copy passed every gate: the follower's state, its symbol's spec, the follower's
#: symbol and side. A plain tuple: this is built once per follower on the hot path.
Admission = tuple[AccountState, SymbolSpec, str, Side]


def admit_new_copy(
    event: PositionOpened | PendingOrderTriggered | PendingOrderPlaced,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
) -> RuleNote | Admission:
    """Every gate of a new copy (position or pending order), in the order they are checked."""
    link = cl.link
    is_pending = facts.is_pending
    if not link.enabled:
        return RuleNote(DecisionRule.LINK_DISABLED, "link is disabled")
    stop = view.active_stop(link)
    if stop is not None:
        return _emergency_stop(stop.scope.value, stop.reason)
    filtered = cl.static_filter(event.symbol, facts.master_side, event.magic)
    if filtered is not None:
        return RuleNote(filtered[0], filtered[1], {"symbol": event.symbol})
    if is_pending and not link.copy_pending:
        return RuleNote(DecisionRule.PENDING_NOT_COPIED, "link does not copy pending orders")
    if link.trading_hours is not None and not within_trading_hours(link.trading_hours, event.ts_ns):
        hours = link.trading_hours
        return RuleNote(
            DecisionRule.TRADING_HOURS,
            f"outside trading hours {hours.start}-{hours.end} {hours.timezone}",
        )
    if link.max_signal_age_ms is not None:
        age_ms = (now_ns - event.ts_ns) / 1e6
        if age_ms > link.max_signal_age_ms:
            return RuleNote(
                DecisionRule.SIGNAL_AGE,
                f"signal is {age_ms:.0f} ms old, older than {link.max_signal_age_ms} ms",
                {"age_ms": age_ms, "max_signal_age_ms": link.max_signal_age_ms},
            )
    today = facts.today
    state = view.link_state(cl.link_id) if cl.uses_link_state else EMPTY_LINK_STATE
    if state.paused and state.is_paused(today):
        return RuleNote(
            DecisionRule.LINK_PAUSED,
            f"link is paused by {state.paused_rule.replace('_', ' ')}",
            {"paused_rule": state.paused_rule},
        )
    follower_state = view.accounts.get(link.follower)
    if follower_state is None:
        return RuleNote(
            DecisionRule.NO_ACCOUNT_STATE,
            f"no account state for follower {link.follower}",
            {"account": link.follower},
        )
    if cl.has_equity_protection:
        breach = check_equity(link, follower_state, state, today)
        if breach is not None:
            return breach
    if (
        link.max_open_positions is not None
        and not is_pending
        and follower_state.open_positions >= link.max_open_positions
    ):
        return RuleNote(
            DecisionRule.MAX_OPEN_POSITIONS,
            f"follower holds {follower_state.open_positions} positions, "
            f"the limit is {link.max_open_positions}",
            {"open_positions": follower_state.open_positions, "limit": link.max_open_positions},
        )
    if link.daily_trade_limit is not None:
        skip = daily_limit_gate(cl, state, facts.daily_key, today)
        if skip is not None:
            return skip
    symbol = cl.follower_symbol(event.symbol)
    spec = view.symbols.get((link.follower, symbol))
    if spec is None:
        return RuleNote(
            DecisionRule.NO_SYMBOL_SPEC,
            f"no symbol specification for {symbol} on {link.follower}",
            {"symbol": symbol},
        )
    side = facts.master_side.flipped() if link.reverse else facts.master_side
    mode = spec.trade_mode
    if mode is not TradeMode.FULL and (
        mode in (TradeMode.DISABLED, TradeMode.CLOSE_ONLY)
        or (mode is TradeMode.LONG_ONLY and side is Side.SELL)
        or (mode is TradeMode.SHORT_ONLY and side is Side.BUY)
    ):
        return RuleNote(
            DecisionRule.TRADE_MODE,
            f"{symbol} trade mode is {mode.value.replace('_', ' ')}",
            {"trade_mode": mode.value},
        )
    return follower_state, spec, symbol, side


def daily_limit_gate(
    cl: CompiledLink, state: LinkState, daily_key: str, today: str
) -> RuleNote | None:
    """The daily trade limit (anti-scalper): a trade already counted today always passes.

    Checked on the cached state here and again by the service's compare-and-set on the fresh
    one, so the count is exact across replicator instances."""
    limit = cl.link.daily_trade_limit
    if limit is None:
        return None
    opened = state.opened_today(today)
    if daily_key in opened or len(opened) < limit:
        return None
    return daily_limit_skip(limit, len(opened), today)


def daily_limit_skip(limit: int, trades_today: int, today: str) -> RuleNote:
    return RuleNote(
        DecisionRule.DAILY_TRADE_LIMIT,
        f"{trades_today} trades copied today ({today}, Europe/Berlin), the limit is {limit}",
        {"trades_today": trades_today, "limit": limit, "day": today},
    )


def admit_follow_up(
    event: MasterEvent, facts: EventFacts, cl: CompiledLink, view: MarketView
) -> RuleNote | bool:
    """Whether a change to something the link may have copied goes out.

    False (silently nothing) when the static filters or the pending-order choice say the
    master's trade was never copied; a ``RuleNote`` for an emergency stop or a kind of change the
    link does not copy; True otherwise.
    """
    link = cl.link
    if cl.static_filter(event.symbol, facts.master_side, event.magic) is not None:
        return False
    if isinstance(event, PendingOrderModified | PendingOrderCancelled) and not link.copy_pending:
        return False
    stop = view.active_stop(link)
    if stop is not None:
        return _emergency_stop(stop.scope.value, stop.reason)
    if isinstance(event, PositionReduced) and not link.copy_partial_closes:
        return RuleNote(DecisionRule.PARTIAL_CLOSES_OFF, "link does not copy partial closes")
    if isinstance(event, PositionModified) and not (
        link.copy_sl_tp and link.copy_sl_tp_modifications
    ):
        return RuleNote(DecisionRule.SL_TP_MODIFICATIONS_OFF, "link does not copy SL/TP changes")
    return True


def _emergency_stop(scope: str, reason: str) -> RuleNote:
    return RuleNote(
        DecisionRule.EMERGENCY_STOP,
        f"emergency stop ({scope}) is active: {reason or 'no reason given'}",
        {"scope": scope},
    )
