"""What the copy rules read: the live market view, a compiled link, and the facts of one event.

All three are computed once and shared: the view is kept live by the service, a link is compiled
when it changes, and an event's facts are worked out once per fan-out, not once per follower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.calendar import trading_day
from engine.core.comments import copy_comment
from engine.replicator.protection import has_equity_protection
from engine.replicator.state import LinkState
from engine.replicator.symbols import map_symbol, symbol_allowed
from schemas import subjects
from schemas.account import AccountState, SymbolSpec
from schemas.common import Side
from schemas.control import EmergencyStop, StopScope, stop_key
from schemas.decisions import DecisionRule
from schemas.links import CopyLink, Direction
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionOpened,
)

EMPTY_LINK_STATE = LinkState()


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
        return self.link_states.get(link_id, EMPTY_LINK_STATE)


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
