"""The order builders: the follower order a master event becomes on one link, once it may go.

Deterministic: the same event and link always build the same order, with the same id — the
idempotency key from the replicator to the follower's terminal.
"""

from __future__ import annotations

from engine.core.volume import close_ratio
from engine.replicator.facts import CompiledLink, EventFacts
from schemas.common import OrderType, Side, Trace
from schemas.links import CopyLink
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    FollowerClose,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)


def order_id(event_id: str, link_id: str) -> str:
    """Deterministic follower order id: the same event and link always give the same id."""
    return f"{event_id}:{link_id}"


def follower_levels(
    link: CopyLink, sl: float | None, tp: float | None
) -> tuple[float | None, float | None]:
    """SL/TP as the follower gets them: dropped when not copied, swapped on reverse copy."""
    if not link.copy_sl_tp:
        return None, None
    return (tp, sl) if link.reverse else (sl, tp)


def new_copy_order(
    event: PositionOpened | PendingOrderTriggered | PendingOrderPlaced,
    facts: EventFacts,
    cl: CompiledLink,
    *,
    symbol: str,
    side: Side,
    volume: float,
    now_ns: int,
    trace: Trace,
) -> FollowerOpen | FollowerPendingPlace:
    """The open (or pending placement) of a new copy of ``volume`` lots."""
    link = cl.link
    sl, tp = follower_levels(link, event.sl, event.tp)
    # Keyword construction, not a shared dict: this runs once per follower on the hot path.
    if facts.is_pending:
        order_type: OrderType = event.order_type.reversed() if link.reverse else event.order_type
        return FollowerPendingPlace(
            order_id=order_id(event.event_id, cl.link_id),
            link_id=cl.link_id,
            follower=link.follower,
            master=event.master,
            master_event_id=event.event_id,
            symbol=symbol,
            ts_ns=now_ns,
            trace=trace,
            master_order_id=event.order_id,  # type: ignore[union-attr]
            order_type=order_type,
            volume=volume,
            price=event.price,
            sl=sl,
            tp=tp,
            expiration_ns=event.expiration_ns,
            magic=link.magic,
            comment=facts.comment,
            master_volume=event.volume,
        )
    return FollowerOpen(
        order_id=order_id(event.event_id, cl.link_id),
        link_id=cl.link_id,
        follower=link.follower,
        master=event.master,
        master_event_id=event.event_id,
        symbol=symbol,
        ts_ns=now_ns,
        trace=trace,
        master_position_id=event.position_id,  # type: ignore[union-attr]
        side=side,
        volume=volume,
        sl=sl,
        tp=tp,
        magic=link.magic,
        comment=facts.comment,
        master_price=event.price,
        master_volume=event.volume,
        master_order_id=facts.master_order_id,
        max_price_deviation=link.max_price_deviation,
        deviation_policy=link.deviation_policy,
        deviation_wait_ms=link.deviation_wait_ms,
        expires_ns=(
            event.ts_ns + link.max_signal_age_ms * 1_000_000 if link.max_signal_age_ms else 0
        ),  # ts_ns ≤ 2**62 and the age ≤ one day by contract: always fits in int64
    )


def follow_up_order(
    event: MasterEvent, cl: CompiledLink, *, now_ns: int, trace: Trace
) -> FollowerOrder:
    """The follower's change to its copy: close (whole or a ratio), SL/TP, close-by, pending."""
    link = cl.link
    base = {
        "order_id": order_id(event.event_id, cl.link_id),
        "link_id": cl.link_id,
        "follower": link.follower,
        "master": event.master,
        "master_event_id": event.event_id,
        "symbol": cl.follower_symbol(event.symbol),
        "ts_ns": now_ns,
        "trace": trace,
    }
    if isinstance(event, PositionClosed):
        return FollowerClose(
            **base, master_position_id=event.position_id, ratio=1.0, master_price=event.price
        )
    if isinstance(event, PositionReduced):
        return FollowerClose(
            **base,
            master_position_id=event.position_id,
            ratio=close_ratio(event.volume_before, event.volume_after),
            master_price=event.price,
            new_master_position_id=event.new_position_id,
        )
    if isinstance(event, PositionModified):
        sl, tp = follower_levels(link, event.sl, event.tp)
        return FollowerModify(**base, master_position_id=event.position_id, sl=sl, tp=tp)
    if isinstance(event, PositionClosedBy):
        return FollowerCloseBy(
            **base,
            master_position_id=event.position_id,
            master_opposite_position_id=event.opposite_position_id,
        )
    if isinstance(event, PendingOrderModified):
        sl, tp = follower_levels(link, event.sl, event.tp)
        return FollowerPendingModify(
            **base,
            master_order_id=event.order_id,
            price=event.price,
            sl=sl,
            tp=tp,
            expiration_ns=event.expiration_ns,
        )
    if isinstance(event, PendingOrderCancelled):
        return FollowerPendingCancel(**base, master_order_id=event.order_id)
    raise TypeError(f"unhandled master event {type(event).__name__}")  # pragma: no cover
