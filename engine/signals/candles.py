"""Closed candles built from the quote stream, aligned to the broker's server day."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from engine.core.calendar import utc_datetime
from engine.signals.errors import CandleError
from schemas.market import Quote
from schemas.signals import Timeframe as Timeframe  # a wire type; its old import path stays

_MINUTE_NS = 60_000_000_000
_HOUR_NS = 60 * _MINUTE_NS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


#: Timeframes aligned on the UTC clock. Broker server zones are whole hours off UTC, so these
#: boundaries are also the server's; 1h stays on UTC so a repeated DST hour is two candles.
_UTC_ALIGNED_NS = {
    Timeframe.M1: _MINUTE_NS,
    Timeframe.M5: 5 * _MINUTE_NS,
    Timeframe.M15: 15 * _MINUTE_NS,
    Timeframe.H1: _HOUR_NS,
}


class ServerDay(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When the broker's server day begins: a wall-clock time in an IANA zone.

    The default is the "New York close" most MetaTrader brokers run on: server time is
    GMT+2 in winter and GMT+3 in summer, switching with US daylight saving, so the server's
    midnight is 17:00 in New York all year and a week has five daily candles.
    ``ServerDay(timezone="Europe/Athens", starts_at="00:00")`` is the same except in the
    weeks between the US and the EU clock changes; ``ServerDay(timezone="UTC",
    starts_at="00:00")`` suits data stamped in UTC.
    """

    timezone: str = "America/New_York"
    starts_at: Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")] = "17:00"


NEW_YORK_CLOSE = ServerDay()


class Candle(msgspec.Struct, frozen=True, kw_only=True):
    """One closed candle of bid prices. Its time is ``close_time_ns``, the bucket's end."""

    symbol: str
    timeframe: Timeframe
    open_time_ns: int
    """The bucket's start (UTC ns), not the first tick's time."""
    close_time_ns: int
    """The bucket's end (UTC ns, exclusive): the next candle's open time when none is skipped."""
    open: float
    high: float
    low: float
    close: float
    ticks: int


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CandleError(f"unknown time zone {name!r}: {exc}") from None


