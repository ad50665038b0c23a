"""The weekly billing window across the 2026 and 2027 clock changes: 120 h, 47/49 h gaps, runs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.billing.windows import (
    completed_windows_since,
    last_completed_window,
    next_run_at,
    window_by_id,
    window_containing,
    window_ending_at,
)

HOUR_NS = 3600 * 10**9
BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> int:
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def berlin(text: str) -> int:
    moment = datetime.fromisoformat(text).replace(tzinfo=BERLIN)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


#: (Friday before the change, Friday after it, gap hours, UTC hour of the run before, after).
CLOCK_CHANGES = [
    pytest.param(date(2026, 3, 27), date(2026, 4, 3), 47, 22, 21, id="2026-03 spring forward"),
    pytest.param(date(2026, 10, 23), date(2026, 10, 30), 49, 21, 22, id="2026-10 fall back"),
    pytest.param(date(2027, 3, 26), date(2027, 4, 2), 47, 22, 21, id="2027-03 spring forward"),
    pytest.param(date(2027, 10, 29), date(2027, 11, 5), 49, 21, 22, id="2027-10 fall back"),
]


@pytest.mark.parametrize(("before", "after", "gap_hours", "run_before", "run_after"), CLOCK_CHANGES)
def test_windows_around_a_clock_change_are_120_hours_and_the_gap_absorbs_it(
    before: date, after: date, gap_hours: int, run_before: int, run_after: int
) -> None:
    first, second = window_ending_at(before), window_ending_at(after)
    for window in (first, second):
        assert window.end_ns - window.start_ns == 120 * HOUR_NS
        assert (window.start.weekday(), window.start.hour, window.start.minute) == (6, 23, 0)
        assert (window.end.weekday(), window.end.hour, window.end.minute) == (4, 23, 0)
    assert second.start_ns - first.end_ns == gap_hours * HOUR_NS
    # The run fires at the window's end: 21:00 UTC in summer (CEST), 22:00 UTC in winter (CET).
    for window, hour in ((first, run_before), (second, run_after)):
        run = datetime.fromtimestamp(window.end_ns // 10**9, tz=UTC)
        assert (run.weekday(), run.hour, run.minute) == (4, hour, 0)


@pytest.mark.parametrize(
    ("change_utc", "window_before", "window_after"),
    [
        ("2026-03-29T01:00", "2026-W13", "2026-W14"),
        ("2026-10-25T01:00", "2026-W43", "2026-W44"),
        ("2027-03-28T01:00", "2027-W12", "2027-W13"),
        ("2027-10-31T01:00", "2027-W43", "2027-W44"),
    ],
)
def test_the_clock_change_itself_is_in_no_window(
    change_utc: str, window_before: str, window_after: str
) -> None:
    change = utc(change_utc)
    assert window_containing(change) is None
    assert last_completed_window(change).window_id == window_before
    assert window_containing(change + 24 * HOUR_NS) is not None  # Monday 02:00 or 03:00 local
    assert window_containing(change + 24 * HOUR_NS).window_id == window_after  # type: ignore[union-attr]


def test_runs_fire_at_21_utc_in_summer_and_22_utc_in_winter() -> None:
    assert next_run_at(utc("2026-07-15T12:00")) == utc("2026-07-17T21:00")
    assert next_run_at(utc("2026-01-14T12:00")) == utc("2026-01-16T22:00")
    # Across the change: Wednesday before the spring change runs Friday 22:00 UTC, the
    # Wednesday after runs Friday 21:00 UTC.
    assert next_run_at(utc("2026-03-25T12:00")) == utc("2026-03-27T22:00")
    assert next_run_at(utc("2026-04-01T12:00")) == utc("2026-04-03T21:00")


def test_a_boundary_instant_belongs_to_exactly_one_window() -> None:
    window = window_ending_at(date(2026, 3, 27))
    assert window_containing(window.start_ns) == window
    assert window_containing(window.start_ns - 1) is None
    assert window_containing(window.end_ns - 1) == window
    assert window_containing(window.end_ns) is None  # the end opens the weekend gap
    following = window_ending_at(date(2026, 4, 3))
    assert window_containing(following.start_ns) == following
    assert window_containing(following.start_ns - 1) is None


def test_at_the_run_instant_the_window_just_ended_is_the_one_charged() -> None:
    window = window_ending_at(date(2026, 10, 30))
    assert last_completed_window(window.end_ns) == window
    assert last_completed_window(window.end_ns - 1).window_id == "2026-W43"
    assert next_run_at(window.end_ns - 1) == window.end_ns
    assert next_run_at(window.end_ns) == window_ending_at(date(2026, 11, 6)).end_ns


@pytest.mark.parametrize(
    "late_run",
    ["2026-03-28T09:00", "2026-03-29T23:30", "2026-04-01T12:00", "2026-04-03T20:59"],
)
def test_a_missed_friday_is_caught_up_with_the_window_that_ended_then(late_run: str) -> None:
    # The job was down on Friday 2026-03-27 (22:00 UTC); whenever it comes back before the next
    # Friday's run, it charges 2026-W13, under the same idempotency key as an on-time run.
    assert last_completed_window(utc(late_run)).window_id == "2026-W13"
    assert completed_windows_since("2026-W12", utc(late_run)) == [window_by_id("2026-W13")]
    assert completed_windows_since("2026-W13", utc(late_run)) == []


def test_several_missed_fridays_are_all_due_oldest_first_across_a_year_end() -> None:
    due = completed_windows_since("2026-W51", utc("2027-01-10T12:00"))
    assert [w.window_id for w in due] == ["2026-W52", "2026-W53", "2027-W01"]
    assert completed_windows_since(None, utc("2027-01-10T12:00")) == [window_by_id("2027-W01")]


def test_window_ids_name_the_iso_week_of_the_friday_and_parse_back() -> None:
    window = window_ending_at(date(2027, 1, 1))  # a Friday in ISO week 2026-W53
    assert window.window_id == "2026-W53"
    assert window.start.date() == date(2026, 12, 27)
    assert window_by_id("2026-W53") == window
    with pytest.raises(ValueError, match="Friday"):
        window_ending_at(date(2026, 3, 28))
    with pytest.raises(ValueError):
        window_by_id("2026-13")
    with pytest.raises(ValueError):
        window_by_id("2025-W53")  # 2025 has 52 ISO weeks


def test_a_week_in_berlin_is_sunday_23_00_to_friday_23_00_local() -> None:
    window = window_containing(berlin("2026-07-15T12:00"))
    assert window is not None
    assert window.start_ns == berlin("2026-07-12T23:00")
    assert window.end_ns == berlin("2026-07-17T23:00")
    assert window_containing(berlin("2026-07-18T12:00")) is None  # Saturday
    assert window_containing(berlin("2026-07-19T22:59")) is None  # Sunday before the open


@given(st.integers(utc("2024-01-01T00:00"), utc("2035-12-31T00:00")))
def test_every_instant_is_in_at_most_one_window_and_windows_are_120_hours(ts_ns: int) -> None:
    window = window_containing(ts_ns)
    completed = last_completed_window(ts_ns)
    assert completed.end_ns <= ts_ns
    assert next_run_at(ts_ns) > ts_ns
    # Consecutive runs are a week apart in local time: 168 hours, or 167/169 across a change.
    assert next_run_at(ts_ns) - completed.end_ns in {h * HOUR_NS for h in (167, 168, 169)}
    if window is None:
        # In the weekend gap: the last window ended, the next has not started.
        assert next_run_at(ts_ns) - ts_ns > 120 * HOUR_NS
    else:
        assert window.end_ns - window.start_ns == 120 * HOUR_NS
        assert window.start_ns <= ts_ns < window.end_ns
        assert window.end_ns == next_run_at(ts_ns)
        assert window_containing(window.start_ns - 1) is None
        assert window_by_id(window.window_id) == window
