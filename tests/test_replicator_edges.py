"""Sanity at the edge (engine/replicator/sanity.py): which master events are refused before
any of them is copied, and which look odd but must still reach the followers."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from engine.replicator.sanity import arrival_judged, check_master_event
from schemas.account import SymbolSpec
from schemas.common import OrderType, Side
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
from schemas.rejections import RejectionReason

MASTER = "m1"
T0 = 1_760_000_000_000_000_000
MASTER_SPEC = SymbolSpec(
    account=MASTER, symbol="XAUUSD", contract_size=100.0, tick_size=0.01, tick_value=1.0,
    digits=2, volume_min=0.01, volume_max=50.0, volume_step=0.01,
)  # fmt: skip

_COMMON: dict[str, Any] = {"master": MASTER, "symbol": "XAUUSD", "ts_ns": T0}
VALID: list[MasterEvent] = [
    PositionOpened(event_id="e1", position_id="p1", side=Side.BUY, volume=1.0, price=2000.0,
                   sl=1990.0, tp=2050.0, **_COMMON),
    PositionModified(event_id="e2", position_id="p1", side=Side.BUY, sl=None, tp=0.0, **_COMMON),
    PositionReduced(event_id="e3", position_id="p1", side=Side.BUY, volume_before=1.0,
                    volume_after=0.4, price=2010.0, **_COMMON),
    PositionClosed(event_id="e4", position_id="p1", side=Side.BUY, volume=0.4, price=2020.0,
                   **_COMMON),
    PositionClosedBy(event_id="e5", position_id="p1", opposite_position_id="p2", side=Side.BUY,
                     volume=0.4, **_COMMON),
    PendingOrderPlaced(event_id="e6", order_id="o1", order_type=OrderType.BUY_LIMIT,
                       volume=0.5, price=1980.0, **_COMMON),
    PendingOrderModified(event_id="e7", order_id="o1", order_type=OrderType.BUY_LIMIT,
                         price=1985.0, sl=1970.0, **_COMMON),
    PendingOrderCancelled(event_id="e8", order_id="o1", order_type=OrderType.BUY_LIMIT,
                          **_COMMON),
    PendingOrderTriggered(event_id="e9", order_id="o2", order_type=OrderType.SELL_STOP,
                          position_id="p3", side=Side.SELL, volume=50.0, price=1975.0,
                          **_COMMON),
]  # fmt: skip
BY_TYPE = {type(e): e for e in VALID}


def check(event: MasterEvent, spec: SymbolSpec | None = MASTER_SPEC) -> RejectionReason | None:
    refusal = check_master_event(event, MASTER, spec)
    return None if refusal is None else refusal.reason


@pytest.mark.parametrize("event", VALID, ids=lambda e: type(e).__name__)
def test_every_kind_of_real_event_passes(event: MasterEvent) -> None:
    assert check_master_event(event, MASTER, MASTER_SPEC) is None


def test_an_event_for_another_master_than_its_subject_is_refused() -> None:
    refusal = check_master_event(VALID[0], "m2", MASTER_SPEC)
    assert refusal is not None
    assert refusal.reason is RejectionReason.SUBJECT_MISMATCH
    assert refusal.numbers == {"master": MASTER, "subject_master": "m2"}


_PRICED = [PositionOpened, PositionReduced, PositionClosed, PendingOrderPlaced,
           PendingOrderModified, PendingOrderTriggered]  # fmt: skip


@pytest.mark.parametrize("kind", _PRICED, ids=lambda k: k.__name__)
@pytest.mark.parametrize("price", [math.inf, -math.inf, math.nan, -1.0])
def test_a_price_that_is_no_price_is_refused(kind: type[Any], price: float) -> None:
    assert check(msgspec.structs.replace(BY_TYPE[kind], price=price)) is (
        RejectionReason.INVALID_PRICE
    )


@pytest.mark.parametrize("kind", [PositionOpened, PendingOrderPlaced, PendingOrderModified,
                                  PendingOrderTriggered], ids=lambda k: k.__name__)  # fmt: skip
def test_an_entry_at_price_zero_is_refused(kind: type[Any]) -> None:
    assert check(msgspec.structs.replace(BY_TYPE[kind], price=0.0)) is (
        RejectionReason.INVALID_PRICE
    )


@pytest.mark.parametrize("kind", [PositionClosed, PositionReduced], ids=lambda k: k.__name__)
def test_an_exit_whose_price_is_unknown_still_reaches_the_followers(kind: type[Any]) -> None:
    # The bridge reports a position it found closed on reconnect with price 0: the follower
    # must still close its copy.
    assert check(msgspec.structs.replace(BY_TYPE[kind], price=0.0)) is None


@pytest.mark.parametrize("kind", [PositionOpened, PositionModified, PendingOrderPlaced,
                                  PendingOrderModified, PendingOrderTriggered],
                         ids=lambda k: k.__name__)  # fmt: skip
@pytest.mark.parametrize("level", ["sl", "tp"])
def test_sl_and_tp_may_be_absent_or_zero_but_must_be_prices(kind: type[Any], level: str) -> None:
    event = BY_TYPE[kind]
    for fine in (None, 0.0, 1234.5):
        assert check(msgspec.structs.replace(event, **{level: fine})) is None
    for bad in (math.inf, -math.inf, math.nan, -0.5):
        assert check(msgspec.structs.replace(event, **{level: bad})) is (
            RejectionReason.INVALID_PRICE
        )


@pytest.mark.parametrize("kind", [PositionOpened, PositionClosed, PositionClosedBy,
                                  PendingOrderPlaced, PendingOrderTriggered],
                         ids=lambda k: k.__name__)  # fmt: skip
@pytest.mark.parametrize("volume", [0.0, -0.0, math.inf, math.nan, -1.0])
def test_a_volume_that_is_no_volume_is_refused(kind: type[Any], volume: float) -> None:
    assert check(msgspec.structs.replace(BY_TYPE[kind], volume=volume)) is (
        RejectionReason.INVALID_VOLUME
    )


@pytest.mark.parametrize(
    ("before", "after", "refused"),
    [
        (1.0, 0.4, False),
        (1.0, 0.0, False),  # reduced to nothing: the followers close everything
        (1.0, 1.0, False),
        (0.0, 0.0, True),
        (math.inf, 0.4, True),
        (1.0, math.nan, True),
        (1.0, -0.1, True),
        (1.0, 1.5, True),  # a "partial close" that grew the position
    ],
)
def test_a_partial_close_keeps_its_volumes_coherent(
    before: float, after: float, refused: bool
) -> None:
    event = msgspec.structs.replace(
        BY_TYPE[PositionReduced], volume_before=before, volume_after=after
    )
    assert check(event) is (RejectionReason.INVALID_VOLUME if refused else None)


@pytest.mark.parametrize("kind", [PositionOpened, PendingOrderPlaced, PendingOrderTriggered],
                         ids=lambda k: k.__name__)  # fmt: skip
def test_new_exposure_above_the_masters_own_maximum_is_refused(kind: type[Any]) -> None:
    at_max = msgspec.structs.replace(BY_TYPE[kind], volume=MASTER_SPEC.volume_max)
    assert check(at_max) is None
    refusal = check_master_event(msgspec.structs.replace(at_max, volume=1e300), MASTER, MASTER_SPEC)
    assert refusal is not None
    assert refusal.reason is RejectionReason.VOLUME_ABOVE_SYMBOL_MAX
    assert refusal.numbers == {"volume": 1e300, "volume_max": 50.0, "symbol": "XAUUSD"}
    # Without the master's spec only what no symbol anywhere allows is refused.
    assert check(msgspec.structs.replace(at_max, volume=5_000.0), spec=None) is None
    absurd = check_master_event(msgspec.structs.replace(at_max, volume=1e300), MASTER, None)
    assert absurd is not None
    assert absurd.reason is RejectionReason.VOLUME_ABOVE_SYMBOL_MAX


@pytest.mark.parametrize("kind", [PositionClosed, PositionClosedBy], ids=lambda k: k.__name__)
def test_a_close_above_one_orders_maximum_still_reaches_the_followers(kind: type[Any]) -> None:
    # A netting account's position may have grown past one order's maximum; its close must
    # never be refused for that, or the followers keep their copies.
    assert check(msgspec.structs.replace(BY_TYPE[kind], volume=120.0)) is None


def test_refusals_say_non_finite_numbers_in_words() -> None:
    refusal = check_master_event(
        msgspec.structs.replace(BY_TYPE[PositionOpened], price=math.inf), MASTER, None
    )
    assert refusal is not None
    assert refusal.numbers == {"field": "price", "value": "inf"}
    assert msgspec.json.decode(msgspec.json.encode(refusal.numbers)) == refusal.numbers


@pytest.mark.parametrize(
    ("ahead_s", "judged_by_arrival"),
    [(-3600.0, False), (0.0, False), (4.999, False), (5.0, False), (5.001, True), (86400, True)],
)
def test_only_a_timestamp_beyond_the_clock_skew_is_replaced_by_the_arrival(
    ahead_s: float, judged_by_arrival: bool
) -> None:
    arrival = T0
    assert arrival_judged(arrival + int(ahead_s * 1e9), arrival, 5 * 10**9) is judged_by_arrival
