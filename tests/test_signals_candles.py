"""Candles from quotes: the shipped XAUUSD bars re-aggregated, server-day alignment, DST, order."""

from __future__ import annotations

import itertools
import zoneinfo
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.paper.prices import Bar, bar_to_ticks, load_bars
from engine.signals.candles import (
    NEW_YORK_CLOSE,
    Candle,
    CandleBuilder,
    ServerDay,
    Timeframe,
    bucket_of,
    build_candles,
)
from engine.signals.errors import CandleError
from schemas.market import Quote

MINUTE = 60_000_000_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
UTC_DAY = ServerDay(timezone="UTC", starts_at="00:00")
ATHENS = ServerDay(timezone="Europe/Athens", starts_at="00:00")


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp()) * 1_000_000_000


def quote(ts_ns: int, bid: float, symbol: str = "XAUUSD") -> Quote:
    return Quote(symbol=symbol, bid=bid, ask=bid + 0.2, ts_ns=ts_ns)


@pytest.fixture(scope="module")
def bars() -> list[Bar]:
    return load_bars()


@pytest.fixture(scope="module")
def quotes(bars: list[Bar]) -> list[Quote]:
    """Each bar replayed as the paper venue replays it: open, the nearer extreme, the other
    extreme, close, at 0, 15, 30 and 45 s into the minute."""
    return [q for bar in bars for q in bar_to_ticks(bar, "XAUUSD")]


def aggregate(bars: list[Bar], key: object) -> list[tuple[float, float, float, float, int]]:
    """OHLC and tick count per group of consecutive bars with the same key, computed here
    without the builder."""
    out = []
    for _, group in itertools.groupby(bars, key=key):  # type: ignore[arg-type]
        members = list(group)
        out.append(
            (
                members[0].open,
                max(b.high for b in members),
                min(b.low for b in members),
                members[-1].close,
                4 * len(members),
            )
        )
    return out


def ohlc(candles: list[Candle]) -> list[tuple[float, float, float, float, int]]:
    return [(c.open, c.high, c.low, c.close, c.ticks) for c in candles]


def test_one_minute_candles_reproduce_the_shipped_bars(
    bars: list[Bar], quotes: list[Quote]
) -> None:
    candles = build_candles(quotes, Timeframe.M1, symbol="XAUUSD", until_ns=bars[-1].ts_ns + MINUTE)
    assert len(candles) == len(bars) == 13_558
    for candle, bar in zip(candles, bars, strict=True):
        assert (candle.open_time_ns, candle.close_time_ns) == (bar.ts_ns, bar.ts_ns + MINUTE)
        assert (candle.open, candle.high, candle.low, candle.close) == (
            bar.open,
            bar.high,
            bar.low,
            bar.close,
        )
        assert candle.ticks == 4


