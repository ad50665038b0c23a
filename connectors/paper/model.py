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
    PRICE_OFF = 10021
    INVALID_EXPIRATION = 10022
    NO_CHANGES = 10025
    POSITION_CLOSED = 10036
    INVALID_CLOSE_VOLUME = 10038
    LONG_ONLY = 10042
    SHORT_ONLY = 10043
    CLOSE_ONLY = 10044


class MarginMode(enum.StrEnum):
    """How margin is computed (MetaTrader's SYMBOL_TRADE_CALC_MODE), in the margin currency."""

    FOREX = "forex"
    """lots x contract size / leverage x margin rate (MT5 SYMBOL_CALC_MODE_FOREX)."""
    CFD_LEVERAGE = "cfd_leverage"
    """lots x contract size x price / leverage x margin rate (SYMBOL_CALC_MODE_CFDLEVERAGE)."""


class SymbolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one symbol trades on the venue (MetaTrader's SymbolInfo)."""

    symbol: str
    contract_size: float
    tick_size: float
    tick_value: float
    """Value of one tick for one lot in the profit currency (the account's currency when the
    two are the same; otherwise converted at the live rate, see ``connectors.paper.fx``)."""
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
    base_currency: str = ""
    """The first currency of a currency pair (EUR in EURUSD); empty for CFDs. A symbol with
    both currencies can convert money between them for other symbols."""
    margin_currency: str = ""
    """The currency margin is computed in; empty means the base currency of a pair in forex
    mode, else the profit currency."""
    margin_mode: MarginMode = MarginMode.CFD_LEVERAGE
    swap_long: float = 0.0
    """Swap of one lot held long over one rollover, in points (MT5 SYMBOL_SWAP_MODE_POINTS);
    negative is a charge."""
    swap_short: float = 0.0
    triple_swap_weekday: int = 2
    """The night whose rollover counts three days (``date.weekday()``, 2 = Wednesday)."""
    commission_per_lot: float = 0.0
    """Charged per lot on every deal (entry and exit), in the profit currency."""

    @property
    def point(self) -> float:
        return 10.0**-self.digits

    @property
    def margin_ccy(self) -> str:
        if self.margin_currency:
            return self.margin_currency
        if self.margin_mode is MarginMode.FOREX and self.base_currency:
            return self.base_currency
        return self.profit_currency


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
    """Swap accrued so far, in the account currency (booked to the balance on close)."""
    commission: float = 0.0
    """Entry commission not yet attributed to a close, in the account currency (already
    booked to the balance when the position opened)."""
    margin: float = 0.0
    """Margin held, in the account currency, fixed at the open (0 in snapshots from before
    the field: then computed from the open price as the venue always did)."""
    conversion: str = ""
    """The pair(s) converting the symbol's profit to the account currency, e.g. ``"USDJPY"``
    or ``"EURUSD*USDJPY"`` (a cross); empty when no conversion is needed."""


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
    commission: float = 0.0
    """Commission of the request's deals (a close: with the closed part's entry commission),
    in account currency; negative is a charge."""
    swap: float = 0.0
    """Swap booked by the request (a close: the closed part's accrued swap)."""
    conversion: str = ""
    """The pair(s) that converted the deal's money to the account currency (see Position)."""
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
    rollover_day: int = 0
    """The last UTC day (days since the epoch) whose swap rollover was applied."""
