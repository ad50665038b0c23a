"""Account read models as a fold of facts: positions, closes, pending orders, copies, cash."""

from __future__ import annotations

from engine.core.book import CloseReason, CopyRef, fold_account
from engine.core.comments import copy_comment
from schemas.account import AccountState
from schemas.common import OrderType, Side, Trace
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.master import (
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import FollowerClose, FollowerCloseAll, FollowerOpen
from schemas.reports import (
    OrderDone,
    OrderFilled,
    OrderPartiallyFilled,
    OrderRejected,
    OrderUnknown,
)

MASTER, FOLLOWER, LINK = "m1", "f1", "link-1"
S = 1_000_000_000
NO_TRACE = Trace()


def opened(
    position_id: str,
    ts: int,
    volume: float = 0.3,
    price: float = 2000.0,
    side: Side = Side.BUY,
    account: str = MASTER,
    comment: str = "",
) -> PositionOpened:
    return PositionOpened(
        event_id=f"o-{position_id}",
        master=account,
        symbol="XAUUSD",
        ts_ns=ts * S,
        position_id=position_id,
        side=side,
        volume=volume,
        price=price,
        comment=comment,
    )


def state(
    ts: int,
    balance: float,
    equity: float | None = None,
    account: str = MASTER,
    currency: str = "USD",
) -> AccountState:
    return AccountState(
        account=account,
        ts_ns=ts * S,
        currency=currency,
        balance=balance,
        equity=balance if equity is None else equity,
    )


def open_order(order_id: str, master_position_id: str, ts: int) -> FollowerOpen:
    return FollowerOpen(
        order_id=order_id,
        link_id=LINK,
        follower=FOLLOWER,
        master=MASTER,
        master_event_id=f"o-{master_position_id}",
        symbol="XAUUSD",
        ts_ns=ts * S,
        master_position_id=master_position_id,
        side=Side.BUY,
        volume=0.1,
        master_price=2000.0,
        comment=copy_comment(MASTER, master_position_id),
    )


def filled(
    order_id: str,
    position_id: str,
    ts: int,
    price: float,
    volume: float = 0.1,
    side: Side = Side.BUY,
    profit: float | None = None,
    trace: Trace = NO_TRACE,
) -> OrderFilled:
    return OrderFilled(
        order_id=order_id,
        link_id=LINK,
        follower=FOLLOWER,
        ts_ns=ts * S,
        symbol="XAUUSD",
        position_id=position_id,
        side=side,
        volume=volume,
        price=price,
        master_price=2000.0,
        slippage=round(price - 2000.0, 10),
        profit=profit,
        trace=trace,
    )


def test_a_position_opened_reduced_and_closed_leaves_two_closes_with_their_money() -> None:
    book = fold_account(
        MASTER,
        [
            state(0, 1000.0),
            opened("A", 1, volume=0.3),
            PositionReduced(
                event_id="r",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=2 * S,
                position_id="A",
                side=Side.BUY,
                volume_before=0.3,
                volume_after=0.2,
                price=2010.0,
                profit=100.0,
                commission=-0.7,
                swap=-0.125,
            ),
            PositionClosed(
                event_id="c",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=3 * S,
                position_id="A",
                side=Side.BUY,
                volume=0.2,
                price=1995.0,
                profit=-100.0,
                reason="client",
            ),
        ],
    )
    first, second = book.closed_positions
    assert (first.volume, first.close_price, first.remainder_id) == (0.1, 2010.0, "A")
    # 100.00 USD = 10000 cents; -0.125 rounds half-even to -12 cents
    assert (first.profit, first.commission, first.swap, first.net) == (10000, -70, -12, 9918)
    assert (second.volume, second.close_price, second.remainder_id) == (0.2, 1995.0, None)
    assert (second.profit, second.commission, second.net) == (-10000, None, -10000)
    assert second.reason is CloseReason.MANUAL and first.balance_at_open == 100000
    assert book.open_positions == []


def test_an_mt4_remainder_gets_its_new_ticket_and_keeps_its_origin() -> None:
    book = fold_account(
        MASTER,
        [
            opened("100", 1, volume=0.03),
            PositionReduced(
                event_id="r",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=2 * S,
                position_id="100",
                side=Side.BUY,
                volume_before=0.03,
                volume_after=0.02,
                price=2001.0,
                new_position_id="101",
            ),
            PositionReduced(
                event_id="r2",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=3 * S,
                position_id="101",
                side=Side.BUY,
                volume_before=0.02,
                volume_after=0.01,
                price=2002.0,
                new_position_id="102",
            ),
        ],
        currency="USD",
    )
    assert [
        (c.position_id, c.remainder_id, c.origin_position_id) for c in book.closed_positions
    ] == [("100", "101", "100"), ("101", "102", "100")]
    (rest,) = book.open_positions
    assert (rest.position_id, rest.origin_position_id, rest.volume) == ("102", "100", 0.01)
    assert (rest.open_price, rest.open_ts_ns) == (2000.0, 1 * S)


def test_close_by_closes_the_smaller_volume_on_both_sides_at_the_opposite_price() -> None:
    book = fold_account(
        MASTER,
        [
            opened("B1", 1, volume=0.5, price=2000.0),
            opened("S1", 2, volume=0.2, price=2012.0, side=Side.SELL),
            PositionClosedBy(
                event_id="cb",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=3 * S,
                position_id="B1",
                opposite_position_id="S1",
                side=Side.BUY,
                volume=0.2,
                profit=240.0,
            ),
        ],
        currency="USD",
    )
    buy, sell = book.closed_positions
    assert (buy.position_id, buy.volume, buy.close_price, buy.profit) == ("B1", 0.2, 2012.0, 24000)
    assert (sell.position_id, sell.volume, sell.close_price, sell.profit) == ("S1", 0.2, 2012.0, 0)
    assert buy.reason is CloseReason.CLOSE_BY is sell.reason
    (rest,) = book.open_positions
    assert (rest.position_id, rest.volume) == ("B1", 0.3)


def test_terminal_close_reasons_are_kept() -> None:
    facts: list[object] = []
    for i, reason in enumerate(("sl", "tp", "stop_out", "expert")):
        facts += [
            opened(f"P{i}", i),
            PositionClosed(
                event_id=f"c{i}",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=(i + 1) * S,
                position_id=f"P{i}",
                side=Side.BUY,
                volume=0.3,
                price=1990.0,
                reason=reason,
            ),
        ]
    book = fold_account(MASTER, facts, currency="USD")
    assert [c.reason for c in book.closed_positions] == [
        CloseReason.SL,
        CloseReason.TP,
        CloseReason.STOP_OUT,
        CloseReason.MANUAL,
    ]
    assert all(c.profit is None for c in book.closed_positions)  # the venue did not say


def test_pending_orders_are_placed_modified_cancelled_and_triggered() -> None:
    def placed(order_id: str, ts: int) -> PendingOrderPlaced:
        return PendingOrderPlaced(
            event_id=f"p-{order_id}",
            master=MASTER,
            symbol="XAUUSD",
            ts_ns=ts * S,
            order_id=order_id,
            order_type=OrderType.BUY_LIMIT,
            volume=0.1,
            price=1990.0,
        )

    book = fold_account(
        MASTER,
        [
            placed("L1", 1),
            placed("L2", 2),
            placed("L3", 3),
            PendingOrderModified(
                event_id="m",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=4 * S,
                order_id="L1",
                order_type=OrderType.BUY_LIMIT,
                price=1985.0,
                sl=1980.0,
            ),
            PendingOrderCancelled(
                event_id="x",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=5 * S,
                order_id="L2",
                order_type=OrderType.BUY_LIMIT,
            ),
            PendingOrderTriggered(
                event_id="t",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=6 * S,
                order_id="L3",
                order_type=OrderType.BUY_LIMIT,
                position_id="P3",
                side=Side.BUY,
                volume=0.1,
                price=1990.0,
            ),
            PositionModified(
                event_id="pm",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=7 * S,
                position_id="P3",
                side=Side.BUY,
                sl=1970.0,
                tp=2050.0,
            ),
        ],
        currency="USD",
    )
    (pending,) = book.pending_orders
    assert (pending.order_id, pending.price, pending.sl) == ("L1", 1985.0, 1980.0)
    (position,) = book.open_positions
    assert (position.position_id, position.sl, position.tp) == ("P3", 1970.0, 2050.0)


def test_copies_are_mapped_to_their_master_and_told_from_manual_trades() -> None:
    trace = Trace(terminal_ns=10 * S, follower_terminal_ns=10 * S + 4_000_000)
    book = fold_account(
        FOLLOWER,
        [
            state(0, 5000.0, account=FOLLOWER),
            open_order("ord-1", "M7", 10),
            filled("ord-1", "F9", 10, price=2000.3, trace=trace),
            opened("F10", 11, account=FOLLOWER),  # the follower's own trade, no copy comment
            FollowerClose(
                order_id="ord-2",
                link_id=LINK,
                follower=FOLLOWER,
                master=MASTER,
                master_event_id="c-M7",
                symbol="XAUUSD",
                ts_ns=20 * S,
                master_position_id="M7",
            ),
            filled("ord-2", "F9", 21, price=2010.0, side=Side.SELL, profit=97.0),
        ],
    )
    (entry,) = book.copy_map
    assert (entry.follower_position_id, entry.master_position_id, entry.link_id) == (
        "F9",
        "M7",
        LINK,
    )
    (closed,) = book.closed_positions
    assert closed.copy == CopyRef(link_id=LINK, master=MASTER, master_position_id="M7")
    assert closed.is_copy and closed.reason is CloseReason.MASTER_CLOSE
    assert (closed.open_price, closed.close_price, closed.profit) == (2000.3, 2010.0, 9700)
    assert closed.balance_at_open == 500000
    (manual,) = book.open_positions
    assert manual.position_id == "F10" and not manual.is_copy
    orders = {o.order_id: o for o in book.links[LINK].orders}
    assert orders["ord-1"].status == "filled" and orders["ord-1"].latency_ns == 4_000_000
    assert orders["ord-1"].slippage is not None and abs(orders["ord-1"].slippage - 0.3) < 1e-9
    assert book.links[LINK].copied == 1


def test_a_copy_closed_by_the_terminal_first_is_still_the_masters_close_and_counted_once() -> None:
    book = fold_account(
        FOLLOWER,
        [
            open_order("ord-1", "M7", 1),
            filled("ord-1", "F9", 1, price=2000.0),
            opened("F9", 1, volume=0.1, account=FOLLOWER, comment=copy_comment(MASTER, "M7")),
            FollowerClose(
                order_id="ord-2",
                link_id=LINK,
                follower=FOLLOWER,
                master=MASTER,
                master_event_id="c-M7",
                symbol="XAUUSD",
                ts_ns=5 * S,
                master_position_id="M7",
            ),
            PositionClosed(
                event_id="fc",
                master=FOLLOWER,
                symbol="XAUUSD",
                ts_ns=6 * S,
                position_id="F9",
                side=Side.BUY,
                volume=0.1,
                price=2004.0,
                reason="expert",
                profit=40.0,
            ),
            filled("ord-2", "F9", 6, price=2004.0, side=Side.SELL, profit=40.0),
        ],
        currency="USD",
    )
    (closed,) = book.closed_positions
    assert closed.reason is CloseReason.MASTER_CLOSE and closed.profit == 4000
    assert book.open_positions == []


def test_protection_close_all_closes_every_named_copy() -> None:
    book = fold_account(
        FOLLOWER,
        [
            open_order("o1", "M1", 1),
            filled("o1", "F1", 1, price=2000.0),
            open_order("o2", "M2", 2),
            filled("o2", "F2", 2, price=2001.0),
            FollowerCloseAll(
                order_id="ca",
                link_id=LINK,
                follower=FOLLOWER,
                master=MASTER,
                master_event_id="stop",
                symbol="*",
                ts_ns=3 * S,
                reason="equity stop",
            ),
            OrderDone(
                order_id="ca",
                link_id=LINK,
                follower=FOLLOWER,
                ts_ns=4 * S,
                detail="closed all",
                position_ids=["F1", "F2"],
            ),
        ],
        currency="USD",
    )
    assert [(c.position_id, c.reason, c.close_price) for c in book.closed_positions] == [
        ("F1", CloseReason.PROTECTION, None),
        ("F2", CloseReason.PROTECTION, None),
    ]


def test_link_outcomes_count_copies_skips_and_rejections() -> None:
    def skipped(i: int, rule: DecisionRule) -> CopyDecision:
        return CopyDecision(
            decision_id=f"d{i}",
            link_id=LINK,
            master=MASTER,
            follower=FOLLOWER,
            outcome=DecisionOutcome.SKIPPED,
            rule=rule,
            message="",
            ts_ns=i * S,
            master_event_id=f"e{i}",
        )

    book = fold_account(
        FOLLOWER,
        [
            skipped(1, DecisionRule.SYMBOL_EXCLUDED),
            skipped(2, DecisionRule.SYMBOL_EXCLUDED),
            skipped(3, DecisionRule.MAX_OPEN_POSITIONS),
            CopyDecision(
                decision_id="d4",
                link_id=LINK,
                master=MASTER,
                follower=FOLLOWER,
                outcome=DecisionOutcome.REDUCED,
                rule=DecisionRule.MAX_LOT,
                message="",
                ts_ns=4 * S,
            ),
            open_order("o1", "M1", 5),
            OrderRejected(
                order_id="o1",
                link_id=LINK,
                follower=FOLLOWER,
                ts_ns=6 * S,
                code=90002,
                reason="price deviation",
            ),
            open_order("o2", "M2", 7),
            OrderPartiallyFilled(
                order_id="o2",
                link_id=LINK,
                follower=FOLLOWER,
                ts_ns=8 * S,
                symbol="XAUUSD",
                position_id="F2",
                side=Side.BUY,
                volume_requested=0.1,
                volume_filled=0.04,
                price=2000.0,
            ),
            open_order("o3", "M3", 9),
        ],
        currency="USD",
    )
    link = book.links[LINK]
    assert (link.copied, link.skipped, link.rejected) == (1, 3, 1)
    assert link.skipped_by_rule == {"symbol_excluded": 2, "max_open_positions": 1}
    assert [(o.order_id, o.status) for o in link.orders] == [
        ("o1", "rejected"),
        ("o2", "partially_filled"),
        ("o3", "sent"),
    ]
    (partial,) = book.open_positions
    assert partial.volume == 0.04


def test_deposits_and_withdrawals_are_balance_changes_no_close_explains() -> None:
    book = fold_account(
        MASTER,
        [
            state(0, 1000.0),
            opened("A", 1),
            PositionClosed(
                event_id="c",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=2 * S,
                position_id="A",
                side=Side.BUY,
                volume=0.3,
                price=2010.0,
                profit=50.0,
                commission=-1.5,
            ),
            state(3, 1048.5),  # 1000 + 50 − 1.5: explained, no flow
            state(4, 1548.5),  # +500 with no close: a deposit
            opened("B", 5),
            PositionClosed(
                event_id="c2",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=6 * S,
                position_id="B",
                side=Side.BUY,
                volume=0.3,
                price=1990.0,
                profit=-20.0,
            ),
            state(7, 1328.5),  # −20 explained, −200 withdrawn
        ],
    )
    assert [(f.ts_ns // S, f.amount, f.kind) for f in book.cash_flows] == [
        (4, 50000, "deposit"),
        (7, -20000, "withdrawal"),
    ]
    assert [s.cash_flow for s in book.balance_series] == [0, 0, 50000, -20000]
    assert [c.balance_at_open for c in book.closed_positions] == [100000, 154850]


def test_a_close_of_unknown_profit_explains_nothing_and_flags_nothing() -> None:
    book = fold_account(
        MASTER,
        [
            state(0, 1000.0),
            opened("A", 1),
            PositionClosed(
                event_id="c",
                master=MASTER,
                symbol="XAUUSD",
                ts_ns=2 * S,
                position_id="A",
                side=Side.BUY,
                volume=0.3,
                price=2010.0,
            ),
            state(3, 1300.0),
            state(4, 1300.0),
            state(5, 1000.0),
        ],
    )
    assert [(f.ts_ns // S, f.amount) for f in book.cash_flows] == [(5, -30000)]


def test_facts_of_other_accounts_are_ignored() -> None:
    book = fold_account(
        MASTER,
        [
            state(0, 1000.0, account="other"),
            opened("A", 1, account="other"),
            state(1, 10.0, currency="JPY"),
            opened("B", 2),
        ],
    )
    assert book.currency == "JPY"
    assert [p.position_id for p in book.open_positions] == ["B"]
    assert book.open_positions[0].balance_at_open == 10


def test_latency_runs_from_the_master_stamp_to_the_fill_or_the_report() -> None:
    unstamped = Trace(terminal_ns=10 * S)  # a fill found from before carries no venue stamp
    book = fold_account(
        FOLLOWER,
        [
            open_order("o1", "M1", 10),
            filled("o1", "F1", 12, price=2000.0, trace=unstamped),
            open_order("o2", "M2", 13),
            filled("o2", "F2", 14, price=2000.0),  # no master stamp: no latency
        ],
        currency="USD",
    )
    latencies = [o.latency_ns for o in book.links[LINK].orders]
    assert latencies == [2 * S, None]


def test_a_redelivered_report_changes_nothing_and_unknown_is_settled_later() -> None:
    book = fold_account(
        FOLLOWER,
        [
            open_order("o1", "M1", 1),
            OrderUnknown(
                order_id="o1", link_id=LINK, follower=FOLLOWER, ts_ns=2 * S, reason="timeout"
            ),
            OrderUnknown(
                order_id="o1", link_id=LINK, follower=FOLLOWER, ts_ns=3 * S, reason="timeout"
            ),
            filled("o1", "F1", 4, price=2000.0, volume=0.2),
            filled("o1", "F1", 4, price=2000.0, volume=0.2),
            FollowerClose(
                order_id="c1",
                link_id=LINK,
                follower=FOLLOWER,
                master=MASTER,
                master_event_id="r-M1",
                symbol="XAUUSD",
                ts_ns=5 * S,
                master_position_id="M1",
                ratio=0.5,
            ),
            filled("c1", "F1", 6, price=2001.0, volume=0.1, side=Side.SELL, profit=10.0),
            filled("c1", "F1", 6, price=2001.0, volume=0.1, side=Side.SELL, profit=10.0),
        ],
        currency="USD",
    )
    link = book.links[LINK]
    assert (link.copied, link.unknown) == (1, 0)
    assert [(c.volume, c.profit) for c in book.closed_positions] == [(0.1, 1000)]
    (rest,) = book.open_positions
    assert (rest.position_id, rest.volume) == ("F1", 0.1)
