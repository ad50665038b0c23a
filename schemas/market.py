"""Market data on the wire: quotes a live price source publishes for paper venues."""

from __future__ import annotations

import msgspec

from schemas.common import Symbol, TimestampNs


class Quote(msgspec.Struct, frozen=True, kw_only=True):
    """One bid/ask price of a symbol at ``ts_ns`` (UTC ns), on ``tc.v1.quotes.<symbol>``."""

    symbol: Symbol
    bid: float
    ask: float
    ts_ns: TimestampNs
