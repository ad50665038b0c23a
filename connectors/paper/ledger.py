"""The paper venue's state and bookkeeping: tickets, event ids, margin checks, realised P&L."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from connectors.paper import accounting as acc
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
from schemas.account import TradeMode
from schemas.common import Side
from schemas.master import PositionClosed

FIRST_TICKET = 1_000_001


def reject(retcode: Retcode, reason: str) -> Result:
    return Result(ok=False, retcode=retcode, reason=reason)


class Ledger:
    """Everything the venue knows, plus the bookkeeping every request and quote shares."""

    def __init__(self, symbols: Iterable[SymbolConfig], stop_out_level: float) -> None:
        self.symbols = {cfg.symbol: cfg for cfg in symbols}
        self.accounts: dict[str, AccountBook] = {}
        self.quotes: dict[str, Quote] = {}
        self.next_ticket = FIRST_TICKET
        self.clock_ns = 0
        self.stop_out_level = stop_out_level

    def ticket(self) -> str:
        """Orders and positions share one counter; a position keeps its opening order's ticket."""
        ticket = self.next_ticket
        self.next_ticket += 1
        return str(ticket)

    def event(self, book: AccountBook, kind: type[Any], ts: int, **fields: Any) -> Transaction:
        book.seq += 1
        event: Transaction = kind(
            event_id=f"{book.account_id}-{book.seq}", master=book.account_id, ts_ns=ts, **fields
        )
        return event

    def position_event(
        self, book: AccountBook, kind: type[Any], ts: int, position: Position, **fields: Any
    ) -> Transaction:
        return self.event(
            book,
            kind,
            ts,
            symbol=position.symbol,
            position_id=position.position_id,
            side=position.side,
            magic=position.magic,
            **fields,
        )

    def order_event(
        self, book: AccountBook, kind: type[Any], ts: int, order: PendingOrder, **fields: Any
    ) -> Transaction:
        return self.event(
            book,
            kind,
            ts,
            symbol=order.symbol,
            order_id=order.order_id,
            order_type=order.order_type,
            magic=order.magic,
            **fields,
        )

    def figures(self, book: AccountBook) -> tuple[float, float, float]:
        """``(balance, equity, margin)`` at the latest quotes."""
        return acc.account_figures(book, self.symbols, self.quotes)

    def floating(self, position: Position) -> float:
        cfg = self.symbols[position.symbol]
        return acc.floating_profit(cfg, position, self.quotes.get(position.symbol))

    def money_error(
        self, book: AccountBook, cfg: SymbolConfig, volume: float, price: float
    ) -> str | None:
        """Why the account cannot carry one more position: free margin after it below zero."""
        _, equity, margin = self.figures(book)
        needed = acc.position_margin(cfg, volume, price, book.leverage)
        if equity - margin - needed < 0:
            return (
                f"not enough money: {volume} {cfg.symbol} needs {needed:.2f} margin,"
                f" free margin is {equity - margin:.2f}"
            )
        return None

    def open_checks(
        self, book: AccountBook, symbol: str, side: Side, volume: float
    ) -> tuple[SymbolConfig, Quote] | Result:
        """Checks every new market or pending order passes, in MT5's order of complaint."""
        cfg = self.symbols.get(symbol)
        if cfg is None:
            return reject(Retcode.INVALID, f"unknown symbol {symbol!r}")
        if cfg.profit_currency != book.currency:
            return reject(
                Retcode.INVALID,
                f"{symbol} settles in {cfg.profit_currency} but the account is in"
                f" {book.currency}; the paper venue does not convert currencies",
            )
        mode = cfg.trade_mode
        if mode is TradeMode.DISABLED:
            return reject(Retcode.TRADE_DISABLED, f"trading {symbol} is disabled")
        if mode is TradeMode.CLOSE_ONLY:
            return reject(Retcode.CLOSE_ONLY, f"{symbol} allows closing positions only")
        if mode is TradeMode.LONG_ONLY and side is Side.SELL:
            return reject(Retcode.LONG_ONLY, f"{symbol} allows long positions only")
        if mode is TradeMode.SHORT_ONLY and side is Side.BUY:
            return reject(Retcode.SHORT_ONLY, f"{symbol} allows short positions only")
        quote = self.quotes.get(symbol)
        if quote is None:
            return reject(Retcode.MARKET_CLOSED, f"market closed: no quote for {symbol} yet")
        invalid = acc.volume_error(volume, cfg)
        if invalid is not None:
            return reject(Retcode.INVALID_VOLUME, invalid)
        return cfg, quote

    def change_checks(self, symbol: str) -> tuple[SymbolConfig, Quote] | Result:
        """Checks for changing what exists (close, modify): allowed unless trading is off."""
        cfg = self.symbols[symbol]
        if cfg.trade_mode is TradeMode.DISABLED:
            return reject(Retcode.TRADE_DISABLED, f"trading {symbol} is disabled")
        quote = self.quotes.get(symbol)
        if quote is None:
            return reject(Retcode.MARKET_CLOSED, f"market closed: no quote for {symbol} yet")
        return cfg, quote

    def realise(
        self, book: AccountBook, cfg: SymbolConfig, position: Position, volume: float, price: float
    ) -> float:
        """Book the profit of closing ``volume`` of ``position`` at ``price``; that profit."""
        profit = acc.deal_profit(cfg, position.side, volume, position.open_price, price)
        minor = acc.to_minor(profit, book.money_digits)
        book.balance_minor += minor
        return minor / 10**book.money_digits

    def close_whole(
        self,
        book: AccountBook,
        cfg: SymbolConfig,
        position: Position,
        price: float,
        ts: int,
        reason: str,
    ) -> tuple[float, Transaction]:
        profit = self.realise(book, cfg, position, position.volume, price)
        del book.positions[position.position_id]
        event = self.position_event(
            book,
            PositionClosed,
            ts,
            position,
            volume=position.volume,
            price=price,
            reason=reason,
        )
        return profit, event
