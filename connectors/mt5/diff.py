"""The snapshot diff: two polls of a master terminal and the deals between them, as events.

The MetaTrader5 package has no trade-event callback, so a master is watched by polling its
positions, pending orders and new history deals, and the difference between two polls is told
as the same normalised master events every connector publishes (``schemas.master``). Deals
add what a snapshot cannot show: the close price and reason, and close-by.

Event ids are deterministic (``<account>-<ticket>-<kind>[-<revision>]``): a poller restarted
from its last saved snapshot that diffs the same change again produces the same ids, and
JetStream's duplicate window drops the second copy. Repeatable changes (SL/TP, partial
closes, pending modifications) count a revision carried in the snapshot. Events of one poll
come opens first, then modifications, then closes, each group by time.

Limits, on purpose: hedging accounts (a netting position that grows or reverses is not an
event here); a position both opened and closed between two polls is not told, unless it came
from a master pending order (that order must not read as cancelled); a close whose deal is not
in the history yet is told with reason ``client`` at the last seen price.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec
import structlog

from connectors.mt5 import protocol as mt5
from connectors.mt5.parsing import (
    Deal,
    PendingSnapshot,
    PositionSnapshot,
    close_reason,
    parse_deal,
    parse_order,
    parse_position,
)
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

log = structlog.get_logger("tradecopy.mt5")

_OPENS, _MODIFIES, _CLOSES = 0, 1, 2
_VOLUME_EPSILON = 1e-9


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What one poll saw: positions by identifier, pending orders by ticket."""

    positions: dict[str, PositionSnapshot] = {}
    orders: dict[str, PendingSnapshot] = {}


class Diff(NamedTuple):
    events: list[MasterEvent]
    snapshot: Snapshot
    """The new snapshot with revisions carried forward: the ``previous`` of the next poll."""


def take_snapshot(
    positions: Iterable[Any], orders: Iterable[Any], server_utc_offset_s: int = 0
) -> Snapshot:
    """``positions_get()`` and ``orders_get()`` records as a snapshot."""
    parsed_positions = (parse_position(r, server_utc_offset_s) for r in positions)
    parsed_orders = (parse_order(r, server_utc_offset_s) for r in orders)
    return Snapshot(
        positions={p.identifier: p for p in parsed_positions if p is not None},
        orders={o.ticket: o for o in parsed_orders if o is not None},
    )


def hold_deal_changes(previous: Snapshot, current: Snapshot) -> Snapshot:
    """``current`` with every change that needs the deal history to be told right put back
    as it was in ``previous``: positions that closed or shrank, pending orders that left
    (triggered or cancelled). Used for a poll whose ``history_deals_get`` answered nothing,
    so those changes are told, with their deals, by a later poll; all else is told now."""
    positions = dict(current.positions)
    for ref, before in previous.positions.items():
        now = positions.get(ref)
        if now is None or now.volume < before.volume - _VOLUME_EPSILON:
            positions[ref] = before
    orders = dict(current.orders)
    for ref, before in previous.orders.items():
        orders.setdefault(ref, before)
    return Snapshot(positions=positions, orders=orders)


def event_id(account: str, ref: str, kind: str, revision: int | None = None) -> str:
    base = f"{account}-{ref}-{kind}"
    return base if revision is None else f"{base}-{revision}"


def diff_snapshots(
    account: str,
    previous: Snapshot,
    current: Snapshot,
    deals: Iterable[Any] = (),
    *,
    now_ns: int,
    server_utc_offset_s: int = 0,
) -> Diff:
    """The master events that turn ``previous`` into ``current``.

    ``deals`` are the ``history_deals_get`` records that are new since ``previous`` (older
    ones do no harm: deals of positions the snapshots do not involve are ignored).
    """
    return _Differ(account, previous, current, deals, now_ns, server_utc_offset_s).run()


