"""Shared wire types: sides, pending order types, ids and the per-hop timestamp trace."""

from __future__ import annotations

import enum
import re
from typing import Annotated

import msgspec

#: Account ids appear as subject tokens: letters, digits, ``_`` and ``-`` only.
# (?!\n) before $: a bare $ also matches before a trailing newline ("acc\n").
ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}(?!\n)$"
AccountId = Annotated[str, msgspec.Meta(pattern=ACCOUNT_ID_PATTERN)]
_ACCOUNT_ID_RE = re.compile(ACCOUNT_ID_PATTERN)

#: Ids travel in subjects, headers and every derived order id: bounded so a hostile or broken
#: producer cannot push a follower order past the server's max payload.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Comment = Annotated[str, msgspec.Meta(max_length=256)]
#: UTC nanoseconds; int64 leaves room for any sum the rules make (years 1970–2262).
TimestampNs = Annotated[int, msgspec.Meta(ge=0, le=2**62)]

Volume = Annotated[float, msgspec.Meta(ge=0.0)]
Price = Annotated[float, msgspec.Meta(ge=0.0)]


def is_account_id(value: str) -> bool:
    return _ACCOUNT_ID_RE.match(value) is not None


class Side(enum.StrEnum):
    BUY = "buy"
    SELL = "sell"

    def flipped(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(enum.StrEnum):
    """Pending order types, as MetaTrader names them."""

    BUY_LIMIT = "buy_limit"
    SELL_LIMIT = "sell_limit"
    BUY_STOP = "buy_stop"
    SELL_STOP = "sell_stop"

    @property
    def side(self) -> Side:
        return Side.BUY if self in (OrderType.BUY_LIMIT, OrderType.BUY_STOP) else Side.SELL

    def reversed(self) -> OrderType:
        """The order that bets the other way at the same trigger price.

        A buy limit waits below the market; the reverse bet that waits below the market
        is a sell stop (and so on), so the trigger price can be copied unchanged.
        """
        return _REVERSED_ORDER_TYPE[self]


_REVERSED_ORDER_TYPE = {
    OrderType.BUY_LIMIT: OrderType.SELL_STOP,
    OrderType.SELL_STOP: OrderType.BUY_LIMIT,
    OrderType.SELL_LIMIT: OrderType.BUY_STOP,
    OrderType.BUY_STOP: OrderType.SELL_LIMIT,
}


class Trace(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """UTC nanosecond stamps taken at every hop, so each hop's latency can be measured.

    A zero means the hop has not stamped (yet). Each hop copies the trace it received and
    adds its own stamps.
    """

    terminal_ns: int = 0
    """The master terminal saw the transaction (or the venue filled the master)."""
    connector_ns: int = 0
    """The master's connector published the event."""
    replicator_in_ns: int = 0
    """The replicator received the master event."""
    replicator_out_ns: int = 0
    """The replicator encoded the follower order."""
    follower_connector_ns: int = 0
    """The follower's connector received the order."""
    follower_terminal_ns: int = 0
    """The follower terminal or venue executed the order."""
    report_ns: int = 0
    """The follower's connector published the execution report."""