@pytest.mark.parametrize(
    ("timeframe", "size", "count"),
    [
        (Timeframe.M5, 5 * MINUTE, 2_715),
        (Timeframe.M15, 15 * MINUTE, 906),
        (Timeframe.H1, HOUR, 227),
    ],
)
def test_intraday_candles_equal_the_bars_aggregated(
    bars: list[Bar], quotes: list[Quote], timeframe: Timeframe, size: int, count: int
) -> None:
    candles = build_candles(quotes, timeframe, symbol="XAUUSD", until_ns=bars[-1].ts_ns + size)
    assert ohlc(candles) == aggregate(bars, lambda b: b.ts_ns // size)
    assert len(candles) == count
    assert [c.open_time_ns for c in candles] == sorted({b.ts_ns // size * size for b in bars})
    assert all(c.close_time_ns == c.open_time_ns + size for c in candles)


def test_daily_and_four_hour_candles_follow_the_new_york_close(
    bars: list[Bar], quotes: list[Quote]
) -> None:
    # February: New York is UTC-5, so the server day (17:00 New York) starts at 22:00 UTC and
    # its 4h candles at 22, 02, 06, 10, 14 and 18 UTC.
    until = bars[-1].ts_ns + DAY
    daily = build_candles(quotes, Timeframe.D1, symbol="XAUUSD", until_ns=until)
    assert ohlc(daily) == aggregate(bars, lambda b: (b.ts_ns + 2 * HOUR) // DAY)
    # The file's clock is already the broker's (read as UTC by load_bars), so shifting it by
    # New York's close leaves each Friday's last two hours a day of their own: 10 + 2. Data
    # stamped in server time wants ServerDay("UTC"), as the next test shows.
    assert len(daily) == 12
    stubs = [c for c in daily if c.open_time_ns % (7 * DAY) == 1 * DAY + 22 * HOUR]
    assert [c.ticks for c in stubs] == [4 * 118, 4 * 118]
    assert all(c.open_time_ns % DAY == 22 * HOUR for c in daily)
    assert all(c.close_time_ns - c.open_time_ns == DAY for c in daily)
    four_hour = build_candles(quotes, Timeframe.H4, symbol="XAUUSD", until_ns=until)
    assert ohlc(four_hour) == aggregate(bars, lambda b: (b.ts_ns + 2 * HOUR) // (4 * HOUR))
    assert len(four_hour) == 61


def test_a_utc_server_day_groups_by_calendar_date(bars: list[Bar], quotes: list[Quote]) -> None:
    daily = build_candles(
        quotes, Timeframe.D1, symbol="XAUUSD", server_day=UTC_DAY, until_ns=bars[-1].ts_ns + DAY
    )
    assert ohlc(daily) == aggregate(bars, lambda b: b.ts_ns // DAY)
    assert [datetime.fromtimestamp(c.open_time_ns / 1e9, UTC).day for c in daily] == [
        16, 17, 18, 19, 20, 23, 24, 25, 26, 27,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("server_day", "inside", "start", "hours"),
    [
        # Athens springs forward at 03:00 local on 29 March: a 23-hour day.
        (ATHENS, "2026-03-29T12:00:00Z", "2026-03-28T22:00:00Z", 23),
        # ...and falls back at 04:00 local on 25 October: a 25-hour day.
        (ATHENS, "2026-10-25T12:00:00Z", "2026-10-24T21:00:00Z", 25),
        # New York changes on 8 March and 1 November; the server day still starts at 17:00.
        (NEW_YORK_CLOSE, "2026-03-08T12:00:00Z", "2026-03-07T22:00:00Z", 23),
        (NEW_YORK_CLOSE, "2026-03-09T12:00:00Z", "2026-03-08T21:00:00Z", 24),
        (NEW_YORK_CLOSE, "2026-11-01T12:00:00Z", "2026-10-31T21:00:00Z", 25),
        (NEW_YORK_CLOSE, "2026-11-02T12:00:00Z", "2026-11-01T22:00:00Z", 24),
    ],
)
def test_daily_candles_span_the_server_day_across_dst(
    server_day: ServerDay, inside: str, start: str, hours: int
) -> None:
    assert bucket_of(Timeframe.D1, ns(inside), server_day) == (ns(start), ns(start) + hours * HOUR)


def test_four_hour_candles_keep_six_per_day_across_dst() -> None:
    def day_of_buckets(first: str) -> list[tuple[int, int]]:
        buckets, ts = [], ns(first)
        for _ in range(6):
            buckets.append(bucket_of(Timeframe.H4, ts, ATHENS))
            ts = buckets[-1][1]
        return buckets

    spring = day_of_buckets("2026-03-28T22:00:00Z")
    assert [(end - start) // HOUR for start, end in spring] == [3, 4, 4, 4, 4, 4]
    assert spring[-1][1] == ns("2026-03-29T21:00:00Z")  # the next server midnight
    autumn = day_of_buckets("2026-10-24T21:00:00Z")
    assert [(end - start) // HOUR for start, end in autumn] == [5, 4, 4, 4, 4, 4]
    assert autumn[-1][1] == ns("2026-10-25T22:00:00Z")


def test_the_repeated_hour_of_a_fall_back_makes_two_hourly_candles() -> None:
    # 03:00-04:00 happens twice in Athens on 25 October (00:00Z and 01:00Z).
    builder = CandleBuilder("XAUUSD", Timeframe.H1, ATHENS)
    first = ns("2026-10-25T00:30:00Z")
    assert builder.on_quote(quote(first, 1.0)) is None
    closed = builder.on_quote(quote(first + HOUR, 2.0))
    assert closed is not None and closed.close == 1.0
    assert (closed.open_time_ns, closed.close_time_ns) == (first - 30 * MINUTE, first + 30 * MINUTE)


def test_buckets_without_quotes_produce_no_candle() -> None:
    builder = CandleBuilder("XAUUSD", Timeframe.M1)
    start = ns("2026-02-16T10:00:00Z")
    assert builder.on_quote(quote(start + 10 * 10**9, 5000.0)) is None
    closed = builder.on_quote(quote(start + 3 * MINUTE + 20 * 10**9, 5001.0))
    assert closed is not None and closed.open_time_ns == start
    assert builder.forming_close_time_ns == start + 4 * MINUTE
    assert builder.close_due(start + 4 * MINUTE - 1) is None
    last = builder.close_due(start + 4 * MINUTE)
    assert last is not None
    assert (last.open_time_ns, last.open, last.ticks) == (start + 3 * MINUTE, 5001.0, 1)
    assert builder.close_due(start + 10 * MINUTE) is None  # nothing formed since


def test_a_quote_on_the_boundary_opens_the_next_candle() -> None:
    builder = CandleBuilder("XAUUSD", Timeframe.M5)
    start = ns("2026-02-16T10:00:00Z")
    builder.on_quote(quote(start, 1.0))
    builder.on_quote(quote(start + 5 * MINUTE - 1, 2.0))
    closed = builder.on_quote(quote(start + 5 * MINUTE, 3.0))
    assert closed is not None and (closed.open, closed.high, closed.close) == (1.0, 2.0, 2.0)


def test_older_and_repeated_quotes_are_ignored_and_counted() -> None:
    builder = CandleBuilder("XAUUSD", Timeframe.M1)
    start = ns("2026-02-16T10:00:00Z")
    builder.on_quote(quote(start + 20 * 10**9, 10.0))
    builder.on_quote(quote(start + 10 * 10**9, 99.0))  # older than the last
    builder.on_quote(quote(start + 20 * 10**9, 10.0))  # the same quote again
    builder.on_quote(quote(start + 20 * 10**9, 11.0))  # same instant, new price: a real tick
    assert builder.stale_quotes == 2
    candle = builder.close_due(start + MINUTE)
    assert candle is not None
    assert (candle.open, candle.high, candle.low, candle.close, candle.ticks) == (
        10.0,
        11.0,
        10.0,
        11.0,
        2,
    )


def test_a_closed_candle_is_never_rewritten_by_a_late_quote() -> None:
    builder = CandleBuilder("XAUUSD", Timeframe.M1)
    start = ns("2026-02-16T10:00:00Z")
    builder.on_quote(quote(start + 50 * 10**9, 10.0))
    closed = builder.close_due(start + MINUTE + 5)
    assert closed is not None
    # The quote was stamped inside the closed minute but arrived after the timer closed it.
    assert builder.on_quote(quote(start + 55 * 10**9, 50.0)) is None
    assert builder.late_quotes == 1
    assert builder.forming_close_time_ns is None
    builder.on_quote(quote(start + MINUTE + 1, 12.0))
    next_candle = builder.close_due(start + 2 * MINUTE)
    assert next_candle is not None
    assert (next_candle.open_time_ns, next_candle.open, next_candle.high) == (
        start + MINUTE,
        12.0,
        12.0,
    )


def test_a_quote_without_a_usable_bid_is_counted_not_used() -> None:
    builder = CandleBuilder("XAUUSD", Timeframe.M1)
    start = ns("2026-02-16T10:00:00Z")
    builder.on_quote(quote(start, 10.0))
    builder.on_quote(quote(start + 1, float("nan")))
    builder.on_quote(quote(start + 2, 0.0))
    candle = builder.close_due(start + MINUTE)
    assert builder.invalid_quotes == 2
    assert candle is not None and (candle.low, candle.ticks) == (10.0, 1)


def test_another_symbols_quote_is_refused() -> None:
    builder = CandleBuilder("XAUUSD", Timeframe.M1)
    with pytest.raises(CandleError, match="XAGUSD"):
        builder.on_quote(quote(ns("2026-02-16T10:00:00Z"), 30.0, symbol="XAGUSD"))


def test_an_unknown_server_zone_is_refused_at_construction() -> None:
    with pytest.raises(CandleError, match="Mars/Olympus"):
        CandleBuilder("XAUUSD", Timeframe.D1, ServerDay(timezone="Mars/Olympus"))


_timeframes = st.sampled_from(list(Timeframe))


@settings(max_examples=150, deadline=None)
@given(
    _timeframes,
    st.sampled_from([NEW_YORK_CLOSE, ATHENS, UTC_DAY]),
    st.lists(st.tuples(st.integers(0, 3 * HOUR), st.integers(1, 1_000)), min_size=1, max_size=60),
)
def test_candles_equal_an_independent_grouping_of_ordered_quotes(
    timeframe: Timeframe, server_day: ServerDay, steps: list[tuple[int, int]]
) -> None:
    ts = ns("2026-03-27T18:00:00Z")  # a run that may cross the EU and US DST weekends
    stream = []
    for gap, price in steps:
        ts += gap
        stream.append(quote(ts, float(price)))
    candles = build_candles(
        stream, timeframe, symbol="XAUUSD", server_day=server_day, until_ns=ts + 2 * DAY
    )
    expected = []
    for (start, end), group in itertools.groupby(
        stream, key=lambda q: bucket_of(timeframe, q.ts_ns, server_day)
    ):
        bids = []
        for q in group:
            # Consecutive repeats of one quote are dropped, as the builder does.
            if not bids or (q.ts_ns, q.bid) != bids[-1]:
                bids.append((q.ts_ns, q.bid))
        prices = [p for _, p in bids]
        expected.append((start, end, prices[0], max(prices), min(prices), prices[-1], len(prices)))
    got = [
        (c.open_time_ns, c.close_time_ns, c.open, c.high, c.low, c.close, c.ticks) for c in candles
    ]
    assert got == expected
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(got))


_ZONES = sorted(zoneinfo.available_timezones())


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(_ZONES),
    st.integers(0, 23),
    st.sampled_from([0, 30]),
    st.integers(ns("2010-01-01T00:00:00Z"), ns("2030-12-31T00:00:00Z")),
    st.sampled_from([Timeframe.H4, Timeframe.D1]),
)
def test_server_day_buckets_tile_time_in_every_zone(
    zone: str, hour: int, minute: int, ts: int, timeframe: Timeframe
) -> None:
    server_day = ServerDay(timezone=zone, starts_at=f"{hour:02d}:{minute:02d}")
    start, end = bucket_of(timeframe, ts, server_day)
    assert start <= ts < end
    # Contiguous: the next candle starts where this one ends, the previous ends where it starts.
    assert bucket_of(timeframe, end, server_day)[0] == end
    assert bucket_of(timeframe, start - 1, server_day)[1] == start
    day_start, day_end = bucket_of(Timeframe.D1, ts, server_day)
    assert day_start <= start < end <= day_end
    assert 20 * HOUR <= day_end - day_start <= 28 * HOUR
