"""The copy rules: one master event × one link → a follower order and/or copy decisions.

Pure functions over a ``MarketView`` (the cached account states, symbol specs, FX rates,
emergency stops and link states); the service does all I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.calendar import trading_day, within_trading_hours
from engine.core.comments import copy_comment
from engine.core.volume import close_ratio
from engine.replicator.protection import check_equity, has_equity_protection
from engine.replicator.sizing import SizingNote, size_follower_volume
from engine.replicator.state import LinkState
from engine.replicator.symbols import map_symbol, symbol_allowed
from schemas import subjects
from schemas.account import AccountState, SymbolSpec, TradeMode
from schemas.common import OrderType, Side, Trace
from schemas.control import EmergencyStop, StopScope, stop_key
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.links import CopyLink, Direction
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    FollowerClose,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)

_EMPTY_STATE = LinkState()


@dataclass(slots=True)
class MarketView:
    """Everything the rules read besides the event and the link, kept live by the service."""

    accounts: dict[str, AccountState] = field(default_factory=dict)
    symbols: dict[tuple[str, str], SymbolSpec] = field(default_factory=dict)
    fx_rates: dict[str, float] = field(default_factory=dict)
    stops: dict[str, EmergencyStop] = field(default_factory=dict)
    link_states: dict[str, LinkState] = field(default_factory=dict)

    def active_stop(self, link: CopyLink) -> EmergencyStop | None:
        if not self.stops:
            return None
        for key in (
            stop_key(StopScope.GLOBAL),
            stop_key(StopScope.ACCOUNT, link.follower),
            stop_key(StopScope.LINK, link.link_id),
        ):
            stop = self.stops.get(key)
            if stop is not None and stop.active:
                return stop
        return None

    def link_state(self, link_id: str) -> LinkState:
        return self.link_states.get(link_id, _EMPTY_STATE)


class CompiledLink:
    """A link with its lookups precomputed for the hot path."""

    __slots__ = (
        "decision_subject",
        "exclude",
        "has_equity_protection",
        "has_static_filters",
        "include",
        "link",
        "link_id",
        "magic_exclude",
        "magic_include",
        "order_subject",
        "symbol_cache",
        "uses_link_state",
    )

    def __init__(self, link: CopyLink) -> None:
        self.link = link
        self.link_id = link.link_id
        self.include = frozenset(s.upper() for s in link.symbols_include)
        self.exclude = frozenset(s.upper() for s in link.symbols_exclude)
        self.magic_include = frozenset(link.magic_include)
        self.magic_exclude = frozenset(link.magic_exclude)
        self.order_subject = subjects.follower_orders(link.follower)
        self.decision_subject = subjects.decisions(link.follower, link.link_id)
        self.symbol_cache: dict[str, str] = {}
        self.has_static_filters = bool(
            self.include
            or self.exclude
            or self.magic_include
            or self.magic_exclude
            or link.direction is not Direction.BOTH
        )
        # Only protections pause a link and only the daily limit counts trades: links with
        # neither never need their state entry on the hot path.
        self.has_equity_protection = has_equity_protection(link)
        self.uses_link_state = link.daily_trade_limit is not None or self.has_equity_protection

    def follower_symbol(self, master_symbol: str) -> str:
        mapped = self.symbol_cache.get(master_symbol)
        if mapped is None:
            mapped = map_symbol(self.link.symbol_mapping, master_symbol)
            self.symbol_cache[master_symbol] = mapped
        return mapped

    def static_filter(self, symbol: str, side: Side, magic: int) -> tuple[DecisionRule, str] | None:
        """Filters that hold for a position's whole life: symbol, direction, magic."""
        if not self.has_static_filters:
            return None
        if self.include or self.exclude:
            allowed, rule = symbol_allowed(self.include, self.exclude, symbol)
            if not allowed:
                listed = (
                    "not in the include"
                    if rule == DecisionRule.SYMBOL_NOT_INCLUDED
                    else "in the exclude"
                )
                return DecisionRule(rule), f"{symbol} is {listed} list"
        direction = self.link.direction
        if direction is not Direction.BOTH and (
            (direction is Direction.BUY_ONLY and side is not Side.BUY)
            or (direction is Direction.SELL_ONLY and side is not Side.SELL)
        ):
            return DecisionRule.DIRECTION, f"link copies {direction.value.replace('_', ' ')}"
        if self.magic_include and magic not in self.magic_include:
            return DecisionRule.MAGIC, f"magic {magic} is not in the include list"
        if magic in self.magic_exclude:
            return DecisionRule.MAGIC, f"magic {magic} is excluded"
        return None


@dataclass(slots=True)
class CopyPlan:
    order: FollowerOrder | None = None
    decisions: list[CopyDecision] = field(default_factory=list)
    daily_key: str | None = None
    """Set when the order is a new copy that counts toward the link's daily trade limit."""


