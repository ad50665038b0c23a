"""The weekly billing window: Sunday 23:00 → Friday 23:00 Europe/Berlin, DST-safe."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

import msgspec

from engine.core.calendar import BERLIN, utc_datetime

#: The window's edges in Berlin wall-clock time. The EU clock changes happen on a Sunday at
#: 01:00 UTC (02:00 or 03:00 local), so neither edge ever falls on a missing or repeated hour:
#: every window is exactly 120 hours and the weekend gap absorbs the change (47 or 49 hours).
WINDOW_EDGE = time(23, 0)
_FRIDAY = 4  # date.weekday()
_WINDOW_DAYS = 5
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WINDOW_ID = re.compile(r"^(\d{4})-W(\d{2})$")


class BillingWindow(msgspec.Struct, frozen=True, kw_only=True):
    """One weekly window ``[start, end)``; ``window_id`` is the ISO week of its Friday."""

    window_id: str
    """``2026-W13``: stable, sortable, and the last part of every weekly idempotency key."""
    start_ns: int
    """Sunday 23:00 Berlin, UTC nanoseconds (inclusive)."""
    end_ns: int
    """Friday 23:00 Berlin, UTC nanoseconds (exclusive): the charge runs at this instant."""

    @property
    def start(self) -> datetime:
        """The start as an aware Europe/Berlin datetime."""
        return utc_datetime(self.start_ns).astimezone(BERLIN)

    @property
    def end(self) -> datetime:
        """The end (and run time) as an aware Europe/Berlin datetime."""
        return utc_datetime(self.end_ns).astimezone(BERLIN)

    def contains(self, ts_ns: int) -> bool:
        """True when ``ts_ns`` is inside ``[start, end)``."""
        return self.start_ns <= ts_ns < self.end_ns


def _ns(moment: datetime) -> int:
    # timedelta floor division is exact; datetime.timestamp() goes through a float.
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _local_edge(day: date) -> datetime:
    return datetime.combine(day, WINDOW_EDGE, tzinfo=BERLIN)


def window_ending_at(friday: date) -> BillingWindow:
    """The window that ends on ``friday`` at 23:00 Berlin."""
    if friday.weekday() != _FRIDAY:
        raise ValueError(f"a billing window ends on a Friday, not on {friday.isoformat()}")
    year, week, _ = friday.isocalendar()
    return BillingWindow(
        window_id=f"{year:04d}-W{week:02d}",
        start_ns=_ns(_local_edge(friday - timedelta(days=_WINDOW_DAYS))),
        end_ns=_ns(_local_edge(friday)),
    )


def window_by_id(window_id: str) -> BillingWindow:
    """The window named ``2026-W13`` (the inverse of ``BillingWindow.window_id``)."""
    match = _WINDOW_ID.match(window_id)
    if match is None:
        raise ValueError(f"{window_id!r} is not a billing window id (YYYY-Www)")
    try:
        friday = date.fromisocalendar(int(match[1]), int(match[2]), _FRIDAY + 1)
    except ValueError as exc:
        raise ValueError(f"{window_id!r} names no ISO week") from exc
    return window_ending_at(friday)


def _berlin(ts_ns: int) -> datetime:
    return utc_datetime(ts_ns).astimezone(BERLIN)


def _next_friday_edge_after(ts_ns: int) -> date:
    """The Friday whose 23:00 Berlin is the first window end strictly after ``ts_ns``."""
    local = _berlin(ts_ns)
    friday = local.date() + timedelta(days=(_FRIDAY - local.weekday()) % 7)
    if _ns(_local_edge(friday)) <= ts_ns:
        friday += timedelta(days=7)
    return friday


def window_containing(ts_ns: int) -> BillingWindow | None:
    """The window ``ts_ns`` falls in, or None in the weekend gap (Friday 23:00 → Sunday 23:00).

    Windows are half-open: the instant of a Sunday start belongs to that window, the instant of
    a Friday end to none, so no timestamp is ever counted in two windows.
    """
    window = window_ending_at(_next_friday_edge_after(ts_ns))
    return window if window.contains(ts_ns) else None


def last_completed_window(now_ns: int) -> BillingWindow:
    """The latest window whose end is at or before ``now_ns``: what a run at ``now`` charges.

    A run that missed its Friday (the job was down) and starts on Saturday or Wednesday still
    charges the window that ended on the last Friday, under the same idempotency key.
    """
    return window_ending_at(_next_friday_edge_after(now_ns) - timedelta(days=7))


def next_run_at(now_ns: int) -> int:
    """The next charge run strictly after ``now_ns``, UTC nanoseconds (Friday 23:00 Berlin)."""
    return window_ending_at(_next_friday_edge_after(now_ns)).end_ns


def completed_windows_since(last_charged: str | None, now_ns: int) -> list[BillingWindow]:
    """Every window completed by ``now_ns`` after ``last_charged``, oldest first (catch-up).

    With no window charged yet only the last completed one is due: billing starts where the
    job starts, it does not invent charges for weeks before it existed.
    """
    latest = last_completed_window(now_ns)
    if last_charged is None:
        return [latest]
    window = window_by_id(last_charged)
    due: list[BillingWindow] = []
    while window.end_ns < latest.end_ns:
        window = window_ending_at(window.end.date() + timedelta(days=7))
        due.append(window)
    return due
