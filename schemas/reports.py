"""Execution reports: what a follower's venue did with a follower order."""

from __future__ import annotations

import msgspec

from schemas.common import AccountId, Price, Side, Trace, Volume


class _ReportBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="status"):
    order_id: str
    link_id: str
    follower: AccountId
    ts_ns: int
    trace: Trace = Trace()


class OrderFilled(_ReportBase, tag="filled"):
    symbol: str
    position_id: str
    side: Side
    volume: Volume
    price: Price
    master_price: Price = 0.0
    slippage: float = 0.0
    """Follower fill minus master fill, in price units, signed against the follower."""
    profit: float | None = None
    """Profit of the part this fill closed, in the account's deposit currency, as the venue
    reports it; ``None`` when the fill opened a position or the venue did not say."""
    commission: float | None = None
    """Commission of the part this fill closed, in the deposit currency; ``None`` if not said."""
    swap: float | None = None
    """Swap of the part this fill closed, in the deposit currency; ``None`` if not said."""


class OrderPartiallyFilled(_ReportBase, tag="partially_filled"):
    symbol: str
    position_id: str
    side: Side
    volume_requested: Volume
    volume_filled: Volume
    price: Price
    master_price: Price = 0.0
    slippage: float = 0.0
    profit: float | None = None
    """Profit of the part this fill closed, in the account's deposit currency, as the venue
    reports it; ``None`` when the fill opened a position or the venue did not say."""
    commission: float | None = None
    """Commission of the part this fill closed, in the deposit currency; ``None`` if not said."""
    swap: float | None = None
    """Swap of the part this fill closed, in the deposit currency; ``None`` if not said."""


class OrderDone(_ReportBase, tag="done"):
    """An order without a fill succeeded: SL/TP modified, pending placed/changed/cancelled,
    close-all done, or nothing was left to do (``detail`` says which)."""

    detail: str
    position_ids: list[str] = []


class OrderRejected(_ReportBase, tag="rejected"):
    """Definitive rejection, with its reason: by the venue (its own code, e.g. a MetaTrader
    retcode 10004–10068), or by a rule the order carries, decided by the connector (codes
    from 90000: 90001 signal older than the link's max signal age, 90002 price further from
    the master's fill than the link's max deviation, 90003 a manual order names a position
    the account does not hold, 90004 a partial close that cannot be sized)."""

    code: int
    reason: str


class OrderUnknown(_ReportBase, tag="unknown"):
    """No definitive answer (timeout, disconnect); reconciliation settles it."""

    reason: str


ExecutionReport = OrderFilled | OrderPartiallyFilled | OrderDone | OrderRejected | OrderUnknown