def order_id(event_id: str, link_id: str) -> str:
    """Deterministic follower order id: the same event and link always give the same id."""
    return f"{event_id}:{link_id}"


def _decision(
    event: MasterEvent,
    cl: CompiledLink,
    now_ns: int,
    rule: DecisionRule,
    message: str,
    numbers: dict[str, float | str | None] | None = None,
    outcome: DecisionOutcome = DecisionOutcome.SKIPPED,
) -> CopyDecision:
    return CopyDecision(
        decision_id=f"{event.event_id}:{cl.link_id}:{rule.value}",
        link_id=cl.link_id,
        master=event.master,
        follower=cl.link.follower,
        outcome=outcome,
        rule=rule,
        message=message,
        ts_ns=now_ns,
        master_event_id=event.event_id,
        numbers=numbers or {},
    )


def _skip(
    event: MasterEvent,
    cl: CompiledLink,
    now_ns: int,
    rule: DecisionRule,
    message: str,
    numbers: dict[str, float | str | None] | None = None,
) -> CopyPlan:
    return CopyPlan(decisions=[_decision(event, cl, now_ns, rule, message, numbers)])


_NOTHING = CopyPlan()


def _levels(
    link: CopyLink, sl: float | None, tp: float | None
) -> tuple[float | None, float | None]:
    """SL/TP as the follower gets them: dropped when not copied, swapped on reverse copy."""
    if not link.copy_sl_tp:
        return None, None
    return (tp, sl) if link.reverse else (sl, tp)


class EventFacts:
    """What every link's rules need to know about one event, computed once per fan-out."""

    __slots__ = (
        "comment",
        "daily_key",
        "is_new_copy",
        "is_pending",
        "master_order_id",
        "master_side",
        "today",
    )

    def __init__(self, event: MasterEvent, now_ns: int) -> None:
        self.today = trading_day(now_ns)
        self.is_new_copy = isinstance(
            event, PositionOpened | PendingOrderTriggered | PendingOrderPlaced
        )
        self.is_pending = isinstance(event, PendingOrderPlaced)
        if isinstance(event, PendingOrderPlaced | PendingOrderModified | PendingOrderCancelled):
            self.master_side = event.order_type.side
        else:
            self.master_side = event.side
        # A triggered pending order is the same trade as its placement: counted once, by id.
        self.daily_key = (
            event.position_id
            if isinstance(event, PositionOpened)
            else getattr(event, "order_id", "")
        )
        self.master_order_id = event.order_id if isinstance(event, PendingOrderTriggered) else None
        self.comment = copy_comment(event.master, self.daily_key)


def plan_copy(
    event: MasterEvent, cl: CompiledLink, view: MarketView, now_ns: int, trace: Trace
) -> CopyPlan:
    """Apply every copy rule of ``cl`` to ``event``."""
    return plan_link(event, EventFacts(event, now_ns), cl, view, now_ns, trace)


