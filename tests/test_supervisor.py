"""The restart schedule: doubling delays up to a cap, back to the bottom once a child is stable."""

from __future__ import annotations

from engine.runtime.supervisor import BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_S, Backoff


def test_each_failure_in_a_row_doubles_the_delay_up_to_the_cap() -> None:
    backoff = Backoff()
    delays = [backoff.failed(now=0.0) for _ in range(10)]
    assert delays[:4] == [BACKOFF_FIRST_S, 2 * BACKOFF_FIRST_S, 4 * BACKOFF_FIRST_S,
                          8 * BACKOFF_FIRST_S]  # fmt: skip
    assert max(delays) == BACKOFF_MAX_S
    assert delays[-1] == BACKOFF_MAX_S


def test_a_restart_is_due_only_once_its_delay_has_passed() -> None:
    backoff = Backoff()
    delay = backoff.failed(now=100.0)
    assert not backoff.due(100.0 + delay / 2)
    assert backoff.due(100.0 + delay)


def test_a_child_that_stayed_up_a_minute_starts_the_schedule_again() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.failed(now=0.0)
    backoff.started(now=10.0)
    backoff.check_stable(now=10.0 + STABLE_S / 2)
    assert backoff.failed(now=10.0 + STABLE_S / 2) == 32 * BACKOFF_FIRST_S
    backoff.started(now=100.0)
    backoff.check_stable(now=100.0 + STABLE_S)
    assert backoff.failed(now=100.0 + STABLE_S) == BACKOFF_FIRST_S
