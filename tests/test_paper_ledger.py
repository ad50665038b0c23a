"""Paper venue ledger: tickets, per-account event ids, open/change checks, margin, realised P&L."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.paper import accounting as acc
from connectors.paper.ledger import FIRST_TICKET, Ledger, reject
from connectors.paper.model import (
    XAUUSD,
    AccountBook,
    PendingOrder,
    Position,
    Result,
    Retcode,
    SymbolConfig,
)
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from schemas.account import TradeMode
from schemas.codec import encode, master_event_decoder
from schemas.common import OrderType, Side
from schemas.master import (
    PendingOrderPlaced,
    PositionClosed,
    PositionOpened,
)

ACCOUNT = "paper-1"
REAL: list[Quote] = [q for bar in load_bars()[:50] for q in bar_to_ticks(bar, "XAUUSD")]
FIRST, LATER = REAL[0], REAL[3]  # bid/ask 5010.50/5010.69, then 5014.77/5014.96


def quote(bid: float, ask: float | None = None, ts_ns: int = 1) -> Quote:
    return Quote(
        symbol="XAUUSD", bid=bid, ask=round(bid + 0.20, 2) if ask is None else ask, ts_ns=ts_ns
    )


def ledger_with(
    balance_minor: int = 1_000_000,
    *,
    symbols: tuple[SymbolConfig, ...] = (XAUUSD,),
    first: Quote | None = FIRST,
    currency: str = "USD",
    account: str = ACCOUNT,
) -> tuple[Ledger, AccountBook]:
    ledger = Ledger(symbols, stop_out_level=50.0)
    book = AccountBook(
        account_id=account, currency=currency, balance_minor=balance_minor, leverage=100
    )
    ledger.accounts[account] = book
    if first is not None:
        ledger.quotes[first.symbol] = first
    return ledger, book


def hold(book: AccountBook, side: Side, volume: float, price: float, pid: str = "7") -> Position:
    position = Position(
        position_id=pid,
        account=book.account_id,
        symbol="XAUUSD",
        side=side,
        volume=volume,
        open_price=price,
        magic=42,
    )
    book.positions[pid] = position
    return position


def mode(trade_mode: TradeMode) -> SymbolConfig:
    return msgspec.structs.replace(XAUUSD, trade_mode=trade_mode)


# ------------------------------------------------------------------------ tickets, events


def test_tickets_count_up_from_the_first_ticket_shared_by_orders_and_positions() -> None:
    ledger, _ = ledger_with()
    assert [ledger.ticket() for _ in range(3)] == [
        str(FIRST_TICKET),
        str(FIRST_TICKET + 1),
        str(FIRST_TICKET + 2),
    ]
    assert ledger.next_ticket == FIRST_TICKET + 3


def test_event_ids_are_the_account_and_its_own_sequence_number() -> None:
    ledger, first = ledger_with()
    second = AccountBook(account_id="paper-2", currency="USD", balance_minor=0, leverage=100)
    position = hold(first, Side.BUY, 0.10, FIRST.ask)
    fields = {"volume": 0.10, "price": FIRST.ask}
    events = [
        ledger.position_event(first, PositionOpened, 5, position, **fields),
        ledger.position_event(second, PositionOpened, 6, position, **fields),
        ledger.position_event(first, PositionOpened, 7, position, **fields),
    ]
    assert [(e.event_id, e.master, e.ts_ns) for e in events] == [
        ("paper-1-1", "paper-1", 5),
        ("paper-2-1", "paper-2", 6),
        ("paper-1-2", "paper-1", 7),
    ]
    assert (first.seq, second.seq) == (2, 1)


def test_a_position_event_tells_the_position_and_is_valid_on_the_wire() -> None:
    ledger, book = ledger_with()
    position = hold(book, Side.SELL, 0.25, FIRST.bid)
    event = ledger.position_event(book, PositionOpened, 9, position, volume=0.25, price=FIRST.bid)
    assert isinstance(event, PositionOpened)
    assert (event.symbol, event.position_id, event.side, event.magic) == (
        "XAUUSD",
        "7",
        Side.SELL,
        42,
    )
    assert (event.volume, event.price) == (0.25, 5010.50)
    assert master_event_decoder.decode(encode(event)) == event


def test_an_order_event_tells_the_pending_order() -> None:
    ledger, book = ledger_with()
    order = PendingOrder(
        order_id="1000005",
        account=ACCOUNT,
        symbol="XAUUSD",
        order_type=OrderType.BUY_LIMIT,
        volume=0.10,
        price=5000.00,
        magic=3,
    )
    event = ledger.order_event(book, PendingOrderPlaced, 11, order, volume=0.10, price=5000.00)
    assert isinstance(event, PendingOrderPlaced)
    assert (event.event_id, event.order_id, event.order_type, event.magic) == (
        "paper-1-1",
        "1000005",
        OrderType.BUY_LIMIT,
        3,
    )
    assert master_event_decoder.decode(encode(event)) == event


def test_a_rejection_is_not_ok_and_carries_no_events() -> None:
    result = reject(Retcode.NO_MONEY, "not enough money")
    assert result == Result(ok=False, retcode=Retcode.NO_MONEY, reason="not enough money")
    assert result.transactions == []


# ------------------------------------------------------------------------ open checks


def test_an_order_that_passes_every_check_gets_the_symbol_and_the_latest_quote() -> None:
    ledger, book = ledger_with()
    ledger.quotes["XAUUSD"] = LATER
    assert ledger.open_checks(book, "XAUUSD", Side.BUY, 0.10) == (XAUUSD, LATER)


@pytest.mark.parametrize(
    ("cfg", "side", "retcode", "reason"),
    [
        (mode(TradeMode.DISABLED), Side.BUY, Retcode.TRADE_DISABLED, "trading XAUUSD is disabled"),
        (mode(TradeMode.CLOSE_ONLY), Side.BUY, Retcode.CLOSE_ONLY, "closing positions only"),
        (mode(TradeMode.LONG_ONLY), Side.SELL, Retcode.LONG_ONLY, "long positions only"),
        (mode(TradeMode.SHORT_ONLY), Side.BUY, Retcode.SHORT_ONLY, "short positions only"),
    ],
)
def test_trade_modes_refuse_the_opens_they_do_not_allow(
    cfg: SymbolConfig, side: Side, retcode: Retcode, reason: str
) -> None:
    ledger, book = ledger_with(symbols=(cfg,))
    result = ledger.open_checks(book, "XAUUSD", side, 0.10)
    assert isinstance(result, Result)
    assert (result.ok, result.retcode) == (False, retcode)
    assert reason in result.reason


@pytest.mark.parametrize(
    ("trade_mode", "side"), [(TradeMode.LONG_ONLY, Side.BUY), (TradeMode.SHORT_ONLY, Side.SELL)]
)
def test_one_way_symbols_allow_their_own_direction(trade_mode: TradeMode, side: Side) -> None:
    ledger, book = ledger_with(symbols=(mode(trade_mode),))
    assert not isinstance(ledger.open_checks(book, "XAUUSD", side, 0.10), Result)


@pytest.mark.parametrize(
    ("symbol", "cfg", "currency", "first", "retcode", "reason"),
    [
        # Each row is wrong in several ways (the volume 0.001 is always below the minimum);
        # the first complaint in MT5's order wins.
        ("EURUSD", XAUUSD, "EUR", None, Retcode.INVALID, "unknown symbol 'EURUSD'"),
        ("XAUUSD", mode(TradeMode.DISABLED), "EUR", None, Retcode.INVALID, "no pair that conv"),
        ("XAUUSD", mode(TradeMode.DISABLED), "USD", None, Retcode.TRADE_DISABLED, "disabled"),
        ("XAUUSD", XAUUSD, "USD", None, Retcode.MARKET_CLOSED, "no quote for XAUUSD yet"),
        ("XAUUSD", XAUUSD, "USD", FIRST, Retcode.INVALID_VOLUME, "below the minimum"),
    ],
)
def test_open_checks_complain_about_the_first_problem_in_mt5_order(
    symbol: str,
    cfg: SymbolConfig,
    currency: str,
    first: Quote | None,
    retcode: Retcode,
    reason: str,
) -> None:
    ledger, book = ledger_with(symbols=(cfg,), currency=currency, first=first)
    result = ledger.open_checks(book, symbol, Side.BUY, 0.001)
    assert isinstance(result, Result)
    assert result.retcode == retcode
    assert reason in result.reason


def test_changing_what_exists_is_allowed_on_close_only_symbols() -> None:
    ledger, _ = ledger_with(symbols=(mode(TradeMode.CLOSE_ONLY),))
    cfg, latest = ledger.change_checks("XAUUSD")  # type: ignore[misc]
    assert (cfg.trade_mode, latest) == (TradeMode.CLOSE_ONLY, FIRST)


def test_changing_what_exists_needs_trading_on_and_a_quote() -> None:
    disabled, _ = ledger_with(symbols=(mode(TradeMode.DISABLED),))
    no_quote, _ = ledger_with(first=None)
    off = disabled.change_checks("XAUUSD")
    closed = no_quote.change_checks("XAUUSD")
    assert isinstance(off, Result) and off.retcode == Retcode.TRADE_DISABLED
    assert isinstance(closed, Result) and closed.retcode == Retcode.MARKET_CLOSED


# ------------------------------------------------------------------------------ money


def test_an_order_that_uses_the_last_cent_of_free_margin_is_accepted() -> None:
    ledger, book = ledger_with(50_000)  # 500.00 USD; 0.10 lot at 5000 holds 500.00
    assert ledger.money_error(book, XAUUSD, 0.10, 5000.00) is None
    error = ledger.money_error(book, XAUUSD, 0.11, 5000.00)
    assert error == "not enough money: 0.11 XAUUSD needs 550.00 margin, free margin is 500.00"


def test_floating_profit_adds_to_free_margin_and_held_margin_takes_from_it() -> None:
    ledger, book = ledger_with(100_000, first=quote(5010.00))
    hold(book, Side.BUY, 0.10, 5000.00)  # +100.00 floating, 500.00 margin: free 600.00
    assert ledger.figures(book) == (1000.0, 1100.0, 500.0)
    assert ledger.money_error(book, XAUUSD, 0.12, 5000.00) is None
    error = ledger.money_error(book, XAUUSD, 0.13, 5000.00)
    assert error is not None and "free margin is 600.00" in error
    ledger.quotes["XAUUSD"] = quote(4990.00)  # now -100.00 floating: free 400.00
    assert ledger.money_error(book, XAUUSD, 0.09, 5000.00) is not None


def test_floating_profit_is_valued_at_the_latest_quote() -> None:
    ledger, book = ledger_with()
    position = hold(book, Side.BUY, 0.10, FIRST.ask)
    assert acc.to_minor(ledger.floating(position), 2) == -190
    ledger.quotes["XAUUSD"] = LATER
    assert acc.to_minor(ledger.floating(position), 2) == 4080


# ----------------------------------------------------------------------- realised P&L


def test_realising_part_of_a_position_books_its_profit_in_cents() -> None:
    ledger, book = ledger_with()
    position = hold(book, Side.BUY, 0.30, FIRST.ask)
    assert ledger.realise(book, XAUUSD, position, 0.10, LATER.bid) == 40.80
    assert ledger.realise(book, XAUUSD, position, 0.10, LATER.bid) == 40.80
    assert book.balance_minor == 1_000_000 + 8_160
    # Realising books money; the position itself is the caller's to change.
    assert book.positions["7"] is position


def test_a_losing_sell_takes_from_the_balance() -> None:
    ledger, book = ledger_with()
    position = hold(book, Side.SELL, 0.10, FIRST.bid)
    assert ledger.realise(book, XAUUSD, position, 0.10, LATER.ask) == -44.60
    assert book.balance_minor == 1_000_000 - 4_460


@settings(max_examples=200, deadline=None)
@given(
    deals=st.lists(
        st.tuples(
            st.sampled_from(Side),
            st.integers(1, 500),  # volume steps
            st.integers(400_000, 600_000),  # open price in cents
            st.integers(400_000, 600_000),  # close price in cents
        ),
        max_size=30,
    )
)
def test_realised_profits_add_up_exactly_in_cents(deals: list[tuple[Side, int, int, int]]) -> None:
    ledger, book = ledger_with()
    expected = 1_000_000
    for side, steps, open_cents, close_cents in deals:
        volume = steps / 100
        position = Position(
            position_id="1",
            account=ACCOUNT,
            symbol="XAUUSD",
            side=side,
            volume=volume,
            open_price=open_cents / 100,
        )
        profit = ledger.realise(book, XAUUSD, position, volume, close_cents / 100)
        cents = acc.direction(side) * (close_cents - open_cents) * steps
        assert profit == cents / 100
        expected += cents
    assert book.balance_minor == expected


def test_closing_a_whole_position_books_it_removes_it_and_tells_it() -> None:
    ledger, book = ledger_with()
    position = hold(book, Side.BUY, 0.10, FIRST.ask)
    other = hold(book, Side.SELL, 0.05, FIRST.bid, pid="8")
    profit, event = ledger.close_whole(book, XAUUSD, position, LATER.bid, 123, "tp")
    assert profit == 40.80
    assert book.balance_minor == 1_004_080
    assert list(book.positions.values()) == [other]
    assert isinstance(event, PositionClosed)
    assert (event.event_id, event.ts_ns, event.position_id, event.side) == (
        "paper-1-1",
        123,
        "7",
        Side.BUY,
    )
    assert (event.volume, event.price, event.reason, event.magic) == (0.10, LATER.bid, "tp", 42)
    assert master_event_decoder.decode(encode(event)) == event
