"""Paper venue requests: market opens, closes, close-by, modifications and pending orders."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from connectors.paper import accounting as acc
from connectors.paper.ledger import ClosingDeal, Ledger, reject
from connectors.paper.model import (
    AccountBook,
    PendingOrder,
    Position,
    Result,
    Retcode,
    SymbolConfig,
    Transaction,
)
from connectors.paper.prices import Quote
from schemas.common import OrderType, Side
from schemas.master import (
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)


class Tags(msgspec.Struct, frozen=True, kw_only=True):
    """What a new order carries through to its position untouched."""

    magic: int = 0
    comment: str = ""
    client_order_id: str | None = None
    master_ref: str | None = None


def open_position(
    ledger: Ledger,
    book: AccountBook,
    symbol: str,
    side: Side,
    volume: float,
    sl: float | None,
    tp: float | None,
    tags: Tags,
    deviation: tuple[float, float] | None,
    ts: int,
) -> Result:
    """A market order; ``deviation`` is ``(expected_price, max_deviation)`` when bounded."""
    checked = ledger.open_checks(book, symbol, side, volume)
    if isinstance(checked, Result):
        return checked
    cfg, quote = checked
    price = acc.entry_price(side, quote)
    if deviation is not None:
        expected, allowed = deviation
        off = abs(price - expected)
        # Half a point of slack: prices on the grid must not requote over float noise.
        if not off <= allowed + cfg.point / 2:
            return reject(
                Retcode.REQUOTE,
                f"price {price} is {off:.{cfg.digits}f} from the expected {expected},"
                f" more than the allowed {allowed}",
            )
    sl, tp = level(sl, cfg), level(tp, cfg)
    stops = acc.stops_error(cfg, side, acc.exit_price(side, quote), sl, tp)
    if stops is not None:
        return reject(Retcode.INVALID_STOPS, stops)
    volume = acc.normalize_volume(volume, cfg)
    money = ledger.money_error(book, cfg, volume, price, side)
    if money is not None:
        return reject(Retcode.NO_MONEY, money)
    ticket = ledger.ticket()
    position = new_position(
        ledger,
        book,
        cfg,
        ticket,
        side,
        volume,
        price,
        ts,
        sl=sl,
        tp=tp,
        **msgspec.structs.asdict(tags),
    )
    event = ledger.position_event(
        book,
        PositionOpened,
        ts,
        position,
        volume=volume,
        price=price,
        sl=sl,
        tp=tp,
        comment=tags.comment,
    )
    return _done(ticket, ticket, price, volume, event, commission=position.commission,
                 conversion=position.conversion)  # fmt: skip


def new_position(
    ledger: Ledger,
    book: AccountBook,
    cfg: SymbolConfig,
    position_id: str,
    side: Side,
    volume: float,
    price: float,
    ts: int,
    **fields: Any,
) -> Position:
    """Open a position on the book: its margin held in the account currency, its entry
    commission booked, and the pair converting its profit named (and logged once)."""
    margin = ledger.margin_for(book, cfg, side, volume, price) or 0.0
    commission = ledger.entry_commission(book, cfg, volume)
    position = Position(
        position_id=position_id,
        account=book.account_id,
        symbol=cfg.symbol,
        side=side,
        volume=volume,
        open_price=price,
        open_ts_ns=ts,
        commission=commission,
        margin=margin,
        conversion=ledger.tell_conversion(book, cfg),
        **fields,
    )
    book.positions[position_id] = position
    return position


def close_position(
    ledger: Ledger,
    book: AccountBook,
    position_id: str,
    volume: float | None,
    ts: int,
    reason: str = "client",
) -> Result:
    position = book.positions.get(position_id)
    if position is None:
        return reject(Retcode.POSITION_CLOSED, f"no open position {position_id}")
    checked = ledger.change_checks(position.symbol, book)
    if isinstance(checked, Result):
        return checked
    cfg, quote = checked
    held = position.volume
    volume = held if volume is None else volume
    invalid = acc.volume_error(volume, cfg)
    if invalid is not None:
        return reject(Retcode.INVALID_VOLUME, invalid)
    volume = acc.normalize_volume(volume, cfg)
    if volume > held:
        return reject(
            Retcode.INVALID_CLOSE_VOLUME, f"close volume {volume} exceeds the held {held}"
        )
    price = acc.exit_price(position.side, quote)
    if volume == held:
        _, event = ledger.close_whole(book, cfg, position, price, ts, reason)
        return _done(position_id, None, price, volume, event, conversion=position.conversion)
    remainder = acc.normalize_volume(held - volume, cfg)
    if remainder < cfg.volume_min:
        return reject(
            Retcode.INVALID_VOLUME,
            f"closing {volume} of {held} would leave {remainder}, below the minimum"
            f" {cfg.volume_min}; close the whole position instead",
        )
    deal = ledger.book_close(book, cfg, position, volume, price)
    book.positions[position_id] = ledger.reduced(book, position, deal, remainder)
    event = ledger.position_event(
        book, PositionReduced, ts, position, volume_before=held, volume_after=remainder,
        price=price, **_money(deal),
    )  # fmt: skip
    return _done(position_id, None, price, volume, event, conversion=deal.conversion)


def close_by(
    ledger: Ledger, book: AccountBook, position_id: str, opposite_id: str, ts: int
) -> Result:
    first = book.positions.get(position_id)
    second = book.positions.get(opposite_id)
    if first is None or second is None:
        missing = position_id if first is None else opposite_id
        return reject(Retcode.POSITION_CLOSED, f"no open position {missing}")
    if first.symbol != second.symbol or first.side is second.side:
        return reject(
            Retcode.INVALID, "close-by needs two positions in one symbol on opposite sides"
        )
    checked = ledger.change_checks(first.symbol, book)
    if isinstance(checked, Result):
        return checked
    cfg, _ = checked
    volume = min(first.volume, second.volume)
    # MT5: the first leg closes at the opposite's open price, the opposite at its own (no P&L).
    price = second.open_price
    deals = [
        ledger.book_close(book, cfg, first, volume, price),
        ledger.book_close(book, cfg, second, volume, second.open_price),
    ]
    for position, deal in zip((first, second), deals, strict=True):
        rest = acc.normalize_volume(position.volume - volume, cfg)
        if rest > 0:
            book.positions[position.position_id] = ledger.reduced(book, position, deal, rest)
        else:
            del book.positions[position.position_id]
    digits = book.money_digits
    total = ClosingDeal(
        profit=round(sum(d.profit for d in deals), digits),
        commission=round(sum(d.commission for d in deals), digits),
        swap=round(sum(d.swap for d in deals), digits),
        entry_commission=0.0,
        conversion=deals[0].conversion,
    )
    event = ledger.position_event(
        book, PositionClosedBy, ts, first, opposite_position_id=opposite_id, volume=volume,
        **_money(total),
    )  # fmt: skip
    return _done(position_id, None, price, volume, event, conversion=total.conversion)


def modify_position(
    ledger: Ledger,
    book: AccountBook,
    position_id: str,
    sl: float | None,
    tp: float | None,
    ts: int,
) -> Result:
    position = book.positions.get(position_id)
    if position is None:
        return reject(Retcode.POSITION_CLOSED, f"no open position {position_id}")
    checked = ledger.change_checks(position.symbol)
    if isinstance(checked, Result):
        return checked
    cfg, quote = checked
    sl, tp = level(sl, cfg), level(tp, cfg)
    if (sl, tp) == (position.sl, position.tp):
        return Result(
            ok=True, retcode=Retcode.NO_CHANGES, reason="no changes", position_id=position_id
        )
    stops = acc.stops_error(cfg, position.side, acc.exit_price(position.side, quote), sl, tp)
    if stops is not None:
        return reject(Retcode.INVALID_STOPS, stops)
    book.positions[position_id] = msgspec.structs.replace(position, sl=sl, tp=tp)
    event = ledger.position_event(book, PositionModified, ts, position, sl=sl, tp=tp)
    return _done(position_id, None, 0.0, position.volume, event)


def place_pending(
    ledger: Ledger,
    book: AccountBook,
    symbol: str,
    order_type: OrderType,
    volume: float,
    price: float,
    sl: float | None,
    tp: float | None,
    expiration_ns: int,
    tags: Tags,
    ts: int,
) -> Result:
    checked = ledger.open_checks(book, symbol, order_type.side, volume)
    if isinstance(checked, Result):
        return checked
    cfg, quote = checked
    levels = pending_levels(cfg, quote, order_type, price, sl, tp, expiration_ns, ts)
    if isinstance(levels, Result):
        return levels
    price, sl, tp = levels
    volume = acc.normalize_volume(volume, cfg)
    order = PendingOrder(
        order_id=ledger.ticket(),
        account=book.account_id,
        symbol=cfg.symbol,
        order_type=order_type,
        volume=volume,
        price=price,
        sl=sl,
        tp=tp,
        expiration_ns=expiration_ns,
        placed_ts_ns=ts,
        **msgspec.structs.asdict(tags),
    )
    book.pendings[order.order_id] = order
    event = ledger.order_event(
        book,
        PendingOrderPlaced,
        ts,
        order,
        volume=volume,
        price=price,
        sl=sl,
        tp=tp,
        expiration_ns=expiration_ns,
        comment=order.comment,
    )
    return Result(
        ok=True,
        retcode=Retcode.PLACED,
        order_id=order.order_id,
        price=price,
        volume=volume,
        transactions=[event],
    )


def modify_pending(
    ledger: Ledger,
    book: AccountBook,
    order_id: str,
    price: float,
    sl: float | None,
    tp: float | None,
    expiration_ns: int,
    ts: int,
) -> Result:
    order = book.pendings.get(order_id)
    if order is None:
        return reject(Retcode.INVALID, f"no pending order {order_id}")
    checked = ledger.change_checks(order.symbol)
    if isinstance(checked, Result):
        return checked
    cfg, quote = checked
    levels = pending_levels(cfg, quote, order.order_type, price, sl, tp, expiration_ns, ts)
    if isinstance(levels, Result):
        return levels
    price, sl, tp = levels
    if (price, sl, tp, expiration_ns) == (order.price, order.sl, order.tp, order.expiration_ns):
        return Result(ok=True, retcode=Retcode.NO_CHANGES, reason="no changes", order_id=order_id)
    book.pendings[order_id] = msgspec.structs.replace(
        order, price=price, sl=sl, tp=tp, expiration_ns=expiration_ns
    )
    event = ledger.order_event(
        book,
        PendingOrderModified,
        ts,
        order,
        price=price,
        sl=sl,
        tp=tp,
        expiration_ns=expiration_ns,
    )
    return Result(
        ok=True,
        retcode=Retcode.DONE,
        order_id=order_id,
        price=price,
        volume=order.volume,
        transactions=[event],
    )


def cancel_pending(ledger: Ledger, book: AccountBook, order_id: str, ts: int) -> Result:
    order = book.pendings.pop(order_id, None)
    if order is None:
        return reject(Retcode.INVALID, f"no pending order {order_id}")
    event = ledger.order_event(book, PendingOrderCancelled, ts, order)
    return Result(
        ok=True, retcode=Retcode.DONE, order_id=order_id, volume=order.volume, transactions=[event]
    )


def level(value: float | None, cfg: SymbolConfig) -> float | None:
    """An SL/TP level on the symbol's digits; None or 0 (MT5's "no level") means none."""
    if value is None or value == 0:
        return None
    return round(value, cfg.digits) if math.isfinite(value) else value


def pending_levels(
    cfg: SymbolConfig,
    quote: Quote,
    order_type: OrderType,
    price: float,
    sl: float | None,
    tp: float | None,
    expiration_ns: int,
    ts: int,
) -> tuple[float, float | None, float | None] | Result:
    """A pending order's price, SL and TP normalised and checked, or the rejection."""
    if not math.isfinite(price) or price <= 0:
        return reject(Retcode.INVALID_PRICE, f"price {price} must be a positive number")
    price = round(price, cfg.digits)
    wrong_price = acc.pending_price_error(cfg, order_type, price, quote)
    if wrong_price is not None:
        return reject(Retcode.INVALID_PRICE, wrong_price)
    sl, tp = level(sl, cfg), level(tp, cfg)
    stops = acc.stops_error(cfg, order_type.side, price, sl, tp)
    if stops is not None:
        return reject(Retcode.INVALID_STOPS, stops)
    if expiration_ns < 0 or (expiration_ns and expiration_ns <= ts):
        return reject(
            Retcode.INVALID_EXPIRATION, f"expiration {expiration_ns} is not after now ({ts})"
        )
    return price, sl, tp


def _money(deal: ClosingDeal) -> dict[str, float]:
    """A closing deal's money as the fields of its master event."""
    return {"profit": deal.profit, "commission": deal.commission, "swap": deal.swap}


def _done(
    position_id: str,
    order_id: str | None,
    price: float,
    volume: float,
    event: Transaction,
    *,
    commission: float | None = None,
    conversion: str = "",
) -> Result:
    """A done deal; its money comes from the closing event (an open: only ``commission``)."""
    profit = getattr(event, "profit", None)
    swap = getattr(event, "swap", None)
    if commission is None:
        commission = getattr(event, "commission", None)
    return Result(
        ok=True,
        retcode=Retcode.DONE,
        position_id=position_id,
        order_id=order_id,
        price=price,
        volume=volume,
        profit=profit or 0.0,
        commission=commission or 0.0,
        swap=swap or 0.0,
        conversion=conversion,
        transactions=[event],
    )
