"""Paper venue: fills at bid/ask, P&L, margin, rejections, idempotency, triggers, persistence."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from connectors.journal import OrderMemoryConfig
from connectors.paper.model import XAUUSD, Result, Retcode, SymbolConfig
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue, UnknownAccountError, UnknownSymbolError
from engine.core.volume import partial_close_volume
from schemas.account import TradeMode
from schemas.codec import encode, master_event_decoder
from schemas.common import OrderType, Side
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
from schemas.streams import follower_orders_stream

ACCOUNT = "paper-1"
MINUTE = 60_000_000_000

#: Real XAUUSD quotes: the first 3,000 shipped bars walked open → extremes → close.
QUOTES: list[Quote] = [q for bar in load_bars()[:3000] for q in bar_to_ticks(bar, "XAUUSD")]


def quote(bid: float, ask: float | None = None, ts_ns: int = 1) -> Quote:
    return Quote(symbol="XAUUSD", bid=bid, ask=bid + 0.20 if ask is None else ask, ts_ns=ts_ns)


def venue_with(
    balance: float = 10_000.0,
    leverage: int = 100,
    first: Quote | None = QUOTES[0],
    symbols: tuple[SymbolConfig, ...] = (XAUUSD,),
) -> PaperVenue:
    venue = PaperVenue(symbols)
    venue.open_account(ACCOUNT, balance=balance, leverage=leverage)
    if first is not None:
        venue.on_quote(first)
    return venue


def feed_until_events(venue: PaperVenue, start: int) -> tuple[int, list[MasterEvent]]:
    """Feed real quotes from ``start`` until one sets something off."""
    for index in range(start, len(QUOTES)):
        events = venue.on_quote(QUOTES[index])
        if events:
            return index, events
    raise AssertionError("the real quotes never set anything off")


def first_index(predicate: Callable[[Quote], bool], start: int = 1) -> int:
    return next(i for i in range(start, len(QUOTES)) if predicate(QUOTES[i]))


def balance(venue: PaperVenue) -> float:
    return venue.account_state(ACCOUNT).balance


# ---------------------------------------------------------------------------- fills


def test_buy_fills_at_the_ask_and_sell_at_the_bid() -> None:
    venue = venue_with()
    buy = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    sell = venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.10)
    assert (buy.ok, buy.retcode, buy.price) == (True, Retcode.DONE, QUOTES[0].ask)
    assert (sell.ok, sell.price) == (True, QUOTES[0].bid)
    assert [p.open_price for p in venue.positions(ACCOUNT)] == [5010.69, 5010.50]


def test_buy_010_from_5000_closed_at_bid_5010_makes_100_usd() -> None:
    venue = venue_with(first=quote(4999.80, 5000.00))
    opened = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    venue.on_quote(quote(5010.00, 5010.20, ts_ns=2))
    closed = venue.close_position(ACCOUNT, opened.position_id or "")
    assert (closed.price, closed.profit) == (5010.00, 100.00)
    assert balance(venue) == 10_100.00
    assert closed.transactions == [
        PositionClosed(
            event_id=f"{ACCOUNT}-2",
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=2,
            position_id=opened.position_id or "",
            side=Side.BUY,
            volume=0.10,
            price=5010.00,
            reason="client",
            profit=100.00,
            commission=0.0,
            swap=0.0,
        )
    ]


def test_sell_loses_when_the_ask_rises() -> None:
    venue = venue_with(first=quote(5000.00, 5000.20))
    opened = venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.25)
    venue.on_quote(quote(5009.80, 5010.00, ts_ns=2))
    closed = venue.close_position(ACCOUNT, opened.position_id or "")
    # (5000.00 - 5010.00) / 0.01 ticks * 1.0 USD * 0.25 lots
    assert closed.profit == -250.00
    assert balance(venue) == 9_750.00


def test_margin_equity_and_free_margin_follow_price_and_leverage() -> None:
    venue = venue_with(first=quote(4999.80, 5000.00))
    venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    venue.on_quote(quote(4990.00, 4990.20, ts_ns=2))
    state = venue.account_state(ACCOUNT)
    # 0.10 lots x 100 oz x 5000.00 / 100 leverage; valued at the bid 4990.00.
    assert state.margin == 500.00
    assert state.equity == 10_000.00 - 100.00
    assert state.free_margin == 9_900.00 - 500.00
    assert (state.open_positions, state.leverage, state.currency) == (1, 100, "USD")
    assert state.ts_ns == 2


def test_margin_rate_scales_margin() -> None:
    half = msgspec.structs.replace(XAUUSD, margin_rate=0.5)
    venue = venue_with(first=quote(4999.80, 5000.00), symbols=(half,))
    venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    assert venue.account_state(ACCOUNT).margin == 250.00


# ----------------------------------------------------------------------- rejections


def assert_rejected_without_change(venue: PaperVenue, result: Result, code: Retcode) -> None:
    assert (result.ok, result.retcode, result.transactions) == (False, code, [])
    assert result.reason
    assert venue.positions(ACCOUNT) == []
    assert venue.pending_orders(ACCOUNT) == []


def test_not_enough_money_is_rejected_and_changes_nothing() -> None:
    venue = venue_with(balance=1_000.0, first=quote(4999.80, 5000.00))
    result = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.30)  # needs 1,500 margin
    assert_rejected_without_change(venue, result, Retcode.NO_MONEY)
    assert "1500.00" in result.reason
    assert venue.account_state(ACCOUNT).balance == 1_000.0
    # The rejection used no event sequence number: the next event is still the first.
    ok = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.20)
    assert ok.transactions[0].event_id == f"{ACCOUNT}-1"


@pytest.mark.parametrize(
    "volume", [0.015, 0.0, -0.01, 0.001, 100.01, 1e306, math.nan, math.inf, -math.inf]
)
def test_invalid_volume_is_rejected(volume: float) -> None:
    venue = venue_with()
    result = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, volume)
    assert_rejected_without_change(venue, result, Retcode.INVALID_VOLUME)


def test_volume_float_noise_is_on_the_step() -> None:
    venue = venue_with()
    result = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.1 + 0.2)
    assert (result.ok, result.volume) == (True, 0.3)


@pytest.mark.parametrize(
    ("side", "sl", "tp"),
    [
        (Side.BUY, 5011.00, None),  # SL above the bid a buy closes at
        (Side.BUY, None, 5010.00),  # TP below the bid
        (Side.BUY, 5010.50, None),  # SL right at the bid
        (Side.SELL, 5010.00, None),  # SL below the ask a sell closes at
        (Side.SELL, None, 5011.00),  # TP above the ask
        (Side.BUY, math.nan, None),
        (Side.BUY, -1.0, None),
    ],
)
def test_stops_on_the_wrong_side_are_rejected(
    side: Side, sl: float | None, tp: float | None
) -> None:
    venue = venue_with()  # bid 5010.50, ask 5010.69
    result = venue.market_order(ACCOUNT, "XAUUSD", side, 0.10, sl=sl, tp=tp)
    assert_rejected_without_change(venue, result, Retcode.INVALID_STOPS)


def test_stops_nearer_than_the_stops_level_are_rejected() -> None:
    leveled = msgspec.structs.replace(XAUUSD, stops_level_points=100)  # 1.00 USD
    venue = venue_with(symbols=(leveled,))
    near = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, sl=5009.60)
    assert_rejected_without_change(venue, near, Retcode.INVALID_STOPS)
    far = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, sl=5009.50, tp=5011.50)
    assert (far.ok, venue.positions(ACCOUNT)[0].sl) == (True, 5009.50)


def test_market_is_closed_before_the_first_quote() -> None:
    venue = venue_with(first=None)
    result = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    assert_rejected_without_change(venue, result, Retcode.MARKET_CLOSED)


@pytest.mark.parametrize(
    ("mode", "side", "code"),
    [
        (TradeMode.DISABLED, Side.BUY, Retcode.TRADE_DISABLED),
        (TradeMode.CLOSE_ONLY, Side.BUY, Retcode.CLOSE_ONLY),
        (TradeMode.LONG_ONLY, Side.SELL, Retcode.LONG_ONLY),
        (TradeMode.SHORT_ONLY, Side.BUY, Retcode.SHORT_ONLY),
    ],
)
def test_trade_mode_refuses_opens_it_does_not_allow(
    mode: TradeMode, side: Side, code: Retcode
) -> None:
    venue = venue_with(symbols=(msgspec.structs.replace(XAUUSD, trade_mode=mode),))
    result = venue.market_order(ACCOUNT, "XAUUSD", side, 0.10)
    assert_rejected_without_change(venue, result, code)


def test_price_deviation_beyond_the_limit_is_a_requote_that_may_be_retried() -> None:
    venue = venue_with()  # ask 5010.69
    args = (ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    far = venue.market_order(
        *args, expected_price=5010.00, max_deviation=0.50, client_order_id="o1"
    )
    assert_rejected_without_change(venue, far, Retcode.REQUOTE)
    # A requote is not remembered: the same order id fills once the price is near enough.
    near = venue.market_order(
        *args, expected_price=5010.00, max_deviation=0.69, client_order_id="o1"
    )
    assert (near.ok, near.duplicate, near.price) == (True, False, 5010.69)


def test_an_account_no_venue_pair_converts_to_is_refused_with_the_reason() -> None:
    venue = PaperVenue()
    venue.open_account("eur-1", currency="EUR", balance=10_000.0)
    venue.on_quote(QUOTES[0])
    result = venue.market_order("eur-1", "XAUUSD", Side.BUY, 0.10)
    assert (result.ok, result.retcode) == (False, Retcode.INVALID)
    assert "no pair that converts USD to EUR" in result.reason
    # Not switched off behind the follower's back: its orders get the venue's reason.
    assert venue.symbol_spec("eur-1", "XAUUSD").trade_mode is TradeMode.FULL


def test_unknown_account_and_symbol() -> None:
    venue = venue_with()
    assert venue.market_order("nobody", "XAUUSD", Side.BUY, 0.1).retcode == Retcode.INVALID
    assert venue.market_order(ACCOUNT, "EURUSD", Side.BUY, 0.1).retcode == Retcode.INVALID
    with pytest.raises(UnknownAccountError):
        venue.account_state("nobody")
    with pytest.raises(UnknownSymbolError):
        venue.symbol_spec(ACCOUNT, "EURUSD")


def test_symbol_spec_describes_the_symbol_for_the_replicator() -> None:
    spec = venue_with().symbol_spec(ACCOUNT, "XAUUSD")
    assert (spec.contract_size, spec.tick_size, spec.tick_value, spec.digits) == (
        100.0,
        0.01,
        1.0,
        2,
    )
    assert (spec.volume_min, spec.volume_step, spec.trade_mode) == (0.01, 0.01, TradeMode.FULL)


def test_opening_an_existing_account_changes_nothing() -> None:
    venue = venue_with()
    venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    again = venue.open_account(ACCOUNT, balance=1.0)
    assert (again.balance, again.open_positions) == (10_000.0, 1)


# ---------------------------------------------------------------------- idempotency


def test_duplicate_client_order_id_returns_the_original_result_and_opens_nothing() -> None:
    venue = venue_with()
    first = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, client_order_id="f-1")
    venue.on_quote(QUOTES[1])
    again = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, client_order_id="f-1")
    assert again.duplicate and not first.duplicate
    assert msgspec.structs.replace(again, duplicate=False) == first
    assert len(venue.positions(ACCOUNT)) == 1
    assert venue.position_by_client_order(ACCOUNT, "f-1") == venue.positions(ACCOUNT)[0]


def test_a_rejected_client_order_id_stays_rejected() -> None:
    venue = venue_with(balance=100.0)
    first = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 1.0, client_order_id="f-2")
    assert (first.ok, first.retcode) == (False, Retcode.NO_MONEY)
    # A redelivery gets the definitive answer again, even though 0.01 lots would now fit.
    again = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.01, client_order_id="f-2")
    assert (again.ok, again.retcode, again.duplicate) == (False, Retcode.NO_MONEY, True)
    assert venue.positions(ACCOUNT) == []


def test_a_redelivered_close_closes_once() -> None:
    venue = venue_with()
    opened = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    pid = opened.position_id or ""
    first = venue.close_position(ACCOUNT, pid, 0.04, client_order_id="close-1")
    again = venue.close_position(ACCOUNT, pid, 0.04, client_order_id="close-1")
    assert again.duplicate and again.transactions == first.transactions
    assert venue.positions(ACCOUNT)[0].volume == 0.06


def test_client_order_ids_are_per_account() -> None:
    venue = venue_with()
    venue.open_account("paper-2")
    one = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, client_order_id="same")
    two = venue.market_order("paper-2", "XAUUSD", Side.BUY, 0.10, client_order_id="same")
    assert not two.duplicate and one.position_id != two.position_id


# ------------------------------------------------------------- SL/TP on real bars


@pytest.mark.parametrize(
    ("side", "which"),
    [(Side.BUY, "sl"), (Side.BUY, "tp"), (Side.SELL, "sl"), (Side.SELL, "tp")],
)
def test_sl_and_tp_are_hit_on_real_bars(side: Side, which: str) -> None:
    venue = venue_with()
    q0 = QUOTES[0]
    start = balance(venue)
    if side is Side.BUY:
        level = round(q0.bid - 3.00, 2) if which == "sl" else round(q0.bid + 3.00, 2)
        hit = (lambda q: q.bid <= level) if which == "sl" else (lambda q: q.bid >= level)
    else:
        level = round(q0.ask + 3.00, 2) if which == "sl" else round(q0.ask - 3.00, 2)
        hit = (lambda q: q.ask >= level) if which == "sl" else (lambda q: q.ask <= level)
    sl, tp = (level, None) if which == "sl" else (None, level)
    opened = venue.market_order(ACCOUNT, "XAUUSD", side, 0.10, sl=sl, tp=tp)
    assert opened.ok, opened.reason
    index, events = feed_until_events(venue, 1)
    assert index == first_index(hit)
    fill = QUOTES[index].bid if side is Side.BUY else QUOTES[index].ask
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, PositionClosed)
    assert (event.reason, event.position_id, event.price) == (which, opened.position_id, fill)
    assert event.ts_ns == QUOTES[index].ts_ns
    sign = 1 if side is Side.BUY else -1
    expected = round(sign * (fill - opened.price) * 100 * 0.10, 2)
    assert balance(venue) == pytest.approx(start + expected, abs=1e-9)
    assert (expected < 0) == (which == "sl")
    assert venue.positions(ACCOUNT) == []


def test_modify_position_moves_stops_and_reports_it() -> None:
    venue = venue_with()
    opened = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    pid = opened.position_id or ""
    moved = venue.modify_position(ACCOUNT, pid, 5000.00, 5030.00)
    assert moved.ok and moved.retcode == Retcode.DONE
    event = moved.transactions[0]
    assert isinstance(event, PositionModified)
    assert (event.sl, event.tp, event.side) == (5000.00, 5030.00, Side.BUY)
    same = venue.modify_position(ACCOUNT, pid, 5000.00, 5030.00)
    assert (same.ok, same.retcode, same.transactions) == (True, Retcode.NO_CHANGES, [])
    wrong = venue.modify_position(ACCOUNT, pid, 5020.00, None)
    assert (wrong.ok, wrong.retcode) == (False, Retcode.INVALID_STOPS)
    removed = venue.modify_position(ACCOUNT, pid, None, 0)
    assert removed.ok and venue.positions(ACCOUNT)[0].sl is None
    gone = venue.modify_position(ACCOUNT, "999", None, None)
    assert gone.retcode == Retcode.POSITION_CLOSED


# -------------------------------------------------------------- pending orders


def test_buy_limit_triggers_into_a_position_on_real_bars() -> None:
    venue = venue_with()
    price = round(QUOTES[0].ask - 2.00, 2)
    placed = venue.place_pending(
        ACCOUNT,
        "XAUUSD",
        OrderType.BUY_LIMIT,
        0.20,
        price,
        sl=price - 10.0,
        client_order_id="p-1",
        master_ref="m:77",
    )
    assert (placed.ok, placed.retcode) == (True, Retcode.PLACED)
    assert isinstance(placed.transactions[0], PendingOrderPlaced)
    index, events = feed_until_events(venue, 1)
    assert index == first_index(lambda q: q.ask <= price)
    trigger = events[0]
    assert isinstance(trigger, PendingOrderTriggered)
    assert trigger.price == QUOTES[index].ask <= price
    assert (trigger.order_id, trigger.position_id) == (placed.order_id, placed.order_id)
    position = venue.positions(ACCOUNT)[0]
    assert (position.side, position.volume, position.sl) == (Side.BUY, 0.20, round(price - 10, 2))
    assert position.master_ref == "m:77" and position.client_order_id == "p-1"
    assert venue.position_by_master_ref(ACCOUNT, "m:77") == position
    assert venue.pending_orders(ACCOUNT) == []


def test_sell_stop_triggers_at_the_bid_on_real_bars() -> None:
    venue = venue_with()
    price = round(QUOTES[0].bid - 2.00, 2)
    placed = venue.place_pending(ACCOUNT, "XAUUSD", OrderType.SELL_STOP, 0.10, price)
    index, events = feed_until_events(venue, 1)
    assert index == first_index(lambda q: q.bid <= price)
    trigger = events[0]
    assert isinstance(trigger, PendingOrderTriggered)
    assert (trigger.side, trigger.price, trigger.order_id) == (
        Side.SELL,
        QUOTES[index].bid,
        placed.order_id,
    )


def test_pending_order_expires_at_its_expiration() -> None:
    venue = venue_with()
    expiry = QUOTES[0].ts_ns + 10 * MINUTE
    placed = venue.place_pending(
        ACCOUNT, "XAUUSD", OrderType.BUY_LIMIT, 0.10, 4000.00, expiration_ns=expiry
    )
    index, events = feed_until_events(venue, 1)
    assert QUOTES[index].ts_ns >= expiry > QUOTES[index - 1].ts_ns
    assert events == [
        PendingOrderCancelled(
            event_id=f"{ACCOUNT}-2",
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=QUOTES[index].ts_ns,
            order_id=placed.order_id or "",
            order_type=OrderType.BUY_LIMIT,
        )
    ]
    assert venue.pending_orders(ACCOUNT) == []


@pytest.mark.parametrize(
    ("order_type", "price"),
    [
        (OrderType.BUY_LIMIT, 5011.00),  # above the ask 5010.69
        (OrderType.BUY_STOP, 5010.00),  # below the ask
        (OrderType.SELL_LIMIT, 5010.00),  # below the bid 5010.50
        (OrderType.SELL_STOP, 5011.00),  # above the bid
        (OrderType.BUY_LIMIT, -1.0),
    ],
)
def test_pending_price_on_the_wrong_side_is_invalid(order_type: OrderType, price: float) -> None:
    venue = venue_with()
    result = venue.place_pending(ACCOUNT, "XAUUSD", order_type, 0.10, price)
    assert_rejected_without_change(venue, result, Retcode.INVALID_PRICE)


def test_pending_with_past_expiration_or_bad_stops_is_rejected() -> None:
    venue = venue_with()
    past = venue.place_pending(
        ACCOUNT, "XAUUSD", OrderType.BUY_LIMIT, 0.1, 5000.0, expiration_ns=QUOTES[0].ts_ns
    )
    assert_rejected_without_change(venue, past, Retcode.INVALID_EXPIRATION)
    stops = venue.place_pending(ACCOUNT, "XAUUSD", OrderType.BUY_LIMIT, 0.1, 5000.0, sl=5001.0)
    assert_rejected_without_change(venue, stops, Retcode.INVALID_STOPS)


def test_modify_and_cancel_pending_report_events() -> None:
    venue = venue_with()
    placed = venue.place_pending(ACCOUNT, "XAUUSD", OrderType.SELL_LIMIT, 0.1, 5020.0)
    oid = placed.order_id or ""
    moved = venue.modify_pending(ACCOUNT, oid, 5025.0, tp=5015.0)
    assert moved.ok and isinstance(moved.transactions[0], PendingOrderModified)
    assert venue.pending_orders(ACCOUNT)[0].price == 5025.0
    assert venue.modify_pending(ACCOUNT, oid, 5025.0, tp=5015.0).retcode == Retcode.NO_CHANGES
    bad = venue.modify_pending(ACCOUNT, oid, 5000.0)
    assert (bad.ok, bad.retcode) == (False, Retcode.INVALID_PRICE)
    cancelled = venue.cancel_pending(ACCOUNT, oid)
    assert isinstance(cancelled.transactions[0], PendingOrderCancelled)
    assert venue.pending_orders(ACCOUNT) == []
    assert venue.cancel_pending(ACCOUNT, oid).retcode == Retcode.INVALID


def test_triggering_without_margin_cancels_the_pending_order() -> None:
    venue = venue_with(balance=100.0, first=quote(5000.00, 5000.20))
    placed = venue.place_pending(ACCOUNT, "XAUUSD", OrderType.BUY_STOP, 1.0, 5001.00)
    assert placed.ok  # margin is checked on activation, as MT5 does
    events = venue.on_quote(quote(5001.00, 5001.20, ts_ns=2))
    assert [type(e) for e in events] == [PendingOrderCancelled]
    assert venue.positions(ACCOUNT) == []


# ----------------------------------------------------------- partial close, close-by


def test_partial_close_keeps_the_id_and_realises_pro_rata() -> None:
    venue = venue_with(first=quote(4999.80, 5000.00))
    opened = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    pid = opened.position_id or ""
    venue.on_quote(quote(5010.00, 5010.20, ts_ns=2))
    reduced = venue.close_position(ACCOUNT, pid, 0.04)
    assert (reduced.ok, reduced.volume, reduced.profit) == (True, 0.04, 40.00)
    event = reduced.transactions[0]
    assert isinstance(event, PositionReduced)
    assert (event.position_id, event.volume_before, event.volume_after, event.price) == (
        pid,
        0.10,
        0.06,
        5010.00,
    )
    assert [(p.position_id, p.volume) for p in venue.positions(ACCOUNT)] == [(pid, 0.06)]
    rest = venue.close_position(ACCOUNT, pid)
    assert rest.profit == 60.00 and balance(venue) == 10_100.00


def test_partial_close_volume_must_fit_what_is_held() -> None:
    tenth = msgspec.structs.replace(XAUUSD, volume_min=0.10)
    venue = venue_with(symbols=(tenth,))
    pid = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.15).position_id or ""
    too_much = venue.close_position(ACCOUNT, pid, 0.20)
    assert (too_much.ok, too_much.retcode) == (False, Retcode.INVALID_CLOSE_VOLUME)
    stub = venue.close_position(ACCOUNT, pid, 0.10)  # would leave 0.05 < min 0.10
    assert (stub.ok, stub.retcode) == (False, Retcode.INVALID_VOLUME)
    off_step = venue.close_position(ACCOUNT, pid, 0.125)
    assert off_step.retcode == Retcode.INVALID_VOLUME
    assert venue.positions(ACCOUNT)[0].volume == 0.15
    # The replicator's sizing closes all of it when the rest could not stay open.
    spec = venue.symbol_spec(ACCOUNT, "XAUUSD")
    assert venue.close_position(ACCOUNT, pid, partial_close_volume(0.15, 0.5, spec)).ok
    assert venue.positions(ACCOUNT) == []


def test_close_by_with_equal_volumes_closes_both_at_the_open_price_difference() -> None:
    venue = venue_with(first=quote(4999.80, 5000.00))
    buy = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10).position_id or ""
    venue.on_quote(quote(5010.00, 5010.20, ts_ns=2))
    sell = venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.10).position_id or ""
    venue.on_quote(quote(4000.00, 4000.20, ts_ns=3))  # the market price plays no part
    result = venue.close_by(ACCOUNT, buy, sell)
    assert (result.ok, result.price, result.volume, result.profit) == (True, 5010.00, 0.10, 100.0)
    assert result.transactions == [
        PositionClosedBy(
            event_id=f"{ACCOUNT}-3",
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=3,
            position_id=buy,
            opposite_position_id=sell,
            side=Side.BUY,
            volume=0.10,
            profit=100.00,
            commission=0.0,
            swap=0.0,
        )
    ]
    assert venue.positions(ACCOUNT) == []
    assert balance(venue) == 10_100.00


def test_close_by_leaves_the_remainder_on_the_larger_position() -> None:
    venue = venue_with(first=quote(4999.80, 5000.00))
    buy = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10).position_id or ""
    venue.on_quote(quote(4990.00, 4990.20, ts_ns=2))
    sell = venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.25).position_id or ""
    result = venue.close_by(ACCOUNT, sell, buy)
    # The sell (opened 4990.00) closes 0.10 at the buy's 5000.00 open: -100.00.
    assert (result.volume, result.profit) == (0.10, -100.00)
    remaining = venue.positions(ACCOUNT)
    assert [(p.position_id, p.side, p.volume) for p in remaining] == [(sell, Side.SELL, 0.15)]


def test_close_by_needs_opposite_sides_of_one_symbol() -> None:
    venue = venue_with()
    a = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10).position_id or ""
    b = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10).position_id or ""
    assert venue.close_by(ACCOUNT, a, b).retcode == Retcode.INVALID
    assert venue.close_by(ACCOUNT, a, "404").retcode == Retcode.POSITION_CLOSED
    assert len(venue.positions(ACCOUNT)) == 2


# ------------------------------------------------------------------------ stop-out


def test_stop_out_closes_the_biggest_loser_first() -> None:
    venue = venue_with(balance=1_000.0, first=quote(4999.80, 5000.00))
    big = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10).position_id  # margin 500.00
    venue.on_quote(quote(4989.80, 4990.00, ts_ns=2))
    small = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.04).position_id  # margin 199.60
    # bid 4955: equity 1000 - 450 - 140 = 410, level 58.6 %: nothing happens.
    assert venue.on_quote(quote(4955.00, 4955.20, ts_ns=3)) == []
    # bid 4950: equity 340, level 48.6 %: the 0.10 (-500) goes; then 340 / 199.6 = 170 %.
    events = venue.on_quote(quote(4950.00, 4950.20, ts_ns=4))
    assert [(type(e), e.position_id, e.reason) for e in events] == [  # type: ignore[union-attr]
        (PositionClosed, big, "stop_out")
    ]
    assert [p.position_id for p in venue.positions(ACCOUNT)] == [small]
    assert balance(venue) == 500.00


def test_stop_out_on_real_bars_fires_at_the_first_quote_below_50_percent() -> None:
    venue = venue_with(balance=600.0)
    buy = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)  # margin 501.07
    sell = venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.01)  # margin 50.11 (hedged)
    margin = 0.10 * 100 * buy.price / 100 + 0.01 * 100 * sell.price / 100

    def level(q: Quote) -> float:
        floating = (q.bid - buy.price) * 100 * 0.10 + (sell.price - q.ask) * 100 * 0.01
        return (600.0 + floating) / margin * 100

    index, events = feed_until_events(venue, 1)
    assert index == first_index(lambda q: level(q) < 50)
    # The losing buy goes; the winning sell alone stands far above the level.
    assert [(e.position_id, e.reason) for e in events] == [  # type: ignore[union-attr]
        (buy.position_id, "stop_out")
    ]
    assert [p.position_id for p in venue.positions(ACCOUNT)] == [sell.position_id]
    state = venue.account_state(ACCOUNT)
    assert state.equity / state.margin * 100 >= 50


# ------------------------------------------------------------------ events, clock


def test_events_are_master_events_with_per_account_sequence_ids() -> None:
    venue = venue_with()
    venue.open_account("paper-2")
    events = [
        *venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10).transactions,
        *venue.market_order("paper-2", "XAUUSD", Side.BUY, 0.10).transactions,
        *venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.10).transactions,
    ]
    assert [(e.master, e.event_id) for e in events] == [
        (ACCOUNT, f"{ACCOUNT}-1"),
        ("paper-2", "paper-2-1"),
        (ACCOUNT, f"{ACCOUNT}-2"),
    ]
    assert all(isinstance(e, PositionOpened) for e in events)
    assert all(master_event_decoder.decode(encode(e)) == e for e in events)


def test_events_carry_the_quote_clock_or_the_given_time() -> None:
    venue = venue_with()
    by_clock = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10)
    explicit = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, now_ns=42)
    assert by_clock.transactions[0].ts_ns == QUOTES[0].ts_ns == venue.clock_ns
    assert explicit.transactions[0].ts_ns == 42


def test_bad_quotes_are_ignored() -> None:
    venue = venue_with()
    assert venue.on_quote(quote(math.nan)) == []
    assert venue.on_quote(quote(5000.0, 4999.0)) == []
    assert venue.on_quote(Quote(symbol="EURUSD", bid=1.08, ask=1.09, ts_ns=5)) == []
    assert venue.quote("XAUUSD") == QUOTES[0]


# ---------------------------------------------------------------------- persistence


def busy_venue() -> PaperVenue:
    venue = venue_with()
    venue.open_account("paper-2", balance=5_000.0, leverage=50)
    venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, sl=5000.0, client_order_id="a")
    venue.market_order(ACCOUNT, "XAUUSD", Side.SELL, 0.05, master_ref="m:1", magic=7)
    venue.place_pending(ACCOUNT, "XAUUSD", OrderType.BUY_LIMIT, 0.02, 4990.0, client_order_id="b")
    venue.market_order("paper-2", "XAUUSD", Side.BUY, 5.0, client_order_id="c")  # no money
    for q in QUOTES[1:50]:
        venue.on_quote(q)
    return venue


def test_snapshot_restore_round_trip_preserves_everything() -> None:
    venue = busy_venue()
    restored = PaperVenue.restore(venue.snapshot())
    assert restored.snapshot() == venue.snapshot()
    for account in (ACCOUNT, "paper-2"):
        assert restored.account_state(account) == venue.account_state(account)
        assert restored.positions(account) == venue.positions(account)
        assert restored.pending_orders(account) == venue.pending_orders(account)
    assert restored.quote("XAUUSD") == venue.quote("XAUUSD")
    assert restored.clock_ns == venue.clock_ns
    # Idempotency memory survives: the redelivered orders change nothing.
    again = restored.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.10, client_order_id="a")
    assert again.duplicate and len(restored.positions(ACCOUNT)) == 2
    assert restored.market_order("paper-2", "XAUUSD", Side.BUY, 5.0, client_order_id="c").duplicate
    # Tickets and event sequences carry on where they stopped.
    old = venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.01)
    new = restored.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.01)
    assert old == new


def test_state_survives_a_restart_through_a_file(tmp_path: Path) -> None:
    venue = busy_venue()
    path = tmp_path / "venue.msgpack"
    venue.save(path)
    venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.01)
    venue.save(path)  # replaces the file whole
    loaded = PaperVenue.load(path)
    assert loaded.snapshot() == venue.snapshot()
    assert [p.name for p in tmp_path.iterdir()] == ["venue.msgpack"]


def test_restore_refuses_symbols_it_is_not_given() -> None:
    data = busy_venue().snapshot()
    other = msgspec.structs.replace(XAUUSD, symbol="XAGUSD")
    with pytest.raises(ValueError, match="XAUUSD"):
        PaperVenue.restore(data, (other,))


# --------------------------------------------- the client-order-id memory, bounded


class WallClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 10**9)


def remembering_venue(clock: WallClock, **memory: Any) -> PaperVenue:
    venue = PaperVenue(order_memory=OrderMemoryConfig(**memory), wall_clock=clock)
    venue.open_account(ACCOUNT, balance=100_000.0)
    venue.on_quote(QUOTES[0])
    return venue


def buy(venue: PaperVenue, client_order_id: str) -> Result:
    return venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, 0.01, client_order_id=client_order_id)


def test_the_client_order_memory_lasts_the_follower_orders_retention_by_default() -> None:
    assert PaperVenue().order_memory.retention_s == follower_orders_stream().max_age


def test_a_client_order_id_is_forgotten_after_the_retention_by_the_wall_clock() -> None:
    clock = WallClock()
    venue = remembering_venue(clock, retention_s=60.0)
    first = buy(venue, "a")
    clock.advance(59)
    assert buy(venue, "a").duplicate  # the quote clock plays no part: only the wall clock
    buy(venue, "b")
    clock.advance(2)
    buy(venue, "c")  # any request prunes what aged out
    assert venue.executed(ACCOUNT, "a") is None and venue.executed(ACCOUNT, "b") is not None
    again = buy(venue, "a")
    assert not again.duplicate and again.position_id != first.position_id


def test_the_client_order_memory_cap_evicts_the_oldest_and_counts_it() -> None:
    clock = WallClock()
    venue = remembering_venue(clock, max_orders=2)
    before = REGISTRY.get_sample_value(
        "tradecopy_connector_order_memory_evicted_total", {"memory": "paper_venue"}
    )
    with structlog.testing.capture_logs() as logs:
        for cid in ("a", "b", "c"):
            buy(venue, cid)
            clock.advance(1)
    assert venue.executed(ACCOUNT, "a") is None
    assert venue.executed(ACCOUNT, "b") is not None and venue.executed(ACCOUNT, "c") is not None
    after = REGISTRY.get_sample_value(
        "tradecopy_connector_order_memory_evicted_total", {"memory": "paper_venue"}
    )
    assert (after or 0) - (before or 0) == 1
    assert [e["evicted"] for e in logs if e["event"] == "order_memory_cap_evicted"] == [1]


def test_the_memory_and_its_ages_survive_a_snapshot_and_keep_aging() -> None:
    clock = WallClock()
    venue = remembering_venue(clock, retention_s=60.0)
    buy(venue, "a")
    clock.advance(30)
    buy(venue, "b")
    restored = PaperVenue.restore(venue.snapshot(), order_memory=venue.order_memory,
                                  wall_clock=clock)  # fmt: skip
    assert buy(restored, "a").duplicate
    clock.advance(31)  # a is 61 s old, b 31 s
    buy(restored, "c")
    assert restored.executed(ACCOUNT, "a") is None
    assert restored.executed(ACCOUNT, "b") is not None


def test_an_old_snapshot_without_ages_restores_with_its_memory_aging_from_now() -> None:
    clock = WallClock()
    venue = remembering_venue(clock)
    first = buy(venue, "a")
    old = msgspec.msgpack.decode(venue.snapshot())
    for book in old["accounts"]:
        del book["executed_ns"]  # what a snapshot looked like before the memory was bounded
    clock.advance(3600)
    restored = PaperVenue.restore(msgspec.msgpack.encode(old),
                                  order_memory=OrderMemoryConfig(retention_s=7200.0),
                                  wall_clock=clock)  # fmt: skip
    again = buy(restored, "a")
    assert again.duplicate and msgspec.structs.replace(again, duplicate=False) == first
    clock.advance(7201)  # a full retention after the restore, not after the order
    buy(restored, "b")
    assert restored.executed(ACCOUNT, "a") is None


def test_a_venue_that_leaves_its_memory_to_a_connector_keeps_no_history() -> None:
    clock = WallClock()
    venue = PaperVenue(wall_clock=clock, remember_client_orders=False)
    venue.open_account(ACCOUNT, balance=100_000.0)
    venue.on_quote(QUOTES[0])
    sizes = []
    for i in range(50):
        opened = buy(venue, f"open-{i}")
        venue.close_position(ACCOUNT, opened.position_id or "", client_order_id=f"close-{i}")
        sizes.append(len(venue.snapshot(with_executed=False)))
    assert venue.executed(ACCOUNT, "open-0") is None
    assert sizes[-1] - sizes[0] <= 8  # a few more digits in the tickets, nothing more
    # What its connector tells it still counts: a repeat of that id is a duplicate.
    remembered = buy(venue, "told")
    venue.remember(ACCOUNT, "known", remembered)
    assert buy(venue, "known").duplicate


# --------------------------------------------------------------- random sequences


class Mirror:
    """Positions and balance rebuilt from the venue's events alone, with integer cents."""

    def __init__(self, balance_cents: int) -> None:
        self.balance_cents = balance_cents
        self.positions: dict[str, tuple[Side, float, float]] = {}
        self.pendings: set[str] = set()

    @staticmethod
    def cents(side: Side, volume: float, open_price: float, close_price: float) -> int:
        sign = 1 if side is Side.BUY else -1
        # Price cents x hundredths of a lot = USD cents for 100-oz gold at 1 USD a tick.
        return sign * round((close_price - open_price) * 100) * round(volume * 100)

    def apply(self, event: MasterEvent) -> int:
        """Apply one event; the cents it realised."""
        if isinstance(event, PositionOpened | PendingOrderTriggered):
            self.positions[event.position_id] = (event.side, event.volume, event.price)
            self.pendings.discard(getattr(event, "order_id", ""))
            return 0
        if isinstance(event, PositionReduced):
            side, _, open_price = self.positions[event.position_id]
            closed = event.volume_before - event.volume_after
            self.positions[event.position_id] = (side, event.volume_after, open_price)
            return self.cents(side, closed, open_price, event.price)
        if isinstance(event, PositionClosed):
            side, volume, open_price = self.positions.pop(event.position_id)
            assert volume == event.volume
            return self.cents(side, volume, open_price, event.price)
        if isinstance(event, PositionClosedBy):
            side, first_volume, first_open = self.positions[event.position_id]
            other_side, other_volume, other_open = self.positions[event.opposite_position_id]
            for pid, (s, v, o) in (
                (event.position_id, (side, first_volume, first_open)),
                (event.opposite_position_id, (other_side, other_volume, other_open)),
            ):
                rest = round(v - event.volume, 2)
                if rest > 0:
                    self.positions[pid] = (s, rest, o)
                else:
                    del self.positions[pid]
            return self.cents(side, event.volume, first_open, other_open)
        if isinstance(event, PendingOrderPlaced):
            self.pendings.add(event.order_id)
        elif isinstance(event, PendingOrderCancelled):
            self.pendings.discard(event.order_id)
        return 0


