"""The paper venue's state and bookkeeping: tickets, event ids, margin checks, realised P&L."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
import structlog

from connectors.paper import accounting as acc
from connectors.paper import fx
from connectors.paper.model import (
    AccountBook,
    PendingOrder,
    Position,
    Result,
    Retcode,
    SymbolConfig,
    Transaction,
)
from connectors.paper.names import SymbolNames
from connectors.paper.prices import Quote
from schemas.account import TradeMode
from schemas.common import Side
from schemas.master import PositionClosed

FIRST_TICKET = 1_000_001
_DAY_NS = 86_400 * 1_000_000_000
#: Rollovers into these days (``weekday()``) charge swap: the nights of Monday to Friday.
_SWAP_DAYS = frozenset({1, 2, 3, 4, 5})

log = structlog.get_logger("tradecopy.paper")


def reject(retcode: Retcode, reason: str) -> Result:
    return Result(ok=False, retcode=retcode, reason=reason)


class Ledger:
    """Everything the venue knows, plus the bookkeeping every request and quote shares."""

    def __init__(
        self,
        symbols: Iterable[SymbolConfig],
        stop_out_level: float,
        names: SymbolNames | None = None,
    ) -> None:
        self.symbols = {cfg.symbol: cfg for cfg in symbols}
        self.names = names or SymbolNames()
        self.accounts: dict[str, AccountBook] = {}
        self.quotes: dict[str, Quote] = {}
        self.next_ticket = FIRST_TICKET
        self.clock_ns = 0
        self.stop_out_level = stop_out_level
        self.rollover_day = 0
        """The last UTC day (days since the epoch) whose swap rollover is done; 0: none yet."""
        self._conversions: dict[tuple[str, str], fx.Conversion | None] = {}
        self._told: set[tuple[str, str]] = set()

    def resolve(self, symbol: str) -> str:
        """The venue's name for ``symbol`` (a broker suffix or an alias), else ``symbol``."""
        if symbol in self.symbols:
            return symbol
        return self.names.resolve(symbol, self.symbols) or symbol

    # ------------------------------------------------------------------ currencies

    def conversion(self, source: str, target: str) -> fx.Conversion | None:
        key = (source, target)
        if key not in self._conversions:
            self._conversions[key] = fx.find_conversion(self.symbols, source, target)
        return self._conversions[key]

    def to_account(self, book: AccountBook, currency: str, amount: float) -> float | None:
        """``amount`` of ``currency`` in the account's currency at the live conversion quote
        (MT5's side for profit, see ``connectors.paper.fx``); None without that quote."""
        conversion = self.conversion(currency, book.currency)
        if conversion is None:
            return None
        return fx.convert_money(conversion, self.quotes, amount)

    def conversion_error(self, book: AccountBook, cfg: SymbolConfig) -> Result | None:
        """Why ``cfg``'s money cannot be booked on this account now: no pair converts its
        currencies (:meth:`unconvertible`), or a conversion pair has no quote yet."""
        unconvertible = self.unconvertible(book, cfg)
        if unconvertible is not None:
            return unconvertible
        for currency, what in ((cfg.profit_currency, "profit"), (cfg.margin_ccy, "margin")):
            conversion = self.conversion(currency, book.currency)
            missing = None if conversion is None else fx.missing_quote(conversion, self.quotes)
            if missing is not None:
                return reject(
                    Retcode.PRICE_OFF,
                    f"no quote for {missing} yet: it converts the {currency} {what} of"
                    f" {cfg.symbol} to {book.currency}",
                )
        return None

    def unconvertible(self, book: AccountBook, cfg: SymbolConfig) -> Result | None:
        """The refusal of a symbol no pair the venue trades converts to the account's
        currency (a configuration fact, whatever the quotes), or None."""
        for currency, what in ((cfg.profit_currency, "profit"), (cfg.margin_ccy, "margin")):
            if self.conversion(currency, book.currency) is None:
                return reject(
                    Retcode.INVALID,
                    f"{cfg.symbol} {what} is in {currency} but the account is in"
                    f" {book.currency}, and the venue trades no pair that converts"
                    f" {currency} to {book.currency}",
                )
        return None

    def tell_conversion(self, book: AccountBook, cfg: SymbolConfig) -> str:
        """The profit conversion pairs of ``cfg`` on this account, logged the first time."""
        conversion = self.conversion(cfg.profit_currency, book.currency)
        pairs = conversion.pairs if conversion is not None else ""
        if pairs and (book.account_id, cfg.symbol) not in self._told:
            self._told.add((book.account_id, cfg.symbol))
            margin = self.conversion(cfg.margin_ccy, book.currency)
            log.info("paper_fx_conversion", account=book.account_id, symbol=cfg.symbol,
                     profit_currency=cfg.profit_currency, currency=book.currency,
                     profit_pairs=pairs,
                     margin_pairs=margin.pairs if margin is not None else "")  # fmt: skip
        return pairs

    def margin_for(
        self, book: AccountBook, cfg: SymbolConfig, side: Side, volume: float, price: float
    ) -> float | None:
        """Margin of a new position in the account currency (MT5's side for margin, see
        ``connectors.paper.fx``); None without the conversion quote."""
        margin = acc.position_margin(cfg, volume, price, book.leverage)
        conversion = self.conversion(cfg.margin_ccy, book.currency)
        if conversion is None:
            return None
        if not conversion.legs:
            return margin
        rate = fx.margin_rate(conversion, self.quotes, side)
        return None if rate is None else margin * rate

    def entry_commission(self, book: AccountBook, cfg: SymbolConfig, volume: float) -> float:
        """Book the commission of an entry deal of ``volume`` lots; the charge (<= 0)."""
        return self._charge(book, cfg, -cfg.commission_per_lot * volume)

    def _charge(self, book: AccountBook, cfg: SymbolConfig, amount: float) -> float:
        if not amount:
            return 0.0
        converted = self.to_account(book, cfg.profit_currency, amount)
        minor = acc.to_minor(converted or 0.0, book.money_digits)
        book.balance_minor += minor
        return minor / 10**book.money_digits

    def rollover(self, ts_ns: int) -> None:
        """Accrue swap on every open position for each rollover (00:00 UTC, Monday to Friday
        nights; the ``triple_swap_weekday`` night counts three days) passed since the last."""
        day = ts_ns // _DAY_NS
        if self.rollover_day == 0 or day < self.rollover_day:
            self.rollover_day = day
            return
        while self.rollover_day < day:
            self.rollover_day += 1
            weekday = (self.rollover_day + 3) % 7  # 1970-01-01 was a Thursday
            if weekday in _SWAP_DAYS:
                self._accrue_swap((weekday - 1) % 7)

    def _accrue_swap(self, night: int) -> None:
        for book in self.accounts.values():
            for position in list(book.positions.values()):
                cfg = self.symbols[position.symbol]
                points = cfg.swap_long if position.side is Side.BUY else cfg.swap_short
                if not points:
                    continue
                days = 3 if night == cfg.triple_swap_weekday else 1
                amount = points * cfg.tick_value * cfg.point / cfg.tick_size
                amount *= position.volume * days
                converted = self.to_account(book, cfg.profit_currency, amount)
                if converted is None:
                    log.warning("paper_swap_not_converted", account=book.account_id,
                                position=position.position_id, symbol=cfg.symbol)  # fmt: skip
                    continue
                swap = acc.to_minor(converted, book.money_digits) / 10**book.money_digits
                book.positions[position.position_id] = msgspec.structs.replace(
                    position, swap=round(position.swap + swap, book.money_digits)
                )

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
        """``(balance, equity, margin)`` at the latest quotes, in the account currency."""
        return acc.account_figures(
            book,
            self.symbols,
            self.quotes,
            lambda currency, amount: self.to_account(book, currency, amount),
        )

    def floating(self, position: Position) -> float:
        """Floating profit in the account currency (0 without the quotes to value it)."""
        cfg = self.symbols[position.symbol]
        profit = acc.floating_profit(cfg, position, self.quotes.get(position.symbol))
        book = self.accounts.get(position.account)
        if book is None or not profit:
            return profit
        return self.to_account(book, cfg.profit_currency, profit) or 0.0

    def money_error(
        self,
        book: AccountBook,
        cfg: SymbolConfig,
        volume: float,
        price: float,
        side: Side = Side.BUY,
    ) -> str | None:
        """Why the account cannot carry one more position: free margin after it below zero."""
        _, equity, margin = self.figures(book)
        needed = self.margin_for(book, cfg, side, volume, price)
        if needed is None:
            return f"no conversion quote to value the {cfg.margin_ccy} margin of {cfg.symbol}"
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
        cfg = self.symbols.get(self.resolve(symbol))
        if cfg is None:
            return reject(Retcode.INVALID, f"unknown symbol {symbol!r}")
        symbol = cfg.symbol
        unconvertible = self.unconvertible(book, cfg)
        if unconvertible is not None:
            return unconvertible
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
        unconverted = self.conversion_error(book, cfg)
        if unconverted is not None:
            return unconverted
        return cfg, quote

    def change_checks(
        self, symbol: str, book: AccountBook | None = None
    ) -> tuple[SymbolConfig, Quote] | Result:
        """Checks for changing what exists (close, modify): allowed unless trading is off;
        with ``book``, its money must also be convertible now (a close books profit)."""
        cfg = self.symbols[symbol]
        if cfg.trade_mode is TradeMode.DISABLED:
            return reject(Retcode.TRADE_DISABLED, f"trading {symbol} is disabled")
        quote = self.quotes.get(symbol)
        if quote is None:
            return reject(Retcode.MARKET_CLOSED, f"market closed: no quote for {symbol} yet")
        if book is not None:
            unconverted = self.conversion_error(book, cfg)
            if unconverted is not None:
                return unconverted
        return cfg, quote

    def convertible(self, book: AccountBook, cfg: SymbolConfig) -> bool:
        """The account can book ``cfg``'s money now (every conversion pair is quoted)."""
        return self.conversion_error(book, cfg) is None

    def realise(
        self, book: AccountBook, cfg: SymbolConfig, position: Position, volume: float, price: float
    ) -> float:
        """Book the profit of closing ``volume`` of ``position`` at ``price``; that profit."""
        return self.book_close(book, cfg, position, volume, price).profit

    def book_close(
        self, book: AccountBook, cfg: SymbolConfig, position: Position, volume: float, price: float
    ) -> ClosingDeal:
        """Book closing ``volume`` of ``position`` at ``price``: its profit converted to the
        account currency, the exit commission, and the closed part's share of the accrued
        swap (the entry commission was booked at the open; its share is reported here)."""
        profit = acc.deal_profit(cfg, position.side, volume, position.open_price, price)
        converted = self.to_account(book, cfg.profit_currency, profit)
        if converted is None:  # callers check convertible() first
            raise ValueError(f"no conversion quote for {cfg.symbol} on {book.account_id}")
        digits = book.money_digits
        profit_minor = acc.to_minor(converted, digits)
        share = volume / position.volume if position.volume else 1.0
        swap_minor = acc.to_minor(position.swap * share, digits)
        book.balance_minor += profit_minor + swap_minor
        exit_commission = self._charge(book, cfg, -cfg.commission_per_lot * volume)
        entry_commission = round(position.commission * share, digits)
        return ClosingDeal(
            profit=profit_minor / 10**digits,
            commission=round(entry_commission + exit_commission, digits),
            swap=swap_minor / 10**digits,
            entry_commission=entry_commission,
            conversion=position.conversion or self.tell_conversion(book, cfg),
        )

    def reduced(
        self, book: AccountBook, position: Position, deal: ClosingDeal, remainder: float
    ) -> Position:
        """``position`` after a partial close left ``remainder`` lots (it keeps its id)."""
        digits = book.money_digits
        return msgspec.structs.replace(
            position,
            volume=remainder,
            commission=round(position.commission - deal.entry_commission, digits),
            swap=round(position.swap - deal.swap, digits),
            margin=position.margin * remainder / position.volume if position.volume else 0.0,
        )

    def close_whole(
        self,
        book: AccountBook,
        cfg: SymbolConfig,
        position: Position,
        price: float,
        ts: int,
        reason: str,
    ) -> tuple[float, Transaction]:
        deal = self.book_close(book, cfg, position, position.volume, price)
        del book.positions[position.position_id]
        event = self.position_event(
            book,
            PositionClosed,
            ts,
            position,
            volume=position.volume,
            price=price,
            reason=reason,
            profit=deal.profit,
            commission=deal.commission,
            swap=deal.swap,
        )
        return deal.profit, event


class ClosingDeal(msgspec.Struct, frozen=True, kw_only=True):
    """The money of one closing deal, in the account currency."""

    profit: float
    commission: float
    """The exit deal's commission plus the closed part's share of the entry commission."""
    swap: float
    entry_commission: float
    """The closed part's share of the entry commission (booked at the open)."""
    conversion: str = ""
