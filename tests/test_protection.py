"""Account protection: equity stop, max drawdown, daily loss, pausing, price deviation."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from engine.core.calendar import trading_day
from engine.core.prices import price_deviation, within_deviation
from engine.replicator.protection import check_equity, has_equity_protection, track_equity
from engine.replicator.state import LinkState
from schemas.account import AccountState
from schemas.common import Side
from schemas.decisions import DecisionRule
from schemas.links import CopyLink, ProtectionAction

FOLLOWER = "follower-1"
DAY = "2026-01-15"
NEXT_DAY = "2026-01-16"


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


NOON = ns("2026-01-15T11:00")  # 12:00 Berlin
LATE = ns("2026-01-15T22:30")  # 23:30 Berlin, same day
NEXT_MORNING = ns("2026-01-15T23:30")  # 00:30 Berlin on the next day


def make_link(**kwargs: object) -> CopyLink:
    return CopyLink(link_id="L1", master="master-1", follower=FOLLOWER, **kwargs)  # type: ignore[arg-type]


def acct(equity: float, currency: str = "USD") -> AccountState:
    return AccountState(account=FOLLOWER, ts_ns=0, currency=currency, balance=equity, equity=equity)


def test_time_fixtures_are_on_the_days_they_claim() -> None:
    assert trading_day(NOON) == DAY
    assert trading_day(LATE) == DAY
    assert trading_day(NEXT_MORNING) == NEXT_DAY


def test_has_equity_protection() -> None:
    assert not has_equity_protection(make_link())
    assert has_equity_protection(make_link(equity_stop=1.0))
    assert has_equity_protection(make_link(max_drawdown_percent=10.0))
    assert has_equity_protection(make_link(daily_loss_percent=5.0))


# --- check_equity -------------------------------------------------------------------------


@pytest.mark.parametrize(("equity", "triggers"), [(5_001.0, False), (5_000.0, True), (10.0, True)])
def test_equity_stop_triggers_at_or_below(equity: float, triggers: bool) -> None:
    trigger = check_equity(make_link(equity_stop=5_000.0), acct(equity), LinkState(), DAY)
    if triggers:
        assert trigger is not None
        assert trigger.rule is DecisionRule.EQUITY_STOP
        assert trigger.numbers == {"equity": equity, "equity_stop": 5_000.0}
    else:
        assert trigger is None


@pytest.mark.parametrize(
    ("equity", "triggers"), [(8_001.0, False), (8_000.0, True), (7_000.0, True)]
)
def test_max_drawdown_from_tracked_peak(equity: float, triggers: bool) -> None:
    state = LinkState(peak_equity=10_000.0)
    trigger = check_equity(make_link(max_drawdown_percent=20.0), acct(equity), state, DAY)
    assert (trigger is not None) == triggers
    if trigger is not None:
        assert trigger.rule is DecisionRule.MAX_DRAWDOWN
        assert trigger.numbers["peak_equity"] == 10_000.0


def test_max_drawdown_without_tracked_peak_uses_current_equity() -> None:
    assert check_equity(make_link(max_drawdown_percent=1.0), acct(100.0), LinkState(), DAY) is None


def test_max_drawdown_peak_never_below_current_equity() -> None:
    # Equity above a stale peak: no drawdown at all.
    state = LinkState(peak_equity=5_000.0)
    assert check_equity(make_link(max_drawdown_percent=1.0), acct(6_000.0), state, DAY) is None


@pytest.mark.parametrize(
    ("equity", "triggers"), [(9_501.0, False), (9_500.0, True), (9_000.0, True)]
)
def test_daily_loss_from_day_start_equity(equity: float, triggers: bool) -> None:
    state = LinkState(day=DAY, day_start_equity=10_000.0)
    trigger = check_equity(make_link(daily_loss_percent=5.0), acct(equity), state, DAY)
    assert (trigger is not None) == triggers
    if trigger is not None:
        assert trigger.rule is DecisionRule.DAILY_LOSS
        assert trigger.numbers["day_start_equity"] == 10_000.0


def test_daily_loss_ignores_start_equity_of_another_day() -> None:
    state = LinkState(day=DAY, day_start_equity=10_000.0)
    link = make_link(daily_loss_percent=5.0)
    assert check_equity(link, acct(1_000.0), state, NEXT_DAY) is None


def test_equity_stop_is_reported_before_drawdown() -> None:
    link = make_link(equity_stop=5_000.0, max_drawdown_percent=10.0, daily_loss_percent=10.0)
    state = LinkState(day=DAY, day_start_equity=10_000.0, peak_equity=10_000.0)
    trigger = check_equity(link, acct(4_000.0), state, DAY)
    assert trigger is not None
    assert trigger.rule is DecisionRule.EQUITY_STOP


def test_no_protection_configured_never_triggers() -> None:
    state = LinkState(day=DAY, day_start_equity=10_000.0, peak_equity=10_000.0)
    assert check_equity(make_link(), acct(1.0), state, DAY) is None


# --- track_equity -------------------------------------------------------------------------


def test_track_equity_starts_day_and_peak_from_first_update() -> None:
    new, trigger = track_equity(make_link(), acct(10_000.0), LinkState(), NOON)
    assert trigger is None
    assert new.day == DAY
    assert new.day_start_equity == 10_000.0
    assert new.peak_equity == 10_000.0
    assert not new.paused


def test_track_equity_raises_peak_but_keeps_day_start() -> None:
    link = make_link()
    state, _ = track_equity(link, acct(10_000.0), LinkState(), NOON)
    state, _ = track_equity(link, acct(11_000.0), state, NOON + 1)
    assert state.peak_equity == 11_000.0
    state, _ = track_equity(link, acct(10_500.0), state, LATE)
    assert state.peak_equity == 11_000.0
    assert state.day_start_equity == 10_000.0


def test_track_equity_does_not_mutate_input_state() -> None:
    state = LinkState(day=DAY, opened=["p1"], day_start_equity=9_000.0, peak_equity=9_000.0)
    before = msgspec.structs.replace(state, opened=list(state.opened))
    track_equity(make_link(equity_stop=10_000.0), acct(9_500.0), state, NEXT_MORNING)
    assert state == before


def test_track_equity_resets_daily_fields_on_new_berlin_day() -> None:
    state = LinkState(day=DAY, opened=["p1", "p2"], day_start_equity=9_000.0, peak_equity=12_000.0)
    new, trigger = track_equity(make_link(), acct(9_500.0), state, NEXT_MORNING)
    assert trigger is None
    assert new.day == NEXT_DAY
    assert new.opened == []
    assert new.day_start_equity == 9_500.0
    assert new.peak_equity == 12_000.0  # the peak is not a daily field


def test_track_equity_keeps_daily_fields_within_the_berlin_day() -> None:
    state = LinkState(day=DAY, opened=["p1"], day_start_equity=9_000.0, peak_equity=9_000.0)
    new, _ = track_equity(make_link(), acct(9_500.0), state, LATE)
    assert new.opened == ["p1"]
    assert new.day_start_equity == 9_000.0


@pytest.mark.parametrize(
    ("action", "close_all"), [(ProtectionAction.PAUSE, False), (ProtectionAction.CLOSE_ALL, True)]
)
def test_track_equity_pauses_with_rule_and_close_all_only_for_close_all(
    action: ProtectionAction, close_all: bool
) -> None:
    link = make_link(max_drawdown_percent=10.0, protection_action=action)
    state = LinkState(day=DAY, day_start_equity=10_000.0, peak_equity=10_000.0)
    new, trigger = track_equity(link, acct(8_500.0), state, NOON)
    assert trigger is not None
    assert trigger.rule is DecisionRule.MAX_DRAWDOWN
    assert new.paused
    assert new.paused_rule == "max_drawdown"
    assert new.paused_ns == NOON
    assert new.paused_day == ""
    assert new.close_all_pending is close_all
    assert new.is_paused(DAY)
    assert new.is_paused(NEXT_DAY)  # a drawdown pause does not lift by itself


def test_track_equity_equity_stop_pause() -> None:
    link = make_link(equity_stop=5_000.0, protection_action=ProtectionAction.CLOSE_ALL)
    new, trigger = track_equity(link, acct(5_000.0), LinkState(), NOON)
    assert trigger is not None
    assert trigger.rule is DecisionRule.EQUITY_STOP
    assert new.paused_rule == "equity_stop"
    assert new.close_all_pending


def test_track_equity_drawdown_uses_peak_raised_in_same_update_history() -> None:
    link = make_link(max_drawdown_percent=10.0)
    state, _ = track_equity(link, acct(10_000.0), LinkState(), NOON)
    state, _ = track_equity(link, acct(20_000.0), state, NOON + 1)
    state, trigger = track_equity(link, acct(17_999.0), state, NOON + 2)
    assert trigger is not None
    assert trigger.rule is DecisionRule.MAX_DRAWDOWN


def test_daily_loss_pause_lifts_on_next_berlin_day() -> None:
    link = make_link(daily_loss_percent=5.0)
    state, _ = track_equity(link, acct(10_000.0), LinkState(), NOON)
    paused, trigger = track_equity(link, acct(9_400.0), state, LATE)
    assert trigger is not None
    assert trigger.rule is DecisionRule.DAILY_LOSS
    assert paused.paused_day == DAY
    assert paused.is_paused(DAY)
    assert not paused.is_paused(NEXT_DAY)
    # The next day's first update starts a fresh day from the current equity.
    next_day, trigger = track_equity(link, acct(9_400.0), paused, NEXT_MORNING)
    assert trigger is None
    assert not next_day.is_paused(NEXT_DAY)
    assert next_day.day_start_equity == 9_400.0


def test_no_trigger_when_already_paused() -> None:
    link = make_link(equity_stop=5_000.0, protection_action=ProtectionAction.CLOSE_ALL)
    state = LinkState(
        day=DAY, paused=True, paused_rule="max_drawdown", paused_ns=1, close_all_pending=False
    )
    new, trigger = track_equity(link, acct(1_000.0), state, NOON)
    assert trigger is None
    assert new.paused
    assert new.paused_rule == "max_drawdown"
    assert new.paused_ns == 1
    assert not new.close_all_pending


def test_is_paused_and_opened_today() -> None:
    assert not LinkState().is_paused(DAY)
    assert LinkState(paused=True).is_paused(DAY)
    assert LinkState(paused=True, paused_day=DAY).is_paused(DAY)
    assert not LinkState(paused=True, paused_day=DAY).is_paused(NEXT_DAY)
    assert LinkState(day=DAY, opened=["a"]).opened_today(DAY) == ["a"]
    assert LinkState(day=DAY, opened=["a"]).opened_today(NEXT_DAY) == []


# --- within_deviation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ask", "allowed"), [(1900.50, True), (1900.51, False), (1899.00, True), (1900.0, True)]
)
def test_buy_deviation_compares_ask_with_master_price(ask: float, allowed: bool) -> None:
    # The bid is irrelevant for a buy: set it far away.
    assert within_deviation(Side.BUY, 1900.0, 1000.0, ask, 0.50) is allowed


@pytest.mark.parametrize(
    ("bid", "allowed"), [(1899.50, True), (1899.49, False), (1901.00, True), (1900.0, True)]
)
def test_sell_deviation_compares_bid_with_master_price(bid: float, allowed: bool) -> None:
    assert within_deviation(Side.SELL, 1900.0, bid, 5000.0, 0.50) is allowed


@pytest.mark.parametrize("side", [Side.BUY, Side.SELL])
def test_no_deviation_limit_allows_any_price(side: Side) -> None:
    assert within_deviation(side, 1900.0, 1.0, 99_999.0, None)


def test_price_deviation_sign() -> None:
    assert price_deviation(Side.BUY, 100.0, 99.0, 101.0) == pytest.approx(1.0)
    assert price_deviation(Side.SELL, 100.0, 99.0, 101.0) == pytest.approx(1.0)
    assert price_deviation(Side.BUY, 100.0, 98.0, 99.0) == pytest.approx(-1.0)
