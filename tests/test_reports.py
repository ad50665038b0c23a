"""The per-order report builder (connectors/reports.py): ids, trace, slippage and the texts
every connector shares."""

from __future__ import annotations

import dataclasses
import time

import msgspec
import pytest

from connectors.reports import (
    EXPIRED_REASON,
    RETCODE_EXPIRED,
    OrderReports,
    slippage,
)
from schemas.common import Side, Trace
from schemas.orders import FollowerClose, FollowerCloseAll, FollowerOpen, FollowerOrder
from schemas.reports import (
    OrderDone,
    OrderFilled,
    OrderPartiallyFilled,
    OrderRejected,
    OrderUnknown,
)

RECEIVED = Trace(terminal_ns=1, connector_ns=2, replicator_in_ns=3, replicator_out_ns=4,
                 follower_connector_ns=5)  # fmt: skip
COMMON = {"link_id": "l1", "follower": "f1", "master": "m1", "symbol": "XAUUSD",
          "ts_ns": 1}  # fmt: skip


def open_order(side: Side = Side.BUY, master_price: float = 2000.0) -> FollowerOpen:
    return FollowerOpen(**COMMON, order_id="e1:l1", master_event_id="e1", master_position_id="7",
                        side=side, volume=0.1, master_price=master_price)  # fmt: skip


def reports_for(order: FollowerOrder, **kwargs: bool) -> OrderReports:
    return OrderReports(order, RECEIVED, **kwargs)


@pytest.mark.parametrize(
    ("side", "price", "expected"),
    [
        (Side.BUY, 2000.3, 0.3),  # bought higher than the master: worse
        (Side.BUY, 1999.8, -0.2),  # bought lower: better
        (Side.SELL, 1999.6, 0.4),  # sold lower than the master: worse
        (Side.SELL, 2000.1, -0.1),  # sold higher: better
    ],
)
def test_slippage_is_positive_when_the_follower_filled_worse_on_either_side(
    side: Side, price: float, expected: float
) -> None:
    assert slippage(side, price, 2000.0) == pytest.approx(expected, abs=1e-9)
    report = reports_for(open_order(side)).filled("XAUUSD", "p1", side, 0.1, price)
    assert report.slippage == pytest.approx(expected, abs=1e-9)
    assert report.master_price == 2000.0


def test_slippage_is_zero_when_a_price_is_unknown() -> None:
    assert slippage(Side.BUY, 2000.0, 0.0) == 0.0
    assert slippage(Side.SELL, 0.0, 2000.0) == 0.0
    close_all = FollowerCloseAll(**COMMON, order_id="e2:l1", master_event_id="e2", reason="stop")
    report = reports_for(close_all).filled("XAUUSD", "p1", Side.SELL, 0.1, 1990.0)
    assert (report.master_price, report.slippage) == (0.0, 0.0)


def test_a_fill_now_stamps_the_terminal_time_and_a_fill_found_from_before_does_not() -> None:
    reports = reports_for(open_order())
    before = time.time_ns()
    now = reports.filled("XAUUSD", "p1", Side.BUY, 0.1, 2000.5, terminal_ns=before)
    assert isinstance(now, OrderFilled)
    assert now.trace == msgspec.structs.replace(RECEIVED, follower_terminal_ns=before)
    assert now.ts_ns >= before
    found = reports.filled("XAUUSD", "p1", Side.BUY, 0.1, 2000.5)
    assert found.trace == RECEIVED
    assert (found.order_id, found.link_id, found.follower) == ("e1:l1", "l1", "f1")
    assert (found.symbol, found.position_id, found.side, found.volume, found.price) == (
        "XAUUSD", "p1", Side.BUY, 0.1, 2000.5,
    )  # fmt: skip


def test_a_partial_fill_carries_both_volumes_slippage_and_the_terminal_stamp() -> None:
    close = FollowerClose(**COMMON, order_id="e3:l1", master_event_id="e3",
                          master_position_id="7", master_price=2010.0)  # fmt: skip
    report = reports_for(close).partially_filled(
        "XAUUSD", "p1", Side.SELL, 0.3, 0.1, 2009.5, terminal_ns=42
    )
    assert isinstance(report, OrderPartiallyFilled)
    assert (report.volume_requested, report.volume_filled, report.price) == (0.3, 0.1, 2009.5)
    assert report.slippage == pytest.approx(0.5)
    assert report.trace.follower_terminal_ns == 42
    assert report.trace.follower_connector_ns == RECEIVED.follower_connector_ns


def test_an_expired_signal_is_the_price_off_rejection_with_the_max_age_reason() -> None:
    reports = reports_for(open_order(), signal_expired=True)
    report = reports.expired()
    assert isinstance(report, OrderRejected)
    assert (report.code, report.reason) == (RETCODE_EXPIRED, EXPIRED_REASON) == (
        90001, "signal expired before execution (max signal age)",
    )  # fmt: skip
    assert (report.order_id, report.trace) == ("e1:l1", RECEIVED)
    assert reports_for(open_order()).signal_expired is False


def test_done_lists_the_positions_it_touched_and_none_by_default() -> None:
    reports = reports_for(open_order())
    done = reports.done("closed by the opposite copy", ("p1", "p2"))
    assert isinstance(done, OrderDone)
    assert (done.detail, done.position_ids, done.trace) == (
        "closed by the opposite copy", ["p1", "p2"], RECEIVED,
    )  # fmt: skip
    assert reports.done("nothing").position_ids == []


def test_rejected_and_unknown_keep_the_venues_code_and_reason() -> None:
    reports = reports_for(open_order())
    rejected = reports.rejected(10019, "not enough money")
    assert isinstance(rejected, OrderRejected)
    assert (rejected.code, rejected.reason, rejected.follower) == (10019, "not enough money", "f1")
    unknown = reports.unknown("no result in time")
    assert isinstance(unknown, OrderUnknown)
    assert (unknown.reason, unknown.order_id, unknown.trace) == (
        "no result in time", "e1:l1", RECEIVED,
    )  # fmt: skip


def test_the_builder_is_immutable() -> None:
    reports = reports_for(open_order())
    with pytest.raises(dataclasses.FrozenInstanceError):
        reports.signal_expired = True  # type: ignore[misc]
