"""Bridge parsing: terminal event frames into master events, and missed events from snapshots."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.bridge.parsing import event_id, master_event, missed_events
from schemas.bridge import (
    BridgeOrder,
    BridgePosition,
    EventKind,
    TradeEvent,
    terminal_frame_decoder,
)
from schemas.codec import encode, master_event_decoder
from schemas.common import OrderType, Side, Trace
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

ACCOUNT = "alpari-1001"
SESSION = "65f1c0a2b3d4e5f60718293a"  # 24 hex digits, as the EA makes them
T = 1_771_207_620_000_000_000
NOW = 1_771_207_700_000_000_000
POSITION_KINDS = [
    EventKind.OPENED,
    EventKind.MODIFIED,
    EventKind.REDUCED,
    EventKind.CLOSED,
    EventKind.CLOSED_BY,
]
PENDING_KINDS = [k for k in EventKind if k not in POSITION_KINDS]


def frame(kind: EventKind, **fields: Any) -> TradeEvent:
    """A frame as the terminal sends it: JSON through the terminal-frame decoder."""
    body = {"t": "event", "seq": 7, "kind": kind.value, "ticket": "1000002", "symbol": "XAUUSD"}
    body.update(fields)
    decoded = terminal_frame_decoder.decode(msgspec.json.encode(body))
    assert isinstance(decoded, TradeEvent)
    return decoded


def parse(kind: EventKind, **fields: Any) -> MasterEvent:
    return master_event(ACCOUNT, SESSION, frame(kind, **fields))


def on_the_wire(event: MasterEvent) -> bool:
    return master_event_decoder.decode(encode(event)) == event


# ------------------------------------------------------------------------------ event ids


def test_an_event_id_is_account_session_and_frame_sequence() -> None:
    assert event_id(ACCOUNT, SESSION, 7) == f"{ACCOUNT}:{SESSION}:7"


def test_a_resent_frame_keeps_its_id_and_two_frames_in_one_millisecond_do_not_collide() -> None:
    first = parse(EventKind.MODIFIED, side="buy", sl=5000.5, time=T)
    resent = parse(EventKind.MODIFIED, side="buy", sl=5000.5, time=T)
    second = master_event(
        ACCOUNT, SESSION, frame(EventKind.MODIFIED, seq=8, side="buy", sl=5001.0, time=T)
    )
    other_session = master_event(
        ACCOUNT, "0000", frame(EventKind.MODIFIED, side="buy", sl=5000.5, time=T)
    )
    assert first.event_id == resent.event_id
    assert len({first.event_id, second.event_id, other_session.event_id}) == 3


# ------------------------------------------------------------------------ position events


def test_an_opened_frame_is_a_position_opened_of_the_configured_account() -> None:
    event = parse(
        EventKind.OPENED,
        side="buy",
        volume=0.1,
        price=5010.69,
        sl=5000.5,
        tp=5030.0,
        magic=7,
        comment="manual",
        time=T,
    )
    assert event == PositionOpened(
        event_id=f"{ACCOUNT}:{SESSION}:7",
        master=ACCOUNT,
        symbol="XAUUSD",
        ts_ns=T,
        trace=Trace(terminal_ns=T),  # the terminal's execution time starts the trace
        position_id="1000002",
        side=Side.BUY,
        volume=0.1,
        price=5010.69,
        sl=5000.5,
        tp=5030.0,
        magic=7,
        comment="manual",
    )
    assert on_the_wire(event)


def test_a_level_of_zero_means_no_level() -> None:
    opened = parse(EventKind.OPENED, side="sell", volume=0.1, price=5010.5, sl=0, tp=0.0)
    assert isinstance(opened, PositionOpened)
    assert (opened.sl, opened.tp) == (None, None)


def test_a_modified_frame_moves_the_levels_and_zero_removes_one() -> None:
    event = parse(EventKind.MODIFIED, side="sell", sl=5020.0, tp=0, time=T)
    assert isinstance(event, PositionModified)
    assert (event.position_id, event.side, event.sl, event.tp) == (
        "1000002",
        Side.SELL,
        5020.0,
        None,
    )


def test_a_reduced_frame_carries_both_volumes_and_mt4s_new_ticket() -> None:
    mt5 = parse(EventKind.REDUCED, side="buy", volume_before=0.3, volume_after=0.1, price=5011.0)
    mt4 = parse(
        EventKind.REDUCED,
        side="buy",
        volume_before=0.3,
        volume_after=0.1,
        price=5011.0,
        new_ticket="2000000001",
    )
    assert isinstance(mt5, PositionReduced) and isinstance(mt4, PositionReduced)
    assert (mt5.volume_before, mt5.volume_after, mt5.price) == (0.3, 0.1, 5011.0)
    assert mt5.new_position_id is None
    assert mt4.new_position_id == "2000000001"


@pytest.mark.parametrize(
    ("reason", "expected"), [("", "client"), ("sl", "sl"), ("stop_out", "stop_out")]
)
def test_a_closed_frame_says_why_and_a_plain_close_is_the_clients(
    reason: str, expected: str
) -> None:
    event = parse(EventKind.CLOSED, side="buy", volume=0.1, price=5014.77, reason=reason)
    assert isinstance(event, PositionClosed)
    assert (event.volume, event.price, event.reason) == (0.1, 5014.77, expected)


def test_a_closed_by_frame_names_both_positions() -> None:
    event = parse(EventKind.CLOSED_BY, side="buy", volume=0.1, opposite_ticket="1000003")
    assert event == PositionClosedBy(
        event_id=f"{ACCOUNT}:{SESSION}:7",
        master=ACCOUNT,
        symbol="XAUUSD",
        ts_ns=0,
        position_id="1000002",
        opposite_position_id="1000003",
        side=Side.BUY,
        volume=0.1,
    )


def test_a_closed_by_frame_without_the_opposite_ticket_is_rejected() -> None:
    with pytest.raises(ValueError, match="closed_by event needs opposite_ticket"):
        parse(EventKind.CLOSED_BY, side="buy", volume=0.1)


@pytest.mark.parametrize("opposite", ["0", "-1000003", " 0 ", "  "])
def test_a_closed_by_frame_with_a_zero_or_negative_opposite_ticket_is_rejected(
    opposite: str,
) -> None:
    """The MT5 EA sent "0" when the close-by order was not in history yet: a close-by of a
    position no follower holds. Refused, the terminal is told and a snapshot settles it."""
    with pytest.raises(ValueError, match="closed_by event needs opposite_ticket"):
        parse(EventKind.CLOSED_BY, side="buy", volume=0.1, opposite_ticket=opposite)


def test_a_closed_by_frame_with_a_non_numeric_opposite_id_is_kept() -> None:
    """Venues other than MetaTrader (the paper venue) name positions with non-numeric ids."""
    event = parse(EventKind.CLOSED_BY, side="buy", volume=0.1, opposite_ticket="p-42")
    assert isinstance(event, PositionClosedBy) and event.opposite_position_id == "p-42"


@pytest.mark.parametrize("kind", POSITION_KINDS)
def test_a_position_frame_without_a_side_is_rejected(kind: EventKind) -> None:
    with pytest.raises(ValueError, match=f"a {kind.value} event needs side"):
        parse(kind, volume=0.1, price=5000.0, opposite_ticket="1000003")


# ------------------------------------------------------------------------- pending events


def test_a_pending_placed_frame_carries_price_levels_expiration_and_comment() -> None:
    event = parse(
        EventKind.PENDING_PLACED,
        order_type="buy_limit",
        volume=0.25,
        price=4990.0,
        tp=5050.0,
        sl=0,
        expiration=T + 3_600_000_000_000,
        magic=3,
        comment="grid",
        time=T,
    )
    assert event == PendingOrderPlaced(
        event_id=f"{ACCOUNT}:{SESSION}:7",
        master=ACCOUNT,
        symbol="XAUUSD",
        ts_ns=T,
        trace=Trace(terminal_ns=T),
        order_id="1000002",
        order_type=OrderType.BUY_LIMIT,
        volume=0.25,
        price=4990.0,
        sl=None,
        tp=5050.0,
        expiration_ns=T + 3_600_000_000_000,
        magic=3,
        comment="grid",
    )
    assert on_the_wire(event)


def test_a_pending_modified_frame_carries_the_new_price_levels_and_expiration() -> None:
    event = parse(
        EventKind.PENDING_MODIFIED,
        order_type="sell_stop",
        price=4980.0,
        sl=4995.0,
        expiration=T + 1,
    )
    assert isinstance(event, PendingOrderModified)
    assert (event.order_type, event.price, event.sl, event.tp, event.expiration_ns) == (
        OrderType.SELL_STOP,
        4980.0,
        4995.0,
        None,
        T + 1,
    )


def test_a_pending_cancelled_frame_names_the_order() -> None:
    event = parse(EventKind.PENDING_CANCELLED, order_type="buy_stop", magic=5)
    assert isinstance(event, PendingOrderCancelled)
    assert (event.order_id, event.order_type, event.magic) == ("1000002", OrderType.BUY_STOP, 5)


def test_a_triggered_frame_becomes_the_position_the_terminal_names() -> None:
    event = parse(
        EventKind.PENDING_TRIGGERED,
        order_type="sell_limit",
        position_ticket="1000009",
        volume=0.25,
        price=5020.0,
        sl=5030.0,
        tp=0,
    )
    assert isinstance(event, PendingOrderTriggered)
    assert (event.order_id, event.position_id) == ("1000002", "1000009")
    # The side follows from the order type; the frame need not say it.
    assert (event.side, event.volume, event.price, event.sl, event.tp) == (
        Side.SELL,
        0.25,
        5020.0,
        5030.0,
        None,
    )


def test_a_triggered_frame_without_a_position_ticket_keeps_the_orders_ticket() -> None:
    event = parse(EventKind.PENDING_TRIGGERED, order_type="buy_stop", volume=0.1, price=5010.0)
    assert isinstance(event, PendingOrderTriggered)
    assert (event.position_id, event.side) == ("1000002", Side.BUY)


@pytest.mark.parametrize("kind", PENDING_KINDS)
def test_a_pending_frame_without_an_order_type_is_rejected(kind: EventKind) -> None:
    with pytest.raises(ValueError, match=f"a {kind.value} event needs order_type"):
        parse(kind, side="buy", volume=0.1, price=5000.0)


FRAME_KINDS = st.sampled_from(EventKind)
LEVELS = st.one_of(st.none(), st.just(0.0), st.floats(0.01, 1e6))


@settings(max_examples=200, deadline=None)
@given(
    kind=FRAME_KINDS,
    seq=st.integers(1, 2**53),
    side=st.one_of(st.none(), st.sampled_from(Side)),
    order_type=st.one_of(st.none(), st.sampled_from(OrderType)),
    volume=st.floats(0.0, 1e4),
    price=st.floats(0.0, 1e6),
    sl=LEVELS,
    tp=LEVELS,
    opposite=st.sampled_from(["", "0", "1000003"]),
    time=st.integers(0, 2**62),
)
def test_every_well_formed_frame_becomes_a_valid_event_or_a_named_rejection(
    kind: EventKind,
    seq: int,
    side: Side | None,
    order_type: OrderType | None,
    volume: float,
    price: float,
    sl: float | None,
    tp: float | None,
    opposite: str,
    time: int,
) -> None:
    fields = {"side": side, "order_type": order_type, "volume": volume, "price": price}
    fields.update(sl=sl, tp=tp, opposite_ticket=opposite, time=time, seq=seq)
    fields.update(volume_before=volume, volume_after=volume / 2, expiration=time)
    try:
        event = parse(kind, **fields)
    except ValueError as exc:
        assert "needs" in str(exc)
        return
    assert on_the_wire(event)
    assert event.ts_ns == time and event.master == ACCOUNT


@pytest.mark.parametrize("field", ["volume", "price", "time"])
def test_a_frame_with_a_negative_number_is_rejected(field: str) -> None:
    fields: dict[str, Any] = {"side": "buy", "volume": 0.1, "price": 5000.0, "time": T}
    fields[field] = -1
    with pytest.raises(ValueError):
        parse(EventKind.OPENED, **fields)


def test_the_longest_account_and_session_the_protocol_allows_make_valid_events() -> None:
    account, session = "a" * 64, "s" * 64
    event = master_event(account, session, frame(EventKind.OPENED, side="buy", volume=0.1))
    assert len(event.event_id) <= 128
    assert on_the_wire(event)


# ------------------------------------------------------------------------ missed events


def position(ticket: str, **fields: Any) -> BridgePosition:
    base: dict[str, Any] = {"symbol": "XAUUSD", "side": Side.BUY, "volume": 0.3, "price": 5010.69}
    base.update(fields)
    return BridgePosition(ticket=ticket, **base)


def order(ticket: str, **fields: Any) -> BridgeOrder:
    base: dict[str, Any] = {
        "symbol": "XAUUSD",
        "order_type": OrderType.BUY_LIMIT,
        "volume": 0.25,
        "price": 4990.0,
    }
    base.update(fields)
    return BridgeOrder(ticket=ticket, **base)


def missed(
    before_p: list[BridgePosition],
    before_o: list[BridgeOrder],
    now_p: list[BridgePosition],
    now_o: list[BridgeOrder],
) -> list[MasterEvent]:
    return missed_events(ACCOUNT, before_p, before_o, now_p, now_o, NOW)


def reconciled_id(kind: str, ticket: str) -> str:
    return f"{ACCOUNT}:reconciled:{kind}:{ticket}:{NOW}"


def test_nothing_changed_means_nothing_was_missed() -> None:
    positions, orders = [position("1", sl=5000.0)], [order("2", tp=5050.0)]
    assert missed(positions, orders, list(positions), list(orders)) == []


def test_a_new_position_was_opened_with_its_levels_magic_and_comment() -> None:
    new = position("5", side=Side.SELL, sl=5020.0, tp=4990.0, magic=9, comment="manual")
    assert missed([], [], [new], []) == [
        PositionOpened(
            event_id=reconciled_id("opened", "5"),
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=NOW,
            position_id="5",
            side=Side.SELL,
            volume=0.3,
            price=5010.69,
            sl=5020.0,
            tp=4990.0,
            magic=9,
            comment="manual",
        )
    ]


def test_a_vanished_position_was_closed_at_an_unknown_price() -> None:
    gone = position("5", side=Side.SELL, volume=0.2, magic=4)
    assert missed([gone], [], [], []) == [
        PositionClosed(
            event_id=reconciled_id("closed", "5"),
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=NOW,
            position_id="5",
            side=Side.SELL,
            volume=0.2,
            price=0.0,  # followers close at their own market price
            magic=4,
            reason="reconciled",
        )
    ]


def test_a_smaller_position_was_partly_closed_and_new_levels_were_a_modification() -> None:
    before = position("5", volume=0.3, sl=5000.0)
    after = position("5", volume=0.1, sl=5005.0, tp=5030.0)
    events = missed([before], [], [after], [])
    assert [type(e) for e in events] == [PositionReduced, PositionModified]
    reduced, modified = events
    assert isinstance(reduced, PositionReduced) and isinstance(modified, PositionModified)
    assert (reduced.volume_before, reduced.volume_after, reduced.price) == (0.3, 0.1, 0.0)
    assert (modified.sl, modified.tp) == (5005.0, 5030.0)
    assert [e.event_id for e in events] == [
        reconciled_id("reduced", "5"),
        reconciled_id("modified", "5"),
    ]


def test_volume_noise_is_not_a_partial_close() -> None:
    assert missed([position("5", volume=0.3)], [], [position("5", volume=0.3 - 1e-12)], []) == []


def test_a_new_pending_order_was_placed_with_its_expiration() -> None:
    new = order("8", order_type=OrderType.SELL_STOP, price=4980.0, sl=4995.0, expiration=T, magic=2)
    assert missed([], [], [], [new]) == [
        PendingOrderPlaced(
            event_id=reconciled_id("pending_placed", "8"),
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=NOW,
            order_id="8",
            order_type=OrderType.SELL_STOP,
            volume=0.25,
            price=4980.0,
            sl=4995.0,
            expiration_ns=T,
            magic=2,
        )
    ]


def test_a_moved_pending_order_was_modified() -> None:
    events = missed([], [order("8", price=4990.0)], [], [order("8", price=4985.0, tp=5000.0)])
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, PendingOrderModified)
    assert (event.event_id, event.price, event.sl, event.tp) == (
        reconciled_id("pending_modified", "8"),
        4985.0,
        None,
        5000.0,
    )


def test_a_pending_order_changed_while_disconnected_keeps_its_expiration() -> None:
    before = order("8", price=4990.0, expiration=T)
    moved = missed([], [before], [], [order("8", price=4985.0, expiration=T)])
    extended = missed([], [before], [], [order("8", price=4990.0, expiration=T + 1)])
    assert [(type(e), getattr(e, "expiration_ns", None)) for e in moved] == [
        (PendingOrderModified, T)
    ]
    assert [(type(e), getattr(e, "expiration_ns", None)) for e in extended] == [
        (PendingOrderModified, T + 1)
    ]


def test_an_order_that_became_a_position_was_triggered_not_cancelled_and_opened() -> None:
    was = order("8", order_type=OrderType.SELL_LIMIT, volume=0.25, price=5020.0)
    became = position("8", side=Side.SELL, volume=0.25, price=5020.4, sl=5030.0, magic=6)
    assert missed([], [was], [became], []) == [
        PendingOrderTriggered(
            event_id=reconciled_id("pending_triggered", "8"),
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=NOW,
            order_id="8",
            order_type=OrderType.SELL_LIMIT,
            position_id="8",
            side=Side.SELL,
            volume=0.25,
            price=5020.4,
            sl=5030.0,
            magic=6,
        )
    ]


def test_a_vanished_order_without_a_position_was_cancelled() -> None:
    assert missed([], [order("8", magic=1)], [], []) == [
        PendingOrderCancelled(
            event_id=reconciled_id("pending_cancelled", "8"),
            master=ACCOUNT,
            symbol="XAUUSD",
            ts_ns=NOW,
            order_id="8",
            order_type=OrderType.BUY_LIMIT,
            magic=1,
        )
    ]


def test_missed_events_come_orders_first_then_opens_and_changes_then_closes_then_cancels() -> None:
    before_p = [position("1"), position("2", volume=0.3)]
    before_o = [order("3"), order("4")]
    now_p = [position("2", volume=0.1), position("5"), position("3")]
    now_o = [order("6")]
    events = missed(before_p, before_o, now_p, now_o)
    assert [
        (type(e).__name__, getattr(e, "position_id", getattr(e, "order_id", ""))) for e in events
    ] == [
        ("PendingOrderPlaced", "6"),
        ("PositionReduced", "2"),
        ("PositionOpened", "5"),
        ("PendingOrderTriggered", "3"),
        ("PositionClosed", "1"),
        ("PendingOrderCancelled", "4"),
    ]


# Snapshots that MetaTrader can produce one after the other: a ticket is a position, an order
# or absent; an order may become a position of its side; a position only shrinks or moves.
TICKETS = [str(t) for t in range(1_000_001, 1_000_007)]
LEVEL = st.one_of(st.none(), st.sampled_from([4980.0, 5000.0, 5040.0]))


SIDES = st.sampled_from(Side)
ORDER_TYPES = st.sampled_from(OrderType)
PRICES = st.sampled_from([4990.0, 5010.0])
FATES = st.sampled_from(["position", "order", "absent"])


@st.composite
def snapshot_pairs(
    draw: st.DrawFn,
) -> tuple[list[BridgePosition], list[BridgeOrder], list[BridgePosition], list[BridgeOrder]]:
    before_p, before_o, now_p, now_o = [], [], [], []
    for ticket in TICKETS:
        was, now = draw(FATES), draw(FATES)
        if was == "position":
            volume = draw(st.sampled_from([0.1, 0.3]))
            p = position(ticket, side=draw(SIDES), volume=volume, sl=draw(LEVEL), tp=draw(LEVEL))
            before_p.append(p)
            if now != "absent":  # a position never becomes an order; it shrinks or moves
                shrunk = draw(st.sampled_from([0.1, volume]))
                now_p.append(
                    msgspec.structs.replace(p, volume=shrunk, sl=draw(LEVEL), tp=draw(LEVEL))
                )
        elif was == "order":
            o = order(ticket, order_type=draw(ORDER_TYPES), price=draw(PRICES), sl=draw(LEVEL))
            before_o.append(o)
            if now == "order":
                now_o.append(msgspec.structs.replace(o, price=draw(PRICES), sl=draw(LEVEL)))
            elif now == "position":  # triggered: a position of the order's side
                side = o.order_type.side
                now_p.append(position(ticket, side=side, volume=o.volume, sl=draw(LEVEL)))
        elif now == "order":
            now_o.append(order(ticket, order_type=draw(ORDER_TYPES), tp=draw(LEVEL)))
        elif now == "position":
            now_p.append(position(ticket, side=draw(SIDES), sl=draw(LEVEL)))
    return before_p, before_o, now_p, now_o


def replay(
    positions: list[BridgePosition], orders: list[BridgeOrder], events: list[MasterEvent]
) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    """Apply master events to a terminal's book, as a follower's copy would follow them."""
    book_p = {p.ticket: (p.side, p.volume, p.sl, p.tp) for p in positions}
    book_o = {o.ticket: (o.order_type, o.price, o.sl, o.tp) for o in orders}
    for e in events:
        if isinstance(e, PositionOpened):
            assert e.position_id not in book_p
            book_p[e.position_id] = (e.side, e.volume, e.sl, e.tp)
        elif isinstance(e, PendingOrderTriggered):
            del book_o[e.order_id]
            book_p[e.position_id] = (e.side, e.volume, e.sl, e.tp)
        elif isinstance(e, PositionReduced):
            side, volume, sl, tp = book_p[e.position_id]
            assert volume == e.volume_before
            book_p[e.position_id] = (side, e.volume_after, sl, tp)
        elif isinstance(e, PositionModified):
            side, volume, _, _ = book_p[e.position_id]
            book_p[e.position_id] = (side, volume, e.sl, e.tp)
        elif isinstance(e, PositionClosed):
            del book_p[e.position_id]
        elif isinstance(e, PendingOrderPlaced):
            assert e.order_id not in book_o
            book_o[e.order_id] = (e.order_type, e.price, e.sl, e.tp)
        elif isinstance(e, PendingOrderModified):
            book_o[e.order_id] = (e.order_type, e.price, e.sl, e.tp)
        elif isinstance(e, PendingOrderCancelled):
            del book_o[e.order_id]
    return book_p, book_o


@settings(max_examples=200, deadline=None)
@given(pair=snapshot_pairs())
def test_replaying_missed_events_on_the_old_snapshot_gives_the_new_one(
    pair: tuple[list[BridgePosition], list[BridgeOrder], list[BridgePosition], list[BridgeOrder]],
) -> None:
    before_p, before_o, now_p, now_o = pair
    events = missed(before_p, before_o, now_p, now_o)
    assert replay(before_p, before_o, events) == replay(now_p, now_o, [])
    assert len({e.event_id for e in events}) == len(events)
    assert all(on_the_wire(e) for e in events)