volumes = st.one_of(st.integers(1, 30), st.integers(1, 300)).map(lambda steps: steps / 100)
#: How far a level sits from its reference, in its natural direction; negative is the wrong side.
distances = st.none() | st.integers(-100, 2000).map(lambda cents: cents / 100)
indices = st.integers(0, 7)
order_ids = st.sampled_from([None, None, "o1", "o2", "o3"])
feeds = st.tuples(st.just("quotes"), st.integers(1, 1500))
#: Hostile input: NaN, infinities, huge, tiny and negative numbers.
odd_numbers = st.none() | st.floats(allow_nan=True, allow_infinity=True)
operations = st.one_of(
    feeds,
    feeds,
    feeds,
    st.tuples(st.just("market"), st.sampled_from(Side), volumes, distances, distances, order_ids),
    st.tuples(st.just("market"), st.sampled_from(Side), volumes, distances, distances, order_ids),
    st.tuples(st.just("close"), indices, st.just(1.0) | st.floats(0.01, 1.0), order_ids),
    st.tuples(st.just("close_by"), indices, indices),
    st.tuples(st.just("modify"), indices, distances, distances),
    st.tuples(
        st.just("pending"),
        st.sampled_from(OrderType),
        volumes,
        st.integers(-100, 1500).map(lambda cents: cents / 100),
        distances,
        distances,
        st.integers(0, 60),
        order_ids,
    ),
    st.tuples(st.just("cancel"), indices),
    st.tuples(st.just("odd"), odd_numbers, odd_numbers, odd_numbers, odd_numbers, indices),
)


