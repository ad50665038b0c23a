"""SMA crossover: buy when the fast average crosses above the slow one, sell when below."""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from engine.signals.strategy import HOLD, Candles, Column, Signal, SignalAction

_Distance = Annotated[float, msgspec.Meta(gt=0.0)]


class SmaCrossParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fast: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    slow: Annotated[int, msgspec.Meta(ge=2, le=10_000)] = 30
    sl_distance: _Distance | None = None
    """Price distance of the stop from the signal candle's close; none when unset."""
    tp_distance: _Distance | None = None

    def __post_init__(self) -> None:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be shorter than slow ({self.slow})")


DEFAULTS = SmaCrossParams()


def sma(values: Column, period: int, end: int) -> float:
    """The mean of the ``period`` values ending before index ``end``.

    ``fsum`` rounds once, so the result does not depend on summation order or history length.
    """
    return math.fsum(values[end - period : end]) / period


def sma_cross(candles: Candles, params: SmaCrossParams = DEFAULTS) -> Signal:
    """Buy on the candle where fast SMA goes from <= slow to > slow; sell on the mirror cross.

    Needs ``slow + 1`` candles (the averages now and one candle earlier); holds before that.
    """
    n = len(candles)
    if n < params.slow + 1:
        return HOLD
    close = candles.close
    fast_now, slow_now = sma(close, params.fast, n), sma(close, params.slow, n)
    fast_before, slow_before = sma(close, params.fast, n - 1), sma(close, params.slow, n - 1)
    last = close[-1]
    if fast_before <= slow_before and fast_now > slow_now:
        return Signal(
            action=SignalAction.BUY,
            sl=None if params.sl_distance is None else last - params.sl_distance,
            tp=None if params.tp_distance is None else last + params.tp_distance,
            comment=f"sma{params.fast}>sma{params.slow}",
        )
    if fast_before >= slow_before and fast_now < slow_now:
        return Signal(
            action=SignalAction.SELL,
            sl=None if params.sl_distance is None else last + params.sl_distance,
            tp=None if params.tp_distance is None else last - params.tp_distance,
            comment=f"sma{params.fast}<sma{params.slow}",
        )
    return HOLD
