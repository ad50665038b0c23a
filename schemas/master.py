"""Master events: facts about a master account's trading, as connectors publish them."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.common import (
    AccountId,
    Comment,
    Id,
    OrderType,
    Price,
    Side,
    Symbol,
    TimestampNs,
    Trace,
    Volume,
)


class _MasterEventBase(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False
):
    event_id: Id
    """Unique per master event; follower order ids are derived from it."""
    master: AccountId
    symbol: Symbol
    ts_ns: TimestampNs
    """When the terminal saw the transaction (UTC ns)."""
    trace: Trace = Trace()


class PositionOpened(_MasterEventBase, tag="position_opened"):
    position_id: Id
    side: Side
    volume: Volume
    price: Price
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: Comment = ""


class PositionModified(_MasterEventBase, tag="position_modified"):
    """The master moved SL and/or TP; ``None`` means no level."""

    position_id: Id
    side: Side
    sl: float | None = None
    tp: float | None = None
    magic: int = 0


class PositionReduced(_MasterEventBase, tag="position_reduced"):
    """A partial close. Followers close the same *ratio* of their own position."""

    position_id: Id
    side: Side
    volume_before: Volume
    volume_after: Volume
    price: Price
    magic: int = 0
    new_position_id: Id | None = None
    """MT4 gives the remainder a new ticket; followers re-key their position to it."""
    profit: float | None = None
    """Profit of the closed part in the account's deposit currency, as the terminal reports it;
    ``None`` when the venue did not say."""
    commission: float | None = None
    """Commission of the closed part in the deposit currency; ``None`` when not reported."""
    swap: float | None = None
    """Swap of the closed part in the deposit currency; ``None`` when not reported."""


class PositionClosed(_MasterEventBase, tag="position_closed"):
    position_id: Id
    side: Side
    volume: Volume
    price: Price
    magic: int = 0
    reason: Annotated[str, msgspec.Meta(max_length=32)] = "client"
    """client, sl, tp, stop_out or expert, as the terminal reports it."""
    profit: float | None = None
    """Profit of the closed part in the account's deposit currency, as the terminal reports it;
    ``None`` when the venue did not say."""
    commission: float | None = None
    """Commission of the closed part in the deposit currency; ``None`` when not reported."""
    swap: float | None = None
    """Swap of the closed part in the deposit currency; ``None`` when not reported."""


class PositionClosedBy(_MasterEventBase, tag="position_closed_by"):
    """The master closed a position by an opposite one (MetaTrader close-by)."""

    position_id: Id
    opposite_position_id: Id
    side: Side
    volume: Volume
    """Volume closed on each side: the smaller of the two positions."""
    magic: int = 0
    profit: float | None = None
    """Profit of the closed part in the account's deposit currency, as the terminal reports it;
    ``None`` when the venue did not say."""
    commission: float | None = None
    """Commission of the closed part in the deposit currency; ``None`` when not reported."""
    swap: float | None = None
    """Swap of the closed part in the deposit currency; ``None`` when not reported."""


class PendingOrderPlaced(_MasterEventBase, tag="pending_placed"):
    order_id: Id
    order_type: OrderType
    volume: Volume
    price: Price
    sl: float | None = None
    tp: float | None = None
    expiration_ns: TimestampNs = 0
    magic: int = 0
    comment: Comment = ""


class PendingOrderModified(_MasterEventBase, tag="pending_modified"):
    order_id: Id
    order_type: OrderType
    price: Price
    sl: float | None = None
    tp: float | None = None
    expiration_ns: TimestampNs = 0
    magic: int = 0


class PendingOrderCancelled(_MasterEventBase, tag="pending_cancelled"):
    order_id: Id
    order_type: OrderType
    magic: int = 0


class PendingOrderTriggered(_MasterEventBase, tag="pending_triggered"):
    """A master pending order became position ``position_id``."""

    order_id: Id
    order_type: OrderType
    position_id: Id
    side: Side
    volume: Volume
    price: Price
    sl: float | None = None
    tp: float | None = None
    magic: int = 0


MasterEvent = (
    PositionOpened
    | PositionModified
    | PositionReduced
    | PositionClosed
    | PositionClosedBy
    | PendingOrderPlaced
    | PendingOrderModified
    | PendingOrderCancelled
    | PendingOrderTriggered
)
