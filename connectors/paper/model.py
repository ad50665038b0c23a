"""Paper venue records: symbol configs, positions, pending orders, results and saved state."""

from __future__ import annotations

import enum

import msgspec

from connectors.paper.prices import Quote
from schemas.account import TradeMode
from schemas.common import OrderType, Side
from schemas.master import MasterEvent

#: Every state change is told as the master event a terminal would report for it, so a
#: connector can publish venue transactions unchanged.
Transaction = MasterEvent


class Retcode(enum.IntEnum):
    """MetaTrader 5 trade server return codes (``TRADE_RETCODE_*``) the venue answers with."""

    REQUOTE = 10004
    PLACED = 10008
    DONE = 10009
    INVALID = 10013
    INVALID_VOLUME = 10014
    INVALID_PRICE = 10015
    INVALID_STOPS = 10016
    TRADE_DISABLED = 10017
    MARKET_CLOSED = 10018
    NO_MONEY = 10019
    INVALID_EXPIRATION = 10022
    NO_CHANGES = 10025
    POSITION_CLOSED = 10036
    INVALID_CLOSE_VOLUME = 10038
    LONG_ONLY = 10042
    SHORT_ONLY = 10043
    CLOSE_ONLY = 10044


class SymbolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one symbol trades on the venue (MetaTrader's SymbolInfo)."""

    symbol: str
    contract_size: float
    tick_size: float
    tick_value: float
    """Account-currency value of one tick for one lot."""
    digits: int
    volume_min: float
    volume_max: float
    volume_step: float
    margin_rate: float = 1.0
    """Multiplies the notional / leverage margin (MT5's initial margin rate)."""
    trade_mode: TradeMode = TradeMode.FULL
    stops_level_points: int = 0
    """Nearest SL/TP/pending distance from the market, in points (MT5's stops level)."""
    profit_currency: str = "USD"

    @property
    def point(self) -> float:
        return 10.0**-self.digits


XAUUSD = SymbolConfig(
    symbol="XAUUSD",
    contract_size=100.0,
    tick_size=0.01,
    tick_value=1.0,
    digits=2,
    volume_min=0.01,
    volume_max=100.0,
    volume_step=0.01,
)


class Position(msgspec.Struct, frozen=True, kw_only=True):
    """An open hedging-account position; a partial close keeps its id (MT5 hedging)."""

    position_id: str
    account: str
    symbol: str
    side: Side
    volume: float
    open_price: float
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: str = ""
    open_ts_ns: int = 0
    client_order_id: str | None = None
    """The follower order that created the position (or its pending order)."""
    master_ref: str | None = None
    """What the position copies, e.g. ``"master:position"``; free-form for the caller."""
    swap: float = 0.0
    commission: float = 0.0


class PendingOrder(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    account: str
    symbol: str
    order_type: OrderType
    volume: float
    price: float
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0
    """Expires at this UTC ns; 0 means good till cancelled."""
    magic: int = 0
    comment: str = ""
    placed_ts_ns: int = 0
    client_order_id: str | None = None
    master_ref: str | None = None


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """The venue's answer to one request: a rejection changes nothing and carries no events."""

    ok: bool
    retcode: int
    reason: str = ""
    position_id: str | None = None
    order_id: str | None = None
    price: float = 0.0
    """Fill price (close-by: the opposite position's open price)."""
    volume: float = 0.0
    profit: float = 0.0
    """Realised profit of the request's deals, in account currency."""
    duplicate: bool = False
    """The client order id had already been executed: this is the original answer again."""
    transactions: list[Transaction] = []


class AccountBook(msgspec.Struct, kw_only=True):
    """One account's whole state; mutable, owned by the venue."""

    account_id: str
    currency: str
    balance_minor: int
    """Balance in minor units (cents): realised profits add up exactly."""
    leverage: int
    money_digits: int = 2
    seq: int = 0
    """Last event sequence number; event ids are ``f"{account}-{seq}"``."""
    positions: dict[str, Position] = {}
    pendings: dict[str, PendingOrder] = {}
    executed: dict[str, Result] = {}
    """Results by client order id: the idempotency memory."""
    executed_ns: dict[str, int] = {}
    """When each result was remembered (UTC ns, wall clock): the memory forgets by age.
    Missing in snapshots from before it existed; such results age from their restore."""


class VenueState(msgspec.Struct, kw_only=True):
    """Everything :meth:`PaperVenue.snapshot` saves (symbol configs come from the caller)."""

    version: int = 1
    next_ticket: int
    clock_ns: int
    stop_out_level: float
    accounts: list[AccountBook]
    quotes: list[Quote]