def levels(
    side: Side, reference: float, sl_away: float | None, tp_away: float | None
) -> tuple[float | None, float | None]:
    sign = 1 if side is Side.BUY else -1
    sl = None if sl_away is None else round(reference - sign * sl_away, 2)
    tp = None if tp_away is None else round(reference + sign * tp_away, 2)
    return sl, tp


def pending_price(order_type: OrderType, q: Quote, away: float) -> float:
    if order_type is OrderType.BUY_LIMIT:
        return q.ask - away
    if order_type is OrderType.SELL_LIMIT:
        return q.bid + away
    if order_type is OrderType.BUY_STOP:
        return q.ask + away
    return q.bid - away


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.integers(0, len(QUOTES) - 2000),
    balance_usd=st.sampled_from([300, 2_000, 20_000]),
    leverage=st.sampled_from([20, 100, 500]),
    steps=st.lists(operations, min_size=5, max_size=40),
)
def test_random_operations_keep_the_books_consistent(
    start: int, balance_usd: int, leverage: int, steps: list[tuple]
) -> None:
    venue = venue_with(balance=float(balance_usd), leverage=leverage, first=QUOTES[start])
    spec = venue.symbol_spec(ACCOUNT, "XAUUSD")
    mirror = Mirror(balance_usd * 100)
    cursor = start + 1
    results: dict[str, Result] = {}

    def settle(result: Result, client_order_id: str | None = None) -> None:
        event(f"retcode {int(result.retcode)}{' duplicate' if result.duplicate else ''}")
        if result.duplicate:
            assert client_order_id is not None
            assert msgspec.structs.replace(result, duplicate=False) == results[client_order_id]
            return  # a duplicate changed nothing and must not be counted again
        if client_order_id is not None and result.retcode != Retcode.REQUOTE:
            results[client_order_id] = result
        for happened in result.transactions:
            event(type(happened).__name__)
        realised = sum(mirror.apply(e) for e in result.transactions)
        mirror.balance_cents += realised
        assert round(result.profit * 100) == realised
        assert result.ok or not result.transactions

    for step in steps:
        positions = venue.positions(ACCOUNT)
        pendings = venue.pending_orders(ACCOUNT)
        kind = step[0]
        if kind == "quotes":
            for q in QUOTES[cursor : cursor + step[1]]:
                for happened in venue.on_quote(q):
                    event(type(happened).__name__ + " " + getattr(happened, "reason", ""))
                    mirror.balance_cents += mirror.apply(happened)
            cursor += step[1]
        elif kind == "market":
            _, side, volume, sl_away, tp_away, cid = step
            q = venue.quote("XAUUSD")
            assert q is not None
            sl, tp = levels(side, q.bid if side is Side.BUY else q.ask, sl_away, tp_away)
            result = venue.market_order(
                ACCOUNT, "XAUUSD", side, volume, sl=sl, tp=tp, client_order_id=cid
            )
            settle(result, cid)
        elif kind == "close" and positions:
            _, index, ratio, cid = step
            position = positions[index % len(positions)]
            volume = partial_close_volume(position.volume, ratio, spec)
            if volume > 0:
                result = venue.close_position(
                    ACCOUNT, position.position_id, volume, client_order_id=cid
                )
                # The replicator's partial-close sizing never asks for an impossible volume.
                assert result.ok or result.duplicate, result.reason
                settle(result, cid)
        elif kind == "close_by" and positions:
            a = positions[step[1] % len(positions)].position_id
            b = positions[step[2] % len(positions)].position_id
            settle(venue.close_by(ACCOUNT, a, b))
        elif kind == "modify" and positions:
            position = positions[step[1] % len(positions)]
            q = venue.quote("XAUUSD")
            assert q is not None
            exit_price = q.bid if position.side is Side.BUY else q.ask
            sl, tp = levels(position.side, exit_price, step[2], step[3])
            settle(venue.modify_position(ACCOUNT, position.position_id, sl, tp))
        elif kind == "pending":
            _, order_type, volume, away, sl_away, tp_away, expiry_min, cid = step
            q = venue.quote("XAUUSD")
            assert q is not None
            price = round(pending_price(order_type, q, away), 2)
            sl, tp = levels(order_type.side, price, sl_away, tp_away)
            expiry = venue.clock_ns + expiry_min * MINUTE if expiry_min else 0
            result = venue.place_pending(
                ACCOUNT,
                "XAUUSD",
                order_type,
                volume,
                price,
                sl=sl,
                tp=tp,
                expiration_ns=expiry,
                client_order_id=cid,
            )
            settle(result, cid)
        elif kind == "cancel" and pendings:
            settle(venue.cancel_pending(ACCOUNT, pendings[step[1] % len(pendings)].order_id))
        elif kind == "odd":
            _, raw_volume, sl, tp, price, index = step
            volume = 0.1 if raw_volume is None else raw_volume
            settle(venue.market_order(ACCOUNT, "XAUUSD", Side.BUY, volume, sl=sl, tp=tp))
            order_type = list(OrderType)[index % 4]
            pending_at = 5000.0 if price is None else price
            settle(venue.place_pending(ACCOUNT, "XAUUSD", order_type, volume, pending_at, sl=sl))
            if positions:
                pid = positions[index % len(positions)].position_id
                settle(venue.modify_position(ACCOUNT, pid, sl, tp))
                if raw_volume is not None:
                    settle(venue.close_position(ACCOUNT, pid, raw_volume))

        # The event stream alone rebuilds the venue's books.
        held = {p.position_id: (p.side, p.volume, p.open_price) for p in venue.positions(ACCOUNT)}
        assert held == mirror.positions
        assert {o.order_id for o in venue.pending_orders(ACCOUNT)} == mirror.pendings
        state = venue.account_state(ACCOUNT)
        assert round(state.balance * 100) == mirror.balance_cents
        for position in venue.positions(ACCOUNT):
            assert position.volume > 0
            assert abs(position.volume * 100 - round(position.volume * 100)) < 1e-9
        q = venue.quote("XAUUSD")
        assert q is not None
        floating = sum(
            Mirror.cents(side, volume, open_price, q.bid if side is Side.BUY else q.ask)
            for side, volume, open_price in mirror.positions.values()
        )
        assert state.equity == pytest.approx((mirror.balance_cents + floating) / 100, abs=0.011)
        # Stop-out keeps the margin level at or above 50 % after every step.
        assert state.margin == 0 or state.equity >= state.margin * 0.5 - 0.02

    assert PaperVenue.restore(venue.snapshot()).snapshot() == venue.snapshot()
