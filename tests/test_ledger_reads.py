"""Reading an account's facts from the ledger's view: which orders the fold can show yet."""

from __future__ import annotations

from engine.runtime.ledger_reads import settled_orders, unreported_orders
from schemas.common import Side, Trace
from schemas.orders import MANUAL_LINK_ID, FollowerOpen
from schemas.reports import OrderFilled

ACCOUNT = "acct-1"


def _order(order_id: str, ts_ns: int, account: str = ACCOUNT) -> FollowerOpen:
    return FollowerOpen(order_id=order_id, link_id=MANUAL_LINK_ID, follower=account,
                        master=account, master_event_id=order_id, symbol="XAUUSD", ts_ns=ts_ns,
                        manual=True, master_position_id=order_id, side=Side.BUY,
                        volume=0.1)  # fmt: skip


def _fill(order_id: str, ts_ns: int, account: str = ACCOUNT) -> OrderFilled:
    return OrderFilled(order_id=order_id, link_id=MANUAL_LINK_ID, follower=account, ts_ns=ts_ns,
                       trace=Trace(), position_id="p-" + order_id, symbol="XAUUSD",
                       side=Side.BUY, volume=0.1, price=2_000.0)  # fmt: skip


def test_an_order_is_settled_only_when_the_ledger_holds_it_and_its_report() -> None:
    facts = [_order("a", 10), _fill("a", 11), _order("b", 12), _fill("c", 13)]
    assert settled_orders(ACCOUNT, facts) == {"a"}


def test_an_order_without_its_report_or_a_report_without_its_order_is_unreported() -> None:
    facts = [_order("a", 10), _fill("a", 11), _order("b", 12), _fill("c", 13),
             _order("x", 14, account="someone-else")]  # fmt: skip
    assert unreported_orders(ACCOUNT, facts) == {"b", "c"}
    assert unreported_orders(ACCOUNT, facts, since_ns=13) == {"c"}  # older ones are let go
