"""Calendar rules: the Europe/Berlin trading day and trading-hours windows, across DST."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from engine.core.calendar import trading_day, within_trading_hours
from schemas.links import TradingHours

WEEKDAYS = [1, 2, 3, 4, 5]


def ns(text: str, tz: str = "UTC") -> int:
    """``YYYY-MM-DDTHH:MM[:SS]`` wall-clock time in ``tz`` as UTC nanoseconds."""
    local = datetime.fromisoformat(text).replace(tzinfo=UTC if tz == "UTC" else ZoneInfo(tz))
    return int(local.timestamp()) * 1_000_000_000


def berlin(text: str) -> int:
    return ns(text, "Europe/Berlin")


# --- trading_day --------------------------------------------------------------------------


def test_trading_day_is_iso_berlin_date_at_midday() -> None:
    assert trading_day(ns("2026-01-15T12:00")) == "2026-01-15"


def test_winter_2330_utc_is_already_next_berlin_day() -> None:
    # CET = UTC+1: 23:30 UTC is 00:30 in Berlin.
    assert trading_day(ns("2026-01-15T22:59:59")) == "2026-01-15"
    assert trading_day(ns("2026-01-15T23:00")) == "2026-01-16"
    assert trading_day(ns("2026-01-15T23:30")) == "2026-01-16"


def test_summer_2230_utc_is_already_next_berlin_day() -> None:
    # CEST = UTC+2: 22:30 UTC is 00:30 in Berlin, 21:30 UTC is still 23:30.
    assert trading_day(ns("2026-07-15T21:30")) == "2026-07-15"
    assert trading_day(ns("2026-07-15T21:59:59")) == "2026-07-15"
    assert trading_day(ns("2026-07-15T22:00")) == "2026-07-16"
    assert trading_day(ns("2026-07-15T22:30")) == "2026-07-16"


def test_spring_forward_day_is_23_hours_long() -> None:
    # 2026-03-29 in Berlin runs from 2026-03-28 23:00 UTC (CET) to 2026-03-29 22:00 UTC (CEST).
    assert trading_day(ns("2026-03-28T22:59:59")) == "2026-03-28"
    assert trading_day(ns("2026-03-28T23:00")) == "2026-03-29"
    assert trading_day(ns("2026-03-29T00:59:59")) == "2026-03-29"  # 01:59:59 CET
    assert trading_day(ns("2026-03-29T01:00")) == "2026-03-29"  # 03:00 CEST
    assert trading_day(ns("2026-03-29T21:59:59")) == "2026-03-29"
    assert trading_day(ns("2026-03-29T22:00")) == "2026-03-30"
    assert ns("2026-03-29T22:00") - ns("2026-03-28T23:00") == 23 * 3600 * 10**9


def test_fall_back_day_is_25_hours_long() -> None:
    # 2026-10-25 in Berlin runs from 2026-10-24 22:00 UTC (CEST) to 2026-10-25 23:00 UTC (CET).
    assert trading_day(ns("2026-10-24T21:59:59")) == "2026-10-24"
    assert trading_day(ns("2026-10-24T22:00")) == "2026-10-25"
    assert trading_day(ns("2026-10-25T00:30")) == "2026-10-25"  # 02:30 CEST
    assert trading_day(ns("2026-10-25T01:30")) == "2026-10-25"  # 02:30 CET, again
    assert trading_day(ns("2026-10-25T22:30")) == "2026-10-25"  # 23:30 CET
    assert trading_day(ns("2026-10-25T22:59:59")) == "2026-10-25"
    assert trading_day(ns("2026-10-25T23:00")) == "2026-10-26"


def test_trading_day_accepts_other_zone() -> None:
    assert trading_day(ns("2026-01-15T23:30"), ZoneInfo("UTC")) == "2026-01-15"
    assert trading_day(ns("2026-01-15T15:30"), ZoneInfo("Asia/Tokyo")) == "2026-01-16"


def test_trading_day_is_exact_to_the_nanosecond_at_midnight() -> None:
    midnight = berlin("2026-01-16T00:00")
    assert trading_day(midnight - 1) == "2026-01-15"
    assert trading_day(midnight) == "2026-01-16"


# --- within_trading_hours -----------------------------------------------------------------


def test_normal_window_is_start_inclusive_end_exclusive() -> None:
    hours = TradingHours(start="08:00", end="17:00")
    assert not within_trading_hours(hours, berlin("2026-01-16T07:59"))
    assert within_trading_hours(hours, berlin("2026-01-16T08:00"))
    assert within_trading_hours(hours, berlin("2026-01-16T16:59"))
    assert not within_trading_hours(hours, berlin("2026-01-16T17:00"))
    assert not within_trading_hours(hours, berlin("2026-01-16T23:00"))


def test_window_is_local_berlin_time_in_summer_and_winter() -> None:
    hours = TradingHours(start="08:00", end="17:00")
    # 07:30 UTC is 08:30 CET but 09:30 CEST: inside both; 06:30 UTC is 07:30 CET (outside)
    # and 08:30 CEST (inside).
    assert within_trading_hours(hours, ns("2026-01-16T07:30"))
    assert not within_trading_hours(hours, ns("2026-01-16T06:30"))
    assert within_trading_hours(hours, ns("2026-07-16T06:30"))


def test_days_filter_applies_to_normal_window() -> None:
    hours = TradingHours(start="08:00", end="17:00", days=WEEKDAYS)
    assert within_trading_hours(hours, berlin("2026-01-16T10:00"))  # Friday
    assert not within_trading_hours(hours, berlin("2026-01-17T10:00"))  # Saturday
    assert not within_trading_hours(hours, berlin("2026-01-18T10:00"))  # Sunday
    assert within_trading_hours(hours, berlin("2026-01-19T10:00"))  # Monday


def test_window_spanning_midnight() -> None:
    hours = TradingHours(start="22:00", end="02:00")
    assert not within_trading_hours(hours, berlin("2026-01-16T21:59"))
    assert within_trading_hours(hours, berlin("2026-01-16T22:00"))
    assert within_trading_hours(hours, berlin("2026-01-16T23:59"))
    assert within_trading_hours(hours, berlin("2026-01-17T00:00"))
    assert within_trading_hours(hours, berlin("2026-01-17T01:59"))
    assert not within_trading_hours(hours, berlin("2026-01-17T02:00"))
    assert not within_trading_hours(hours, berlin("2026-01-17T12:00"))


def test_window_spanning_midnight_counts_the_weekday_it_started_on() -> None:
    hours = TradingHours(start="22:00", end="02:00", days=[5])  # Friday nights only
    assert within_trading_hours(hours, berlin("2026-01-16T23:00"))  # Friday
    assert within_trading_hours(hours, berlin("2026-01-17T01:00"))  # Saturday, Friday's session
    assert not within_trading_hours(hours, berlin("2026-01-17T23:00"))  # Saturday's session
    assert not within_trading_hours(hours, berlin("2026-01-16T01:00"))  # Thursday's session


def test_window_spanning_midnight_monday_morning_belongs_to_sunday() -> None:
    sunday_nights = TradingHours(start="22:00", end="02:00", days=[7])
    assert within_trading_hours(sunday_nights, berlin("2026-01-19T01:00"))  # Monday 01:00
    assert not within_trading_hours(sunday_nights, berlin("2026-01-19T23:00"))
    monday_nights = TradingHours(start="22:00", end="02:00", days=[1])
    assert not within_trading_hours(monday_nights, berlin("2026-01-19T01:00"))


def test_non_berlin_timezone_window() -> None:
    hours = TradingHours(start="09:30", end="16:00", timezone="America/New_York", days=WEEKDAYS)
    # EST = UTC-5 in January, EDT = UTC-4 in July.
    assert not within_trading_hours(hours, ns("2026-01-16T14:29"))
    assert within_trading_hours(hours, ns("2026-01-16T14:30"))
    assert not within_trading_hours(hours, ns("2026-01-16T21:00"))
    assert within_trading_hours(hours, ns("2026-07-16T13:30"))
    assert not within_trading_hours(hours, ns("2026-07-16T20:00"))


def test_non_berlin_timezone_uses_that_zone_weekday() -> None:
    # Monday 08:00 in Tokyo is Sunday 23:00 UTC.
    hours = TradingHours(start="07:00", end="12:00", timezone="Asia/Tokyo", days=[1])
    assert within_trading_hours(hours, ns("2026-01-18T23:00"))
    assert not within_trading_hours(hours, ns("2026-01-19T23:00"))  # Tuesday in Tokyo


def test_window_across_dst_change_follows_wall_clock() -> None:
    hours = TradingHours(start="09:00", end="10:00")
    # The day after spring forward, 09:30 Berlin is 07:30 UTC (the day before it was 08:30).
    assert within_trading_hours(hours, ns("2026-03-28T08:30"))
    assert not within_trading_hours(hours, ns("2026-03-30T08:30"))
    assert within_trading_hours(hours, ns("2026-03-30T07:30"))


def test_window_end_is_exclusive_to_the_nanosecond() -> None:
    hours = TradingHours(start="08:00", end="17:00")
    assert within_trading_hours(hours, berlin("2026-01-16T17:00") - 1)


@pytest.mark.parametrize("bad", ["24:00", "8:00", "12:60", "noon"])
def test_trading_hours_rejects_malformed_times(bad: str) -> None:
    with pytest.raises(ValueError):
        TradingHours(start=bad, end="17:00")


def test_trading_hours_rejects_unknown_timezone() -> None:
    with pytest.raises(ValueError):
        TradingHours(start="08:00", end="17:00", timezone="Mars/Olympus")
