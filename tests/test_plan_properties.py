"""Properties of the copy planner over whole master events (engine/replicator/rules.py).

Any master event the contract lets through, with any links and any market view, goes through
``plan_event`` without raising, without tripping a rule's internal error, and every order it
returns is on its follower symbol's grid within the symbol's and the link's limits.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.replicator.rules import CompiledLink, MarketView, plan_event
from schemas import codec
from schemas.account import AccountState, SymbolSpec
from schemas.common import OrderType, Side, Trace
from schemas.decisions import DecisionRule
from schemas.links import (
    BalanceRatio,
    BelowMin,
    CopyLink,
    Direction,
    EquityRatio,
    FixedLot,
    FreeMarginRatio,
    Multiplier,
    RiskAmount,
    RiskPercent,
    SymbolMapping,
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
from schemas.orders import FollowerClose, FollowerOpen, FollowerPendingPlace

MASTER = "m1"
SYMBOL = "XAUUSD"
NOW = 1_768_474_800_000_000_000  # 2026-01-15 11:00 UTC
STEPS = (0.001, 0.01, 0.1, 1.0)

# What the contract accepts for a volume or price (≥ 0: inf included, nan not), with the
# values that break arithmetic: 0, the smallest subnormal, huge, inf.
NON_NEGATIVE = st.one_of(
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=True),
    st.sampled_from([0.0, 5e-324, 1e-300, 0.01, 1.0, 2000.0, 1e300, math.inf]),
    st.floats(0.01, 5_000.0),  # (twice: most events should be plausible enough to copy)
    st.floats(0.01, 5_000.0),
)
ANY_LEVEL = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), NON_NEGATIVE)
ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5e-324, 1e300, -1.0, 10_000.0, math.inf, math.nan]),
    st.floats(100.0, 1e6),
    st.floats(100.0, 1e6),
)
TIMESTAMP = st.one_of(
    st.integers(0, 2**62), st.sampled_from([0, NOW, NOW - 10**9, NOW + 86_400 * 10**9, 2**62])
)
IDS = st.text(alphabet="abcdefghij0123456789-:", min_size=1, max_size=12)


@st.composite
def master_events(draw: st.DrawFn) -> MasterEvent:
    common: dict[str, Any] = {
        "event_id": draw(IDS),
        "master": MASTER,
        "symbol": SYMBOL,
        "ts_ns": draw(TIMESTAMP),
        "magic": draw(st.sampled_from([0, 7, -(2**63), 2**63 - 1])),
    }
    side = draw(st.sampled_from(list(Side)))
    order_type = draw(st.sampled_from(list(OrderType)))
    # New copies (open, pending placed, triggered) most often: they carry the sizing.
    kind = draw(st.sampled_from([*range(9), *[0, 5, 8] * 3]))
    price, volume = draw(NON_NEGATIVE), draw(NON_NEGATIVE)
    # Stops anywhere, and stops a hair from the price (a risk per lot that underflows).
    near = st.sampled_from([5e-324, 1e-300, 1e-9, 1.0]).map(lambda d: price - d)
    levels = {"sl": draw(ANY_LEVEL | near), "tp": draw(ANY_LEVEL | near)}
    position, order = draw(IDS), draw(IDS)
    events: list[Any] = [
        lambda: PositionOpened(**common, position_id=position, side=side, volume=volume,
                               price=price, **levels),
        lambda: PositionModified(**common, position_id=position, side=side, **levels),
        lambda: PositionReduced(**common, position_id=position, side=side,
                                volume_before=volume, volume_after=draw(NON_NEGATIVE),
                                price=price, new_position_id=draw(st.none() | IDS)),
        lambda: PositionClosed(**common, position_id=position, side=side, volume=volume,
                               price=price),
        lambda: PositionClosedBy(**common, position_id=position, opposite_position_id=order,
                                 side=side, volume=volume),
        lambda: PendingOrderPlaced(**common, order_id=order, order_type=order_type,
                                   volume=volume, price=price, **levels,
                                   expiration_ns=draw(TIMESTAMP)),
        lambda: PendingOrderModified(**common, order_id=order, order_type=order_type,
                                     price=price, **levels),
        lambda: PendingOrderCancelled(**common, order_id=order, order_type=order_type),
        lambda: PendingOrderTriggered(**common, order_id=order, order_type=order_type,
                                      position_id=position, side=side, volume=volume,
                                      price=price, **levels),
    ]  # fmt: skip
    return events[kind]()


POSITIVE = st.one_of(
    st.floats(min_value=5e-324, allow_nan=False, allow_infinity=True),
    st.sampled_from([5e-324, 1e-9, 0.5, 1.0, 3.0, 1e9, 1e300, math.inf]),
)


@st.composite
def copy_links(draw: st.DrawFn, n: int, *, gated: bool = True) -> CopyLink:
    """A link of any sizing; ``gated`` adds the filters and protections that may hold a copy
    back (without them almost every new copy reaches the sizing)."""
    sizing = draw(
        st.one_of(
            st.builds(FixedLot, lots=POSITIVE),
            st.builds(Multiplier, factor=POSITIVE),
            st.builds(BalanceRatio, factor=POSITIVE),
            st.builds(EquityRatio, factor=POSITIVE),
            st.builds(FreeMarginRatio, factor=POSITIVE),
            st.builds(RiskPercent, percent=st.floats(min_value=5e-324, max_value=100.0)),
            st.builds(RiskAmount, amount=POSITIVE,
                      currency=st.sampled_from([None, "EUR", "USD", "JPY"])),
        )
    )  # fmt: skip
    link = CopyLink(
        link_id=f"l{n}",
        master=MASTER,
        follower=f"f{n}",
        sizing=sizing,
        max_lot=draw(st.none() | POSITIVE),
        below_min=draw(st.sampled_from(list(BelowMin))),
        symbol_mapping=draw(st.sampled_from([SymbolMapping(), SymbolMapping(add_suffix=".m")])),
        reverse=draw(st.booleans()),
        copy_sl_tp=draw(st.booleans()),
    )
    if not gated:
        return link
    return msgspec.structs.replace(
        link,
        direction=draw(st.sampled_from([Direction.BOTH] * 4 + list(Direction))),
        copy_pending=draw(st.sampled_from([True, True, True, False])),
        copy_partial_closes=draw(st.booleans()),
        max_open_positions=draw(st.sampled_from([None] * 5 + [1, 5])),
        max_signal_age_ms=draw(st.none() | st.integers(1, 86_400_000)),
        daily_trade_limit=draw(st.sampled_from([None, None, 1, 3])),
        equity_stop=draw(st.one_of(st.none(), st.none(), st.none(), POSITIVE)),
        max_drawdown_percent=draw(
            st.one_of(st.none(), st.none(), st.none(), st.floats(5e-324, 100.0))
        ),
    )


@st.composite
def symbol_specs(draw: st.DrawFn, account: str, symbol: str) -> SymbolSpec:
    step = draw(st.sampled_from(STEPS))
    decimals = {0.001: 3, 0.01: 2, 0.1: 1, 1.0: 0}[step]
    min_steps = draw(st.integers(1, 100))
    max_steps = draw(st.integers(min_steps, 1_000_000))
    return SymbolSpec(
        account=account,
        symbol=symbol,
        contract_size=draw(st.sampled_from([1.0, 100.0, 100_000.0])),
        tick_size=draw(st.sampled_from([0.00001, 0.01, 0.25, 1.0])),
        tick_value=draw(st.sampled_from([5e-324, 0.01, 1.0, 100.0, 1e300])),
        digits=2,
        volume_min=round(min_steps * step, decimals),
        volume_max=round(max_steps * step, decimals),
        volume_step=step,
    )


@st.composite
def account_states(draw: st.DrawFn, account: str) -> AccountState:
    return AccountState(
        account=account,
        ts_ns=NOW,
        currency=draw(st.sampled_from(["USD", "EUR", "JPY"])),
        balance=draw(ANY_FLOAT),
        equity=draw(ANY_FLOAT),
        free_margin=draw(ANY_FLOAT),
        open_positions=draw(st.integers(0, 10)),
    )


@st.composite
def market(draw: st.DrawFn, *, gated: bool = True) -> tuple[tuple[CompiledLink, ...], MarketView]:
    """Links and the view they are planned in; ``gated=False``: plain links, and every
    account's state and every follower symbol's spec present."""
    count = draw(st.integers(1, 4))
    links = [draw(copy_links(n, gated=gated)) for n in range(count)]
    for link in links:
        # Only what the contract accepts: a link is decoded from KV before the rules see it.
        assume(_valid(link, CopyLink))
    accounts: dict[str, AccountState] = {}
    # Now and then an account without a state or a symbol without a spec (listed first, so
    # a failing example shrinks to it).
    sometimes_missing = (
        st.sampled_from([False, True, True, True, True, True, True, True])
        if gated
        else st.just(True)
    )
    if draw(sometimes_missing):
        accounts[MASTER] = draw(account_states(MASTER))
    symbols: dict[tuple[str, str], SymbolSpec] = {}
    for link in links:
        if draw(sometimes_missing):
            accounts[link.follower] = draw(account_states(link.follower))
        for symbol in (SYMBOL, f"{SYMBOL}.m"):
            if draw(sometimes_missing):
                symbols[(link.follower, symbol)] = draw(symbol_specs(link.follower, symbol))
    fx = draw(st.dictionaries(st.sampled_from(["EURUSD", "USDJPY", "EURJPY"]), ANY_FLOAT))
    view = MarketView(accounts=accounts, symbols=symbols, fx_rates=fx)
    return tuple(CompiledLink(link) for link in links), view


def _valid(value: Any, tp: Any) -> bool:
    try:
        msgspec.convert(msgspec.to_builtins(value), tp)
    except msgspec.ValidationError:
        return False
    return True


def _on_grid(volume: float, step: float) -> bool:
    steps = volume / step
    return abs(steps - round(steps)) < 1e-6 + abs(steps) * 1e-15


#: When the replicator sees the event: mostly a moment after it, sometimes any time at all.
DELAY = st.one_of(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(-(2**62), 2**62))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=master_events(), world=market(), delay=DELAY)
def test_any_valid_event_is_planned_without_error_and_every_order_fits_its_symbol(
    event: MasterEvent, world: tuple[tuple[CompiledLink, ...], MarketView], delay: int
) -> None:
    assume(_valid(event, MasterEvent))
    check_plans(event, *world, min(max(event.ts_ns + delay, 0), 2**62))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=master_events(), world=market(gated=False), delay=st.integers(0, 10**9))
def test_any_new_copy_that_gets_an_order_gets_one_on_its_symbols_grid(
    event: MasterEvent, world: tuple[tuple[CompiledLink, ...], MarketView], delay: int
) -> None:
    # Nothing to hold the copy back but the sizing itself: most examples end in an order.
    assume(isinstance(event, PositionOpened | PendingOrderPlaced | PendingOrderTriggered))
    assume(_valid(event, MasterEvent))
    check_plans(event, *world, min(event.ts_ns + delay, 2**62))


def check_plans(
    event: MasterEvent, links: tuple[CompiledLink, ...], view: MarketView, now_ns: int
) -> None:
    """``plan_event`` does not raise, no rule fails internally, every order fits."""
    trace = Trace(terminal_ns=event.ts_ns, replicator_in_ns=now_ns)

    plans = plan_event(event, links, view, now_ns, trace)

    by_id = {cl.link_id: cl for cl in links}
    for cl, plan in plans:
        assert by_id[cl.link_id] is cl
        for decision in plan.decisions:
            # A rule that raised becomes an internal_error decision: none may be needed.
            assert decision.rule is not DecisionRule.INTERNAL_ERROR, decision.message
            assert decision.master_event_id == event.event_id
        order = plan.order
        if order is None:
            continue
        link = cl.link
        assert order.order_id == f"{event.event_id}:{cl.link_id}"
        assert (order.follower, order.master) == (link.follower, MASTER)
        if isinstance(order, FollowerOpen | FollowerPendingPlace):
            spec = view.symbols[(link.follower, order.symbol)]
            volume = order.volume
            assert math.isfinite(volume), order
            assert _on_grid(volume, spec.volume_step), (volume, spec)
            assert spec.volume_min - 1e-9 <= volume <= spec.volume_max + 1e-9, (volume, spec)
            if link.max_lot is not None and link.max_lot >= spec.volume_min:
                assert volume <= link.max_lot + 1e-9, (volume, link.max_lot)
            assert plan.daily_key is not None
            assert 0 <= order.ts_ns <= 2**62
            if isinstance(order, FollowerOpen):
                assert 0 <= order.expires_ns <= 2**63 - 1  # fits the wire's int64
        elif isinstance(order, FollowerClose):
            assert 0.0 <= order.ratio <= 1.0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=master_events(), world=market(), delay=DELAY)
def test_planning_is_deterministic(
    event: MasterEvent, world: tuple[tuple[CompiledLink, ...], MarketView], delay: int
) -> None:
    # A redelivered event must build the very same orders (same ids, same volumes): JetStream
    # dedup and the connectors' idempotency rest on it.
    assume(_valid(event, MasterEvent))
    now_ns = min(max(event.ts_ns + delay, 0), 2**62)
    links, view = world
    trace = Trace(replicator_in_ns=now_ns)
    first = plan_event(event, links, view, now_ns, trace)
    again = plan_event(event, links, view, now_ns, trace)
    # Compared as the bytes that go on the wire (a nan in a decision's numbers is not == nan).
    assert [(cl.link_id, codec.encode(p.order), codec.encode(p.decisions)) for cl, p in first] == [
        (cl.link_id, codec.encode(p.order), codec.encode(p.decisions)) for cl, p in again
    ]
