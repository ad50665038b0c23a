"""Calendar rules: the trading day in Europe/Berlin and trading-hours windows, DST-safe."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from schemas.links import TradingHours

BERLIN = ZoneInfo("Europe/Berlin")


def utc_datetime(ts_ns: int) -> datetime:
    """Truncated to the microsecond (a float division would round up across boundaries)."""
    seconds, remainder = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=remainder // 1000)


def trading_day(ts_ns: int, tz: ZoneInfo = BERLIN) -> str:
    """The calendar date at ``ts_ns`` in ``tz`` (ISO ``YYYY-MM-DD``).

    zoneinfo applies the offset in force at that instant, so days are 23 or 25 hours long
    across DST changes and no trade is counted on the wrong day.
    """
    # Every UTC offset in use is a whole number of minutes, so the date is constant within
    # a UTC minute: cache by minute (the hot path asks once per follower per event).
    return _trading_day_of_minute(ts_ns // _MINUTE_NS, tz)


_MINUTE_NS = 60_000_000_000


@lru_cache(maxsize=1024)
def _trading_day_of_minute(minute: int, tz: ZoneInfo) -> str:
    return utc_datetime(minute * _MINUTE_NS).astimezone(tz).date().isoformat()


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _minutes(hhmm: str) -> int:
    return int(hhmm[:2]) * 60 + int(hhmm[3:5])


def within_trading_hours(hours: TradingHours, ts_ns: int) -> bool:
    """True when local wall-clock time at ``ts_ns`` falls inside the window.

    The window is ``[start, end)``; ``end <= start`` spans midnight, and then the weekday
    that counts is the one the window started on.
    """
    local = utc_datetime(ts_ns).astimezone(_zone(hours.timezone))
    now = local.hour * 60 + local.minute
    start, end = _minutes(hours.start), _minutes(hours.end)
    weekday = local.isoweekday()
    if start < end:
        return start <= now < end and weekday in hours.days
    if now >= start:
        return weekday in hours.days
    if now < end:
        previous = 7 if weekday == 1 else weekday - 1
        return previous in hours.days
    return False
