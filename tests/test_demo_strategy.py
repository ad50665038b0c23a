"""``tradecopy demo --source strategy``: the SMA crossover trades the demo's master through the
worker, TC_SIGNALS and the drive, and its trades are copied to the paper followers."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.paper.venue import PaperVenue
from engine.demo import run_demo
from engine.demo_strategy import strategy_version, unexpected_master_positions
from schemas.common import Side, Trace
from schemas.market import Quote
from schemas.orders import MANUAL_LINK_ID, FollowerOpen
from schemas.reports import OrderFilled

MASTER = "demo-master"


@pytest.fixture
async def strategy_run(database_url: str) -> dict[str, Any]:
    return await run_demo(25.0, 3, None, as_json=True, database_url=database_url, source="strategy")


async def test_the_strategy_demo_copies_the_strategys_trades_with_the_default_summary(
    strategy_run: dict[str, Any],
) -> None:
    summary = strategy_run
    script_fields = {"master_events", "orders", "fills", "rejected", "skipped",
                     "unexpected_positions", "latency_us", "ledger", "api", "fees",
                     "fees_window", "source"}  # fmt: skip
    assert script_fields <= set(summary)
    assert summary["source"] == "strategy"
    assert summary["strategy_version"] == strategy_version().version_id
    assert summary["signals"] >= 2, summary
    assert summary["master_orders"] >= summary["signals"]
    assert summary["master_events"] >= summary["signals"]
    assert summary["orders"] > 0 and summary["fills"] > 0
    assert summary["unexpected_positions"] == 0
    # The ledger stored the master's trades and the copies (the drive read them from there).
    assert summary["ledger"]["master_event"] >= summary["signals"]
    assert summary["ledger"]["execution_report"] >= summary["fills"]


def _open(order_id: str) -> FollowerOpen:
    return FollowerOpen(order_id=order_id, link_id=MANUAL_LINK_ID, follower=MASTER, master=MASTER,
                        master_event_id=order_id, symbol="XAUUSD", ts_ns=1, manual=True,
                        master_position_id=order_id, side=Side.BUY, volume=0.1)  # fmt: skip


def _filled(order_id: str, position_id: str) -> OrderFilled:
    return OrderFilled(order_id=order_id, link_id=MANUAL_LINK_ID, follower=MASTER, ts_ns=1,
                       trace=Trace(), position_id=position_id, symbol="XAUUSD", side=Side.BUY,
                       volume=0.1, price=2_000.0)  # fmt: skip


def test_a_master_position_no_signal_made_is_unexpected() -> None:
    venue = PaperVenue()
    venue.open_account(MASTER)
    venue.on_quote(
        Quote(symbol="XAUUSD", bid=2_000.0, ask=2_000.3, ts_ns=1_771_200_000_000_000_000)
    )
    made = venue.market_order(MASTER, "XAUUSD", Side.BUY, 0.1)
    assert made.ok and made.position_id
    orders, reports = [_open("o1")], {"o1": _filled("o1", made.position_id)}
    assert unexpected_master_positions(venue, MASTER, orders, reports) == []
    assert venue.market_order(MASTER, "XAUUSD", Side.SELL, 0.1).ok  # not the strategy's
    problems = unexpected_master_positions(venue, MASTER, orders, reports)
    assert len(problems) == 1 and "no signal made" in problems[0]