def plan_link(
    event: MasterEvent,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan:
    if facts.is_new_copy:
        return _plan_new_copy(event, facts, cl, view, now_ns, trace)  # type: ignore[arg-type]
    return _plan_follow_up(event, facts, cl, view, now_ns, trace)


def plan_event(
    event: MasterEvent,
    links: tuple[CompiledLink, ...],
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> list[tuple[CompiledLink, CopyPlan]]:
    """Every link's plan for one event, leaving out links with nothing to publish."""
    facts = EventFacts(event, now_ns)
    plans = []
    for cl in links:
        try:
            plan = plan_link(event, facts, cl, view, now_ns, trace)
        except Exception as exc:
            # A defect in one link's rules must not stop the copies of every other link.
            plan = _skip(
                event, cl, now_ns, DecisionRule.INTERNAL_ERROR,
                f"the copy rules failed on this event: {exc!r}", {"error": repr(exc)},
            )  # fmt: skip
        if plan.order is not None or plan.decisions:
            plans.append((cl, plan))
    return plans


def _plan_new_copy(
    event: PositionOpened | PendingOrderTriggered | PendingOrderPlaced,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan:
    link = cl.link
    is_pending = facts.is_pending
    master_side = facts.master_side
    if not link.enabled:
        return _skip(event, cl, now_ns, DecisionRule.LINK_DISABLED, "link is disabled")
    stop = view.active_stop(link)
    if stop is not None:
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.EMERGENCY_STOP,
            f"emergency stop ({stop.scope.value}) is active: {stop.reason or 'no reason given'}",
            {"scope": stop.scope.value},
        )
    filtered = cl.static_filter(event.symbol, master_side, event.magic)
    if filtered is not None:
        return _skip(event, cl, now_ns, filtered[0], filtered[1], {"symbol": event.symbol})
    if is_pending and not link.copy_pending:
        return _skip(
            event, cl, now_ns, DecisionRule.PENDING_NOT_COPIED, "link does not copy pending orders"
        )
    if link.trading_hours is not None and not within_trading_hours(link.trading_hours, event.ts_ns):
        hours = link.trading_hours
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.TRADING_HOURS,
            f"outside trading hours {hours.start}-{hours.end} {hours.timezone}",
        )
    if link.max_signal_age_ms is not None:
        age_ms = (now_ns - event.ts_ns) / 1e6
        if age_ms > link.max_signal_age_ms:
            return _skip(
                event,
                cl,
                now_ns,
                DecisionRule.SIGNAL_AGE,
                f"signal is {age_ms:.0f} ms old, older than {link.max_signal_age_ms} ms",
                {"age_ms": age_ms, "max_signal_age_ms": link.max_signal_age_ms},
            )
    today = facts.today
    state = view.link_state(cl.link_id) if cl.uses_link_state else _EMPTY_STATE
    if state.paused and state.is_paused(today):
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.LINK_PAUSED,
            f"link is paused by {state.paused_rule.replace('_', ' ')}",
            {"paused_rule": state.paused_rule},
        )
    follower_state = view.accounts.get(link.follower)
    if follower_state is None:
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.NO_ACCOUNT_STATE,
            f"no account state for follower {link.follower}",
            {"account": link.follower},
        )
    if cl.has_equity_protection:
        breach = check_equity(link, follower_state, state, today)
        if breach is not None:
            return _skip(event, cl, now_ns, breach.rule, breach.message, breach.numbers)
    if (
        link.max_open_positions is not None
        and not is_pending
        and follower_state.open_positions >= link.max_open_positions
    ):
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.MAX_OPEN_POSITIONS,
            f"follower holds {follower_state.open_positions} positions, "
            f"the limit is {link.max_open_positions}",
            {"open_positions": follower_state.open_positions, "limit": link.max_open_positions},
        )
    daily_key = facts.daily_key
    if link.daily_trade_limit is not None:
        opened = state.opened_today(today)
        if daily_key not in opened and len(opened) >= link.daily_trade_limit:
            return daily_limit_skip(event, cl, now_ns, len(opened), today)
    symbol = cl.follower_symbol(event.symbol)
    spec = view.symbols.get((link.follower, symbol))
    if spec is None:
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.NO_SYMBOL_SPEC,
            f"no symbol specification for {symbol} on {link.follower}",
            {"symbol": symbol},
        )
    follower_side = master_side.flipped() if link.reverse else master_side
    mode = spec.trade_mode
    if mode is not TradeMode.FULL and (
        mode in (TradeMode.DISABLED, TradeMode.CLOSE_ONLY)
        or (mode is TradeMode.LONG_ONLY and follower_side is Side.SELL)
        or (mode is TradeMode.SHORT_ONLY and follower_side is Side.BUY)
    ):
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.TRADE_MODE,
            f"{symbol} trade mode is {mode.value.replace('_', ' ')}",
            {"trade_mode": mode.value},
        )
    # Risk sizing measures the follower's stop: on reverse copy that is the master's TP.
    stop_level = event.tp if link.reverse else event.sl
    sized = size_follower_volume(
        link,
        master_volume=event.volume,
        sl_distance=None if stop_level is None else abs(event.price - stop_level),
        master_state=view.accounts.get(link.master),
        follower_state=follower_state,
        spec=spec,
        fx_rates=view.fx_rates,
    )
    if sized.skip is not None:
        return _note_plan(event, cl, now_ns, sized.skip, DecisionOutcome.SKIPPED)
    plan = CopyPlan(daily_key=daily_key)
    for note in sized.reductions:
        plan.decisions.append(
            _decision(
                event, cl, now_ns, note.rule, note.message, note.numbers, DecisionOutcome.REDUCED
            )
        )
    sl, tp = _levels(link, event.sl, event.tp)
    if is_pending:
        order_type: OrderType = event.order_type.reversed() if link.reverse else event.order_type
        plan.order = FollowerPendingPlace(
            order_id=order_id(event.event_id, cl.link_id),
            link_id=cl.link_id,
            follower=link.follower,
            master=event.master,
            master_event_id=event.event_id,
            symbol=symbol,
            ts_ns=now_ns,
            trace=trace,
            master_order_id=event.order_id,
            order_type=order_type,
            volume=sized.volume,
            price=event.price,
            sl=sl,
            tp=tp,
            expiration_ns=event.expiration_ns,
            magic=link.magic,
            comment=facts.comment,
            master_volume=event.volume,
        )
        return plan
    plan.order = FollowerOpen(
        order_id=order_id(event.event_id, cl.link_id),
        link_id=cl.link_id,
        follower=link.follower,
        master=event.master,
        master_event_id=event.event_id,
        symbol=symbol,
        ts_ns=now_ns,
        trace=trace,
        master_position_id=event.position_id,
        side=follower_side,
        volume=sized.volume,
        sl=sl,
        tp=tp,
        magic=link.magic,
        comment=facts.comment,
        master_price=event.price,
        master_volume=event.volume,
        master_order_id=facts.master_order_id,
        max_price_deviation=link.max_price_deviation,
        deviation_policy=link.deviation_policy,
        deviation_wait_ms=link.deviation_wait_ms,
        expires_ns=(
            event.ts_ns + link.max_signal_age_ms * 1_000_000 if link.max_signal_age_ms else 0
        ),  # ts_ns ≤ 2**62 and the age ≤ one day by contract: always fits in int64
    )
    return plan


