"""Paper venue arithmetic: deal profit in cents, margin, equity, volume and stop/pending checks."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.paper import accounting as acc
from connectors.paper.model import XAUUSD, AccountBook, Position, SymbolConfig
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from schemas.common import OrderType, Side

ACCOUNT = "paper-1"
#: The first real XAUUSD quotes: bid 5010.50 / ask 5010.69, then bid 5014.78 / 5014.77 ...
REAL: list[Quote] = [q for bar in load_bars()[:50] for q in bar_to_ticks(bar, "XAUUSD")]
FIRST, LATER = REAL[0], REAL[3]


def quote(bid: float, ask: float | None = None) -> Quote:
    return Quote(
        symbol="XAUUSD", bid=bid, ask=round(bid + 0.20, 2) if ask is None else ask, ts_ns=1
    )


def position(
    side: Side, volume: float, open_price: float, symbol: str = "XAUUSD", pid: str = "1"
) -> Position:
    return Position(
        position_id=pid,
        account=ACCOUNT,
        symbol=symbol,
        side=side,
        volume=volume,
        open_price=open_price,
    )


def book(balance_minor: int = 1_000_000, *positions: Position, leverage: int = 100) -> AccountBook:
    return AccountBook(
        account_id=ACCOUNT,
        currency="USD",
        balance_minor=balance_minor,
        leverage=leverage,
        positions={p.position_id: p for p in positions},
    )


def with_level(points: int) -> SymbolConfig:
    return msgspec.structs.replace(XAUUSD, stops_level_points=points)


# ------------------------------------------------------------------------------ profit


def test_buy_profit_is_ticks_moved_times_tick_value_times_lots_on_real_quotes() -> None:
    # Bought at the first real ask, valued at a later real bid: 408 ticks x 1 USD x 0.10 lots.
    assert (FIRST.ask, LATER.bid) == (5010.69, 5014.77)
    profit = acc.deal_profit(XAUUSD, Side.BUY, 0.10, FIRST.ask, LATER.bid)
    assert acc.to_minor(profit, 2) == 4080


def test_sell_loses_when_the_price_rises() -> None:
    profit = acc.deal_profit(XAUUSD, Side.SELL, 0.25, 5000.00, 5012.00)
    assert acc.to_minor(profit, 2) == -30_000


def test_tick_value_scales_profit_for_symbols_whose_ticks_are_worth_more() -> None:
    silver = SymbolConfig(
        symbol="XAGUSD",
        contract_size=5000.0,
        tick_size=0.001,
        tick_value=5.0,
        digits=3,
        volume_min=0.01,
        volume_max=100.0,
        volume_step=0.01,
    )
    # 0.150 = 150 ticks x 5 USD x 0.02 lots = 15.00 USD.
    assert acc.to_minor(acc.deal_profit(silver, Side.BUY, 0.02, 78.100, 78.250), 2) == 1500


@settings(max_examples=200, deadline=None)
@given(
    open_cents=st.integers(1, 10_000_000),
    close_cents=st.integers(1, 10_000_000),
    steps=st.integers(1, 10_000),
)
def test_profit_in_cents_is_exact_for_prices_on_the_tick_and_volumes_on_the_step(
    open_cents: int, close_cents: int, steps: int
) -> None:
    # XAUUSD: one tick (1 cent of price) of one lot is worth 1 USD, so a 0.01 lot step
    # moving one tick is worth exactly one cent.
    volume = acc.normalize_volume(steps * XAUUSD.volume_step, XAUUSD)
    profit = acc.deal_profit(XAUUSD, Side.BUY, volume, open_cents / 100, close_cents / 100)
    assert acc.to_minor(profit, 2) == (close_cents - open_cents) * steps


@settings(max_examples=200, deadline=None)
@given(
    volume=st.floats(0.0, 1000.0),
    open_price=st.floats(0.01, 1e6),
    close_price=st.floats(0.01, 1e6),
)
def test_profit_of_a_buy_and_the_same_sell_mirror_each_other(
    volume: float, open_price: float, close_price: float
) -> None:
    buy = acc.deal_profit(XAUUSD, Side.BUY, volume, open_price, close_price)
    sell = acc.deal_profit(XAUUSD, Side.SELL, volume, open_price, close_price)
    assert buy == -sell
    assert acc.to_minor(buy, 2) == -acc.to_minor(sell, 2)


def test_money_rounds_once_to_the_minor_unit_half_to_even() -> None:
    assert acc.to_minor(106.8999999, 2) == 10690
    assert acc.to_minor(0.125, 2) == 12  # exact binary ties go to the even cent
    assert acc.to_minor(0.375, 2) == 38
    assert acc.to_minor(-0.125, 2) == -12
    assert acc.to_minor(1234.4, 0) == 1234  # a currency without minor units
    assert acc.to_minor(12.3456, 3) == 12346


# ------------------------------------------------------------------------ margin, equity


def test_margin_is_notional_over_leverage_times_margin_rate() -> None:
    assert acc.position_margin(XAUUSD, 0.10, 5000.00, 100) == 500.0
    assert acc.position_margin(XAUUSD, 0.10, 5000.00, 500) == 100.0
    half_rate = msgspec.structs.replace(XAUUSD, margin_rate=0.5)
    assert acc.position_margin(half_rate, 0.10, 5000.00, 100) == 250.0


@settings(max_examples=200, deadline=None)
@given(
    volume=st.floats(0.0, 1e4),
    price=st.floats(0.0, 1e7),
    leverage=st.integers(1, 10_000),
    rate=st.floats(0.0, 10.0),
)
def test_margin_is_never_negative(volume: float, price: float, leverage: int, rate: float) -> None:
    cfg = msgspec.structs.replace(XAUUSD, margin_rate=rate)
    margin = acc.position_margin(cfg, volume, price, leverage)
    assert margin >= 0.0
    assert math.isfinite(margin)


def test_buys_are_valued_at_the_bid_and_sells_at_the_ask() -> None:
    assert acc.entry_price(Side.BUY, FIRST) == FIRST.ask
    assert acc.entry_price(Side.SELL, FIRST) == FIRST.bid
    assert acc.exit_price(Side.BUY, FIRST) == FIRST.bid
    assert acc.exit_price(Side.SELL, FIRST) == FIRST.ask
    # A position opened at the quote is down exactly the spread (19 points x 0.10 lots).
    bought = position(Side.BUY, 0.10, FIRST.ask)
    sold = position(Side.SELL, 0.10, FIRST.bid)
    assert acc.to_minor(acc.floating_profit(XAUUSD, bought, FIRST), 2) == -190
    assert acc.to_minor(acc.floating_profit(XAUUSD, sold, FIRST), 2) == -190


def test_a_position_without_a_quote_has_no_floating_profit() -> None:
    assert acc.floating_profit(XAUUSD, position(Side.BUY, 1.0, 5000.0), None) == 0.0


def test_equity_is_balance_plus_floating_profit_and_margin_is_held_at_the_open_price() -> None:
    held = book(1_000_000, position(Side.BUY, 0.10, FIRST.ask))
    balance, equity, margin = acc.account_figures(held, {"XAUUSD": XAUUSD}, {"XAUUSD": LATER})
    assert balance == 10_000.00
    assert acc.to_minor(equity, 2) == 1_004_080
    # The open price, not the current one: 0.10 x 100 x 5010.69 / 100.
    assert margin == pytest.approx(501.069, abs=1e-9)


def test_hedged_legs_add_their_margins_and_both_pay_the_spread() -> None:
    hedged = book(
        1_000_000,
        position(Side.BUY, 0.10, FIRST.ask, pid="1"),
        position(Side.SELL, 0.10, FIRST.bid, pid="2"),
    )
    _, equity, margin = acc.account_figures(hedged, {"XAUUSD": XAUUSD}, {"XAUUSD": FIRST})
    assert margin == pytest.approx(501.069 + 501.05, abs=1e-9)
    assert acc.to_minor(equity, 2) == 1_000_000 - 380


def test_figures_of_an_account_without_positions_are_its_balance() -> None:
    assert acc.account_figures(book(123_456), {}, {}) == (1234.56, 1234.56, 0.0)


def test_a_symbol_without_a_quote_still_holds_margin() -> None:
    held = book(1_000_000, position(Side.BUY, 0.10, 5000.00))
    balance, equity, margin = acc.account_figures(held, {"XAUUSD": XAUUSD}, {})
    assert (balance, equity, margin) == (10_000.0, 10_000.0, 500.0)


def test_money_digits_set_the_balance_unit() -> None:
    yen = AccountBook(
        account_id=ACCOUNT, currency="JPY", balance_minor=1_500_000, leverage=100, money_digits=0
    )
    assert acc.account_figures(yen, {}, {})[0] == 1_500_000.0


# ------------------------------------------------------------------------------ volume


@pytest.mark.parametrize(
    ("volume", "complaint"),
    [
        (math.nan, "positive number"),
        (math.inf, "positive number"),
        (0.0, "positive number"),
        (-0.01, "positive number"),
        (0.009, "below the minimum 0.01"),
        (100.01, "above the maximum 100.0"),
        (1e300, "above the maximum 100.0"),
        (0.015, "not a multiple of the step 0.01"),
    ],
)
def test_untradable_volumes_are_named(volume: float, complaint: str) -> None:
    error = acc.volume_error(volume, XAUUSD)
    assert error is not None
    assert complaint in error


@pytest.mark.parametrize("volume", [0.01, 0.07, 0.1 + 0.2, 1.0, 99.99, 100.0])
def test_volumes_on_the_step_within_range_are_tradable(volume: float) -> None:
    assert acc.volume_error(volume, XAUUSD) is None


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 10_000), noise=st.floats(-1e-12, 1e-12))
def test_every_volume_on_the_step_is_tradable_and_normalizes_without_float_noise(
    steps: int, noise: float
) -> None:
    volume = steps * 0.01 + noise
    assert acc.volume_error(volume, XAUUSD) is None
    normalized = acc.normalize_volume(volume, XAUUSD)
    assert normalized == round(steps / 100, 2)
    assert len(repr(normalized).split(".")[1]) <= 2


def test_normalize_volume_keeps_the_steps_decimals() -> None:
    coarse = msgspec.structs.replace(XAUUSD, volume_step=0.1, volume_min=0.1)
    whole = msgspec.structs.replace(XAUUSD, volume_step=1.0, volume_min=1.0)
    assert acc.normalize_volume(0.1 + 0.2, coarse) == 0.3
    assert acc.normalize_volume(2.9999999, whole) == 3.0


# ------------------------------------------------------------------------ SL/TP checks


def test_stops_on_the_right_side_of_the_reference_are_accepted() -> None:
    assert acc.stops_error(XAUUSD, Side.BUY, 5000.00, 4990.00, 5010.00) is None
    assert acc.stops_error(XAUUSD, Side.SELL, 5000.00, 5010.00, 4990.00) is None
    assert acc.stops_error(XAUUSD, Side.BUY, 5000.00, None, None) is None


@pytest.mark.parametrize(
    ("side", "sl", "tp", "complaint"),
    [
        (Side.BUY, 5000.00, None, "stop loss 5000.0 must be below 5000.0"),
        (Side.BUY, 5000.01, None, "stop loss 5000.01 must be below"),
        (Side.BUY, None, 4999.99, "take profit 4999.99 must be above"),
        (Side.SELL, 4999.99, None, "stop loss 4999.99 must be above"),
        (Side.SELL, None, 5000.00, "take profit 5000.0 must be below"),
        (Side.BUY, -1.0, None, "stop loss -1.0 must be below"),
        (Side.SELL, None, -1.0, "take profit -1.0 must be below"),
        (Side.BUY, math.nan, None, "stop loss nan must be a finite price"),
        (Side.SELL, None, math.inf, "take profit inf must be a finite price"),
    ],
)
def test_stops_on_the_wrong_side_or_not_prices_are_named(
    side: Side, sl: float | None, tp: float | None, complaint: str
) -> None:
    error = acc.stops_error(XAUUSD, side, 5000.00, sl, tp)
    assert error is not None
    assert complaint in error


def test_stops_must_keep_the_stops_level_from_the_reference() -> None:
    cfg = with_level(50)  # 0.50 on XAUUSD
    assert acc.stops_error(cfg, Side.BUY, 5000.00, 4999.50, 5000.50) is None
    near_sl = acc.stops_error(cfg, Side.BUY, 5000.00, 4999.51, None)
    near_tp = acc.stops_error(cfg, Side.SELL, 5000.00, None, 4999.51)
    assert near_sl is not None and "at least 50 points" in near_sl
    assert near_tp is not None and "at least 50 points" in near_tp


def test_a_stop_less_than_half_a_point_away_counts_as_on_the_price() -> None:
    assert acc.stops_error(XAUUSD, Side.BUY, 5000.00, 4999.996, None) is not None
    assert acc.stops_error(XAUUSD, Side.BUY, 5000.00, 4999.99, None) is None


@settings(max_examples=200, deadline=None)
@given(
    side=st.sampled_from(Side),
    bid_cents=st.integers(100, 1_000_000),
    spread=st.integers(0, 100),
    sl_offset=st.one_of(st.none(), st.integers(-500, 500)),
    tp_offset=st.one_of(st.none(), st.integers(-500, 500)),
    level=st.integers(0, 100),
)
def test_stops_accepted_at_a_quote_are_not_hit_by_that_quote(
    side: Side,
    bid_cents: int,
    spread: int,
    sl_offset: int | None,
    tp_offset: int | None,
    level: int,
) -> None:
    q = quote(bid_cents / 100, (bid_cents + spread) / 100)
    reference = acc.exit_price(side, q)
    sl = None if sl_offset is None else round(reference + sl_offset / 100, 2)
    tp = None if tp_offset is None else round(reference + tp_offset / 100, 2)
    if acc.stops_error(with_level(level), side, reference, sl, tp) is not None:
        return
    sign = acc.direction(side)
    assert sl is None or (reference - sl) * sign > 0
    assert tp is None or (tp - reference) * sign > 0


# ---------------------------------------------------------------------- pending orders


@pytest.mark.parametrize(
    ("order_type", "valid", "invalid", "where"),
    [
        (OrderType.BUY_LIMIT, 5000.19, 5000.20, "below the ask 5000.2"),
        (OrderType.SELL_LIMIT, 5000.01, 5000.00, "above the bid 5000.0"),
        (OrderType.BUY_STOP, 5000.21, 5000.20, "above the ask 5000.2"),
        (OrderType.SELL_STOP, 4999.99, 5000.00, "below the bid 5000.0"),
    ],
)
def test_limits_wait_for_a_better_price_and_stops_for_a_worse_one(
    order_type: OrderType, valid: float, invalid: float, where: str
) -> None:
    market = quote(5000.00, 5000.20)
    assert acc.pending_price_error(XAUUSD, order_type, valid, market) is None
    error = acc.pending_price_error(XAUUSD, order_type, invalid, market)
    assert error is not None
    assert f"{order_type.value} price {invalid} must be {where}" in error


def test_pending_prices_must_keep_the_stops_level_from_the_market() -> None:
    market = quote(5000.00, 5000.20)
    cfg = with_level(10)
    assert acc.pending_price_error(cfg, OrderType.BUY_LIMIT, 5000.10, market) is None
    assert acc.pending_price_error(cfg, OrderType.BUY_LIMIT, 5000.11, market) is not None
    assert acc.pending_price_error(cfg, OrderType.SELL_STOP, 4999.90, market) is None
    assert acc.pending_price_error(cfg, OrderType.SELL_STOP, 4999.91, market) is not None


@pytest.mark.parametrize(
    ("order_type", "price", "bid", "ask", "triggered"),
    [
        (OrderType.BUY_LIMIT, 5000.00, 4999.80, 5000.00, True),
        # The bid under a buy limit is not enough: buys fill at the ask.
        (OrderType.BUY_LIMIT, 5000.00, 4999.90, 5000.10, False),
        (OrderType.SELL_LIMIT, 5000.00, 5000.00, 5000.20, True),
        # The ask over a sell limit is not enough: sells fill at the bid.
        (OrderType.SELL_LIMIT, 5000.00, 4999.90, 5000.10, False),
        (OrderType.BUY_STOP, 5000.00, 4999.80, 5000.00, True),
        (OrderType.BUY_STOP, 5000.00, 4999.70, 4999.99, False),
        (OrderType.SELL_STOP, 5000.00, 5000.00, 5000.20, True),
        (OrderType.SELL_STOP, 5000.00, 5000.01, 5000.21, False),
    ],
)
def test_pending_orders_trigger_on_the_side_they_fill_at(
    order_type: OrderType, price: float, bid: float, ask: float, triggered: bool
) -> None:
    assert acc.pending_triggered(order_type, price, quote(bid, ask)) is triggered


@settings(max_examples=200, deadline=None)
@given(
    order_type=st.sampled_from(OrderType),
    bid_cents=st.integers(100, 1_000_000),
    spread=st.integers(0, 100),
    offset=st.integers(-300, 300),
    level=st.integers(0, 50),
)
def test_a_pending_price_accepted_at_a_quote_is_not_triggered_by_that_quote(
    order_type: OrderType, bid_cents: int, spread: int, offset: int, level: int
) -> None:
    market = quote(bid_cents / 100, (bid_cents + spread) / 100)
    price = round(bid_cents / 100 + offset / 100, 2)
    if acc.pending_price_error(with_level(level), order_type, price, market) is None:
        assert not acc.pending_triggered(order_type, price, market)
