"""Account state, symbol specifications and FX rates, published by connectors."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from schemas.common import AccountId

Positive = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class TradeMode(enum.StrEnum):
    """MetaTrader's SYMBOL_TRADE_MODE."""

    DISABLED = "disabled"
    LONG_ONLY = "long_only"
    SHORT_ONLY = "short_only"
    CLOSE_ONLY = "close_only"
    FULL = "full"


class TerminalStatus(msgspec.Struct, frozen=True, kw_only=True):
    """How the connector sees the terminal behind an account: whether it can trade now, and
    if not, why (the same state its ``/healthz`` reports)."""

    connected: bool
    """The connector reaches the terminal and the terminal its trade server."""
    synchronised: bool = True
    """The connector's view of positions and orders is current (last read or snapshot)."""
    trade_allowed: bool = True
    """The terminal accepts trade requests (MetaTrader's AutoTrading is on)."""
    reason: Annotated[str, msgspec.Meta(max_length=256)] = ""
    """Why the terminal cannot trade now; empty when it can."""
    last_error_code: int = 0
    last_error: Annotated[str, msgspec.Meta(max_length=256)] = ""
    """The terminal's last error (MetaTrader's ``last_error()``), for operators."""


class AccountState(msgspec.Struct, frozen=True, kw_only=True):
    """The latest balance sheet of one trading account, in its deposit currency."""

    account: AccountId
    ts_ns: int
    currency: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    balance: float
    equity: float
    margin: NonNegative = 0.0
    free_margin: float = 0.0
    leverage: Annotated[int, msgspec.Meta(ge=1)] = 100
    open_positions: Annotated[int, msgspec.Meta(ge=0)] = 0
    connector: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}(?!\n)$")] = ""
    """The connector process serving this account; with batching on, its orders travel
    together in one ``FollowerOrderBatch`` per master event."""
    terminal: TerminalStatus | None = None
    """The terminal's connection state, where the connector has a terminal to watch."""


class SymbolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How one symbol trades on one account (MetaTrader's SymbolInfo)."""

    account: AccountId
    symbol: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ts_ns: int = 0
    contract_size: Positive
    tick_size: Positive
    tick_value: Positive
    """Value of one tick for one lot, in the account's deposit currency."""
    digits: Annotated[int, msgspec.Meta(ge=0, le=10)]
    volume_min: Positive
    volume_max: Positive
    volume_step: Positive
    trade_mode: TradeMode = TradeMode.FULL


class FxRate(msgspec.Struct, frozen=True, kw_only=True):
    """``1 base = rate quote``, e.g. EURUSD 1.08."""

    base: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    quote: Annotated[str, msgspec.Meta(min_length=3, max_length=3)]
    rate: Positive
    ts_ns: int = 0
