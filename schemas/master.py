"""Master events: facts about a master account's trading, as connectors publish them."""

from __future__ import annotations

import msgspec

from schemas.common import AccountId, OrderType, Price, Side, Trace, Volume


class _MasterEventBase(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=False
):
    event_id: str
    """Unique per master event; follower order ids are derived from it."""
    master: AccountId
    symbol: str
    ts_ns: int
    """When the terminal saw the transaction (UTC ns)."""
    trace: Trace = Trace()


class PositionOpened(_MasterEventBase, tag="position_opened"):
    position_id: str
    side: Side
    volume: Volume
    price: Price
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: str = ""


class PositionModified(_MasterEventBase, tag="position_modified"):
    """The master moved SL and/or TP; ``None`` means no level."""

    position_id: str
    side: Side
    sl: float | None = None
    tp: float | None = None
    magic: int = 0


class PositionReduced(_MasterEventBase, tag="position_reduced"):
    """A partial close. Followers close the same *ratio* of their own position."""

    position_id: str
    side: Side
    volume_before: Volume
    volume_after: Volume
    price: Price
    magic: int = 0
    new_position_id: str | None = None
    """MT4 gives the remainder a new ticket; followers re-key their position to it."""


class PositionClosed(_MasterEventBase, tag="position_closed"):
    position_id: str
    side: Side
    volume: Volume
    price: Price
    magic: int = 0
    reason: str = "client"
    """client, sl, tp, stop_out or expert, as the terminal reports it."""


class PositionClosedBy(_MasterEventBase, tag="position_closed_by"):
    """The master closed a position by an opposite one (MetaTrader close-by)."""

    position_id: str
    opposite_position_id: str
    side: Side
    volume: Volume
    """Volume closed on each side: the smaller of the two positions."""
    magic: int = 0


class PendingOrderPlaced(_MasterEventBase, tag="pending_placed"):
    order_id: str
    order_type: OrderType
    volume: Volume
    price: Price
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0
    magic: int = 0
    comment: str = ""


class PendingOrderModified(_MasterEventBase, tag="pending_modified"):
    order_id: str
    order_type: OrderType
    price: Price
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0
    magic: int = 0


class PendingOrderCancelled(_MasterEventBase, tag="pending_cancelled"):
    order_id: str
    order_type: OrderType
    magic: int = 0


class PendingOrderTriggered(_MasterEventBase, tag="pending_triggered"):
    """A master pending order became position ``position_id``."""

    order_id: str
    order_type: OrderType
    position_id: str
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
