"""Real price data for the paper venue: MT5 bar files, bar-to-tick paths and paced replay."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from schemas.market import Quote

#: The bars shipped with the package (see ``data/README.md`` for provenance).
DEFAULT_BARS_PATH = Path(__file__).parent / "data" / "XAUUSD-M1-2026-02-16_27.csv"

_HEADER = (
    "<DATE>",
    "<TIME>",
    "<OPEN>",
    "<HIGH>",
    "<LOW>",
    "<CLOSE>",
    "<TICKVOL>",
    "<VOL>",
    "<SPREAD>",
)
_MINUTE_NS = 60_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


class PriceFileError(ValueError):
    """A bar file line that cannot be read; names the file and the 1-based line number."""

    def __init__(self, path: Path | str, line_no: int, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: {reason}")
        self.path = Path(path)
        self.line_no = line_no
        self.reason = reason


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    """One one-minute bar of bid prices, as MetaTrader exports it."""

    ts_ns: int
    """Bar open, UTC ns. The export carries broker server time; we read it as UTC."""
    open: float
    high: float
    low: float
    close: float
    spread_points: int
    tick_volume: int


def load_bars(path: Path | None = None) -> list[Bar]:
    """Read an MT5 bar export (tab-separated, ``<DATE> <TIME> <OPEN> ... <SPREAD>`` header).

    Dates look like ``2026.02.16`` and times like ``02:07:00``; both are taken as UTC (MT5
    exports server time, which has no zone attached). Bars must be in strictly increasing
    time order. Any malformed line raises :class:`PriceFileError` naming its line number.
    """
    path = DEFAULT_BARS_PATH if path is None else path
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PriceFileError(path, 0, f"not UTF-8 text: {exc}") from exc
    lines = text.splitlines()
    if not lines or tuple(lines[0].split()) != _HEADER:
        raise PriceFileError(path, 1, f"header must be {' '.join(_HEADER)} (tab-separated)")
    bars: list[Bar] = []
    previous_ts = -1
    for index, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        bar = _parse_bar(path, index, line)
        if bar.ts_ns <= previous_ts:
            raise PriceFileError(path, index, "bar time is not after the previous bar's time")
        previous_ts = bar.ts_ns
        bars.append(bar)
    return bars


def _parse_bar(path: Path, line_no: int, line: str) -> Bar:
    fields = line.split("\t")
    if len(fields) != len(_HEADER):
        raise PriceFileError(
            path, line_no, f"expected {len(_HEADER)} tab-separated fields, got {len(fields)}"
        )
    date, clock, open_, high, low, close, tickvol, _vol, spread = (f.strip() for f in fields)
    try:
        stamp = datetime.strptime(f"{date} {clock}", "%Y.%m.%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError as exc:
        raise PriceFileError(path, line_no, f"bad date/time {date!r} {clock!r}: {exc}") from exc
    try:
        o, h, lo, c = (float(v) for v in (open_, high, low, close))
        tick_volume, spread_points = int(tickvol), int(spread)
    except ValueError as exc:
        raise PriceFileError(path, line_no, f"bad number: {exc}") from exc
    if not all(math.isfinite(v) and v > 0 for v in (o, h, lo, c)):
        raise PriceFileError(path, line_no, "prices must be finite and positive")
    if h < max(o, c) or lo > min(o, c):
        raise PriceFileError(path, line_no, "high/low do not contain open and close")
    if spread_points < 0 or tick_volume < 0:
        raise PriceFileError(path, line_no, "spread and tick volume must not be negative")
    ts_ns = (stamp - _EPOCH) // _ONE_MICROSECOND * 1_000
    return Bar(
        ts_ns=ts_ns,
        open=o,
        high=h,
        low=lo,
        close=c,
        spread_points=spread_points,
        tick_volume=tick_volume,
    )


def bar_to_ticks(
    bar: Bar, symbol: str, point: float = 0.01, digits: int = 2, *, steps_per_leg: int = 1
) -> list[Quote]:
    """The deterministic quote path through one bar.

    An up bar (close >= open) goes open → low → high → close, a down bar open → high → low →
    close, the path MT5's tester assumes with only OHLC known: the bar visits both extremes
    and the nearer-to-open extreme is taken first. ``steps_per_leg`` > 1 adds evenly spaced
    prices along each leg so SL/TP and pending triggers meet a continuous path. The
    ``1 + 3 * steps_per_leg`` quotes are spread evenly across the minute (0, 15, 30, 45 s for
    one step); bid is the bar price and ask = bid + spread_points * point, both rounded to
    ``digits``.
    """
    if steps_per_leg < 1:
        raise ValueError("steps_per_leg must be at least 1")
    if bar.close >= bar.open:
        corners = (bar.open, bar.low, bar.high, bar.close)
    else:
        corners = (bar.open, bar.high, bar.low, bar.close)
    path = [corners[0]]
    for start, end in itertools.pairwise(corners):
        path.extend(start + (end - start) * k / steps_per_leg for k in range(1, steps_per_leg + 1))
    spread = bar.spread_points * point
    count = len(path)
    quotes = []
    for i, price in enumerate(path):
        bid = round(price, digits)
        quotes.append(
            Quote(
                symbol=symbol,
                bid=bid,
                ask=round(bid + spread, digits),
                ts_ns=bar.ts_ns + i * _MINUTE_NS // count,
            )
        )
    return quotes


class PriceReplay:
    """Replays bars as quotes in (scaled) real time.

    ``speed`` is replay seconds per wall second: 60 plays one bar per second, 0 plays as fast
    as possible. With ``compress_gaps`` (the default) a gap between bars (nights, weekends)
    costs one bar's time instead of hours of waiting; quote timestamps stay the file's own.
    With ``loop`` the replay starts over at ``start`` when the bars run out, shifting
    timestamps by the replayed span so the venue's clock never runs backwards. With
    ``stamp_wall_clock`` every quote carries the wall-clock time it was emitted, for live
    paper-copying where signal-age rules compare event times with the present. Pacing runs
    on the monotonic ``clock``; each quote is due at its replay offset / ``speed``, so a slow
    consumer catches up instead of drifting.
    """

    def __init__(
        self,
        bars: Sequence[Bar],
        symbol: str = "XAUUSD",
        *,
        start: int = 0,
        speed: float = 60.0,
        loop: bool = False,
        steps_per_leg: int = 1,
        point: float = 0.01,
        digits: int = 2,
        compress_gaps: bool = True,
        stamp_wall_clock: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if not 0 <= start < len(bars):
            raise ValueError(f"start {start} is outside the {len(bars)} bars")
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("speed must be finite and not negative")
        self.bars = bars
        self.symbol = symbol
        self.start = start
        self.speed = speed
        self.loop = loop
        self.steps_per_leg = steps_per_leg
        self.point = point
        self.digits = digits
        self.compress_gaps = compress_gaps
        self.stamp_wall_clock = stamp_wall_clock
        # Injectable so pacing can be checked against a fake clock, never against real time.
        self._clock = clock
        self._sleep = sleep
        self.bar_index = start
        """The bar being replayed now: where a restarted replay could resume."""

    async def quotes(self) -> AsyncIterator[Quote]:
        bars = self.bars
        lap_span = bars[-1].ts_ns + _MINUTE_NS - bars[self.start].ts_ns
        shift = 0
        replay_ns = 0  # replay-time offset of the current bar from the first one
        started = self._clock()
        while True:
            for index in range(self.start, len(bars)):
                self.bar_index = index
                bar = bars[index]
                for quote in bar_to_ticks(
                    bar, self.symbol, self.point, self.digits, steps_per_leg=self.steps_per_leg
                ):
                    if self.speed > 0:
                        due = started + (replay_ns + quote.ts_ns - bar.ts_ns) / 1e9 / self.speed
                        delay = due - self._clock()
                        if delay > 0:
                            await self._sleep(delay)
                    if self.stamp_wall_clock:
                        yield msgspec.structs.replace(quote, ts_ns=time.time_ns())
                    elif shift:
                        yield msgspec.structs.replace(quote, ts_ns=quote.ts_ns + shift)
                    else:
                        yield quote
                if self.speed == 0:
                    # Flat out, but never starve the other tasks on the loop.
                    await asyncio.sleep(0)
                gap = bars[index + 1].ts_ns - bar.ts_ns if index + 1 < len(bars) else _MINUTE_NS
                replay_ns += min(gap, _MINUTE_NS) if self.compress_gaps else gap
            if not self.loop:
                return
            shift += lap_span
