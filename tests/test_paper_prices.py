"""Paper venue prices: the shipped MT5 bars, bar-to-tick paths and paced replay."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.paper.prices import (
    DEFAULT_BARS_PATH,
    Bar,
    PriceFileError,
    PriceReplay,
    Quote,
    bar_to_ticks,
    load_bars,
)

HEADER = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
GOOD_LINE = "2026.02.16\t02:07:00\t5010.50\t5014.78\t5010.50\t5014.77\t271\t0\t19"
SECOND = 1_000_000_000


@pytest.fixture(scope="module")
def bars() -> list[Bar]:
    return load_bars()


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * SECOND


class FakeClock:
    """Monotonic time that only moves when the replay sleeps: pacing without real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


async def collect(replay: PriceReplay, limit: int | None = None) -> list[Quote]:
    quotes = []
    async for quote in replay.quotes():
        quotes.append(quote)
        if limit is not None and len(quotes) == limit:
            break
    return quotes


# ----------------------------------------------------------------------------- loading


def test_shipped_file_holds_13558_bars_in_time_order(bars: list[Bar]) -> None:
    assert len(bars) == 13_558
    assert all(a.ts_ns < b.ts_ns for a, b in itertools.pairwise(bars))


def test_shipped_file_is_the_unaltered_export() -> None:
    digest = hashlib.sha256(DEFAULT_BARS_PATH.read_bytes()).hexdigest()
    assert digest == "325a9c99276441cb2099609d362c4992d5cf9e690d4fb351d849c704aed323ae"
    readme = (DEFAULT_BARS_PATH.parent / "README.md").read_text()
    assert "ade7390e7d72f89ccfc4926975105d0b55c40e57" in readme


def test_first_bar_matches_the_first_data_line(bars: list[Bar]) -> None:
    # 2026.02.16 02:07:00  5010.50 5014.78 5010.50 5014.77  271 0 19
    assert bars[0] == Bar(
        ts_ns=ns("2026-02-16T02:07:00"),
        open=5010.50,
        high=5014.78,
        low=5010.50,
        close=5014.77,
        spread_points=19,
        tick_volume=271,
    )


def test_last_bar_matches_the_last_data_line(bars: list[Bar]) -> None:
    # 2026.02.27 23:57:00  5279.41 5279.42 5277.87 5278.17  76 0 144
    assert bars[-1].ts_ns == ns("2026-02-27T23:57:00")
    assert (bars[-1].open, bars[-1].close, bars[-1].spread_points) == (5279.41, 5278.17, 144)


def test_bar_times_are_read_as_utc(bars: list[Bar]) -> None:
    stamp = datetime.fromtimestamp(bars[0].ts_ns / SECOND, tz=UTC)
    assert (stamp.hour, stamp.minute) == (2, 7)


