"""The master's orders for a strategy signal: open, reverse, close or nothing, by what it holds."""

from __future__ import annotations

import msgspec
import pytest

from engine.signals.candles import Timeframe
from engine.signals.drive import MasterOrder, OrderKind, net_position, orders_for
from engine.signals.messages import StrategySignal
from engine.signals.strategy import HOLD, Signal, SignalAction
from schemas.common import Side

BUY = Signal(action=SignalAction.BUY, sl=2640.0, tp=2680.0, comment="sma10>sma30")
SELL = Signal(action=SignalAction.SELL, comment="sma10<sma30")
CLOSE = Signal(action=SignalAction.CLOSE)
LOT = 0.1


class _Held(msgspec.Struct, frozen=True, kw_only=True):
    symbol: str
    side: Side
    volume: float


def _open(side: Side, signal: Signal) -> MasterOrder:
    return MasterOrder(
        kind=OrderKind.OPEN, side=side, volume=LOT, sl=signal.sl, tp=signal.tp,
        comment=signal.comment,
    )  # fmt: skip


def _close(side: Side, volume: float) -> MasterOrder:
    return MasterOrder(kind=OrderKind.CLOSE, side=side, volume=volume)


def test_a_flat_master_opens_on_buy_or_sell_with_the_signals_stops() -> None:
    assert orders_for(BUY, 0.0, LOT) == [_open(Side.BUY, BUY)]
    assert orders_for(SELL, 0.0, LOT) == [_open(Side.SELL, SELL)]
    [opened] = orders_for(BUY, 0.0, LOT)
    assert (opened.sl, opened.tp, opened.comment) == (2640.0, 2680.0, "sma10>sma30")


def test_a_signal_against_the_held_side_reverses_close_first_then_open() -> None:
    assert orders_for(BUY, -0.3, LOT) == [_close(Side.SELL, 0.3), _open(Side.BUY, BUY)]
    assert orders_for(SELL, 0.2, LOT) == [_close(Side.BUY, 0.2), _open(Side.SELL, SELL)]


def test_a_signal_on_the_held_side_never_adds_to_the_position() -> None:
    # A repeated or replayed signal must not double the master's position.
    assert orders_for(BUY, 0.1, LOT) == []
    assert orders_for(SELL, -0.1, LOT) == []


def test_close_closes_whatever_is_held_and_does_nothing_when_flat() -> None:
    assert orders_for(CLOSE, 0.5, LOT) == [_close(Side.BUY, 0.5)]
    assert orders_for(CLOSE, -0.25, LOT) == [_close(Side.SELL, 0.25)]
    assert orders_for(CLOSE, 0.0, LOT) == []


@pytest.mark.parametrize("position", [0.0, 0.1, -0.1])
def test_hold_never_trades(position: float) -> None:
    assert orders_for(HOLD, position, LOT) == []


def test_float_noise_is_flat_not_a_position() -> None:
    noise = 0.3 - 0.2 - 0.1  # -2.8e-17
    assert orders_for(BUY, noise, LOT) == [_open(Side.BUY, BUY)]
    assert orders_for(CLOSE, noise, LOT) == []


def test_a_published_strategy_signal_maps_like_its_signal() -> None:
    emitted = StrategySignal(
        version_id="sv-" + "0" * 24, symbol="XAUUSD", timeframe=Timeframe.M15,
        candle_close_ns=1, signal=SELL, price=2650.0, worker="w1", emitted_ns=2,
    )  # fmt: skip
    assert orders_for(emitted, 0.1, LOT) == orders_for(SELL, 0.1, LOT)


@pytest.mark.parametrize("volume", [0.0, -0.1, float("nan")])
def test_a_lot_that_is_not_positive_is_refused(volume: float) -> None:
    with pytest.raises(ValueError, match="volume must be positive"):
        orders_for(BUY, 0.0, volume)


def test_net_position_sums_the_symbols_positions_signed_by_side() -> None:
    held = [
        _Held(symbol="XAUUSD", side=Side.BUY, volume=0.3),
        _Held(symbol="XAUUSD", side=Side.SELL, volume=0.1),
        _Held(symbol="EURUSD", side=Side.SELL, volume=5.0),
    ]
    assert net_position(held, "XAUUSD") == pytest.approx(0.2)
    assert net_position(held, "EURUSD") == -5.0
    assert net_position(held, "GBPUSD") == 0.0
    hedged = [
        _Held(symbol="XAUUSD", side=Side.BUY, volume=0.1),
        _Held(symbol="XAUUSD", side=Side.SELL, volume=0.1),
    ]
    assert net_position(hedged, "XAUUSD") == 0.0
