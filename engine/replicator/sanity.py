"""Sanity at the edge: what a master event must be before anything of it is copied.

The contract lets through what msgpack can say (``inf`` is ≥ 0, a producer's clock may be a
day ahead); these checks stop what no real trade looks like, before one follower order is
sized from it. A refused event is answered with a ``MasterEventRejected`` by the service.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from schemas.account import SymbolSpec
from schemas.master import (
    MasterEvent,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionOpened,
    PositionReduced,
)
from schemas.rejections import RejectionReason

#: Float noise allowed above the master's own symbol maximum.
_MAX_TOLERANCE = 1e-9
#: Lots no broker accepts in one order on any symbol: the bound when the master's own
#: symbol spec is not known (yet), so ``volume=1e300`` never becomes a maximum-size copy.
ABSURD_VOLUME = 1_000_000.0


class Refusal(NamedTuple):
    """Why a master event is not copied at all, with the values the check saw."""

    reason: RejectionReason
    message: str
    numbers: dict[str, float | str | None]


def check_master_event(
    event: MasterEvent, subject_master: str, master_spec: SymbolSpec | None
) -> Refusal | None:
    """None when the event may be planned; otherwise the first check it fails.

    ``subject_master`` is the account its subject names: an event for another master would
    bypass the publisher's subject permissions and land in another master's partition.
    ``master_spec`` is the master's own spec of the event's symbol, when its connector
    published one: no single order of the master can be larger than its maximum.
    """
    if event.master != subject_master:
        return Refusal(
            RejectionReason.SUBJECT_MISMATCH,
            f"event for master {event.master} was published on the subject of {subject_master}",
            {"master": event.master, "subject_master": subject_master},
        )
    price = getattr(event, "price", None)
    if price is not None and not (
        math.isfinite(price)
        # A close or partial close whose price the connector does not know carries 0 (a
        # position found closed on reconciliation): the follower must still close its copy.
        and (price > 0 or (price == 0 and isinstance(event, PositionClosed | PositionReduced)))
    ):
        return _invalid_price("price", price)
    for name in ("sl", "tp"):
        level = getattr(event, name, None)
        # 0 is MetaTrader's "no level"; anything else must be a real price.
        if level is not None and not (math.isfinite(level) and level >= 0):
            return _invalid_price(name, level)
    if isinstance(event, PositionReduced):
        before, after = event.volume_before, event.volume_after
        if not (math.isfinite(before) and before > 0):
            return _invalid_volume("volume_before", before)
        if not (math.isfinite(after) and 0 <= after <= before):
            return Refusal(
                RejectionReason.INVALID_VOLUME,
                f"volume_after {after!r} is not between 0 and volume_before {before!r}",
                {"volume_before": before, "volume_after": after},
            )
        return None
    volume = getattr(event, "volume", None)
    if volume is None:
        return None
    if not (math.isfinite(volume) and volume > 0):
        return _invalid_volume("volume", volume)
    new_exposure = isinstance(event, PositionOpened | PendingOrderPlaced | PendingOrderTriggered)
    if new_exposure and master_spec is None and volume >= ABSURD_VOLUME:
        return Refusal(
            RejectionReason.VOLUME_ABOVE_SYMBOL_MAX,
            f"volume {volume:g} is above what any symbol allows ({ABSURD_VOLUME:g} lots)",
            {"volume": volume, "volume_max": ABSURD_VOLUME, "symbol": event.symbol},
        )
    if (
        master_spec is not None
        and new_exposure
        and volume > master_spec.volume_max * (1 + _MAX_TOLERANCE)
    ):
        # Only new exposure: a netting account's position may grow past one order's maximum,
        # and its close must still reach the followers.
        return Refusal(
            RejectionReason.VOLUME_ABOVE_SYMBOL_MAX,
            f"volume {volume:g} is above the master's {event.symbol} maximum "
            f"{master_spec.volume_max:g}",
            {"volume": volume, "volume_max": master_spec.volume_max, "symbol": event.symbol},
        )
    return None


def arrival_judged(event_ts_ns: int, arrival_ns: int, skew_ns: int) -> bool:
    """Whether an event is dated so far ahead that its arrival time must stand in for it."""
    return event_ts_ns > arrival_ns + skew_ns


def _invalid_price(name: str, value: float) -> Refusal:
    return Refusal(
        RejectionReason.INVALID_PRICE,
        f"{name} {value!r} is not a valid price",
        {"field": name, "value": _number(value)},
    )


def _invalid_volume(name: str, value: float) -> Refusal:
    return Refusal(
        RejectionReason.INVALID_VOLUME,
        f"{name} {value!r} is not a valid volume",
        {"field": name, "value": _number(value)},
    )


def _number(value: float) -> float | str:
    # JSON has no inf or nan: say them in words, so the rejection stays readable everywhere.
    return value if math.isfinite(value) else repr(value)