def _ns(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _server_day_bounds(day: ServerDay, ts_ns: int) -> tuple[datetime, int, int]:
    """The server day holding ``ts_ns``: its local start (naive), start and end in UTC ns."""
    zone = _zone(day.timezone)
    starts = time(int(day.starts_at[:2]), int(day.starts_at[3:]))
    local = utc_datetime(ts_ns).astimezone(zone)
    start = datetime.combine(local.date(), starts)
    if _ns(start.replace(tzinfo=zone)) > ts_ns:
        start -= timedelta(days=1)
    # Wall-clock arithmetic on the naive time, then localised: a day across a DST change is
    # 23 or 25 hours long, as the server's clock says.
    end = start + timedelta(days=1)
    return start, _ns(start.replace(tzinfo=zone)), _ns(end.replace(tzinfo=zone))


def bucket_of(
    timeframe: Timeframe, ts_ns: int, server_day: ServerDay = NEW_YORK_CLOSE
) -> tuple[int, int]:
    """``(open_time_ns, close_time_ns)`` of the candle holding ``ts_ns``; the end is exclusive.

    1m, 5m, 15m and 1h align on the UTC clock. 1d is the server day; 4h candles start at
    the server day's start plus 0, 4, ... 20 wall-clock hours, so across a DST change one of
    them is 3 or 5 hours long and the day still holds six.
    """
    size = _UTC_ALIGNED_NS.get(timeframe)
    if size is not None:
        start = ts_ns - ts_ns % size
        return start, start + size
    local_start, day_start, day_end = _server_day_bounds(server_day, ts_ns)
    if timeframe is Timeframe.D1:
        return day_start, day_end
    zone = _zone(server_day.timezone)
    # Every IANA zone moves its clock by less than 4 hours at a time, so these stay in order
    # (tests tile every zone's days with them).
    bounds = [day_start]
    bounds.extend(
        _ns((local_start + timedelta(hours=hours)).replace(tzinfo=zone))
        for hours in (4, 8, 12, 16, 20)
    )
    bounds.append(day_end)
    for start, end in itertools.pairwise(bounds):
        if start <= ts_ns < end:
            return start, end
    raise AssertionError("a server day's 4h buckets cover the day")  # pragma: no cover


class _Forming(msgspec.Struct, kw_only=True):
    open_time_ns: int
    close_time_ns: int
    open: float
    high: float
    low: float
    close: float
    ticks: int


class CandleBuilder:
    """Builds one (symbol, timeframe) series of candles from quotes, on the bid.

    Bid, because MetaTrader charts and the shipped bar files are bid prices. A candle is
    emitted once, when a quote of a later bucket arrives or when :meth:`close_due` is called
    at or after its end (a timer calls it, so a quiet market still closes its candle). A
    bucket with no quotes produces no candle. A quote older than the last one, or an exact
    repeat of it, is ignored and counted in ``stale_quotes``; one that arrives after its
    candle was closed is counted in ``late_quotes``: a closed candle is never rewritten.
    """

    def __init__(
        self, symbol: str, timeframe: Timeframe, server_day: ServerDay = NEW_YORK_CLOSE
    ) -> None:
        _zone(server_day.timezone)  # fail at construction, not on the first quote
        self.symbol = symbol
        self.timeframe = Timeframe(timeframe)
        self.server_day = server_day
        self.stale_quotes = 0
        self.late_quotes = 0
        self.invalid_quotes = 0
        self._forming: _Forming | None = None
        self._closed_until_ns = 0
        self._last: tuple[int, float, float] | None = None

    def on_quote(self, quote: Quote) -> Candle | None:
        """Take one quote; returns the candle it closed, if it opened a later bucket."""
        if quote.symbol != self.symbol:
            raise CandleError(f"a {self.symbol} candle builder was fed a {quote.symbol} quote")
        ts, bid = quote.ts_ns, quote.bid
        if not (math.isfinite(bid) and bid > 0):
            self.invalid_quotes += 1
            return None
        last = self._last
        if last is not None and (ts < last[0] or (ts, bid, quote.ask) == last):
            self.stale_quotes += 1
            return None
        if ts < self._closed_until_ns:
            self.late_quotes += 1
            return None
        self._last = (ts, bid, quote.ask)
        forming = self._forming
        closed = None
        if forming is not None and ts >= forming.close_time_ns:
            closed = self._close()
            forming = None
        if forming is None:
            start, end = bucket_of(self.timeframe, ts, self.server_day)
            self._forming = _Forming(
                open_time_ns=start, close_time_ns=end, open=bid, high=bid, low=bid, close=bid,
                ticks=1,
            )  # fmt: skip
        else:
            if bid > forming.high:
                forming.high = bid
            elif bid < forming.low:
                forming.low = bid
            forming.close = bid
            forming.ticks += 1
        return closed

    def close_due(self, now_ns: int) -> Candle | None:
        """The forming candle, closed, when ``now_ns`` has reached its end; else ``None``."""
        if self._forming is None or now_ns < self._forming.close_time_ns:
            return None
        return self._close()

    @property
    def forming_close_time_ns(self) -> int | None:
        """When the forming candle is due to close (for the timer), or ``None``."""
        return None if self._forming is None else self._forming.close_time_ns

    def _close(self) -> Candle:
        forming = self._forming
        assert forming is not None
        self._forming = None
        self._closed_until_ns = forming.close_time_ns
        return Candle(
            symbol=self.symbol,
            timeframe=self.timeframe,
            open_time_ns=forming.open_time_ns,
            close_time_ns=forming.close_time_ns,
            open=forming.open,
            high=forming.high,
            low=forming.low,
            close=forming.close,
            ticks=forming.ticks,
        )


def build_candles(
    quotes: Iterable[Quote],
    timeframe: Timeframe,
    *,
    symbol: str,
    server_day: ServerDay = NEW_YORK_CLOSE,
    until_ns: int | None = None,
) -> list[Candle]:
    """Every candle the quotes close, in order; ``until_ns`` also closes the last one if due."""
    builder = CandleBuilder(symbol, timeframe, server_day)
    candles = [c for q in quotes if (c := builder.on_quote(q)) is not None]
    if until_ns is not None and (last := builder.close_due(until_ns)) is not None:
        candles.append(last)
    return candles
