"""Wilder's RSI: buy on a cross up out of oversold, sell on a cross down out of overbought."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec

from engine.signals.strategy import HOLD, Candles, Signal, SignalAction

_Level = Annotated[float, msgspec.Meta(gt=0.0, lt=100.0)]
_Distance = Annotated[float, msgspec.Meta(gt=0.0)]


class RsiParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    period: Annotated[int, msgspec.Meta(ge=2, le=1_000)] = 14
    oversold: _Level = 30.0
    overbought: _Level = 70.0
    exit_level: _Level | None = 50.0
    """Close on a cross of this level either way (the midline); none to exit only by SL/TP."""
    lookback: Annotated[int, msgspec.Meta(ge=3, le=100_000)] = 250
    """Candles the smoothing runs over. With period 14 the weight left on anything older
    than 250 candles is (13/14)**236, about 2.5e-8, so the RSI moves by well under 1e-4
    points against a full-history run, and one run costs O(lookback), not O(history)."""
    sl_distance: _Distance | None = None
    tp_distance: _Distance | None = None

    def __post_init__(self) -> None:
        if self.oversold >= self.overbought:
            raise ValueError(
                f"oversold ({self.oversold:g}) must be below overbought ({self.overbought:g})"
            )
        if self.lookback < self.period + 2:
            raise ValueError(f"lookback ({self.lookback}) must be at least period + 2")


DEFAULTS = RsiParams()


def wilder_rsi(closes: Sequence[float], period: int) -> list[float | None]:
    """RSI per close, ``None`` until ``period`` changes exist (the first ``period`` closes).

    Wilder's smoothing: the first averages are the plain means of the first ``period`` gains
    and losses; each later one is ``(previous * (period - 1) + current) / period``. No loss
    over the window gives 100, neither gain nor loss gives 50.
    """
    rsi: list[float | None] = [None] * min(period, len(closes))
    if len(closes) <= period:
        return rsi
    gains = losses = 0.0
    for i in range(1, period + 1):
        change = closes[i] - closes[i - 1]
        gains += max(change, 0.0)
        losses += max(-change, 0.0)
    avg_gain, avg_loss = gains / period, losses / period
    rsi.append(_rsi(avg_gain, avg_loss))
    for i in range(period + 1, len(closes)):
        change = closes[i] - closes[i - 1]
        avg_gain = (avg_gain * (period - 1) + max(change, 0.0)) / period
        avg_loss = (avg_loss * (period - 1) + max(-change, 0.0)) / period
        rsi.append(_rsi(avg_gain, avg_loss))
    return rsi


def _rsi(avg_gain: float, avg_loss: float) -> float:
    if avg_loss == 0.0:
        return 100.0 if avg_gain > 0.0 else 50.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


def rsi_reversal(candles: Candles, params: RsiParams = DEFAULTS) -> Signal:
    """Buy when RSI rises through ``oversold``, sell when it falls through ``overbought``,
    close when it crosses ``exit_level``; hold otherwise and until ``period + 2`` candles."""
    n = len(candles)
    if n < params.period + 2:
        return HOLD
    values = wilder_rsi(candles.close[max(0, n - params.lookback) :], params.period)
    now, before = values[-1], values[-2]
    assert now is not None and before is not None
    last = candles.close[-1]
    if before <= params.oversold < now:
        return Signal(
            action=SignalAction.BUY,
            sl=None if params.sl_distance is None else last - params.sl_distance,
            tp=None if params.tp_distance is None else last + params.tp_distance,
            comment=f"rsi{params.period} {now:.1f} up through {params.oversold:g}",
        )
    if before >= params.overbought > now:
        return Signal(
            action=SignalAction.SELL,
            sl=None if params.sl_distance is None else last + params.sl_distance,
            tp=None if params.tp_distance is None else last - params.tp_distance,
            comment=f"rsi{params.period} {now:.1f} down through {params.overbought:g}",
        )
    exit_level = params.exit_level
    if exit_level is not None and (before < exit_level <= now or before > exit_level >= now):
        return Signal(
            action=SignalAction.CLOSE, comment=f"rsi{params.period} crossed {exit_level:g}"
        )
    return HOLD
