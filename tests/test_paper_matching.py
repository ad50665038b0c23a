"""Paper venue matching: pending triggers, expiries, SL/TP hits, gaps and stop-out on quotes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.paper import accounting as acc
from connectors.paper.ledger import Ledger
from connectors.paper.matching import (
    expire_pendings,
    hit_stops,
    process_quote,
    stop_out,
    trigger_pendings,
)
from connectors.paper.model import (
    XAUUSD,
    AccountBook,
    PendingOrder,
    Position,
    SymbolConfig,
    Transaction,
)
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from schemas.codec import encode, master_event_decoder
from schemas.common import OrderType, Side
from schemas.master import PendingOrderCancelled, PendingOrderTriggered, PositionClosed

ACCOUNT = "paper-1"
XAGUSD = SymbolConfig(
    symbol="XAGUSD",
    contract_size=5000.0,
    tick_size=0.001,
    tick_value=5.0,
    digits=3,
    volume_min=0.01,
    volume_max=100.0,
    volume_step=0.01,
)
#: Real XAUUSD quotes: the first 3,000 shipped bars walked open → extremes → close.
QUOTES: list[Quote] = [q for bar in load_bars()[:3000] for q in bar_to_ticks(bar, "XAUUSD")]


def quote(bid: float, ask: float | None = None, ts_ns: int = 1, symbol: str = "XAUUSD") -> Quote:
    return Quote(
        symbol=symbol, bid=bid, ask=round(bid + 0.20, 2) if ask is None else ask, ts_ns=ts_ns
    )


def venue(
    balance_minor: int = 1_000_000, stop_out_level: float = 50.0
) -> tuple[Ledger, AccountBook]:
    ledger = Ledger((XAUUSD, XAGUSD), stop_out_level)
    book = AccountBook(
        account_id=ACCOUNT, currency="USD", balance_minor=balance_minor, leverage=100
    )
    ledger.accounts[ACCOUNT] = book
    return ledger, book


def tick(ledger: Ledger, q: Quote) -> list[Transaction]:
    """What the venue does with a quote: store it as the latest, then match."""
    ledger.quotes[q.symbol] = q
    ledger.clock_ns = q.ts_ns
    return process_quote(ledger, ledger.symbols[q.symbol], q)


def pending(
    book: AccountBook,
    order_type: OrderType,
    price: float,
    *,
    order_id: str = "1000001",
    volume: float = 0.10,
    sl: float | None = None,
    tp: float | None = None,
    expiration_ns: int = 0,
    symbol: str = "XAUUSD",
) -> PendingOrder:
    order = PendingOrder(
        order_id=order_id,
        account=book.account_id,
        symbol=symbol,
        order_type=order_type,
        volume=volume,
        price=price,
        sl=sl,
        tp=tp,
        expiration_ns=expiration_ns,
        magic=77,
        comment="copy:m1:9",
        client_order_id="ev-9:l1",
        master_ref="m1:9",
    )
    book.pendings[order_id] = order
    return order


def held(
    book: AccountBook,
    side: Side,
    open_price: float,
    *,
    pid: str = "1000001",
    volume: float = 0.10,
    sl: float | None = None,
    tp: float | None = None,
    symbol: str = "XAUUSD",
) -> Position:
    position = Position(
        position_id=pid,
        account=book.account_id,
        symbol=symbol,
        side=side,
        volume=volume,
        open_price=open_price,
        sl=sl,
        tp=tp,
    )
    book.positions[pid] = position
    return position


def summary(events: list[Transaction]) -> list[tuple[str, str, float]]:
    """(type, id, price) of each event; cancelled orders have no price."""
    out: list[tuple[str, str, float]] = []
    for e in events:
        if isinstance(e, PositionClosed):
            out.append((f"closed:{e.reason}", e.position_id, e.price))
        elif isinstance(e, PendingOrderTriggered):
            out.append(("triggered", e.order_id, e.price))
        elif isinstance(e, PendingOrderCancelled):
            out.append(("cancelled", e.order_id, 0.0))
        else:
            out.append((type(e).__name__, "", 0.0))
    return out


# ---------------------------------------------------------------------- pending triggers


def test_buy_stop_triggers_when_ask_reaches_its_price() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_STOP, 5005.00, sl=4990.00, tp=5020.00)
    assert tick(ledger, quote(5004.70, 5004.90, ts_ns=1)) == []
    events = tick(ledger, quote(5004.80, 5005.00, ts_ns=2))
    assert summary(events) == [("triggered", "1000001", 5005.00)]
    assert book.pendings == {}
    # MT5: the position's id is the ticket of the order that opened it; it keeps every tag.
    assert book.positions == {
        "1000001": Position(
            position_id="1000001",
            account=ACCOUNT,
            symbol="XAUUSD",
            side=Side.BUY,
            volume=0.10,
            open_price=5005.00,
            sl=4990.00,
            tp=5020.00,
            magic=77,
            comment="copy:m1:9",
            open_ts_ns=2,
            client_order_id="ev-9:l1",
            master_ref="m1:9",
            margin=500.5,  # 0.10 x 100 x 5005.00 / 100, held since the fill
        )
    }
    triggered = events[0]
    assert isinstance(triggered, PendingOrderTriggered)
    assert (triggered.position_id, triggered.side, triggered.volume) == ("1000001", Side.BUY, 0.10)
    assert (triggered.sl, triggered.tp, triggered.ts_ns) == (4990.00, 5020.00, 2)
    assert master_event_decoder.decode(encode(triggered)) == triggered


def test_a_gap_through_a_buy_stop_fills_at_the_ask_past_its_price() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_STOP, 5005.00)
    assert summary(tick(ledger, quote(5007.00, 5007.20))) == [("triggered", "1000001", 5007.20)]
    assert book.positions["1000001"].open_price == 5007.20


def test_a_gap_through_a_buy_limit_fills_at_the_better_ask() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 4995.00)
    assert summary(tick(ledger, quote(4990.00, 4990.20))) == [("triggered", "1000001", 4990.20)]


def test_sell_limit_triggers_on_the_bid_not_on_the_ask() -> None:
    ledger, book = venue()
    pending(book, OrderType.SELL_LIMIT, 5005.00)
    assert tick(ledger, quote(5004.90, 5005.10)) == []
    assert summary(tick(ledger, quote(5005.00, 5005.20))) == [("triggered", "1000001", 5005.00)]
    assert book.positions["1000001"].side is Side.SELL


def test_sell_stop_triggers_when_the_bid_falls_to_its_price() -> None:
    ledger, book = venue()
    pending(book, OrderType.SELL_STOP, 4995.00)
    assert tick(ledger, quote(4995.01)) == []
    assert summary(tick(ledger, quote(4994.50))) == [("triggered", "1000001", 4994.50)]


def test_a_quote_of_another_symbol_triggers_nothing() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 30.000, symbol="XAGUSD")
    # An XAUUSD ask of 29.98 would be under the silver limit, but it is not a silver price.
    assert tick(ledger, quote(29.80, 29.98)) == []
    assert list(book.pendings) == ["1000001"]


def test_a_trigger_without_free_margin_cancels_the_order() -> None:
    ledger, book = venue(balance_minor=10_000)  # 100.00 USD; 0.10 lot needs ~500 margin
    pending(book, OrderType.BUY_STOP, 5005.00)
    events = tick(ledger, quote(5004.80, 5005.00))
    assert summary(events) == [("cancelled", "1000001", 0.0)]
    assert book.pendings == {} and book.positions == {}
    assert book.balance_minor == 10_000


@pytest.mark.parametrize(
    ("order_type", "offset"),
    [
        (OrderType.BUY_STOP, 3.00),
        (OrderType.BUY_LIMIT, -3.00),
        (OrderType.SELL_STOP, -3.00),
        (OrderType.SELL_LIMIT, 3.00),
    ],
)
def test_pending_orders_trigger_at_the_first_real_quote_that_reaches_them(
    order_type: OrderType, offset: float
) -> None:
    ledger, book = venue()
    tick(ledger, QUOTES[0])
    buy = order_type.side is Side.BUY
    price = round((QUOTES[0].ask if buy else QUOTES[0].bid) + offset, 2)
    pending(book, order_type, price)
    reached = {
        OrderType.BUY_STOP: lambda q: q.ask >= price,
        OrderType.BUY_LIMIT: lambda q: q.ask <= price,
        OrderType.SELL_STOP: lambda q: q.bid <= price,
        OrderType.SELL_LIMIT: lambda q: q.bid >= price,
    }[order_type]
    expected = next(i for i in range(1, len(QUOTES)) if reached(QUOTES[i]))
    for index in range(1, len(QUOTES)):
        events = tick(ledger, QUOTES[index])
        if events:
            break
    assert index == expected
    fill = QUOTES[index].ask if buy else QUOTES[index].bid
    assert summary(events) == [("triggered", "1000001", fill)]


# ------------------------------------------------------------------------------ expiry


def test_an_order_expires_at_its_expiration_time_and_not_before() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 4900.00, expiration_ns=1_000)
    pending(book, OrderType.SELL_LIMIT, 5100.00, order_id="1000002")  # good till cancelled
    assert tick(ledger, quote(5000.00, ts_ns=999)) == []
    events = tick(ledger, quote(5000.00, ts_ns=1_000))
    assert summary(events) == [("cancelled", "1000001", 0.0)]
    assert events[0].ts_ns == 1_000
    assert list(book.pendings) == ["1000002"]


@pytest.mark.parametrize("ts_ns", [1_000, 2_000])
def test_an_order_at_or_past_its_expiration_is_cancelled_even_when_its_price_is_reached(
    ts_ns: int,
) -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 4995.00, expiration_ns=1_000)
    assert summary(tick(ledger, quote(4990.00, ts_ns=ts_ns))) == [("cancelled", "1000001", 0.0)]
    assert book.positions == {}


def test_expiry_runs_on_the_clock_for_orders_of_every_symbol() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 25.000, symbol="XAGUSD", expiration_ns=1_000)
    assert summary(tick(ledger, quote(5000.00, ts_ns=1_000))) == [("cancelled", "1000001", 0.0)]


def test_expire_pendings_alone_leaves_live_orders() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 4995.00, expiration_ns=5)
    pending(book, OrderType.BUY_LIMIT, 4995.00, order_id="1000002", expiration_ns=50)
    events: list[Transaction] = []
    expire_pendings(ledger, book, 10, events)
    assert summary(events) == [("cancelled", "1000001", 0.0)]
    assert list(book.pendings) == ["1000002"]


# -------------------------------------------------------------------------------- SL/TP


@pytest.mark.parametrize(
    ("side", "sl", "tp", "bid", "ask", "reason", "price"),
    [
        # Buys close at the bid: SL when it falls to the level, TP when it rises to it.
        (Side.BUY, 4990.00, 5010.00, 4990.00, 4990.20, "sl", 4990.00),
        (Side.BUY, 4990.00, 5010.00, 5010.00, 5010.20, "tp", 5010.00),
        # Sells close at the ask.
        (Side.SELL, 5010.00, 4990.00, 5009.80, 5010.00, "sl", 5010.00),
        (Side.SELL, 5010.00, 4990.00, 4989.80, 4990.00, "tp", 4990.00),
        # A gap through the level fills at the quote: real slippage.
        (Side.BUY, 4990.00, None, 4985.00, 4985.20, "sl", 4985.00),
        (Side.SELL, None, 4990.00, 4980.00, 4980.20, "tp", 4980.20),
    ],
)
def test_stops_close_at_the_quote_side_the_position_closes_at(
    side: Side,
    sl: float | None,
    tp: float | None,
    bid: float,
    ask: float,
    reason: str,
    price: float,
) -> None:
    ledger, book = venue()
    position = held(book, side, 5000.00, sl=sl, tp=tp)
    events = tick(ledger, quote(bid, ask, ts_ns=7))
    assert summary(events) == [(f"closed:{reason}", "1000001", price)]
    assert book.positions == {}
    profit = acc.deal_profit(XAUUSD, side, 0.10, position.open_price, price)
    assert book.balance_minor == 1_000_000 + acc.to_minor(profit, 2)


@pytest.mark.parametrize(
    ("side", "sl", "tp", "bid", "ask"),
    [
        # The ask reaching a buy's TP (or a sell's SL reached by the bid) does not count.
        (Side.BUY, None, 5010.00, 5009.90, 5010.10),
        (Side.BUY, 4990.00, None, 4990.01, 4990.21),
        (Side.SELL, 5010.00, None, 5009.90, 5009.99),
        (Side.SELL, None, 4990.00, 4989.90, 4990.10),
    ],
)
def test_stops_are_not_hit_before_the_closing_side_reaches_them(
    side: Side, sl: float | None, tp: float | None, bid: float, ask: float
) -> None:
    ledger, book = venue()
    held(book, side, 5000.00, sl=sl, tp=tp)
    assert tick(ledger, quote(bid, ask)) == []
    assert list(book.positions) == ["1000001"]


def test_positions_without_levels_or_on_other_symbols_are_not_closed() -> None:
    ledger, book = venue()
    held(book, Side.BUY, 5000.00, pid="1")
    held(book, Side.BUY, 25.000, pid="2", sl=24.000, symbol="XAGUSD")
    events: list[Transaction] = []
    hit_stops(ledger, book, XAUUSD, quote(10.00), events)
    assert events == []
    assert list(book.positions) == ["1", "2"]


@pytest.mark.parametrize("side", [Side.BUY, Side.SELL])
def test_real_quotes_close_a_position_at_the_first_quote_past_its_sl_or_tp(side: Side) -> None:
    ledger, book = venue()
    tick(ledger, QUOTES[0])
    open_price = acc.entry_price(side, QUOTES[0])
    sign = acc.direction(side)
    sl, tp = round(open_price - 4.00 * sign, 2), round(open_price + 4.00 * sign, 2)
    held(book, side, open_price, sl=sl, tp=tp)

    def crossed(q: Quote) -> bool:
        price = acc.exit_price(side, q)
        return (price - sl) * sign <= 0 or (tp - price) * sign <= 0

    expected = next(i for i in range(1, len(QUOTES)) if crossed(QUOTES[i]))
    for index in range(1, len(QUOTES)):
        events = tick(ledger, QUOTES[index])
        if events:
            break
    assert index == expected
    close = acc.exit_price(side, QUOTES[index])
    reason = "sl" if (close - sl) * sign <= 0 else "tp"
    assert summary(events) == [(f"closed:{reason}", "1000001", close)]
    # 0.10 lot of XAUUSD: each cent of price is 10 cents of money.
    moved_cents = sign * (round(close * 100) - round(open_price * 100))
    assert book.balance_minor == 1_000_000 + moved_cents * 10


def test_a_gap_through_a_pending_price_and_its_take_profit_opens_and_closes_on_one_quote() -> None:
    ledger, book = venue()
    pending(book, OrderType.SELL_STOP, 4995.00, sl=5010.00, tp=4990.00)
    events = tick(ledger, quote(4985.00, 4985.20, ts_ns=3))
    assert summary(events) == [("triggered", "1000001", 4985.00), ("closed:tp", "1000001", 4985.20)]
    assert book.positions == {} and book.pendings == {}
    assert book.balance_minor == 1_000_000 - 200  # opened at the bid, closed at the ask
    assert [e.event_id for e in events] == ["paper-1-1", "paper-1-2"]


# ----------------------------------------------------------------------------- stop-out


def test_stop_out_closes_the_biggest_loser_and_stops_once_the_level_is_back() -> None:
    ledger, book = venue(balance_minor=50_000)
    held(book, Side.BUY, 5000.00, pid="1", volume=0.10)  # margin 500
    held(book, Side.SELL, 5000.00, pid="2", volume=0.05)  # margin 250, hedged: summed
    # bid 4960: -400 and +199: equity 299 over 750 margin is 39.9 %.
    events = tick(ledger, quote(4960.00, 4960.20, ts_ns=5))
    assert summary(events) == [("closed:stop_out", "1", 4960.00)]
    assert list(book.positions) == ["2"]
    assert book.balance_minor == 10_000  # 299 equity over 250 margin: 119.6 %, left alone


def test_stop_out_keeps_closing_and_may_leave_a_negative_balance() -> None:
    ledger, book = venue(balance_minor=100_000)
    held(book, Side.BUY, 5000.00, pid="1", volume=0.05)
    held(book, Side.BUY, 5000.00, pid="2", volume=0.10)
    events = tick(ledger, quote(4930.00))  # -350 and -700 on a 1,000.00 balance
    assert summary(events) == [("closed:stop_out", "2", 4930.00), ("closed:stop_out", "1", 4930.00)]
    assert book.positions == {}
    assert book.balance_minor == -5_000


def test_stop_out_closes_the_oldest_of_equal_losers_first() -> None:
    ledger, book = venue(balance_minor=200_000)
    held(book, Side.BUY, 5000.00, pid="1000007")
    held(book, Side.BUY, 5000.00, pid="1000003")
    # -850 each: equity 300 over 1,000 margin (30 %); after one close 300 over 500 (60 %).
    events = tick(ledger, quote(4915.00))
    assert summary(events) == [("closed:stop_out", "1000007", 4915.00)]
    assert list(book.positions) == ["1000003"]


def test_a_margin_level_exactly_at_the_stop_out_level_is_left_alone() -> None:
    ledger, book = venue(balance_minor=100_000)
    held(book, Side.BUY, 5000.00)  # margin 500
    assert tick(ledger, quote(4925.00)) == []  # equity 250: exactly 50 %
    assert summary(tick(ledger, quote(4924.99))) == [("closed:stop_out", "1000001", 4924.99)]


def test_a_position_without_a_quote_is_stopped_out_at_its_open_price() -> None:
    ledger, book = venue(balance_minor=2_000)
    held(book, Side.BUY, 25.000, pid="1", volume=0.01, symbol="XAGUSD")  # margin 12.50
    held(book, Side.BUY, 5000.00, pid="2", volume=0.01)  # margin 50.00
    ledger.quotes["XAUUSD"] = quote(5010.00)  # gold is up 10.00: silver, flat, is the worst
    # 20.00 + 10.00 floating over 62.50 margin: 48 %; without silver 30.00 over 50.00: 60 %.
    events: list[Transaction] = []
    stop_out(ledger, book, 9, events)
    assert summary(events) == [("closed:stop_out", "1", 25.000)]
    assert book.balance_minor == 2_000  # closed flat
    assert list(book.positions) == ["2"]


def test_stop_out_with_no_margin_held_does_nothing() -> None:
    ledger, book = venue(balance_minor=-100)
    events: list[Transaction] = []
    stop_out(ledger, book, 1, events)
    assert events == []


# ---------------------------------------------------------------------- a whole quote


def test_every_account_gets_the_quote_with_its_own_event_ids() -> None:
    ledger, first = venue()
    second = AccountBook(
        account_id="paper-2", currency="USD", balance_minor=1_000_000, leverage=100
    )
    second.seq = 40
    ledger.accounts["paper-2"] = second
    held(first, Side.BUY, 5000.00, sl=4990.00)
    pending(second, OrderType.SELL_STOP, 4995.00)
    events = tick(ledger, quote(4989.00))
    assert [(e.master, e.event_id, type(e)) for e in events] == [
        ("paper-1", "paper-1-1", PositionClosed),
        ("paper-2", "paper-2-41", PendingOrderTriggered),
    ]


def test_trigger_pendings_leaves_orders_the_quote_does_not_reach() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 4990.00, order_id="1")
    pending(book, OrderType.BUY_STOP, 5010.00, order_id="2")
    q = quote(5000.00)
    ledger.quotes["XAUUSD"] = q
    events: list[Transaction] = []
    trigger_pendings(ledger, book, XAUUSD, q, events)
    assert events == []
    assert list(book.pendings) == ["1", "2"]


ORDER_TYPES = st.sampled_from(OrderType)
SIDES = st.sampled_from(Side)
OFFSETS = st.integers(-3_000, 3_000)  # cents around 5,000.00


@settings(max_examples=200, deadline=None)
@given(
    balance=st.integers(0, 300_000),
    positions=st.lists(
        st.tuples(SIDES, st.integers(1, 20), OFFSETS, st.none() | OFFSETS, st.none() | OFFSETS),
        max_size=5,
    ),
    orders=st.lists(
        st.tuples(ORDER_TYPES, st.integers(1, 20), OFFSETS, st.sampled_from([0, 50, 150])),
        max_size=4,
    ),
    bid=OFFSETS,
    spread=st.integers(0, 60),
)
def test_after_a_quote_nothing_it_should_have_set_off_is_left_standing(
    balance: int,
    positions: list[tuple[Side, int, int, int | None, int | None]],
    orders: list[tuple[OrderType, int, int, int]],
    bid: int,
    spread: int,
) -> None:
    ledger, book = venue(balance_minor=balance)
    opened_at: dict[str, float] = {}
    for n, (side, steps, at, sl, tp) in enumerate(positions):
        level = None if sl is None else (500_000 + sl) / 100
        take = None if tp is None else (500_000 + tp) / 100
        p = held(
            book, side, (500_000 + at) / 100, pid=f"p{n}", volume=steps / 100, sl=level, tp=take
        )
        opened_at[p.position_id] = p.open_price
    for n, (order_type, steps, at, expiration) in enumerate(orders):
        pending(
            book,
            order_type,
            (500_000 + at) / 100,
            order_id=f"o{n}",
            volume=steps / 100,
            expiration_ns=expiration,
        )
    q = quote((500_000 + bid) / 100, (500_000 + bid + spread) / 100, ts_ns=100)

    events = tick(ledger, q)

    for order in book.pendings.values():
        assert not acc.pending_triggered(order.order_type, order.price, q)
        assert not order.expiration_ns or order.expiration_ns > q.ts_ns
    for p in book.positions.values():
        exit_at, sign = acc.exit_price(p.side, q), acc.direction(p.side)
        assert p.sl is None or (exit_at - p.sl) * sign > 0
        assert p.tp is None or (p.tp - exit_at) * sign > 0
    _, equity, margin = ledger.figures(book)
    assert not book.positions or equity / margin * 100 >= ledger.stop_out_level
    # Every cent that moved the balance is a closed position's profit, booked once.
    booked = balance
    for e in events:
        assert master_event_decoder.decode(encode(e)) == e
        if isinstance(e, PendingOrderTriggered):
            opened_at[e.position_id] = e.price
        if isinstance(e, PositionClosed):
            profit = acc.deal_profit(XAUUSD, e.side, e.volume, opened_at[e.position_id], e.price)
            booked += acc.to_minor(profit, 2)
    assert book.balance_minor == booked
    assert [e.event_id for e in events] == [f"paper-1-{n}" for n in range(1, len(events) + 1)]


def test_a_quote_of_a_symbol_triggers_that_symbols_orders() -> None:
    ledger, book = venue()
    pending(book, OrderType.BUY_LIMIT, 30.000, symbol="XAGUSD")
    pending(book, OrderType.BUY_LIMIT, 4990.00, order_id="1000002")
    events = tick(ledger, quote(29.500, 29.520, symbol="XAGUSD"))
    assert summary(events) == [("triggered", "1000001", 29.520)]
    assert book.positions["1000001"].symbol == "XAGUSD"
    assert list(book.pendings) == ["1000002"]