def write_bars(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text("\r\n".join([header, *lines]) + "\r\n")
    return path


def test_a_hand_written_file_loads(tmp_path: Path) -> None:
    second = "2026.02.16\t02:08:00\t5014.77\t5016.59\t5013.07\t5014.44\t407\t0\t19"
    loaded = load_bars(write_bars(tmp_path, GOOD_LINE, second, ""))
    assert [bar.close for bar in loaded] == [5014.77, 5014.44]


@pytest.mark.parametrize(
    ("bad_line", "words"),
    [
        ("2026.02.16\t02:08:00\t5014.77\tabc\t5013.07\t5014.44\t407\t0\t19", "bad number"),
        ("2026.02.16\t02:08:00\t5014.77\t5016.59\t5013.07", "fields"),
        ("2026.13.16\t02:08:00\t5014.77\t5016.59\t5013.07\t5014.44\t407\t0\t19", "date/time"),
        ("2026.02.16\t02:08:00\t5014.77\t5010.00\t5013.07\t5014.44\t407\t0\t19", "high/low"),
        ("2026.02.16\t02:08:00\t5014.77\t5016.59\t5013.07\t5014.44\t407\t0\t-1", "negative"),
        ("2026.02.16\t02:07:00\t5014.77\t5016.59\t5013.07\t5014.44\t407\t0\t19", "previous"),
        ("2026.02.16\t02:08:00\tnan\t5016.59\t5013.07\t5014.44\t407\t0\t19", "finite"),
    ],
)
def test_malformed_line_raises_price_file_error_naming_its_line(
    tmp_path: Path, bad_line: str, words: str
) -> None:
    path = write_bars(tmp_path, GOOD_LINE, bad_line)
    with pytest.raises(PriceFileError) as caught:
        load_bars(path)
    assert caught.value.line_no == 3
    assert caught.value.path == path
    assert words in caught.value.reason
    assert f"{path}:3:" in str(caught.value)


def test_wrong_header_is_line_one(tmp_path: Path) -> None:
    path = write_bars(tmp_path, GOOD_LINE, header="date,time,open,high,low,close")
    with pytest.raises(PriceFileError) as caught:
        load_bars(path)
    assert caught.value.line_no == 1


# ------------------------------------------------------------------------ tick paths


def test_up_bar_walks_open_low_high_close(bars: list[Bar]) -> None:
    up = next(b for b in bars if b.close > b.open and b.low < b.open)
    quotes = bar_to_ticks(up, "XAUUSD")
    assert [q.bid for q in quotes] == [up.open, up.low, up.high, up.close]


def test_down_bar_walks_open_high_low_close(bars: list[Bar]) -> None:
    # 2026.02.16 02:10:00  5015.62 5016.40 5013.31 5013.34: closed down.
    down = bars[3]
    assert down.close < down.open
    quotes = bar_to_ticks(down, "XAUUSD")
    assert [q.bid for q in quotes] == [5015.62, 5016.40, 5013.31, 5013.34]


def test_ticks_fall_at_0_15_30_45_seconds(bars: list[Bar]) -> None:
    quotes = bar_to_ticks(bars[0], "XAUUSD")
    assert [q.ts_ns - bars[0].ts_ns for q in quotes] == [0, 15 * SECOND, 30 * SECOND, 45 * SECOND]
    assert {q.symbol for q in quotes} == {"XAUUSD"}


def test_ask_minus_bid_is_the_bar_spread(bars: list[Bar]) -> None:
    for bar in bars[::97]:
        for quote in bar_to_ticks(bar, "XAUUSD"):
            assert round((quote.ask - quote.bid) / 0.01) == bar.spread_points
            assert quote.ask == round(quote.ask, 2)


def test_steps_per_leg_adds_evenly_spaced_prices_along_each_leg(bars: list[Bar]) -> None:
    bar = bars[3]
    quotes = bar_to_ticks(bar, "XAUUSD", steps_per_leg=3)
    bids = [q.bid for q in quotes]
    assert len(quotes) == 10
    assert bids[0::3] == [bar.open, bar.high, bar.low, bar.close]
    assert bids[1] == round(bar.open + (bar.high - bar.open) / 3, 2)
    # Each leg moves one way only: the path is continuous, not a jump.
    assert bids[0] <= bids[1] <= bids[2] <= bids[3] >= bids[4] >= bids[5] >= bids[6]
    stamps = [q.ts_ns for q in quotes]
    assert stamps == sorted(set(stamps))
    assert stamps[-1] < bar.ts_ns + 60 * SECOND


def test_bar_to_ticks_is_deterministic(bars: list[Bar]) -> None:
    first = [bar_to_ticks(bar, "XAUUSD", steps_per_leg=2) for bar in bars[:200]]
    second = [bar_to_ticks(bar, "XAUUSD", steps_per_leg=2) for bar in bars[:200]]
    assert first == second


def test_steps_per_leg_below_one_is_refused(bars: list[Bar]) -> None:
    with pytest.raises(ValueError):
        bar_to_ticks(bars[0], "XAUUSD", steps_per_leg=0)


# --------------------------------------------------------------------------- replay


async def test_replay_at_speed_zero_yields_every_quote_in_order(bars: list[Bar]) -> None:
    window = bars[:50]
    quotes = await collect(PriceReplay(window, speed=0))
    expected = [q for bar in window for q in bar_to_ticks(bar, "XAUUSD")]
    assert quotes == expected


async def test_replay_starts_at_the_given_bar_and_tracks_its_position(bars: list[Bar]) -> None:
    replay = PriceReplay(bars[:30], speed=0, start=10)
    quotes = await collect(replay)
    assert quotes[0] == bar_to_ticks(bars[10], "XAUUSD")[0]
    assert len(quotes) == 20 * 4
    assert replay.bar_index == 29


async def test_paced_replay_lets_other_tasks_run_between_quotes(bars: list[Bar]) -> None:
    order: list[str] = []

    async def consume() -> None:
        async for quote in PriceReplay(bars[:3], speed=6_000.0).quotes():
            order.append(f"quote:{quote.ts_ns}")

    async def ticker() -> None:
        for _ in range(3):
            order.append("other")
            await asyncio.sleep(0)

    await asyncio.gather(consume(), ticker())
    quotes = [entry for entry in order if entry.startswith("quote:")]
    expected = [f"quote:{q.ts_ns}" for bar in bars[:3] for q in bar_to_ticks(bar, "XAUUSD")]
    assert quotes == expected
    # The other task got its turns before the replay finished, not after.
    assert order.index("other") < order.index(expected[-1])


async def test_replay_paces_each_quote_at_its_offset_over_speed(bars: list[Bar]) -> None:
    clock = FakeClock()
    replay = PriceReplay(bars[:10], speed=60.0, clock=clock, sleep=clock.sleep)
    quotes = await collect(replay)
    assert len(quotes) == 40
    # The last quote is 9 bars + 45 s into the replay: 585 s of market time at 60x.
    assert clock.now - 1000.0 == pytest.approx(585 / 60)


async def test_gaps_between_bars_cost_one_bar_of_replay_time(bars: list[Bar]) -> None:
    # Bars 1148 and 1149 sit 225 minutes apart (a session break).
    window = bars[1147:1151]
    compressed, full = FakeClock(), FakeClock()
    await collect(PriceReplay(window, speed=60.0, clock=compressed, sleep=compressed.sleep))
    await collect(
        PriceReplay(window, speed=60.0, clock=full, sleep=full.sleep, compress_gaps=False)
    )
    assert compressed.now - 1000.0 == pytest.approx((3 * 60 + 45) / 60)
    assert full.now - compressed.now == pytest.approx((225 - 1) * 60 / 60)


async def test_loop_starts_over_with_timestamps_still_rising(bars: list[Bar]) -> None:
    window = bars[:3]
    quotes = await collect(PriceReplay(window, speed=0, loop=True), limit=30)
    stamps = [q.ts_ns for q in quotes]
    assert stamps == sorted(set(stamps))
    assert [q.bid for q in quotes[12:24]] == [q.bid for q in quotes[:12]]
    assert quotes[12].ts_ns - quotes[0].ts_ns == 3 * 60 * SECOND


async def test_without_loop_the_replay_ends(bars: list[Bar]) -> None:
    assert len(await collect(PriceReplay(bars[:2], speed=0))) == 8


async def test_wall_clock_stamping_replaces_file_times(bars: list[Bar]) -> None:
    before = time.time_ns()
    quotes = await collect(PriceReplay(bars[:2], speed=0, stamp_wall_clock=True))
    after = time.time_ns()
    assert all(before <= q.ts_ns <= after for q in quotes)
    assert [q.bid for q in quotes] == [q.bid for b in bars[:2] for q in bar_to_ticks(b, "XAUUSD")]
