"""The per-event, per-link copy planner: every copy rule of a link applied to master events."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.calendar import trading_day
from engine.replicator.rules import CompiledLink, CopyPlan, MarketView, plan_copy, plan_event
from engine.replicator.state import LinkState
from schemas.account import AccountState, SymbolSpec, TradeMode
from schemas.common import OrderType, Side, Trace
from schemas.control import EmergencyStop, StopScope, stop_key
from schemas.decisions import DecisionOutcome, DecisionRule
from schemas.links import (
    BalanceRatio,
    BelowMin,
    CopyLink,
    Direction,
    FixedLot,
    Multiplier,
    RiskAmount,
    RiskPercent,
    SymbolMapping,
    TradingHours,
)
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
    DeviationPolicy,
    FollowerClose,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)

MASTER = "master-1"
FOLLOWER = "follower-1"
LINK = "link-1"


def utc_ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


NOW = utc_ns("2026-01-15T11:00")  # Thursday, 12:00 in Berlin
TODAY = trading_day(NOW)
EVENT_TS = NOW - 5_000_000  # 5 ms old
TRACE = Trace(terminal_ns=EVENT_TS, replicator_in_ns=NOW)


# --- builders -------------------------------------------------------------------------------


def make_link(**kwargs: object) -> CopyLink:
    fields: dict[str, object] = {"link_id": LINK, "master": MASTER, "follower": FOLLOWER}
    fields.update(kwargs)
    return CopyLink(**fields)  # type: ignore[arg-type]


def account(
    account_id: str,
    *,
    equity: float = 10_000.0,
    balance: float = 10_000.0,
    currency: str = "USD",
    open_positions: int = 0,
) -> AccountState:
    return AccountState(
        account=account_id,
        ts_ns=NOW,
        currency=currency,
        balance=balance,
        equity=equity,
        free_margin=equity,
        open_positions=open_positions,
    )


def symbol_spec(
    symbol: str = "XAUUSD",
    *,
    account_id: str = FOLLOWER,
    trade_mode: TradeMode = TradeMode.FULL,
    volume_min: float = 0.01,
    volume_max: float = 100.0,
    volume_step: float = 0.01,
) -> SymbolSpec:
    return SymbolSpec(
        account=account_id,
        symbol=symbol,
        contract_size=100.0,
        tick_size=0.01,
        tick_value=1.0,
        digits=2,
        volume_min=volume_min,
        volume_max=volume_max,
        volume_step=volume_step,
        trade_mode=trade_mode,
    )


def make_view(
    *,
    follower: AccountState | None = None,
    with_follower: bool = True,
    specs: list[SymbolSpec] | None = None,
    stops: list[EmergencyStop] | None = None,
    link_states: dict[str, LinkState] | None = None,
    fx_rates: dict[str, float] | None = None,
) -> MarketView:
    accounts = {MASTER: account(MASTER, equity=20_000.0, balance=20_000.0)}
    if with_follower:
        accounts[FOLLOWER] = follower or account(FOLLOWER)
    all_specs = specs if specs is not None else [symbol_spec("XAUUSD"), symbol_spec("EURUSD")]
    return MarketView(
        accounts=accounts,
        symbols={(s.account, s.symbol): s for s in all_specs},
        fx_rates=fx_rates or {},
        stops={s.key: s for s in stops or []},
        link_states=link_states or {},
    )


def opened(**kwargs: object) -> PositionOpened:
    fields: dict[str, object] = {
        "event_id": "ev-open-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "position_id": "p1",
        "side": Side.BUY,
        "volume": 0.5,
        "price": 1900.0,
        "sl": 1890.0,
        "tp": 1920.0,
        "magic": 7,
    }
    fields.update(kwargs)
    return PositionOpened(**fields)  # type: ignore[arg-type]


def modified(**kwargs: object) -> PositionModified:
    fields: dict[str, object] = {
        "event_id": "ev-mod-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "position_id": "p1",
        "side": Side.BUY,
        "sl": 1895.0,
        "tp": 1930.0,
        "magic": 7,
    }
    fields.update(kwargs)
    return PositionModified(**fields)  # type: ignore[arg-type]


def reduced(**kwargs: object) -> PositionReduced:
    fields: dict[str, object] = {
        "event_id": "ev-red-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "position_id": "p1",
        "side": Side.BUY,
        "volume_before": 1.0,
        "volume_after": 0.4,
        "price": 1910.0,
        "magic": 7,
    }
    fields.update(kwargs)
    return PositionReduced(**fields)  # type: ignore[arg-type]


def closed(**kwargs: object) -> PositionClosed:
    fields: dict[str, object] = {
        "event_id": "ev-close-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "position_id": "p1",
        "side": Side.BUY,
        "volume": 0.5,
        "price": 1915.0,
        "magic": 7,
    }
    fields.update(kwargs)
    return PositionClosed(**fields)  # type: ignore[arg-type]


def closed_by(**kwargs: object) -> PositionClosedBy:
    fields: dict[str, object] = {
        "event_id": "ev-closeby-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "position_id": "p1",
        "opposite_position_id": "p2",
        "side": Side.BUY,
        "volume": 0.5,
        "magic": 7,
    }
    fields.update(kwargs)
    return PositionClosedBy(**fields)  # type: ignore[arg-type]


def pending_placed(**kwargs: object) -> PendingOrderPlaced:
    fields: dict[str, object] = {
        "event_id": "ev-pp-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "order_id": "o1",
        "order_type": OrderType.BUY_LIMIT,
        "volume": 0.5,
        "price": 1880.0,
        "sl": 1870.0,
        "tp": 1900.0,
        "expiration_ns": NOW + 3_600_000_000_000,
        "magic": 7,
    }
    fields.update(kwargs)
    return PendingOrderPlaced(**fields)  # type: ignore[arg-type]


def pending_modified(**kwargs: object) -> PendingOrderModified:
    fields: dict[str, object] = {
        "event_id": "ev-pm-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "order_id": "o1",
        "order_type": OrderType.BUY_LIMIT,
        "price": 1885.0,
        "sl": 1875.0,
        "tp": 1905.0,
        "magic": 7,
    }
    fields.update(kwargs)
    return PendingOrderModified(**fields)  # type: ignore[arg-type]


def pending_cancelled(**kwargs: object) -> PendingOrderCancelled:
    fields: dict[str, object] = {
        "event_id": "ev-pc-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "order_id": "o1",
        "order_type": OrderType.BUY_LIMIT,
        "magic": 7,
    }
    fields.update(kwargs)
    return PendingOrderCancelled(**fields)  # type: ignore[arg-type]


def triggered(**kwargs: object) -> PendingOrderTriggered:
    fields: dict[str, object] = {
        "event_id": "ev-pt-1",
        "master": MASTER,
        "symbol": "XAUUSD",
        "ts_ns": EVENT_TS,
        "order_id": "o1",
        "order_type": OrderType.BUY_LIMIT,
        "position_id": "p9",
        "side": Side.BUY,
        "volume": 0.5,
        "price": 1880.0,
        "sl": 1870.0,
        "tp": 1900.0,
        "magic": 7,
    }
    fields.update(kwargs)
    return PendingOrderTriggered(**fields)  # type: ignore[arg-type]


FOLLOW_UPS = {
    "modified": modified,
    "reduced": reduced,
    "closed": closed,
    "closed_by": closed_by,
    "pending_modified": pending_modified,
    "pending_cancelled": pending_cancelled,
}
NEW_COPIES = {"opened": opened, "pending_placed": pending_placed, "triggered": triggered}


def plan(
    event: MasterEvent,
    link: CopyLink | None = None,
    view: MarketView | None = None,
    now_ns: int = NOW,
) -> CopyPlan:
    return plan_copy(event, CompiledLink(link or make_link()), view or make_view(), now_ns, TRACE)


def only_skip(p: CopyPlan) -> DecisionRule:
    """The rule of a plan that skipped the copy with exactly one decision."""
    assert p.order is None
    assert len(p.decisions) == 1
    decision = p.decisions[0]
    assert decision.outcome is DecisionOutcome.SKIPPED
    return decision.rule


def assert_nothing(p: CopyPlan) -> None:
    assert p.order is None
    assert p.decisions == []


# --- a plain copy ---------------------------------------------------------------------------


def test_position_opened_becomes_follower_open() -> None:
    event = opened()
    p = plan(event, make_link(magic=4242, max_price_deviation=0.5, deviation_wait_ms=200))
    order = p.order
    assert isinstance(order, FollowerOpen)
    assert p.decisions == []
    assert p.daily_key == "p1"
    assert order.order_id == f"{event.event_id}:{LINK}"
    assert order.link_id == LINK
    assert order.follower == FOLLOWER
    assert order.master == MASTER
    assert order.master_event_id == event.event_id
    assert order.master_position_id == "p1"
    assert order.symbol == "XAUUSD"
    assert order.side is Side.BUY
    assert order.volume == 0.5
    assert (order.sl, order.tp) == (1890.0, 1920.0)
    assert order.magic == 4242
    assert order.master_price == 1900.0
    assert order.master_volume == 0.5
    assert order.master_order_id is None
    assert order.max_price_deviation == 0.5
    assert order.deviation_policy is DeviationPolicy.SKIP
    assert order.deviation_wait_ms == 200
    assert order.expires_ns == 0
    assert order.ts_ns == NOW
    assert order.trace == TRACE
    assert "p1" in order.comment
    assert len(order.comment) <= 31


def test_same_inputs_give_same_order_and_id() -> None:
    first = plan(opened())
    second = plan(opened())
    assert first.order is not None
    assert first.order == second.order
    assert first.order.order_id == "ev-open-1:link-1"


def test_redelivery_later_keeps_the_order_id() -> None:
    first = plan(opened())
    later = plan(opened(), now_ns=NOW + 1_000_000)
    assert first.order is not None and later.order is not None
    assert later.order.order_id == first.order.order_id


def test_different_events_get_different_order_ids() -> None:
    a = plan(opened(event_id="e-a"))
    b = plan(opened(event_id="e-b"))
    assert a.order is not None and b.order is not None
    assert a.order.order_id != b.order.order_id


def test_skip_decision_is_deterministic_and_describes_the_link() -> None:
    p = plan(opened(symbol="EURUSD"), make_link(symbols_include=["XAUUSD"]))
    decision = p.decisions[0]
    assert decision.decision_id == f"ev-open-1:{LINK}:symbol_not_included"
    assert decision.link_id == LINK
    assert decision.master == MASTER
    assert decision.follower == FOLLOWER
    assert decision.master_event_id == "ev-open-1"
    assert decision.ts_ns == NOW
    assert decision.message
    assert (
        p.decisions
        == plan(opened(symbol="EURUSD"), make_link(symbols_include=["XAUUSD"])).decisions
    )


# --- symbol filters and mapping ------------------------------------------------------------


def test_include_list_is_case_insensitive() -> None:
    link = make_link(symbols_include=["xauusd"])
    assert isinstance(plan(opened(symbol="XAUUSD"), link).order, FollowerOpen)
    assert only_skip(plan(opened(symbol="EURUSD"), link)) is DecisionRule.SYMBOL_NOT_INCLUDED


def test_exclude_list_is_case_insensitive() -> None:
    link = make_link(symbols_exclude=["eurUSD"])
    assert only_skip(plan(opened(symbol="EURUSD"), link)) is DecisionRule.SYMBOL_EXCLUDED
    assert isinstance(plan(opened(symbol="XAUUSD"), link).order, FollowerOpen)


def test_master_symbol_in_lower_case_is_matched_by_upper_case_lists() -> None:
    view = make_view(specs=[symbol_spec("eurusd")])
    link = make_link(symbols_exclude=["EURUSD"])
    assert only_skip(plan(opened(symbol="eurusd"), link, view)) is DecisionRule.SYMBOL_EXCLUDED


@pytest.mark.parametrize("name", sorted(FOLLOW_UPS))
def test_follow_ups_of_filtered_symbols_are_silent(name: str) -> None:
    link = make_link(symbols_exclude=["XAUUSD"])
    assert_nothing(plan(FOLLOW_UPS[name](), link))


def test_symbol_mapping_is_applied_to_the_order() -> None:
    link = make_link(symbol_mapping=SymbolMapping(strip_suffix=".", add_suffix=".m"))
    view = make_view(specs=[symbol_spec("usdjpy.m")])
    p = plan(opened(symbol="usdjpy."), link, view)
    assert isinstance(p.order, FollowerOpen)
    assert p.order.symbol == "usdjpy.m"


def test_symbol_mapping_explicit_pair_and_spec_lookup_by_mapped_name() -> None:
    link = make_link(symbol_mapping=SymbolMapping(pairs={"GOLD": "XAUUSD.pro"}))
    view = make_view(specs=[symbol_spec("XAUUSD.pro")])
    p = plan(opened(symbol="GOLD"), link, view)
    assert isinstance(p.order, FollowerOpen)
    assert p.order.symbol == "XAUUSD.pro"
    # Without a spec for the *mapped* name there is no copy.
    assert only_skip(plan(opened(symbol="GOLD"), link, make_view())) is DecisionRule.NO_SYMBOL_SPEC


def test_symbol_mapping_is_applied_to_closes() -> None:
    link = make_link(symbol_mapping=SymbolMapping(add_suffix="-ECN"))
    p = plan(closed(), link)
    assert isinstance(p.order, FollowerClose)
    assert p.order.symbol == "XAUUSD-ECN"


def test_symbol_filters_use_master_symbol_not_mapped_symbol() -> None:
    link = make_link(
        symbols_include=["GOLD"], symbol_mapping=SymbolMapping(pairs={"GOLD": "XAUUSD"})
    )
    assert isinstance(plan(opened(symbol="GOLD"), link).order, FollowerOpen)


# --- direction and magic --------------------------------------------------------------------


def test_buy_only_link_skips_sells() -> None:
    link = make_link(direction=Direction.BUY_ONLY)
    assert isinstance(plan(opened(side=Side.BUY), link).order, FollowerOpen)
    assert only_skip(plan(opened(side=Side.SELL), link)) is DecisionRule.DIRECTION


def test_sell_only_link_skips_buys() -> None:
    link = make_link(direction=Direction.SELL_ONLY)
    assert isinstance(plan(opened(side=Side.SELL), link).order, FollowerOpen)
    assert only_skip(plan(opened(side=Side.BUY), link)) is DecisionRule.DIRECTION


def test_direction_applies_to_pending_order_side() -> None:
    link = make_link(direction=Direction.BUY_ONLY)
    assert isinstance(
        plan(pending_placed(order_type=OrderType.BUY_STOP), link).order, FollowerPendingPlace
    )
    assert (
        only_skip(plan(pending_placed(order_type=OrderType.SELL_LIMIT), link))
        is DecisionRule.DIRECTION
    )


def test_direction_filtered_close_is_silent() -> None:
    assert_nothing(plan(closed(side=Side.SELL), make_link(direction=Direction.BUY_ONLY)))


def test_magic_include() -> None:
    link = make_link(magic_include=[7, 8])
    assert isinstance(plan(opened(magic=8), link).order, FollowerOpen)
    assert only_skip(plan(opened(magic=9), link)) is DecisionRule.MAGIC


def test_magic_exclude() -> None:
    link = make_link(magic_exclude=[7])
    assert only_skip(plan(opened(magic=7), link)) is DecisionRule.MAGIC
    assert isinstance(plan(opened(magic=0), link).order, FollowerOpen)
    assert_nothing(plan(closed(magic=7), link))


# --- pending orders -------------------------------------------------------------------------


def test_pending_order_placed_becomes_pending_place() -> None:
    event = pending_placed()
    p = plan(event, make_link(magic=11))
    order = p.order
    assert isinstance(order, FollowerPendingPlace)
    assert order.order_id == f"{event.event_id}:{LINK}"
    assert order.master_order_id == "o1"
    assert order.order_type is OrderType.BUY_LIMIT
    assert order.price == 1880.0
    assert (order.sl, order.tp) == (1870.0, 1900.0)
    assert order.volume == 0.5
    assert order.master_volume == 0.5
    assert order.expiration_ns == event.expiration_ns
    assert order.magic == 11
    assert p.daily_key == "o1"


def test_pending_modified_and_cancelled_are_copied() -> None:
    modify = plan(pending_modified()).order
    assert isinstance(modify, FollowerPendingModify)
    assert modify.master_order_id == "o1"
    assert modify.price == 1885.0
    assert (modify.sl, modify.tp) == (1875.0, 1905.0)
    cancel = plan(pending_cancelled()).order
    assert isinstance(cancel, FollowerPendingCancel)
    assert cancel.master_order_id == "o1"
    assert cancel.order_id == f"ev-pc-1:{LINK}"


def test_copy_pending_off_skips_placement_and_ignores_changes() -> None:
    link = make_link(copy_pending=False)
    assert only_skip(plan(pending_placed(), link)) is DecisionRule.PENDING_NOT_COPIED
    assert_nothing(plan(pending_modified(), link))
    assert_nothing(plan(pending_cancelled(), link))


def test_copy_pending_off_still_copies_triggered_position() -> None:
    p = plan(triggered(), make_link(copy_pending=False))
    assert isinstance(p.order, FollowerOpen)


def test_pending_order_triggered_becomes_open_with_master_order_id() -> None:
    event = triggered()
    p = plan(event)
    order = p.order
    assert isinstance(order, FollowerOpen)
    assert order.master_order_id == "o1"
    assert order.master_position_id == "p9"
    assert order.side is Side.BUY
    assert order.order_id == f"{event.event_id}:{LINK}"
    # Counted under the pending order's id, like its placement.
    assert p.daily_key == "o1"


# --- timing rules ---------------------------------------------------------------------------


def test_outside_trading_hours_skips() -> None:
    # NOW is 12:00 in Berlin.
    link = make_link(trading_hours=TradingHours(start="08:00", end="10:00"))
    assert only_skip(plan(opened(), link)) is DecisionRule.TRADING_HOURS
    inside = make_link(trading_hours=TradingHours(start="11:00", end="13:00"))
    assert isinstance(plan(opened(), inside).order, FollowerOpen)


def test_trading_hours_never_hold_back_closes() -> None:
    link = make_link(trading_hours=TradingHours(start="08:00", end="10:00"))
    assert isinstance(plan(closed(), link).order, FollowerClose)
    assert isinstance(plan(modified(), link).order, FollowerModify)


def test_signal_older_than_max_age_is_skipped() -> None:
    link = make_link(max_signal_age_ms=500)
    p = plan(opened(ts_ns=NOW - 600_000_000), link)
    assert only_skip(p) is DecisionRule.SIGNAL_AGE
    assert p.decisions[0].numbers["max_signal_age_ms"] == 500


def test_fresh_signal_carries_expiry_from_max_age() -> None:
    link = make_link(max_signal_age_ms=500)
    event = opened(ts_ns=NOW - 400_000_000)
    order = plan(event, link).order
    assert isinstance(order, FollowerOpen)
    assert order.expires_ns == event.ts_ns + 500 * 1_000_000


def test_old_close_is_still_copied() -> None:
    link = make_link(max_signal_age_ms=500)
    assert isinstance(plan(closed(ts_ns=NOW - 60_000_000_000), link).order, FollowerClose)


# --- limits ---------------------------------------------------------------------------------


def test_max_open_positions_skips_at_limit() -> None:
    link = make_link(max_open_positions=3)
    full = make_view(follower=account(FOLLOWER, open_positions=3))
    assert only_skip(plan(opened(), link, full)) is DecisionRule.MAX_OPEN_POSITIONS
    room = make_view(follower=account(FOLLOWER, open_positions=2))
    assert isinstance(plan(opened(), link, room).order, FollowerOpen)


def test_max_open_positions_does_not_limit_pending_placement() -> None:
    link = make_link(max_open_positions=1)
    full = make_view(follower=account(FOLLOWER, open_positions=5))
    assert isinstance(plan(pending_placed(), link, full).order, FollowerPendingPlace)


def test_daily_trade_limit_reached_skips_new_copy() -> None:
    link = make_link(daily_trade_limit=2)
    view = make_view(link_states={LINK: LinkState(day=TODAY, opened=["p1", "p2"])})
    p = plan(opened(position_id="p3", event_id="ev-3"), link, view)
    assert only_skip(p) is DecisionRule.DAILY_TRADE_LIMIT
    assert p.decisions[0].numbers["day"] == TODAY


def test_daily_trade_limit_allows_redelivery_of_counted_trade() -> None:
    link = make_link(daily_trade_limit=2)
    view = make_view(link_states={LINK: LinkState(day=TODAY, opened=["p1", "p2"])})
    p = plan(opened(position_id="p1"), link, view)
    assert isinstance(p.order, FollowerOpen)
    assert p.daily_key == "p1"


def test_daily_trade_limit_counts_triggered_pending_once() -> None:
    link = make_link(daily_trade_limit=1)
    view = make_view(link_states={LINK: LinkState(day=TODAY, opened=["o1"])})
    assert isinstance(plan(triggered(order_id="o1"), link, view).order, FollowerOpen)
    assert only_skip(plan(triggered(order_id="o2"), link, view)) is DecisionRule.DAILY_TRADE_LIMIT


def test_daily_trade_limit_counts_only_today() -> None:
    link = make_link(daily_trade_limit=1)
    view = make_view(link_states={LINK: LinkState(day="2026-01-14", opened=["p1", "p2"])})
    assert isinstance(plan(opened(position_id="p3"), link, view).order, FollowerOpen)


def test_daily_trade_limit_uses_berlin_day_of_now() -> None:
    # 23:30 UTC is already the next day in Berlin: yesterday's count no longer applies.
    late = utc_ns("2026-01-15T23:30")
    link = make_link(daily_trade_limit=1)
    view = make_view(link_states={LINK: LinkState(day=TODAY, opened=["p1"])})
    event = opened(position_id="p2", ts_ns=late - 1_000_000)
    assert only_skip(plan(event, link, view, now_ns=late - 3_600_000_000_000)) is (
        DecisionRule.DAILY_TRADE_LIMIT
    )
    assert isinstance(plan(event, link, view, now_ns=late).order, FollowerOpen)


def test_daily_trade_limit_does_not_block_closes() -> None:
    link = make_link(daily_trade_limit=1)
    view = make_view(link_states={LINK: LinkState(day=TODAY, opened=["p1", "p2"])})
    assert isinstance(plan(closed(), link, view).order, FollowerClose)


# --- disabled, emergency stops, pauses, protection ------------------------------------------


def test_disabled_link_skips_opens_but_copies_closes_and_changes() -> None:
    link = make_link(enabled=False)
    assert only_skip(plan(opened(), link)) is DecisionRule.LINK_DISABLED
    assert only_skip(plan(pending_placed(), link)) is DecisionRule.LINK_DISABLED
    assert isinstance(plan(closed(), link).order, FollowerClose)
    assert isinstance(plan(reduced(), link).order, FollowerClose)
    assert isinstance(plan(modified(), link).order, FollowerModify)
    assert isinstance(plan(pending_cancelled(), link).order, FollowerPendingCancel)


@pytest.mark.parametrize(
    "stop",
    [
        EmergencyStop(scope=StopScope.GLOBAL, reason="market halt"),
        EmergencyStop(scope=StopScope.ACCOUNT, target=FOLLOWER),
        EmergencyStop(scope=StopScope.LINK, target=LINK),
    ],
    ids=["global", "account", "link"],
)
def test_emergency_stop_blocks_opens_and_closes(stop: EmergencyStop) -> None:
    assert stop.key in {stop_key(StopScope.GLOBAL), f"account.{FOLLOWER}", f"link.{LINK}"}
    view = make_view(stops=[stop])
    for event in (
        opened(),
        pending_placed(),
        triggered(),
        closed(),
        reduced(),
        modified(),
        closed_by(),
        pending_modified(),
        pending_cancelled(),
    ):
        p = plan(event, view=view)
        assert only_skip(p) is DecisionRule.EMERGENCY_STOP, type(event).__name__
        assert p.decisions[0].numbers["scope"] == stop.scope.value


def test_inactive_or_unrelated_emergency_stops_do_not_block() -> None:
    view = make_view(
        stops=[
            EmergencyStop(scope=StopScope.GLOBAL, active=False),
            EmergencyStop(scope=StopScope.ACCOUNT, target="someone-else"),
            EmergencyStop(scope=StopScope.LINK, target="other-link"),
        ]
    )
    assert isinstance(plan(opened(), view=view).order, FollowerOpen)
    assert isinstance(plan(closed(), view=view).order, FollowerClose)


def test_paused_link_skips_opens_but_copies_closes() -> None:
    link = make_link(max_drawdown_percent=50.0)
    state = LinkState(day=TODAY, paused=True, paused_rule="max_drawdown", paused_ns=NOW - 1)
    view = make_view(link_states={LINK: state})
    p = plan(opened(), link, view)
    assert only_skip(p) is DecisionRule.LINK_PAUSED
    assert p.decisions[0].numbers["paused_rule"] == "max_drawdown"
    assert isinstance(plan(closed(), link, view).order, FollowerClose)
    assert isinstance(plan(modified(), link, view).order, FollowerModify)


def test_paused_by_daily_loss_yesterday_no_longer_skips() -> None:
    link = make_link(daily_loss_percent=5.0)
    state = LinkState(
        day="2026-01-14", paused=True, paused_rule="daily_loss", paused_day="2026-01-14"
    )
    view = make_view(link_states={LINK: state})
    assert isinstance(plan(opened(), link, view).order, FollowerOpen)


def test_equity_stop_breach_at_open_time_skips() -> None:
    link = make_link(equity_stop=5_000.0)
    view = make_view(follower=account(FOLLOWER, equity=4_000.0))
    assert only_skip(plan(opened(), link, view)) is DecisionRule.EQUITY_STOP
    assert isinstance(plan(closed(), link, view).order, FollowerClose)


def test_drawdown_breach_at_open_time_skips() -> None:
    link = make_link(max_drawdown_percent=10.0)
    view = make_view(
        follower=account(FOLLOWER, equity=8_000.0),
        link_states={LINK: LinkState(day=TODAY, peak_equity=10_000.0)},
    )
    assert only_skip(plan(opened(), link, view)) is DecisionRule.MAX_DRAWDOWN


def test_daily_loss_breach_at_open_time_skips() -> None:
    link = make_link(daily_loss_percent=5.0)
    view = make_view(
        follower=account(FOLLOWER, equity=9_000.0),
        link_states={LINK: LinkState(day=TODAY, day_start_equity=10_000.0)},
    )
    assert only_skip(plan(opened(), link, view)) is DecisionRule.DAILY_LOSS


def test_no_follower_account_state_skips() -> None:
    p = plan(opened(), view=make_view(with_follower=False))
    assert only_skip(p) is DecisionRule.NO_ACCOUNT_STATE
    assert p.decisions[0].numbers["account"] == FOLLOWER


def test_no_symbol_spec_skips() -> None:
    p = plan(opened(symbol="BTCUSD"))
    assert only_skip(p) is DecisionRule.NO_SYMBOL_SPEC
    assert p.decisions[0].numbers["symbol"] == "BTCUSD"


def test_spec_of_another_account_does_not_count() -> None:
    view = make_view(specs=[symbol_spec("XAUUSD", account_id=MASTER)])
    assert only_skip(plan(opened(), view=view)) is DecisionRule.NO_SYMBOL_SPEC


# --- trade modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [TradeMode.CLOSE_ONLY, TradeMode.DISABLED])
def test_close_only_or_disabled_symbol_skips_opens_not_closes(mode: TradeMode) -> None:
    view = make_view(specs=[symbol_spec(trade_mode=mode)])
    assert only_skip(plan(opened(), view=view)) is DecisionRule.TRADE_MODE
    assert only_skip(plan(pending_placed(), view=view)) is DecisionRule.TRADE_MODE
    assert isinstance(plan(closed(), view=view).order, FollowerClose)


def test_long_only_symbol_skips_sells() -> None:
    view = make_view(specs=[symbol_spec(trade_mode=TradeMode.LONG_ONLY)])
    assert isinstance(plan(opened(side=Side.BUY), view=view).order, FollowerOpen)
    assert only_skip(plan(opened(side=Side.SELL), view=view)) is DecisionRule.TRADE_MODE


def test_short_only_symbol_skips_buys() -> None:
    view = make_view(specs=[symbol_spec(trade_mode=TradeMode.SHORT_ONLY)])
    assert isinstance(plan(opened(side=Side.SELL), view=view).order, FollowerOpen)
    assert only_skip(plan(opened(side=Side.BUY), view=view)) is DecisionRule.TRADE_MODE


def test_trade_mode_checks_follower_side_on_reverse_copy() -> None:
    view = make_view(specs=[symbol_spec(trade_mode=TradeMode.LONG_ONLY)])
    link = make_link(reverse=True)
    order = plan(opened(side=Side.SELL), link, view).order
    assert isinstance(order, FollowerOpen)
    assert order.side is Side.BUY
    assert only_skip(plan(opened(side=Side.BUY), link, view)) is DecisionRule.TRADE_MODE


# --- reverse copy ---------------------------------------------------------------------------


def test_reverse_copy_flips_side_and_swaps_sl_tp() -> None:
    order = plan(opened(side=Side.BUY, sl=1890.0, tp=1920.0), make_link(reverse=True)).order
    assert isinstance(order, FollowerOpen)
    assert order.side is Side.SELL
    assert (order.sl, order.tp) == (1920.0, 1890.0)


@pytest.mark.parametrize(
    ("master_type", "follower_type"),
    [
        (OrderType.BUY_LIMIT, OrderType.SELL_STOP),
        (OrderType.SELL_STOP, OrderType.BUY_LIMIT),
        (OrderType.SELL_LIMIT, OrderType.BUY_STOP),
        (OrderType.BUY_STOP, OrderType.SELL_LIMIT),
    ],
)
def test_reverse_copy_reverses_pending_order_type(
    master_type: OrderType, follower_type: OrderType
) -> None:
    p = plan(pending_placed(order_type=master_type, sl=1.0, tp=2.0), make_link(reverse=True))
    order = p.order
    assert isinstance(order, FollowerPendingPlace)
    assert order.order_type is follower_type
    assert order.order_type.side is master_type.side.flipped()
    assert order.price == 1880.0
    assert (order.sl, order.tp) == (2.0, 1.0)


def test_reverse_copy_swaps_modified_levels() -> None:
    order = plan(modified(sl=1.0, tp=2.0), make_link(reverse=True)).order
    assert isinstance(order, FollowerModify)
    assert (order.sl, order.tp) == (2.0, 1.0)
    pending = plan(pending_modified(sl=3.0, tp=4.0), make_link(reverse=True)).order
    assert isinstance(pending, FollowerPendingModify)
    assert (pending.sl, pending.tp) == (4.0, 3.0)


def test_risk_sizing_uses_master_sl_distance() -> None:
    # 1 % of 10,000 = 100; SL 10.00 away on XAUUSD (0.01 tick = 1.0) -> 1,000 per lot -> 0.1.
    order = plan(opened(sl=1890.0, tp=1920.0), make_link(sizing=RiskPercent(percent=1.0))).order
    assert isinstance(order, FollowerOpen)
    assert order.volume == pytest.approx(0.1)


def test_risk_sizing_on_reverse_copy_uses_master_tp_distance() -> None:
    # The follower's stop is the master's TP, 20.00 away -> 2,000 per lot -> 0.05.
    link = make_link(sizing=RiskPercent(percent=1.0), reverse=True)
    order = plan(opened(sl=1890.0, tp=1920.0), link).order
    assert isinstance(order, FollowerOpen)
    assert order.volume == pytest.approx(0.05)


def test_risk_sizing_on_reverse_copy_without_master_tp_skips() -> None:
    link = make_link(sizing=RiskPercent(percent=1.0), reverse=True)
    assert only_skip(plan(opened(sl=1890.0, tp=None), link)) is DecisionRule.NO_STOP_LOSS


def test_risk_sizing_without_master_sl_skips() -> None:
    link = make_link(sizing=RiskAmount(amount=50.0))
    assert only_skip(plan(opened(sl=None), link)) is DecisionRule.NO_STOP_LOSS


def test_risk_sizing_for_pending_measures_from_pending_price() -> None:
    # Buy limit at 1880 with SL 1870: 10.00 away -> 0.1 lots at 1 % of 10,000.
    link = make_link(sizing=RiskPercent(percent=1.0))
    order = plan(pending_placed(price=1880.0, sl=1870.0), link).order
    assert isinstance(order, FollowerPendingPlace)
    assert order.volume == pytest.approx(0.1)


# --- SL/TP copying ----------------------------------------------------------------------------


def test_copy_sl_tp_off_drops_levels_and_skips_modifications() -> None:
    link = make_link(copy_sl_tp=False)
    order = plan(opened(), link).order
    assert isinstance(order, FollowerOpen)
    assert (order.sl, order.tp) == (None, None)
    pending = plan(pending_placed(), link).order
    assert isinstance(pending, FollowerPendingPlace)
    assert (pending.sl, pending.tp) == (None, None)
    assert only_skip(plan(modified(), link)) is DecisionRule.SL_TP_MODIFICATIONS_OFF
    pending_change = plan(pending_modified(), link).order
    assert isinstance(pending_change, FollowerPendingModify)
    assert (pending_change.sl, pending_change.tp) == (None, None)
    assert pending_change.price == 1885.0


def test_copy_sl_tp_off_still_sizes_risk_from_master_sl() -> None:
    link = make_link(copy_sl_tp=False, sizing=RiskPercent(percent=1.0))
    order = plan(opened(sl=1890.0), link).order
    assert isinstance(order, FollowerOpen)
    assert order.volume == pytest.approx(0.1)
    assert order.sl is None


def test_copy_sl_tp_modifications_off_keeps_initial_levels() -> None:
    link = make_link(copy_sl_tp_modifications=False)
    order = plan(opened(), link).order
    assert isinstance(order, FollowerOpen)
    assert (order.sl, order.tp) == (1890.0, 1920.0)
    assert only_skip(plan(modified(), link)) is DecisionRule.SL_TP_MODIFICATIONS_OFF


def test_position_modified_becomes_follower_modify() -> None:
    event = modified(sl=None, tp=1950.0)
    order = plan(event).order
    assert isinstance(order, FollowerModify)
    assert order.master_position_id == "p1"
    assert (order.sl, order.tp) == (None, 1950.0)
    assert order.order_id == f"{event.event_id}:{LINK}"


# --- closes ---------------------------------------------------------------------------------


def test_position_reduced_closes_same_ratio_and_carries_new_ticket() -> None:
    event = reduced(volume_before=1.0, volume_after=0.4, new_position_id="p1-renewed")
    order = plan(event).order
    assert isinstance(order, FollowerClose)
    assert order.ratio == pytest.approx(0.6)
    assert order.master_position_id == "p1"
    assert order.new_master_position_id == "p1-renewed"
    assert order.master_price == 1910.0
    assert order.order_id == f"{event.event_id}:{LINK}"


def test_position_reduced_without_new_ticket() -> None:
    order = plan(reduced(volume_before=2.0, volume_after=1.5)).order
    assert isinstance(order, FollowerClose)
    assert order.ratio == pytest.approx(0.25)
    assert order.new_master_position_id is None


def test_partial_closes_off_skips_reduction_but_not_full_close() -> None:
    link = make_link(copy_partial_closes=False)
    assert only_skip(plan(reduced(), link)) is DecisionRule.PARTIAL_CLOSES_OFF
    assert isinstance(plan(closed(), link).order, FollowerClose)


def test_position_closed_closes_everything() -> None:
    order = plan(closed()).order
    assert isinstance(order, FollowerClose)
    assert order.ratio == 1.0
    assert order.master_position_id == "p1"
    assert order.master_price == 1915.0
    assert order.new_master_position_id is None


def test_position_closed_by_carries_both_ids() -> None:
    event = closed_by()
    order = plan(event).order
    assert isinstance(order, FollowerCloseBy)
    assert order.master_position_id == "p1"
    assert order.master_opposite_position_id == "p2"
    assert order.order_id == f"{event.event_id}:{LINK}"


@pytest.mark.parametrize("name", sorted(FOLLOW_UPS))
def test_follow_ups_never_count_toward_the_daily_limit(name: str) -> None:
    p = plan(FOLLOW_UPS[name]())
    assert p.order is not None
    assert p.daily_key is None


# --- sizing inside the plan -------------------------------------------------------------------


def test_max_lot_reduction_gives_order_and_reduced_decision() -> None:
    event = opened(volume=3.0)
    p = plan(event, make_link(max_lot=1.0))
    assert isinstance(p.order, FollowerOpen)
    assert p.order.volume == 1.0
    assert p.order.master_volume == 3.0
    assert len(p.decisions) == 1
    decision = p.decisions[0]
    assert decision.rule is DecisionRule.MAX_LOT
    assert decision.outcome is DecisionOutcome.REDUCED
    assert decision.decision_id == f"{event.event_id}:{LINK}:max_lot"


def test_symbol_max_reduction_gives_order_and_reduced_decision() -> None:
    view = make_view(specs=[symbol_spec(volume_max=2.0)])
    p = plan(opened(volume=5.0), view=view)
    assert isinstance(p.order, FollowerOpen)
    assert p.order.volume == 2.0
    assert [d.rule for d in p.decisions] == [DecisionRule.MAX_VOLUME]


def test_forced_min_volume_gives_order_and_decision() -> None:
    link = make_link(sizing=Multiplier(factor=0.01), below_min=BelowMin.FORCE_MIN)
    p = plan(opened(volume=0.5), link)
    assert isinstance(p.order, FollowerOpen)
    assert p.order.volume == 0.01
    assert [d.rule for d in p.decisions] == [DecisionRule.FORCED_MIN_VOLUME]


def test_below_min_volume_skips_without_daily_key() -> None:
    p = plan(opened(volume=0.5), make_link(sizing=Multiplier(factor=0.01)))
    assert only_skip(p) is DecisionRule.BELOW_MIN_VOLUME
    assert p.daily_key is None


def test_balance_ratio_uses_both_account_states_and_fx() -> None:
    # Follower 10,000 EUR at EURUSD 1.2 = 12,000 USD; master 20,000 USD -> 0.6 of 0.5 = 0.3.
    view = make_view(
        follower=account(FOLLOWER, balance=10_000.0, currency="EUR"),
        fx_rates={"EURUSD": 1.2},
    )
    order = plan(opened(volume=0.5), make_link(sizing=BalanceRatio()), view).order
    assert isinstance(order, FollowerOpen)
    assert order.volume == pytest.approx(0.3)


def test_balance_ratio_without_fx_rate_skips() -> None:
    view = make_view(follower=account(FOLLOWER, currency="EUR"))
    assert only_skip(plan(opened(), make_link(sizing=BalanceRatio()), view)) is (
        DecisionRule.NO_FX_RATE
    )


# --- several masters into one follower ------------------------------------------------------


def test_several_masters_into_one_follower_are_independent() -> None:
    link_a = make_link(link_id="link-a", master="master-a", sizing=FixedLot(lots=0.1))
    link_b = make_link(link_id="link-b", master="master-b", sizing=FixedLot(lots=0.2))
    view = make_view()
    # Both masters happen to use the same event id and position id.
    event_a = opened(master="master-a", event_id="e1", position_id="1")
    event_b = opened(master="master-b", event_id="e1", position_id="1", side=Side.SELL)
    order_a = plan(event_a, link_a, view).order
    order_b = plan(event_b, link_b, view).order
    assert isinstance(order_a, FollowerOpen) and isinstance(order_b, FollowerOpen)
    assert order_a.order_id != order_b.order_id
    assert order_a.follower == order_b.follower == FOLLOWER
    assert (order_a.master, order_b.master) == ("master-a", "master-b")
    assert (order_a.volume, order_b.volume) == (0.1, 0.2)
    assert (order_a.side, order_b.side) == (Side.BUY, Side.SELL)
    assert order_a.comment != order_b.comment


def test_link_state_of_one_link_does_not_affect_another() -> None:
    link_a = make_link(link_id="link-a", master="master-a", daily_trade_limit=1)
    link_b = make_link(link_id="link-b", master="master-b", daily_trade_limit=1)
    view = make_view(link_states={"link-a": LinkState(day=TODAY, opened=["x"])})
    assert only_skip(plan(opened(master="master-a"), link_a, view)) is (
        DecisionRule.DAILY_TRADE_LIMIT
    )
    assert isinstance(plan(opened(master="master-b"), link_b, view).order, FollowerOpen)


def test_plan_event_fans_out_and_leaves_out_silent_links() -> None:
    links = (
        CompiledLink(make_link(link_id="l1")),
        CompiledLink(make_link(link_id="l2", follower="follower-2")),
        CompiledLink(make_link(link_id="l3", symbols_exclude=["XAUUSD"])),
    )
    view = make_view(specs=[symbol_spec(), symbol_spec(account_id="follower-2")])
    view.accounts["follower-2"] = account("follower-2")
    plans = plan_event(closed(), links, view, NOW, TRACE)
    assert [cl.link_id for cl, _ in plans] == ["l1", "l2"]
    ids = {p.order.order_id for _, p in plans if p.order is not None}
    assert ids == {"ev-close-1:l1", "ev-close-1:l2"}


# --- property: reverse copy mirrors the straight copy ------------------------------------------

LEVEL = st.one_of(st.none(), st.floats(0.01, 5_000.0))


@st.composite
def new_or_changed_events(draw: st.DrawFn) -> MasterEvent:
    kind = draw(st.sampled_from(["opened", "triggered", "placed", "modified", "pending_modified"]))
    side = draw(st.sampled_from(list(Side)))
    order_type = draw(st.sampled_from(list(OrderType)))
    common = {
        "symbol": draw(st.sampled_from(["XAUUSD", "EURUSD"])),
        "sl": draw(LEVEL),
        "tp": draw(LEVEL),
        "magic": draw(st.integers(0, 3)),
    }
    price = draw(st.floats(0.01, 5_000.0))
    volume = draw(st.floats(0.01, 50.0))
    if kind == "opened":
        return opened(side=side, price=price, volume=volume, **common)
    if kind == "triggered":
        return triggered(
            side=order_type.side, order_type=order_type, price=price, volume=volume, **common
        )
    if kind == "placed":
        return pending_placed(order_type=order_type, price=price, volume=volume, **common)
    if kind == "modified":
        return modified(side=side, **common)
    return pending_modified(order_type=order_type, price=price, **common)


@st.composite
def link_options(draw: st.DrawFn) -> dict[str, object]:
    return {
        "sizing": draw(
            st.sampled_from(
                [
                    Multiplier(),
                    Multiplier(factor=2.0),
                    FixedLot(lots=0.3),
                    BalanceRatio(),
                    RiskPercent(percent=1.0),
                    RiskAmount(amount=100.0),
                ]
            )
        ),
        "copy_sl_tp": draw(st.booleans()),
        "copy_sl_tp_modifications": draw(st.booleans()),
        "max_lot": draw(st.one_of(st.none(), st.sampled_from([0.05, 1.0, 10.0]))),
        "below_min": draw(st.sampled_from(list(BelowMin))),
        "direction": draw(st.sampled_from(list(Direction))),
        "magic_exclude": draw(st.sampled_from([[], [3]])),
        "magic": draw(st.integers(0, 100)),
    }


@settings(max_examples=300, deadline=None)
@given(event=new_or_changed_events(), options=link_options())
def test_reverse_copy_mirrors_straight_copy(event: MasterEvent, options: dict[str, object]) -> None:
    view = make_view()
    straight = plan(event, make_link(**options), view)
    reverse = plan(event, make_link(reverse=True, **options), view)
    risk_sized = isinstance(options["sizing"], RiskPercent | RiskAmount)
    if not risk_sized:
        # Without risk sizing, direction does not change whether there is a copy.
        assert (straight.order is None) == (reverse.order is None)
    if straight.order is None or reverse.order is None:
        return
    s, r = straight.order, reverse.order
    assert type(s) is type(r)
    assert s.order_id == r.order_id
    assert (r.sl, r.tp) == (s.tp, s.sl)  # type: ignore[union-attr]
    if isinstance(s, FollowerOpen):
        assert isinstance(r, FollowerOpen)
        assert r.side is s.side.flipped()
        if not risk_sized:
            assert r.volume == s.volume
    elif isinstance(s, FollowerPendingPlace):
        assert isinstance(r, FollowerPendingPlace)
        assert r.order_type is s.order_type.reversed()
        assert r.order_type.side is s.order_type.side.flipped()
        assert r.price == s.price
        if not risk_sized:
            assert r.volume == s.volume
    else:
        assert isinstance(s, FollowerModify | FollowerPendingModify)
    if not options["copy_sl_tp"]:
        assert (r.sl, r.tp) == (None, None)  # type: ignore[union-attr]
