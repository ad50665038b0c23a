"""Bridge frames ↔ tradecopy messages: terminal events and snapshots to master events."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from schemas import codec
from schemas.bridge import BridgeOrder, BridgePosition, EventKind, TradeEvent
from schemas.common import Trace
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

#: The contract's longest id (``schemas.common.Id``).
_ID_MAX = 128


def event_id(account: str, session: str, seq: int) -> str:
    """One id per terminal frame: distinct events never collide (two modifies in the same
    millisecond), and a frame re-sent within its session keeps its id (JetStream dedups it).

    A session long enough to push the id past the contract's limit is replaced by a digest
    of itself (``~`` marks it; sessions never hold ``:``), so the id stays valid and stable."""
    plain = f"{account}:{session}:{seq}"
    if len(plain) <= _ID_MAX:
        return plain
    digest = hashlib.blake2b(session.encode(), digest_size=12).hexdigest()
    return f"{account}:~{digest}:{seq}"


def _is_ticket(ticket: str) -> bool:
    """MetaTrader tickets are positive; "0" is what the MT5 EA sent when the close-by order
    was not in history yet, and taking it would publish a close-by no follower can execute."""
    text = ticket.strip()
    if not text:
        return False
    try:
        return int(text) > 0
    except ValueError:
        # Paper and other venues use non-numeric ids: any non-empty one names a position.
        return True


def _level(price: float | None) -> float | None:
    """MetaTrader writes 0 for "no SL/TP"."""
    return price if price else None


def master_event(account: str, session: str, frame: TradeEvent) -> MasterEvent:
    """Normalise one terminal transaction; ``ValueError`` names what is missing or invalid.

    The event is checked against the contract here, where the terminal can be told, rather
    than by the replicator after it was published."""
    event = _master_event(account, session, frame)
    try:
        return codec.master_event_decoder.decode(codec.encode(event))
    except msgspec.ValidationError as exc:
        raise ValueError(f"a {frame.kind.value} event breaks the contract: {exc}") from None


def _master_event(account: str, session: str, frame: TradeEvent) -> MasterEvent:
    frame = msgspec.structs.replace(frame, sl=_level(frame.sl), tp=_level(frame.tp))
    common = {
        "event_id": event_id(account, session, frame.seq),
        "master": account,
        "symbol": frame.symbol,
        "ts_ns": frame.time,
        "magic": frame.magic,
        # The terminal's execution time starts the trace: master fill → follower fill.
        "trace": Trace(terminal_ns=frame.time),
    }
    kind = frame.kind
    if kind in (EventKind.OPENED, EventKind.MODIFIED, EventKind.REDUCED, EventKind.CLOSED,
                EventKind.CLOSED_BY):  # fmt: skip
        if frame.side is None:
            raise ValueError(f"a {kind.value} event needs side")
        side = frame.side
        if kind is EventKind.OPENED:
            return PositionOpened(**common, position_id=frame.ticket, side=side,
                                  volume=frame.volume, price=frame.price, sl=frame.sl,
                                  tp=frame.tp, comment=frame.comment)  # fmt: skip
        if kind is EventKind.MODIFIED:
            return PositionModified(**common, position_id=frame.ticket, side=side,
                                    sl=frame.sl, tp=frame.tp)  # fmt: skip
        if kind is EventKind.REDUCED:
            return PositionReduced(**common, position_id=frame.ticket, side=side,
                                   volume_before=frame.volume_before,
                                   volume_after=frame.volume_after, price=frame.price,
                                   new_position_id=frame.new_ticket or None)  # fmt: skip
        if kind is EventKind.CLOSED:
            return PositionClosed(**common, position_id=frame.ticket, side=side,
                                  volume=frame.volume, price=frame.price,
                                  reason=frame.reason or "client")  # fmt: skip
        if not _is_ticket(frame.opposite_ticket):
            raise ValueError("a closed_by event needs opposite_ticket")
        return PositionClosedBy(**common, position_id=frame.ticket,
                                opposite_position_id=frame.opposite_ticket, side=side,
                                volume=frame.volume)  # fmt: skip
    if frame.order_type is None:
        raise ValueError(f"a {kind.value} event needs order_type")
    if kind is EventKind.PENDING_PLACED:
        return PendingOrderPlaced(**common, order_id=frame.ticket, order_type=frame.order_type,
                                  volume=frame.volume, price=frame.price, sl=frame.sl,
                                  tp=frame.tp, expiration_ns=frame.expiration,
                                  comment=frame.comment)  # fmt: skip
    if kind is EventKind.PENDING_MODIFIED:
        return PendingOrderModified(**common, order_id=frame.ticket,
                                    order_type=frame.order_type, price=frame.price,
                                    sl=frame.sl, tp=frame.tp,
                                    expiration_ns=frame.expiration)  # fmt: skip
    if kind is EventKind.PENDING_CANCELLED:
        return PendingOrderCancelled(**common, order_id=frame.ticket,
                                     order_type=frame.order_type)  # fmt: skip
    return PendingOrderTriggered(**common, order_id=frame.ticket, order_type=frame.order_type,
                                 position_id=frame.position_ticket or frame.ticket,
                                 side=frame.order_type.side, volume=frame.volume,
                                 price=frame.price, sl=frame.sl, tp=frame.tp)  # fmt: skip


def missed_events(
    account: str,
    before_positions: Iterable[BridgePosition],
    before_orders: Iterable[BridgeOrder],
    now_positions: Iterable[BridgePosition],
    now_orders: Iterable[BridgeOrder],
    now_ns: int,
) -> list[MasterEvent]:
    """What must have happened between two snapshots: the events a disconnection lost.

    Prices of closes are unknown here (0.0): followers close at their own market price.
    """
    old_p = {p.ticket: p for p in before_positions}
    new_p = {p.ticket: p for p in now_positions}
    old_o = {o.ticket: o for o in before_orders}
    new_o = {o.ticket: o for o in now_orders}
    events: list[MasterEvent] = []

    def ids(kind: str, ticket: str) -> dict[str, object]:
        return {"event_id": f"{account}:reconciled:{kind}:{ticket}:{now_ns}",
                "master": account, "ts_ns": now_ns}  # fmt: skip

    for ticket, order in new_o.items():
        if ticket not in old_o:
            events.append(PendingOrderPlaced(**ids("pending_placed", ticket), symbol=order.symbol,
                order_id=ticket, order_type=order.order_type, volume=order.volume,
                price=order.price, sl=order.sl, tp=order.tp, expiration_ns=order.expiration,
                magic=order.magic))  # fmt: skip
        elif _pending_terms(order) != _pending_terms(old_o[ticket]):
            events.append(PendingOrderModified(**ids("pending_modified", ticket),
                symbol=order.symbol, order_id=ticket, order_type=order.order_type,
                price=order.price, sl=order.sl, tp=order.tp, expiration_ns=order.expiration,
                magic=order.magic))  # fmt: skip
    for ticket, position in new_p.items():
        old = old_p.get(ticket)
        if old is None:
            if ticket in old_o and ticket not in new_o:
                order = old_o[ticket]
                events.append(PendingOrderTriggered(**ids("pending_triggered", ticket),
                    symbol=position.symbol, order_id=ticket, order_type=order.order_type,
                    position_id=ticket, side=position.side, volume=position.volume,
                    price=position.price, sl=position.sl, tp=position.tp,
                    magic=position.magic))  # fmt: skip
            else:
                events.append(PositionOpened(**ids("opened", ticket), symbol=position.symbol,
                    position_id=ticket, side=position.side, volume=position.volume,
                    price=position.price, sl=position.sl, tp=position.tp,
                    magic=position.magic, comment=position.comment))  # fmt: skip
            continue
        if position.volume < old.volume - 1e-9:
            events.append(PositionReduced(**ids("reduced", ticket), symbol=position.symbol,
                position_id=ticket, side=position.side, volume_before=old.volume,
                volume_after=position.volume, price=0.0, magic=position.magic))  # fmt: skip
        if (position.sl, position.tp) != (old.sl, old.tp):
            events.append(PositionModified(**ids("modified", ticket), symbol=position.symbol,
                position_id=ticket, side=position.side, sl=position.sl, tp=position.tp,
                magic=position.magic))  # fmt: skip
    for ticket, old in old_p.items():
        if ticket not in new_p:
            events.append(PositionClosed(**ids("closed", ticket), symbol=old.symbol,
                position_id=ticket, side=old.side, volume=old.volume, price=0.0,
                magic=old.magic, reason="reconciled"))  # fmt: skip
    for ticket, order in old_o.items():
        if ticket not in new_o and ticket not in new_p:
            events.append(PendingOrderCancelled(**ids("pending_cancelled", ticket),
                symbol=order.symbol, order_id=ticket, order_type=order.order_type,
                magic=order.magic))  # fmt: skip
    return events


def _pending_terms(order: BridgeOrder) -> tuple[float, float | None, float | None, int]:
    """What a modification of a pending order can change."""
    return order.price, order.sl, order.tp, order.expiration