def daily_limit_skip(
    event: MasterEvent, cl: CompiledLink, now_ns: int, trades_today: int, today: str
) -> CopyPlan:
    """The daily trade limit's skip: from the cached count here, from the fresh count when
    the service's compare-and-set finds the limit already reached."""
    limit = cl.link.daily_trade_limit
    return _skip(
        event,
        cl,
        now_ns,
        DecisionRule.DAILY_TRADE_LIMIT,
        f"{trades_today} trades copied today ({today}, Europe/Berlin), the limit is {limit}",
        {"trades_today": trades_today, "limit": limit, "day": today},
    )


def _note_plan(
    event: MasterEvent, cl: CompiledLink, now_ns: int, note: SizingNote, outcome: DecisionOutcome
) -> CopyPlan:
    return CopyPlan(
        decisions=[_decision(event, cl, now_ns, note.rule, note.message, note.numbers, outcome)]
    )


def _plan_follow_up(
    event: MasterEvent,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan:
    """Modifications, closes and pending changes of something the link may have copied.

    They are never held back by hours, limits, pauses or a disabled link (a copy must be able
    to close), only by an emergency stop, and they skip silently when the static filters say
    the master's position was never copied.
    """
    link = cl.link
    if cl.static_filter(event.symbol, facts.master_side, event.magic) is not None:
        return _NOTHING
    if isinstance(event, PendingOrderModified | PendingOrderCancelled) and not link.copy_pending:
        return _NOTHING
    stop = view.active_stop(link)
    if stop is not None:
        return _skip(
            event,
            cl,
            now_ns,
            DecisionRule.EMERGENCY_STOP,
            f"emergency stop ({stop.scope.value}) is active: {stop.reason or 'no reason given'}",
            {"scope": stop.scope.value},
        )
    base = {
        "order_id": order_id(event.event_id, cl.link_id),
        "link_id": cl.link_id,
        "follower": link.follower,
        "master": event.master,
        "master_event_id": event.event_id,
        "symbol": cl.follower_symbol(event.symbol),
        "ts_ns": now_ns,
        "trace": trace,
    }
    if isinstance(event, PositionClosed):
        return CopyPlan(
            order=FollowerClose(
                **base, master_position_id=event.position_id, ratio=1.0, master_price=event.price
            )
        )
    if isinstance(event, PositionReduced):
        if not link.copy_partial_closes:
            return _skip(
                event,
                cl,
                now_ns,
                DecisionRule.PARTIAL_CLOSES_OFF,
                "link does not copy partial closes",
            )
        return CopyPlan(
            order=FollowerClose(
                **base,
                master_position_id=event.position_id,
                ratio=close_ratio(event.volume_before, event.volume_after),
                master_price=event.price,
                new_master_position_id=event.new_position_id,
            )
        )
    if isinstance(event, PositionModified):
        if not (link.copy_sl_tp and link.copy_sl_tp_modifications):
            return _skip(
                event,
                cl,
                now_ns,
                DecisionRule.SL_TP_MODIFICATIONS_OFF,
                "link does not copy SL/TP changes",
            )
        sl, tp = _levels(link, event.sl, event.tp)
        return CopyPlan(
            order=FollowerModify(**base, master_position_id=event.position_id, sl=sl, tp=tp)
        )
    if isinstance(event, PositionClosedBy):
        return CopyPlan(
            order=FollowerCloseBy(
                **base,
                master_position_id=event.position_id,
                master_opposite_position_id=event.opposite_position_id,
            )
        )
    if isinstance(event, PendingOrderModified):
        sl, tp = _levels(link, event.sl, event.tp)
        return CopyPlan(
            order=FollowerPendingModify(
                **base,
                master_order_id=event.order_id,
                price=event.price,
                sl=sl,
                tp=tp,
                expiration_ns=event.expiration_ns,
            )
        )
    if isinstance(event, PendingOrderCancelled):
        return CopyPlan(order=FollowerPendingCancel(**base, master_order_id=event.order_id))
    raise TypeError(f"unhandled master event {type(event).__name__}")  # pragma: no cover