class _Differ:
    def __init__(
        self,
        account: str,
        previous: Snapshot,
        current: Snapshot,
        deals: Iterable[Any],
        now_ns: int,
        server_utc_offset_s: int,
    ) -> None:
        self.account = account
        self.previous = previous
        self.current = current
        self.now_ns = now_ns
        parsed = (parse_deal(r, server_utc_offset_s) for r in deals)
        self.deals = sorted(
            (d for d in parsed if d is not None), key=lambda d: (d.time_ns, d.ticket)
        )
        self.out: list[tuple[int, int, str, MasterEvent]] = []
        self.positions = {
            ident: _carry(position, previous.positions.get(ident))
            for ident, position in current.positions.items()
        }
        self.orders = {
            ticket: _carry(order, previous.orders.get(ticket))
            for ticket, order in current.orders.items()
        }
        self.triggered: set[str] = set()
        self.consumed: dict[str, float] = defaultdict(float)

    def run(self) -> Diff:
        self.pending_orders_gone()
        self.positions_opened()
        self.pending_orders_placed_or_modified()
        self.closed_by()
        self.positions_changed_or_closed()
        self.out.sort(key=lambda item: item[:3])
        snapshot = Snapshot(positions=self.positions, orders=self.orders)
        return Diff([event for *_, event in self.out], snapshot)

    def emit(self, rank: int, event: MasterEvent) -> None:
        self.out.append((rank, event.ts_ns, event.event_id, event))

    def id(self, ref: str, kind: str, revision: int | None = None) -> str:
        return event_id(self.account, ref, kind, revision)

    # ------------------------------------------------------------------ pending orders

    def pending_orders_gone(self) -> None:
        """A pending order that left was triggered (its position is here) or cancelled."""
        previous, current = self.previous, self.current
        for ticket, order in previous.orders.items():
            if ticket in current.orders:
                continue
            # MT5: the position a pending order opens is identified by the order's ticket.
            position = None if ticket in previous.positions else current.positions.get(ticket)
            if position is not None:
                self.triggered.add(ticket)
                self.emit(_OPENS, self.triggered_event(order, position))
                continue
            fills = [d for d in self.deals if d.order == ticket and d.entry == mt5.DEAL_ENTRY_IN]
            if fills and fills[0].position_id not in previous.positions:
                self.triggered_and_gone(order, fills)
                continue
            self.emit(
                _CLOSES,
                PendingOrderCancelled(
                    event_id=self.id(ticket, "cancelled"), master=self.account,
                    symbol=order.symbol, ts_ns=self.now_ns, order_id=ticket,
                    order_type=order.order_type, magic=order.magic,
                ),
            )  # fmt: skip

    def triggered_event(
        self, order: PendingSnapshot, position: PositionSnapshot
    ) -> PendingOrderTriggered:
        return PendingOrderTriggered(
            event_id=self.id(order.ticket, "triggered"), master=self.account,
            symbol=position.symbol, ts_ns=position.time_ns or self.now_ns,
            order_id=order.ticket, order_type=order.order_type,
            position_id=position.identifier, side=position.side, volume=position.volume,
            price=position.price_open, sl=position.sl, tp=position.tp, magic=position.magic,
        )  # fmt: skip

    def triggered_and_gone(self, order: PendingSnapshot, fills: list[Deal]) -> None:
        """The order filled between two polls: tell the trigger from its deals, then the
        close if the position is gone already (followers must not keep a pending copy)."""
        position_id = fills[0].position_id
        self.triggered.add(position_id)
        volume = sum(d.volume for d in fills)
        self.emit(
            _OPENS,
            PendingOrderTriggered(
                event_id=self.id(order.ticket, "triggered"), master=self.account,
                symbol=order.symbol, ts_ns=fills[0].time_ns or self.now_ns,
                order_id=order.ticket, order_type=order.order_type, position_id=position_id,
                side=order.order_type.side, volume=volume, price=_average_price(fills),
                sl=order.sl, tp=order.tp, magic=order.magic,
            ),
        )  # fmt: skip
        if position_id in self.current.positions:
            return
        exits = [
            d for d in self.deals if d.position_id == position_id and d.entry != mt5.DEAL_ENTRY_IN
        ]
        if exits:
            self.emit(_CLOSES, self.closed_event(
                position_id, order.symbol, order.order_type.side, order.magic, volume, exits,
                fallback_price=_average_price(fills),
            ))  # fmt: skip

    def pending_orders_placed_or_modified(self) -> None:
        previous = self.previous.orders
        for ticket, order in self.current.orders.items():
            before = previous.get(ticket)
            if before is None:
                self.emit(
                    _OPENS,
                    PendingOrderPlaced(
                        event_id=self.id(ticket, "placed"), master=self.account,
                        symbol=order.symbol, ts_ns=order.time_ns or self.now_ns,
                        order_id=ticket, order_type=order.order_type, volume=order.volume,
                        price=order.price, sl=order.sl, tp=order.tp,
                        expiration_ns=order.expiration_ns, magic=order.magic,
                        comment=order.comment,
                    ),
                )  # fmt: skip
                continue
            if _pending_levels(order) == _pending_levels(before):
                continue
            revision = before.revision + 1
            self.orders[ticket] = msgspec.structs.replace(order, revision=revision)
            self.emit(
                _MODIFIES,
                PendingOrderModified(
                    event_id=self.id(ticket, "pending_modified", revision), master=self.account,
                    symbol=order.symbol, ts_ns=self.now_ns, order_id=ticket,
                    order_type=order.order_type, price=order.price, sl=order.sl, tp=order.tp,
                    expiration_ns=order.expiration_ns, magic=order.magic,
                ),
            )  # fmt: skip

    # ------------------------------------------------------------------------ positions

    def positions_opened(self) -> None:
        for ident, position in self.current.positions.items():
            if ident in self.previous.positions or ident in self.triggered:
                continue
            self.emit(
                _OPENS,
                PositionOpened(
                    event_id=self.id(ident, "opened"), master=self.account,
                    symbol=position.symbol, ts_ns=position.time_ns or self.now_ns,
                    position_id=ident, side=position.side, volume=position.volume,
                    price=position.price_open, sl=position.sl, tp=position.tp,
                    magic=position.magic, comment=position.comment,
                ),
            )  # fmt: skip

    def closed_by(self) -> None:
        """Close-by leaves two OUT_BY deals of one close-by order, one per position."""
        legs_by_order: dict[str, list[Deal]] = defaultdict(list)
        for deal in self.deals:
            if deal.entry == mt5.DEAL_ENTRY_OUT_BY:
                legs_by_order[deal.order].append(deal)
        previous = self.previous.positions
        for order, legs in legs_by_order.items():
            volumes: dict[str, float] = {}
            for leg in sorted(legs, key=lambda d: d.ticket):
                volumes[leg.position_id] = volumes.get(leg.position_id, 0.0) + leg.volume
            if len(volumes) != 2 or not all(p in previous for p in volumes):
                continue
            first, second = volumes
            volume = min(volumes.values())
            self.consumed[first] += volume
            self.consumed[second] += volume
            position = previous[first]
            self.emit(
                _CLOSES,
                PositionClosedBy(
                    event_id=self.id(order, "closed_by"), master=self.account,
                    symbol=position.symbol, ts_ns=legs[0].time_ns or self.now_ns,
                    position_id=first, opposite_position_id=second, side=position.side,
                    volume=volume, magic=position.magic,
                ),
            )  # fmt: skip

    def positions_changed_or_closed(self) -> None:
        for ident, before in self.previous.positions.items():
            held = before.volume - self.consumed.get(ident, 0.0)
            now = self.current.positions.get(ident)
            exits = [
                d
                for d in self.deals
                if d.position_id == ident and d.entry in (mt5.DEAL_ENTRY_OUT, mt5.DEAL_ENTRY_INOUT)
            ]
            if now is None:
                if held > _VOLUME_EPSILON:
                    self.emit(_CLOSES, self.closed_event(
                        ident, before.symbol, before.side, before.magic, held, exits,
                        fallback_price=before.price_current,
                    ))  # fmt: skip
                continue
            if now.side is not before.side:
                log.warning("mt5_position_reversed", account=self.account, position=ident)
                continue
            revision = before.revision
            if (now.sl, now.tp) != (before.sl, before.tp):
                revision += 1
                changed_at = now.update_ns if now.update_ns > before.update_ns else self.now_ns
                self.emit(
                    _MODIFIES,
                    PositionModified(
                        event_id=self.id(ident, "modified", revision), master=self.account,
                        symbol=now.symbol, ts_ns=changed_at, position_id=ident,
                        side=now.side, sl=now.sl, tp=now.tp, magic=now.magic,
                    ),
                )  # fmt: skip
            if now.volume < held - _VOLUME_EPSILON:
                revision += 1
                self.emit(
                    _CLOSES,
                    PositionReduced(
                        event_id=self.id(ident, "reduced", revision), master=self.account,
                        symbol=now.symbol, ts_ns=exits[-1].time_ns if exits else self.now_ns,
                        position_id=ident, side=now.side, volume_before=held,
                        volume_after=now.volume,
                        price=_average_price(exits) if exits else now.price_current,
                        magic=now.magic,
                    ),
                )  # fmt: skip
            elif now.volume > held + _VOLUME_EPSILON:
                log.warning("mt5_position_increased", account=self.account, position=ident)
            self.positions[ident] = msgspec.structs.replace(now, revision=revision)

    def closed_event(
        self,
        ident: str,
        symbol: str,
        side: Any,
        magic: int,
        volume: float,
        exits: list[Deal],
        *,
        fallback_price: float,
    ) -> PositionClosed:
        return PositionClosed(
            event_id=self.id(ident, "closed"), master=self.account, symbol=symbol,
            ts_ns=(exits[-1].time_ns if exits else 0) or self.now_ns, position_id=ident,
            side=side, volume=volume,
            price=_average_price(exits) if exits else fallback_price, magic=magic,
            reason=close_reason(exits[-1].reason) if exits else "client",
        )  # fmt: skip


def _carry(record: Any, before: Any) -> Any:
    """The new record keeps the revision count of the one it replaces."""
    if before is None or before.revision == record.revision:
        return record
    return msgspec.structs.replace(record, revision=before.revision)


def _pending_levels(order: PendingSnapshot) -> tuple[float, float | None, float | None, int]:
    return order.price, order.sl, order.tp, order.expiration_ns


def _average_price(deals: list[Deal]) -> float:
    volume = sum(d.volume for d in deals)
    if volume <= 0:
        return deals[-1].price
    return round(sum(d.price * d.volume for d in deals) / volume, 10)
