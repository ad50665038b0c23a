"""PaperVenue: hedging MetaTrader-5-like accounts filled at real bid/ask, pure and synchronous."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
import structlog

from connectors.journal import EVICTED, OrderMemoryConfig
from connectors.paper import accounting as acc
from connectors.paper import execution, fx
from connectors.paper.config import PaperVenueConfig
from connectors.paper.execution import Tags
from connectors.paper.ledger import Ledger, reject
from connectors.paper.matching import process_quote
from connectors.paper.model import (
    XAUUSD,
    AccountBook,
    PendingOrder,
    Position,
    Result,
    Retcode,
    SymbolConfig,
    Transaction,
    VenueState,
)
from connectors.paper.names import SymbolNames
from connectors.paper.prices import Quote
from engine.runtime.files import write_atomically
from schemas.account import AccountState, SymbolSpec
from schemas.common import OrderType, Side, is_account_id

#: A requote is MT5's "try again": the same client order id may be retried after one.
_RETRYABLE = frozenset({Retcode.REQUOTE})
_state_decoder = msgspec.msgpack.Decoder(VenueState)
_STATE_VERSION = 1
_NS = 1_000_000_000
#: The metric label of the venue's client-order-id memory.
_MEMORY = "paper_venue"
EVICTED.labels(_MEMORY)  # from 0, so the eviction alert's increase() sees the first one

log = structlog.get_logger("tradecopy.paper")


class UnknownAccountError(KeyError):
    """A query named an account the venue does not hold."""


class UnknownSymbolError(KeyError):
    """A query named a symbol the venue does not trade."""


class PaperVenue:
    """A hedging account venue: market and pending orders, SL/TP, margin and stop-out.

    Prices come only from :meth:`on_quote`; the venue's clock is the last quote's time (order
    methods take ``now_ns`` to override it). Every state change comes back as master events
    (``master`` = the account id, ids ``f"{account}-{seq}"``) that a connector can publish
    unchanged; a rejection is a :class:`Result` value that changed nothing. A request whose
    ``client_order_id`` was already executed on that account returns the original result again
    with ``duplicate=True`` and changes nothing: no follower order is executed twice. That
    memory is bounded as a connector's order memory is (``order_memory``): a client order id
    is forgotten ``retention_s`` after it ran (by ``wall_clock``, not the quote clock), and
    beyond ``max_orders`` ids the oldest go first (logged and counted). A venue behind a
    connector that keeps that memory itself (its order journal) opens with
    ``remember_client_orders=False``: it still answers ids it was told of (:meth:`remember`),
    and its history stays out of its memory and its snapshots.

    Money in another currency is converted as MT5 does (``connectors.paper.fx``): profit,
    swap and commission from the symbol's profit currency and margin from its margin currency
    into the account's, at the live quote of a pair the venue trades (direct, inverse, or a
    cross through USD). A symbol no pair converts is refused with 10013 and the reason; one
    whose conversion pair has no quote yet, with 10021 PRICE_OFF. ``names`` lets broker names
    (``usdjpy.``, aliases) find the venue's symbols.

    Limits, on purpose: hedged positions' margins are summed, not netted, and held at the
    rate of the open; swaps accrue at 00:00 UTC; a stop-out may leave a negative balance (no
    negative-balance protection).
    """

    def __init__(
        self,
        symbols: Iterable[SymbolConfig] = (XAUUSD,),
        *,
        stop_out_level: float = 50.0,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        remember_client_orders: bool = True,
        names: SymbolNames | None = None,
    ) -> None:
        self._ledger = Ledger(symbols, stop_out_level, names)
        self.order_memory = order_memory or OrderMemoryConfig()
        self.wall_clock = wall_clock
        self.remember_client_orders = remember_client_orders
        # (ts, account, client order id) oldest first; an entry whose id was remembered
        # again since (or forgotten) is stale and skipped.
        self._remembered: deque[tuple[int, str, str]] = deque()
        self._remembered_count = 0

    @classmethod
    def from_config(
        cls,
        config: PaperVenueConfig,
        *,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        remember_client_orders: bool = True,
    ) -> PaperVenue:
        """A venue trading what ``[paper.venue]`` lists, under its broker names."""
        return cls(config.symbol_configs(), stop_out_level=config.stop_out_level,
                   order_memory=order_memory, wall_clock=wall_clock,
                   remember_client_orders=remember_client_orders,
                   names=config.names())  # fmt: skip

    # ------------------------------------------------------------------ accounts, queries

    @property
    def clock_ns(self) -> int:
        return self._ledger.clock_ns

    @property
    def stop_out_level(self) -> float:
        """Margin level (equity / margin, %) below which losing positions are closed."""
        return self._ledger.stop_out_level

    @property
    def symbols(self) -> dict[str, SymbolConfig]:
        return dict(self._ledger.symbols)

    def open_account(
        self,
        account_id: str,
        currency: str = "USD",
        balance: float = 10_000.0,
        leverage: int = 100,
        *,
        money_digits: int = 2,
    ) -> AccountState:
        """Open an account; opening an existing one changes nothing (start-up is recovery)."""
        if account_id not in self._ledger.accounts:
            if not is_account_id(account_id):
                raise ValueError(f"account id {account_id!r} is not a valid subject token")
            if len(currency) != 3 or not math.isfinite(balance) or balance < 0 or leverage < 1:
                raise ValueError("need a 3-letter currency, a balance >= 0 and leverage >= 1")
            self._ledger.accounts[account_id] = AccountBook(
                account_id=account_id,
                currency=currency,
                balance_minor=acc.to_minor(balance, money_digits),
                leverage=leverage,
                money_digits=money_digits,
            )
        return self.account_state(account_id)

    def accounts(self) -> list[str]:
        return list(self._ledger.accounts)

    def quote(self, symbol: str) -> Quote | None:
        return self._ledger.quotes.get(symbol)

    def account_state(self, account: str, now_ns: int | None = None) -> AccountState:
        book = self._book(account)
        balance, equity, margin = self._ledger.figures(book)
        digits = book.money_digits
        return AccountState(
            account=account,
            ts_ns=self._ts(now_ns),
            currency=book.currency,
            balance=round(balance, digits),
            equity=round(equity, digits),
            margin=round(margin, digits),
            free_margin=round(equity - margin, digits),
            leverage=book.leverage,
            open_positions=len(book.positions),
        )

    def symbol_spec(self, account: str, symbol: str, now_ns: int | None = None) -> SymbolSpec:
        """The symbol as this account sees it, its tick value in the account's currency.

        The tick value is the losing one (MT5's ``SYMBOL_TRADE_TICK_VALUE_LOSS``: what risk
        sizing needs) at the live conversion quote. Without that quote it is the profit
        currency's, logged: an order then gets the venue's reason (10021), the symbol is
        not switched off behind the caller's back.
        """
        book = self._book(account)
        cfg = self._ledger.symbols.get(self._ledger.resolve(symbol))
        if cfg is None:
            raise UnknownSymbolError(symbol)
        tick_value = self._ledger.to_account(book, cfg.profit_currency, -cfg.tick_value)
        if tick_value is None:
            log.warning("paper_tick_value_unconverted", account=account, symbol=cfg.symbol,
                        profit_currency=cfg.profit_currency, currency=book.currency)  # fmt: skip
            tick_value = -cfg.tick_value
        return SymbolSpec(
            account=account,
            symbol=cfg.symbol,
            ts_ns=self._ts(now_ns),
            contract_size=cfg.contract_size,
            tick_size=cfg.tick_size,
            tick_value=-tick_value,
            digits=cfg.digits,
            volume_min=cfg.volume_min,
            volume_max=cfg.volume_max,
            volume_step=cfg.volume_step,
            trade_mode=cfg.trade_mode,
        )

    def conversion(self, account: str, symbol: str) -> fx.Conversion | None:
        """How ``symbol``'s profit becomes ``account``'s money (its pairs), or None when the
        venue trades no pair for it."""
        book = self._book(account)
        cfg = self._ledger.symbols.get(self._ledger.resolve(symbol))
        if cfg is None:
            raise UnknownSymbolError(symbol)
        return self._ledger.conversion(cfg.profit_currency, book.currency)

    def resolve(self, symbol: str) -> str | None:
        """The venue's symbol a broker name means (suffixes, aliases), or None."""
        resolved = self._ledger.resolve(symbol)
        return resolved if resolved in self._ledger.symbols else None

    def floating_profit(self, account: str, position_id: str) -> float:
        """A position's floating profit in the account currency at the latest quotes (0
        without them; accrued swap not included)."""
        position = self._book(account).positions.get(position_id)
        return 0.0 if position is None else self._ledger.floating(position)

    def positions(self, account: str) -> list[Position]:
        """Open positions, oldest ticket first."""
        return list(self._book(account).positions.values())

    def pending_orders(self, account: str) -> list[PendingOrder]:
        return list(self._book(account).pendings.values())

    def position_by_master_ref(self, account: str, master_ref: str) -> Position | None:
        positions = self._book(account).positions.values()
        return next((p for p in positions if p.master_ref == master_ref), None)

    def position_by_client_order(self, account: str, client_order_id: str) -> Position | None:
        positions = self._book(account).positions.values()
        return next((p for p in positions if p.client_order_id == client_order_id), None)

    def pending_by_master_ref(self, account: str, master_ref: str) -> PendingOrder | None:
        pendings = self._book(account).pendings.values()
        return next((o for o in pendings if o.master_ref == master_ref), None)

    def rekey_master_ref(self, account: str, position_id: str, master_ref: str) -> bool:
        """Point a position at a new master reference (MT4 renews the ticket of a remainder)."""
        book = self._book(account)
        position = book.positions.get(position_id)
        if position is None:
            return False
        book.positions[position_id] = msgspec.structs.replace(position, master_ref=master_ref)
        return True

    def executed(self, account: str, client_order_id: str) -> Result | None:
        """The remembered result of a client order id (for reconciliation), or None."""
        return self._book(account).executed.get(client_order_id)

    def remember(self, account: str, client_order_id: str, result: Result) -> None:
        """Take the result of a client order id that ran on an earlier incarnation of this
        venue (whose memory was kept elsewhere): a repeat of it is then a duplicate."""
        self._remember(self._book(account), client_order_id, result)

    # ---------------------------------------------------------------------- requests

    def market_order(
        self,
        account: str,
        symbol: str,
        side: Side,
        volume: float,
        *,
        sl: float | None = None,
        tp: float | None = None,
        magic: int = 0,
        comment: str = "",
        client_order_id: str | None = None,
        master_ref: str | None = None,
        expected_price: float | None = None,
        max_deviation: float | None = None,
        now_ns: int | None = None,
    ) -> Result:
        """Open a position at the ask (buy) or the bid (sell).

        A fill further than ``max_deviation`` from ``expected_price`` is refused with 10004
        REQUOTE (MT5's answer to a deviation breach); a requote is not remembered, so the same
        ``client_order_id`` may try again at a later price.
        """
        tags = Tags(
            magic=magic, comment=comment, client_order_id=client_order_id, master_ref=master_ref
        )
        deviation = None
        if expected_price is not None and max_deviation is not None:
            deviation = (expected_price, max_deviation)
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.open_position(
                self._ledger, book, symbol, side, volume, sl, tp, tags, deviation, ts
            ),
        )

    def close_position(
        self,
        account: str,
        position_id: str,
        volume: float | None = None,
        *,
        client_order_id: str | None = None,
        now_ns: int | None = None,
        reason: str = "client",
    ) -> Result:
        """Close a position at the bid (buy) or ask (sell), wholly or in part.

        A partial close keeps the position id (MT5 hedging) and reports PositionReduced; a
        remainder below the symbol's minimum is refused with 10014 INVALID_VOLUME, a volume
        above the held one with 10038 INVALID_CLOSE_VOLUME. ``reason`` is what a whole
        close reports (a replayed statement's ``sl``/``tp``).
        """
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.close_position(
                self._ledger, book, position_id, volume, ts, reason
            ),
        )

    def close_by(
        self,
        account: str,
        position_id: str,
        opposite_id: str,
        *,
        client_order_id: str | None = None,
        now_ns: int | None = None,
    ) -> Result:
        """MT5 close-by: both positions lose the smaller volume.

        ``position_id`` is closed at ``opposite_id``'s open price (that is the whole profit),
        the opposite at its own open price; the larger keeps the rest under its own id.
        """
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.close_by(self._ledger, book, position_id, opposite_id, ts),
        )

    def modify_position(
        self,
        account: str,
        position_id: str,
        sl: float | None,
        tp: float | None,
        *,
        client_order_id: str | None = None,
        now_ns: int | None = None,
    ) -> Result:
        """Set both SL and TP (None or 0 removes a level); unchanged levels answer ok, 10025."""
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.modify_position(self._ledger, book, position_id, sl, tp, ts),
        )

    def place_pending(
        self,
        account: str,
        symbol: str,
        order_type: OrderType,
        volume: float,
        price: float,
        *,
        sl: float | None = None,
        tp: float | None = None,
        expiration_ns: int = 0,
        magic: int = 0,
        comment: str = "",
        client_order_id: str | None = None,
        master_ref: str | None = None,
        now_ns: int | None = None,
    ) -> Result:
        """Place a limit or stop order (answer 10008 PLACED); margin is checked on trigger."""
        tags = Tags(
            magic=magic, comment=comment, client_order_id=client_order_id, master_ref=master_ref
        )
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.place_pending(
                self._ledger,
                book,
                symbol,
                order_type,
                volume,
                price,
                sl,
                tp,
                expiration_ns,
                tags,
                ts,
            ),
        )

    def modify_pending(
        self,
        account: str,
        order_id: str,
        price: float,
        *,
        sl: float | None = None,
        tp: float | None = None,
        expiration_ns: int = 0,
        client_order_id: str | None = None,
        now_ns: int | None = None,
    ) -> Result:
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.modify_pending(
                self._ledger, book, order_id, price, sl, tp, expiration_ns, ts
            ),
        )

    def cancel_pending(
        self,
        account: str,
        order_id: str,
        *,
        client_order_id: str | None = None,
        now_ns: int | None = None,
    ) -> Result:
        ts = self._ts(now_ns)
        return self._request(
            account,
            client_order_id,
            lambda book: execution.cancel_pending(self._ledger, book, order_id, ts),
        )

    def on_quote(self, quote: Quote) -> list[Transaction]:
        """Take a new price: trigger pendings, expire pendings, hit SL/TP, then stop out.

        Quotes for symbols the venue does not trade, or with impossible prices, are ignored.
        """
        ledger = self._ledger
        cfg = ledger.symbols.get(ledger.resolve(quote.symbol))
        sane = math.isfinite(quote.bid) and math.isfinite(quote.ask) and 0 < quote.bid <= quote.ask
        if cfg is None or not sane:
            return []
        if quote.symbol != cfg.symbol:
            quote = msgspec.structs.replace(quote, symbol=cfg.symbol)
        ledger.quotes[quote.symbol] = quote
        ledger.clock_ns = quote.ts_ns
        ledger.rollover(quote.ts_ns)
        return process_quote(ledger, cfg, quote)

    def _request(
        self, account: str, client_order_id: str | None, run: Callable[[AccountBook], Result]
    ) -> Result:
        """Idempotency for every request: recall a known client order id, remember a new one."""
        book = self._ledger.accounts.get(account)
        if book is None:
            return reject(Retcode.INVALID, f"unknown account {account!r}")
        if client_order_id is not None:
            known = book.executed.get(client_order_id)
            if known is not None:
                return msgspec.structs.replace(known, duplicate=True)
        result = run(book)
        if (
            client_order_id is not None
            and self.remember_client_orders
            and result.retcode not in _RETRYABLE
        ):
            self._remember(book, client_order_id, result)
        return result

    def _remember(self, book: AccountBook, client_order_id: str, result: Result) -> None:
        now = self.wall_clock()
        if client_order_id not in book.executed:
            self._remembered_count += 1
        book.executed[client_order_id] = result
        book.executed_ns[client_order_id] = now
        self._remembered.append((now, book.account_id, client_order_id))
        self._forget_old(now)

    def _forget_old(self, now: int) -> None:
        """Forget client order ids past the retention, then the oldest beyond the cap."""
        remembered = self._remembered
        horizon = now - int(self.order_memory.retention_s * _NS)
        while remembered and remembered[0][0] < horizon:
            self._forget(*remembered.popleft())
        evicted = 0
        while self._remembered_count > self.order_memory.max_orders:
            evicted += self._forget(*remembered.popleft())
        if evicted:
            # Younger than the retention: a repeat of these would now trade again.
            EVICTED.labels(_MEMORY).inc(evicted)
            log.warning("order_memory_cap_evicted", memory=_MEMORY, evicted=evicted,
                        max_orders=self.order_memory.max_orders)  # fmt: skip

    def _forget(self, ts: int, account: str, client_order_id: str) -> bool:
        book = self._ledger.accounts.get(account)
        if book is None or book.executed_ns.get(client_order_id) != ts:
            return False
        del book.executed[client_order_id]
        del book.executed_ns[client_order_id]
        self._remembered_count -= 1
        return True

    def _ts(self, now_ns: int | None) -> int:
        return self._ledger.clock_ns if now_ns is None else now_ns

    def position(self, account: str, position_id: str) -> Position | None:
        """One open position of ``account`` (None when it has none of that id)."""
        return self._book(account).positions.get(position_id)

    def set_position_charges(
        self, account: str, position_id: str, *, swap: float, commission: float
    ) -> None:
        """Set an open position's accrued swap and entry commission, in the account currency
        (a broker's own charges, e.g. a statement being replayed: no order request sets them).
        Entry commission is booked to the balance when held, so the balance moves by the
        change; the swap is booked when the position closes."""
        book = self._book(account)
        position = book.positions.get(position_id)
        if position is None:
            raise ValueError(f"{account} has no open position {position_id!r}")
        digits = book.money_digits
        book.balance_minor += acc.to_minor(commission, digits) - acc.to_minor(
            position.commission, digits
        )
        book.positions[position_id] = msgspec.structs.replace(
            position, swap=swap, commission=commission
        )

    def _book(self, account: str) -> AccountBook:
        book = self._ledger.accounts.get(account)
        if book is None:
            raise UnknownAccountError(account)
        return book

    # ------------------------------------------------------------------- persistence

    def snapshot(self, *, with_executed: bool = True) -> bytes:
        """The whole venue as msgpack: accounts, orders, tickets, idempotency memory, quotes.

        ``with_executed=False`` leaves the idempotency memory out: what is left is as small as
        the open positions and orders, whatever the history (a connector keeps its order
        memory in its journal instead).
        """
        ledger = self._ledger
        accounts = list(ledger.accounts.values())
        if not with_executed:
            accounts = [msgspec.structs.replace(b, executed={}, executed_ns={}) for b in accounts]
        state = VenueState(
            next_ticket=ledger.next_ticket,
            clock_ns=ledger.clock_ns,
            stop_out_level=ledger.stop_out_level,
            accounts=accounts,
            quotes=list(ledger.quotes.values()),
            rollover_day=ledger.rollover_day,
        )
        return msgspec.msgpack.encode(state)

    @classmethod
    def restore(
        cls,
        data: bytes,
        symbols: Iterable[SymbolConfig] = (XAUUSD,),
        *,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        remember_client_orders: bool = True,
        names: SymbolNames | None = None,
    ) -> PaperVenue:
        """The venue a :meth:`snapshot` saved, trading ``symbols`` (they are not saved)."""
        state = _state_decoder.decode(data)
        if state.version != _STATE_VERSION:
            raise ValueError(f"snapshot version {state.version}, this venue reads {_STATE_VERSION}")
        venue = cls(symbols, stop_out_level=state.stop_out_level, order_memory=order_memory,
                    wall_clock=wall_clock, remember_client_orders=remember_client_orders,
                    names=names)  # fmt: skip
        ledger = venue._ledger
        for book in state.accounts:
            used = {p.symbol for p in book.positions.values()}
            used |= {o.symbol for o in book.pendings.values()}
            unknown = used - ledger.symbols.keys()
            if unknown:
                raise ValueError(
                    f"account {book.account_id} holds {sorted(unknown)}, not configured here"
                )
            ledger.accounts[book.account_id] = book
        ledger.quotes = {q.symbol: q for q in state.quotes}
        ledger.next_ticket = state.next_ticket
        ledger.clock_ns = state.clock_ns
        ledger.rollover_day = state.rollover_day
        venue._recall_memory()
        return venue

    def _recall_memory(self) -> None:
        """Rebuild the age order of the restored idempotency memory, then prune it."""
        now = self.wall_clock()
        entries = []
        for book in self._ledger.accounts.values():
            # Snapshots from before executed_ns: those results age from now.
            book.executed_ns = {cid: book.executed_ns.get(cid, now) for cid in book.executed}
            entries.extend((ts, book.account_id, cid) for cid, ts in book.executed_ns.items())
        entries.sort()
        self._remembered = deque(entries)
        self._remembered_count = len(entries)
        self._forget_old(now)

    def save(self, path: Path, durable: bool = True) -> None:
        """Write the snapshot atomically: a crash leaves the old file or the new, never half.

        ``durable=False`` skips the fsync: the file survives a crash of the process (what a
        connector restart needs, at every order) but not of the machine.
        """
        write_atomically(path, self.snapshot(), durable=durable)

    @classmethod
    def load(
        cls,
        path: Path,
        symbols: Iterable[SymbolConfig] = (XAUUSD,),
        *,
        order_memory: OrderMemoryConfig | None = None,
    ) -> PaperVenue:
        return cls.restore(path.read_bytes(), symbols, order_memory=order_memory)
