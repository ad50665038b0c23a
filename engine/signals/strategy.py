"""The strategy contract: a pure function from closed candles to one signal."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import msgspec

from engine.signals.candles import Candle
from schemas.signals import Signal, SignalAction

# Signal and SignalAction are wire types (schemas.signals); strategies import them from here.
__all__ = [
    "HOLD",
    "Candles",
    "Column",
    "Signal",
    "SignalAction",
    "Strategy",
    "TimedSignal",
    "signals_over",
]

HOLD = Signal(action=SignalAction.HOLD)


class Column(Sequence[float]):
    """A read-only column of a :class:`Candles` window: indexes like a list or a pandas Series.

    ``close[-1]`` is the last closed candle's close. Slicing returns a list (a copy of that
    slice only); the column itself shares its storage with every other window.
    """

    __slots__ = ("_data", "_end")

    def __init__(self, data: Sequence[float], end: int) -> None:
        self._data = data
        self._end = end

    def __len__(self) -> int:
        return self._end

    @overload
    def __getitem__(self, index: int) -> float: ...
    @overload
    def __getitem__(self, index: slice) -> list[float]: ...
    def __getitem__(self, index: int | slice) -> float | list[float]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._end)
            return list(self._data[start:stop:step])
        if index < 0:
            index += self._end
        if not 0 <= index < self._end:
            raise IndexError("candle index out of range")
        return self._data[index]

    def __iter__(self) -> Iterator[float]:
        data = self._data
        return (data[i] for i in range(self._end))

    def __repr__(self) -> str:
        return f"Column(len={self._end})"


class Candles:
    """The closed candles a strategy sees, oldest first, as columns.

    Read-only and shared: ``candles[:n]`` is the window of the first ``n`` candles without
    copying, so a backtest hands the strategy each window in turn in linear memory.
    """

    __slots__ = ("_columns", "_end")

    def __init__(self, columns: tuple[Sequence[float], ...], end: int) -> None:
        self._columns = columns
        self._end = end

    # Properties, not attributes: a strategy cannot swap a column out from under the next one.
    @property
    def open(self) -> Column:
        return Column(self._columns[0], self._end)

    @property
    def high(self) -> Column:
        return Column(self._columns[1], self._end)

    @property
    def low(self) -> Column:
        return Column(self._columns[2], self._end)

    @property
    def close(self) -> Column:
        return Column(self._columns[3], self._end)

    @property
    def open_time_ns(self) -> Column:
        return Column(self._columns[4], self._end)

    @property
    def close_time_ns(self) -> Column:
        return Column(self._columns[5], self._end)

    @property
    def ticks(self) -> Column:
        return Column(self._columns[6], self._end)

    @classmethod
    def of(cls, candles: Sequence[Candle]) -> Candles:
        columns = (
            tuple(c.open for c in candles),
            tuple(c.high for c in candles),
            tuple(c.low for c in candles),
            tuple(c.close for c in candles),
            tuple(c.open_time_ns for c in candles),
            tuple(c.close_time_ns for c in candles),
            tuple(c.ticks for c in candles),
        )
        return cls(columns, len(candles))

    def __len__(self) -> int:
        return self._end

    def frame(self) -> Any:
        """These candles as a pandas ``DataFrame`` (pandas is the optional extra
        ``tradecopy[pandas]``): columns ``open``, ``high``, ``low``, ``close``, ``ticks`` and
        ``open_time``, indexed by ``close_time``, both UTC timestamps; oldest first.

        A new frame on each call, so a strategy may change it freely.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "Candles.frame() needs pandas: pip install 'tradecopy[pandas]'"
            ) from exc
        end = self._end
        columns = self._columns
        close_time = pd.DatetimeIndex(
            pd.to_datetime(list(columns[5][:end]), unit="ns", utc=True), name="close_time"
        )
        return pd.DataFrame(
            {
                "open": list(columns[0][:end]),
                "high": list(columns[1][:end]),
                "low": list(columns[2][:end]),
                "close": list(columns[3][:end]),
                "ticks": list(columns[6][:end]),
                "open_time": pd.to_datetime(list(columns[4][:end]), unit="ns", utc=True),
            },
            index=close_time,
        )

    def __getitem__(self, index: slice) -> Candles:
        """Only prefixes (``[:n]``): a strategy never sees a candle after the last one."""
        if not isinstance(index, slice) or index.start not in (None, 0) or index.step is not None:
            raise TypeError("Candles windows are prefixes: candles[:n]")
        stop = self._end if index.stop is None else index.indices(self._end)[1]
        return Candles(self._columns, stop)

    def __repr__(self) -> str:
        return f"Candles(len={self._end})"


Strategy = Callable[[Candles], Signal]
"""A pure function: same candles, same signal. Parameters are bound with functools.partial."""


class TimedSignal(msgspec.Struct, frozen=True, kw_only=True):
    """A signal and the close time of the candle it was computed on."""

    index: int
    close_time_ns: int
    signal: Signal


def signals_over(candles: Candles, strategy: Strategy) -> list[TimedSignal]:
    """Every non-hold signal the strategy gives when run once per closed candle, in order."""
    found = []
    for end in range(1, len(candles) + 1):
        signal = strategy(candles[:end])
        if signal.action is not SignalAction.HOLD:
            found.append(
                TimedSignal(
                    index=end - 1,
                    close_time_ns=int(candles.close_time_ns[end - 1]),
                    signal=signal,
                )
            )
    return found
