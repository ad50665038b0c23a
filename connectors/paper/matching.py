"""What a new quote sets off: pending triggers, expiries, SL/TP hits and stop-out."""

from __future__ import annotations

from connectors.paper import accounting as acc
from connectors.paper.execution import new_position
from connectors.paper.ledger import Ledger
from connectors.paper.model import AccountBook, SymbolConfig, Transaction
from connectors.paper.prices import Quote
from schemas.master import PendingOrderCancelled, PendingOrderTriggered


def process_quote(ledger: Ledger, cfg: SymbolConfig, quote: Quote) -> list[Transaction]:
    """Apply ``quote`` (already stored as the latest) to every account, in MT5's order."""
    events: list[Transaction] = []
    for book in ledger.accounts.values():
        if book.pendings:
            trigger_pendings(ledger, book, cfg, quote, events)
            expire_pendings(ledger, book, quote.ts_ns, events)
        if book.positions:
            hit_stops(ledger, book, cfg, quote, events)
            stop_out(ledger, book, quote.ts_ns, events)
    return events


def trigger_pendings(
    ledger: Ledger, book: AccountBook, cfg: SymbolConfig, quote: Quote, events: list[Transaction]
) -> None:
    ts = quote.ts_ns
    for order in list(book.pendings.values()):
        # An order already past its expiration cannot trigger; the expiry pass removes it.
        if order.symbol != cfg.symbol or (order.expiration_ns and ts >= order.expiration_ns):
            continue
        if not acc.pending_triggered(order.order_type, order.price, quote):
            continue
        if not ledger.convertible(book, cfg):
            continue  # waits for the conversion pair's quote, as for its own
        del book.pendings[order.order_id]
        side = order.order_type.side
        # Market-like fill at the quote: a gap through the order price fills past it.
        price = acc.entry_price(side, quote)
        if ledger.money_error(book, cfg, order.volume, price, side) is not None:
            # MT5 cancels a pending order whose activation fails for lack of margin.
            events.append(ledger.order_event(book, PendingOrderCancelled, ts, order))
            continue
        # MT5: a position's id is the ticket of the order that opened it.
        new_position(
            ledger, book, cfg, order.order_id, side, order.volume, price, ts, sl=order.sl,
            tp=order.tp, magic=order.magic, comment=order.comment,
            client_order_id=order.client_order_id, master_ref=order.master_ref,
        )  # fmt: skip
        event = ledger.order_event(
            book,
            PendingOrderTriggered,
            ts,
            order,
            position_id=order.order_id,
            side=side,
            volume=order.volume,
            price=price,
            sl=order.sl,
            tp=order.tp,
        )
        events.append(event)


def expire_pendings(ledger: Ledger, book: AccountBook, ts: int, events: list[Transaction]) -> None:
    for order in list(book.pendings.values()):
        if order.expiration_ns and ts >= order.expiration_ns:
            del book.pendings[order.order_id]
            events.append(ledger.order_event(book, PendingOrderCancelled, ts, order))


def hit_stops(
    ledger: Ledger, book: AccountBook, cfg: SymbolConfig, quote: Quote, events: list[Transaction]
) -> None:
    for position in list(book.positions.values()):
        if position.symbol != cfg.symbol or (position.sl is None and position.tp is None):
            continue
        if not ledger.convertible(book, cfg):
            continue  # the profit cannot be booked until the conversion pair is quoted
        price = acc.exit_price(position.side, quote)
        sign = acc.direction(position.side)
        if position.sl is not None and (price - position.sl) * sign <= 0:
            reason = "sl"
        elif position.tp is not None and (position.tp - price) * sign <= 0:
            reason = "tp"
        else:
            continue
        # Filled at the quote, not at the level: a gap through a stop costs real slippage.
        _, event = ledger.close_whole(book, cfg, position, price, quote.ts_ns, reason)
        events.append(event)


def stop_out(ledger: Ledger, book: AccountBook, ts: int, events: list[Transaction]) -> None:
    """Close the biggest loser until the margin level is back at the stop-out level."""
    while book.positions:
        _, equity, margin = ledger.figures(book)
        if margin <= 0 or equity / margin * 100.0 >= ledger.stop_out_level:
            return
        closable = [
            p for p in book.positions.values()
            if ledger.convertible(book, ledger.symbols[p.symbol])
        ]  # fmt: skip
        if not closable:
            return
        # min() keeps the first of equal losers: the oldest ticket goes first.
        worst = min(closable, key=ledger.floating)
        cfg = ledger.symbols[worst.symbol]
        quote = ledger.quotes.get(worst.symbol)
        price = worst.open_price if quote is None else acc.exit_price(worst.side, quote)
        _, event = ledger.close_whole(book, cfg, worst, price, ts, "stop_out")
        events.append(event)
