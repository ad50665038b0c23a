"""The MT5 snapshot diff (connectors/mt5/diff.py) on records shaped exactly like the
MetaTrader5 package's: every master event kind, the order of events within one poll, and
deterministic event ids."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.mt5.diff import Snapshot, diff_snapshots, take_snapshot
from schemas import codec
from schemas.common import OrderType, Side
from schemas.master import (
    MasterEvent,
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

# The MetaTrader5 package's records, with the field names and order its documentation gives
# (positions_get, orders_get, history_deals_get).
TradePosition = collections.namedtuple(
    "TradePosition",
    [
        "ticket", "time", "time_msc", "time_update", "time_update_msc", "type", "magic",
        "identifier", "reason", "volume", "price_open", "sl", "tp", "price_current", "swap",
        "profit", "symbol", "comment", "external_id",
    ],
)  # fmt: skip
TradeOrder = collections.namedtuple(
    "TradeOrder",
    [
        "ticket", "time_setup", "time_setup_msc", "time_done", "time_done_msc",
        "time_expiration", "type", "type_time", "type_filling", "state", "magic", "position_id",
        "position_by_id", "reason", "volume_initial", "volume_current", "price_open", "sl", "tp",
        "price_current", "price_stoplimit", "symbol", "comment", "external_id",
    ],
)  # fmt: skip
TradeDeal = collections.namedtuple(
    "TradeDeal",
    [
        "ticket", "order", "time", "time_msc", "type", "entry", "magic", "position_id", "reason",
        "volume", "price", "commission", "swap", "profit", "fee", "symbol", "comment",
        "external_id",
    ],
)  # fmt: skip

ACCOUNT = "m1"
SYMBOL = "XAUUSD"
T0 = 1_767_600_000  # server seconds
NOW_NS = (T0 + 60) * 1_000_000_000
BUY, SELL = 0, 1  # POSITION_TYPE_* / DEAL_TYPE_* / ORDER_TYPE_*
BUY_LIMIT, SELL_LIMIT, BUY_STOP, SELL_STOP, BUY_STOP_LIMIT = 2, 3, 4, 5, 6
ENTRY_IN, ENTRY_OUT, ENTRY_INOUT, ENTRY_OUT_BY = 0, 1, 2, 3
REASON_CLIENT, REASON_MOBILE, REASON_WEB, REASON_EXPERT = 0, 1, 2, 3
REASON_SL, REASON_TP, REASON_SO = 4, 5, 6


def position(
    ticket: int, *, type: int = BUY, volume: float = 0.1, price_open: float = 2000.0,
    sl: float = 0.0, tp: float = 0.0, at: int = T0, updated: int | None = None, magic: int = 7,
    comment: str = "", identifier: int | None = None, price_current: float = 2001.0,
) -> TradePosition:  # fmt: skip
    updated = at if updated is None else updated
    return TradePosition(
        ticket=ticket, time=at, time_msc=at * 1000 + 250, time_update=updated,
        time_update_msc=updated * 1000 + 250, type=type, magic=magic,
        identifier=ticket if identifier is None else identifier, reason=REASON_EXPERT,
        volume=volume, price_open=price_open, sl=sl, tp=tp, price_current=price_current,
        swap=0.0, profit=0.0, symbol=SYMBOL, comment=comment, external_id="",
    )  # fmt: skip


def pending(
    ticket: int, *, type: int = BUY_LIMIT, volume: float = 0.2, price: float = 1990.0,
    sl: float = 0.0, tp: float = 0.0, expiration: int = 0, at: int = T0, magic: int = 7,
    comment: str = "",
) -> TradeOrder:  # fmt: skip
    return TradeOrder(
        ticket=ticket, time_setup=at, time_setup_msc=at * 1000 + 100, time_done=0,
        time_done_msc=0, time_expiration=expiration, type=type, type_time=2 if expiration else 0,
        type_filling=2, state=1, magic=magic, position_id=0, position_by_id=0,
        reason=REASON_EXPERT, volume_initial=volume, volume_current=volume, price_open=price,
        sl=sl, tp=tp, price_current=2000.0, price_stoplimit=0.0, symbol=SYMBOL,
        comment=comment, external_id="",
    )  # fmt: skip


def deal(
    ticket: int, *, position_id: int, order: int, type: int = SELL, entry: int = ENTRY_OUT,
    reason: int = REASON_CLIENT, volume: float = 0.1, price: float = 2005.0, at: int = T0 + 5,
    magic: int = 7, comment: str = "",
) -> TradeDeal:  # fmt: skip
    return TradeDeal(
        ticket=ticket, order=order, time=at, time_msc=at * 1000 + 500, type=type, entry=entry,
        magic=magic, position_id=position_id, reason=reason, volume=volume, price=price,
        commission=0.0, swap=0.0, profit=0.0, fee=0.0, symbol=SYMBOL, comment=comment,
        external_id="",
    )  # fmt: skip


def snap(positions: Sequence[Any] = (), orders: Sequence[Any] = (), offset_s: int = 0) -> Snapshot:
    return take_snapshot(positions, orders, offset_s)


def diff(
    before: Snapshot, after: Snapshot, deals: Sequence[Any] = (), offset_s: int = 0
) -> list[MasterEvent]:
    events, _ = diff_snapshots(
        ACCOUNT, before, after, deals, now_ns=NOW_NS, server_utc_offset_s=offset_s
    )
    return events


def ms_ns(seconds: int, extra_ms: int) -> int:
    return (seconds * 1000 + extra_ms) * 1_000_000


# --- positions ------------------------------------------------------------------------------


def test_new_position_is_opened_with_its_levels_magic_and_comment() -> None:
    after = snap([position(501, type=SELL, sl=2010.0, tp=1980.0, comment="grid #3")])
    (event,) = diff(snap(), after)
    assert event == PositionOpened(
        event_id="m1-501-opened", master=ACCOUNT, symbol=SYMBOL, ts_ns=ms_ns(T0, 250),
        position_id="501", side=Side.SELL, volume=0.1, price=2000.0, sl=2010.0, tp=1980.0,
        magic=7, comment="grid #3",
    )  # fmt: skip


def test_sl_tp_change_is_a_modification_and_zero_means_no_level() -> None:
    before = snap([position(501, sl=1990.0, tp=2020.0)])
    after = snap([position(501, sl=1995.0, tp=0.0, updated=T0 + 9)])
    (event,) = diff(before, after)
    assert isinstance(event, PositionModified)
    assert (event.position_id, event.sl, event.tp) == ("501", 1995.0, None)
    assert event.ts_ns == ms_ns(T0 + 9, 250)
    assert event.event_id == "m1-501-modified-1"


def test_partial_close_keeps_the_ticket_and_reports_both_volumes_at_the_deal_price() -> None:
    before = snap([position(501, volume=0.3)])
    after = snap([position(501, volume=0.1)])
    out = deal(9001, position_id=501, order=777, volume=0.2, price=2003.5)
    (event,) = diff(before, after, [out])
    assert isinstance(event, PositionReduced)
    assert (event.position_id, event.volume_before, event.volume_after) == ("501", 0.3, 0.1)
    assert event.price == 2003.5
    assert event.side is Side.BUY
    assert event.new_position_id is None
    assert event.ts_ns == ms_ns(T0 + 5, 500)


@pytest.mark.parametrize(
    ("deal_reason", "reason"),
    [
        (REASON_SL, "sl"),
        (REASON_TP, "tp"),
        (REASON_SO, "stop_out"),
        (REASON_EXPERT, "expert"),
        (REASON_CLIENT, "client"),
        (REASON_MOBILE, "client"),
        (REASON_WEB, "client"),
    ],
)
def test_close_reason_comes_from_the_closing_deal(deal_reason: int, reason: str) -> None:
    before = snap([position(501, volume=0.3)])
    out = deal(9001, position_id=501, order=778, reason=deal_reason, volume=0.3, price=1987.25)
    (event,) = diff(before, snap(), [out])
    assert isinstance(event, PositionClosed)
    assert (event.position_id, event.volume, event.price, event.reason) == (
        "501", 0.3, 1987.25, reason,
    )  # fmt: skip
    assert event.event_id == "m1-501-closed"


def test_close_whose_deal_is_not_in_history_yet_is_a_client_close_at_the_last_price() -> None:
    before = snap([position(501, price_current=2001.75)])
    (event,) = diff(before, snap())
    assert isinstance(event, PositionClosed)
    assert (event.reason, event.price, event.ts_ns) == ("client", 2001.75, NOW_NS)


def test_close_by_is_one_event_naming_both_positions_and_no_separate_closes() -> None:
    before = snap([position(501, type=BUY, volume=0.2), position(502, type=SELL, volume=0.2)])
    legs = [
        deal(9001, position_id=501, order=800, type=SELL, entry=ENTRY_OUT_BY, volume=0.2),
        deal(9002, position_id=502, order=800, type=BUY, entry=ENTRY_OUT_BY, volume=0.2),
    ]
    (event,) = diff(before, snap(), legs)
    assert event == PositionClosedBy(
        event_id="m1-800-closed_by", master=ACCOUNT, symbol=SYMBOL, ts_ns=ms_ns(T0 + 5, 500),
        position_id="501", opposite_position_id="502", side=Side.BUY, volume=0.2, magic=7,
    )  # fmt: skip


def test_partial_close_by_leaves_the_larger_position_without_a_reduction_event() -> None:
    before = snap([position(501, type=BUY, volume=0.5), position(502, type=SELL, volume=0.2)])
    after = snap([position(501, type=BUY, volume=0.3)])
    legs = [
        deal(9001, position_id=501, order=800, type=SELL, entry=ENTRY_OUT_BY, volume=0.2),
        deal(9002, position_id=502, order=800, type=BUY, entry=ENTRY_OUT_BY, volume=0.2),
    ]
    events = diff(before, after, legs)
    assert [type(e) for e in events] == [PositionClosedBy]
    assert events[0].volume == 0.2


def test_position_is_followed_by_identifier_through_a_server_side_ticket_change() -> None:
    before = snap([position(501)])
    after = snap([position(990, identifier=501)])  # swap charged by re-opening: new ticket
    events, snapshot = diff_snapshots(ACCOUNT, before, after, now_ns=NOW_NS)
    assert events == []
    assert snapshot.positions["501"].ticket == "990"


# --- pending orders -------------------------------------------------------------------------


def test_pending_order_placed_then_modified_then_cancelled() -> None:
    placed = snap(orders=[pending(601, type=SELL_STOP, price=1980.0, expiration=T0 + 3600)])
    (event,) = diff(snap(), placed)
    assert isinstance(event, PendingOrderPlaced)
    assert (event.order_id, event.order_type, event.price, event.volume) == (
        "601", OrderType.SELL_STOP, 1980.0, 0.2,
    )  # fmt: skip
    assert event.expiration_ns == (T0 + 3600) * 1_000_000_000

    moved = snap(orders=[pending(601, type=SELL_STOP, price=1975.0, sl=1985.0)])
    (event,) = diff(placed, moved)
    assert isinstance(event, PendingOrderModified)
    assert (event.price, event.sl, event.expiration_ns) == (1975.0, 1985.0, 0)

    (event,) = diff(moved, snap())
    assert isinstance(event, PendingOrderCancelled)
    assert (event.order_id, event.order_type, event.event_id) == (
        "601", OrderType.SELL_STOP, "m1-601-cancelled",
    )  # fmt: skip


def test_pending_trigger_is_one_event_carrying_the_new_position() -> None:
    before = snap(orders=[pending(601, type=BUY_STOP, price=2004.0, sl=1990.0)])
    after = snap([position(601, type=BUY, volume=0.2, price_open=2004.2, sl=1990.0, at=T0 + 8)])
    (event,) = diff(before, after, [deal(9001, position_id=601, order=601, type=BUY,
                                         entry=ENTRY_IN, volume=0.2)])  # fmt: skip
    assert event == PendingOrderTriggered(
        event_id="m1-601-triggered", master=ACCOUNT, symbol=SYMBOL, ts_ns=ms_ns(T0 + 8, 250),
        order_id="601", order_type=OrderType.BUY_STOP, position_id="601", side=Side.BUY,
        volume=0.2, price=2004.2, sl=1990.0, tp=None, magic=7,
    )  # fmt: skip


def test_pending_filled_and_closed_between_two_polls_is_triggered_then_closed() -> None:
    before = snap(orders=[pending(601, type=BUY_LIMIT, price=1990.0)])
    fills = [
        deal(9001, position_id=601, order=601, type=BUY, entry=ENTRY_IN, volume=0.2,
             price=1990.0, at=T0 + 2),
        deal(9002, position_id=601, order=602, type=SELL, entry=ENTRY_OUT, volume=0.2,
             price=1985.0, reason=REASON_SL, at=T0 + 3),
    ]  # fmt: skip
    events = diff(before, snap(), fills)
    assert [type(e) for e in events] == [PendingOrderTriggered, PositionClosed]
    assert events[1].position_id == events[0].position_id == "601"
    assert (events[1].reason, events[1].price, events[1].volume) == ("sl", 1985.0, 0.2)


def test_market_orders_in_flight_and_stop_limits_are_not_pending_orders() -> None:
    after = snap(orders=[pending(601, type=BUY), pending(602, type=BUY_STOP_LIMIT)])
    assert after.orders == {}
    assert diff(snap(), after) == []


def test_balance_and_other_money_deals_are_ignored() -> None:
    before = snap([position(501)])
    balance = deal(9001, position_id=501, order=0, type=2, volume=0.0, price=0.0)
    (event,) = diff(before, snap(), [balance])
    assert isinstance(event, PositionClosed)
    assert (event.reason, event.price) == ("client", 2001.0)


# --- one poll, many changes -----------------------------------------------------------------


def test_several_changes_in_one_poll_come_opens_then_modifies_then_closes_each_by_time() -> None:
    before = snap(
        [position(501), position(502, sl=1990.0), position(503, volume=0.3)],
        [pending(601)],
    )
    after = snap(
        [
            position(502, sl=1995.0, updated=T0 + 4),
            position(503, volume=0.1),
            position(504, at=T0 + 9),
            position(505, at=T0 + 7),
        ],
        [pending(602, at=T0 + 8)],
    )
    deals = [
        deal(9001, position_id=501, order=701, volume=0.1, at=T0 + 6),
        deal(9002, position_id=503, order=702, volume=0.2, at=T0 + 3),
    ]
    events = diff(before, after, deals)
    assert [(type(e).__name__, e.event_id) for e in events] == [
        ("PositionOpened", "m1-505-opened"),
        ("PendingOrderPlaced", "m1-602-placed"),
        ("PositionOpened", "m1-504-opened"),
        ("PositionModified", "m1-502-modified-1"),
        ("PositionReduced", "m1-503-reduced-1"),
        ("PositionClosed", "m1-501-closed"),
        ("PendingOrderCancelled", "m1-601-cancelled"),
    ]


def test_record_times_are_shifted_from_server_time_to_utc() -> None:
    offset = 2 * 3600
    after = snap([position(501)], offset_s=offset)
    (event,) = diff(snap(), after, offset_s=offset)
    assert event.ts_ns == ms_ns(T0 - offset, 250)


# --- deterministic ids ----------------------------------------------------------------------


def test_the_same_change_diffed_twice_gives_the_same_events_and_ids() -> None:
    before = snap([position(501, volume=0.3), position(502, sl=1990.0)], [pending(601)])
    after_records = [position(501, volume=0.1), position(502, sl=1992.0), position(503)]
    deals = [deal(9001, position_id=501, order=701, volume=0.2)]
    first = diff(before, snap(after_records), deals)
    # A restarted poller re-reads the same change, the terminal listing records in its order.
    again = diff(before, snap(list(reversed(after_records))), list(reversed(deals)))
    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert first == again
    assert len({e.event_id for e in first}) == len(first) == 4


def test_repeated_changes_of_one_position_get_new_ids_even_back_to_old_levels() -> None:
    a = snap([position(501, sl=1990.0)])
    ids = []
    snapshot = a
    for sl in (1995.0, 1990.0, 1995.0):
        events, snapshot = diff_snapshots(
            ACCOUNT, snapshot, snap([position(501, sl=sl)]), now_ns=NOW_NS
        )
        ids += [e.event_id for e in events]
    assert ids == ["m1-501-modified-1", "m1-501-modified-2", "m1-501-modified-3"]


def test_every_event_is_valid_on_the_wire() -> None:
    before = snap([position(501), position(502, type=SELL)], [pending(601)])
    after = snap([position(503, sl=1.5)], [pending(604, type=SELL_LIMIT)])
    events = diff(before, after)
    assert events
    for event in events:
        assert codec.master_event_decoder.decode(codec.encode(event)) == event


# --- property -------------------------------------------------------------------------------

TICKETS = st.integers(min_value=1, max_value=8)
VOLUMES = st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.5])
LEVELS = st.sampled_from([0.0, 1990.0, 2010.0])


@st.composite
def positions_st(draw: st.DrawFn) -> list[TradePosition]:
    tickets = draw(st.lists(TICKETS, unique=True, max_size=5))
    return [
        position(
            t, type=draw(st.sampled_from([BUY, SELL])), volume=draw(VOLUMES),
            sl=draw(LEVELS), tp=draw(LEVELS), at=T0 + draw(st.integers(0, 5)),
        )
        for t in tickets
    ]  # fmt: skip


@st.composite
def orders_st(draw: st.DrawFn) -> list[TradeOrder]:
    tickets = draw(st.lists(TICKETS, unique=True, max_size=4))
    return [
        pending(t, type=draw(st.integers(0, 7)), price=draw(st.sampled_from([1990.0, 1995.0])),
                sl=draw(LEVELS))
        for t in tickets
    ]  # fmt: skip


DEALS = st.lists(
    st.builds(
        deal,
        st.integers(9000, 9020),
        position_id=TICKETS,
        order=st.integers(1, 12),
        type=st.integers(0, 2),
        entry=st.integers(0, 3),
        reason=st.integers(0, 9),
        volume=VOLUMES,
        price=st.sampled_from([1980.0, 2000.0]),
        at=st.integers(T0, T0 + 9),
    ),
    max_size=6,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(positions_st(), orders_st(), DEALS), min_size=1, max_size=6))
def test_random_snapshot_sequences_never_raise_nor_close_an_unknown_ticket(
    polls: list[tuple[list[TradePosition], list[TradeOrder], list[TradeDeal]]],
) -> None:
    previous = snap()
    for positions, orders, deals in polls:
        events, current = diff_snapshots(ACCOUNT, previous, snap(positions, orders), deals,
                                         now_ns=NOW_NS)  # fmt: skip
        opened: set[str] = set()
        for event in events:
            if isinstance(event, PositionOpened | PendingOrderTriggered):
                opened.add(event.position_id)
            known = previous.positions.keys() | opened
            if isinstance(event, PositionClosed | PositionReduced | PositionModified):
                assert event.position_id in known, event
            if isinstance(event, PositionClosedBy):
                assert {event.position_id, event.opposite_position_id} <= known, event
            if isinstance(
                event, PendingOrderTriggered | PendingOrderModified | PendingOrderCancelled
            ):
                assert event.order_id in previous.orders, event
            assert codec.master_event_decoder.decode(codec.encode(event)) == event
        assert len({e.event_id for e in events}) == len(events)
        assert current.positions.keys() == snap(positions, orders).positions.keys()
        previous = current
