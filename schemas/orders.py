"""Follower orders: commands from the replicator to the connector of a follower account."""

from __future__ import annotations

import enum
import hashlib

import msgspec

from schemas.common import AccountId, OrderType, Price, Side, Trace, Volume


class DeviationPolicy(enum.StrEnum):
    SKIP = "skip"
    """Reject the open when the follower's price is too far from the master's fill."""
    WAIT = "wait"
    """Wait up to ``deviation_wait_ms`` for a price within the limit, then reject."""


#: The ``link_id`` of every manual order: ``LINK_ID_PATTERN`` refuses ``@``, so no copy link
#: can carry it.
MANUAL_LINK_ID = "@manual"


def manual_order_id(follower: str, client_order_id: str) -> str:
    """A manual order's id: the same for every retry of one request (``client_order_id``) on
    one account, so JetStream's dedup and the connector's idempotency trade it once."""
    digest = hashlib.sha256(f"{follower}\x00{client_order_id}".encode()).hexdigest()
    return f"manual-{digest[:40]}"


class _FollowerOrderBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    order_id: str
    """Deterministic from master event id and link id: the idempotency key end to end
    (manual orders: from the account and the client's ``client_order_id``)."""
    link_id: str
    """The copy link (manual orders: ``MANUAL_LINK_ID``)."""
    follower: AccountId
    master: AccountId
    """The master account copied (manual orders: the follower itself, which no link's
    master can be)."""
    master_event_id: str
    """The master event copied (manual orders: the order id)."""
    symbol: str
    """The follower's symbol (after mapping)."""
    ts_ns: int
    """When the replicator (or, for a manual order, the API) created the order (UTC ns)."""
    trace: Trace = Trace()
    manual: bool = False
    """Placed by a person (the platform API), not copied: billing never counts it. A manual
    order's ``master_position_id`` names the follower's own position (modify and close; an
    open names its own order id), which the connector looks up directly."""


class FollowerOpen(_FollowerOrderBase, tag="open"):
    master_position_id: str
    side: Side
    volume: Volume
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: str = ""
    master_price: Price = 0.0
    master_volume: Volume = 0.0
    master_order_id: str | None = None
    """Set when the master position came from a pending order the follower may hold too."""
    max_price_deviation: float | None = None
    """Largest allowed distance, in price units, between the follower's fill and master_price."""
    deviation_policy: DeviationPolicy = DeviationPolicy.SKIP
    deviation_wait_ms: int = 0
    expires_ns: int = 0
    """Do not execute after this time (max signal age); 0 means no limit."""


class FollowerModify(_FollowerOrderBase, tag="modify"):
    master_position_id: str
    sl: float | None = None
    tp: float | None = None


class FollowerClose(_FollowerOrderBase, tag="close"):
    """Close ``ratio`` of the follower's position that copies ``master_position_id``.

    The connector sizes the close from the volume it actually holds (see
    ``engine.core.volume.partial_close_volume``), so it never closes more than it holds.
    """

    master_position_id: str
    ratio: float = 1.0
    master_price: Price = 0.0
    new_master_position_id: str | None = None


class FollowerCloseBy(_FollowerOrderBase, tag="close_by"):
    master_position_id: str
    master_opposite_position_id: str


class FollowerCloseAll(_FollowerOrderBase, tag="close_all"):
    """Close every position and cancel every pending order this link opened (protection)."""

    reason: str


class FollowerPendingPlace(_FollowerOrderBase, tag="pending_place"):
    master_order_id: str
    order_type: OrderType
    volume: Volume
    price: Price
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0
    magic: int = 0
    comment: str = ""
    master_volume: Volume = 0.0


class FollowerPendingModify(_FollowerOrderBase, tag="pending_modify"):
    master_order_id: str
    price: Price
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0


class FollowerPendingCancel(_FollowerOrderBase, tag="pending_cancel"):
    master_order_id: str


FollowerOrder = (
    FollowerOpen
    | FollowerModify
    | FollowerClose
    | FollowerCloseBy
    | FollowerCloseAll
    | FollowerPendingPlace
    | FollowerPendingModify
    | FollowerPendingCancel
)


class FollowerOrderBatch(msgspec.Struct, frozen=True, kw_only=True):
    """All of one master event's orders for the accounts one connector serves.

    Fewer, larger messages: a 1,000-follower fan-out costs one stored message per connector
    instead of one per follower. Each order keeps its own id for idempotent execution.
    """

    batch_id: str
    """Deterministic: master event id and connector; JetStream dedups redone batches."""
    connector: str
    master: AccountId
    master_event_id: str
    ts_ns: int
    orders: list[FollowerOrder]
