"""The fan-out planner (engine/replicator/fanout.py) plans exactly what the reference plans.

``rules.plan_event`` is the reference: every link through every gate, one at a time. The fast
pass must give the very same orders and decisions, in the same order, for any links, events
and views — compared as the bytes that go on the wire.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_plan_properties import (
    DELAY,
    MASTER,
    NOW,
    SYMBOL,
    _valid,
    account_states,
    copy_links,
    master_events,
    symbol_specs,
)

from engine.replicator import fanout
from engine.replicator.facts import CompiledLink, MarketView
from engine.replicator.fanout import (
    FanOutCache,
    SymbolFanOut,
    fan_out_publications,
    plan_fan_out,
)
from engine.replicator.rules import plan_event
from engine.replicator.splice import AVAILABLE, Batches, array_header, str_header
from engine.replicator.state import LinkState
from schemas import codec
from schemas.account import AccountState, SymbolSpec, TradeMode
from schemas.common import OrderType, Side, Trace
from schemas.control import EmergencyStop, StopScope, stop_key
from schemas.links import (
    BalanceRatio,
    CopyLink,
    EquityRatio,
    FixedLot,
    FreeMarginRatio,
    Multiplier,
    RiskPercent,
    SymbolMapping,
)
from schemas.master import (
    MasterEvent,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import FollowerClose, FollowerOpen


@st.composite
def plausible_links(draw: st.DrawFn, n: int) -> CopyLink:
    """A link as they mostly are: sizes that land inside the symbol's limits."""
    sizing = draw(st.one_of(
        st.builds(FixedLot, lots=st.floats(0.01, 3.0)),
        st.builds(Multiplier, factor=st.floats(0.1, 5.0)),
        st.builds(BalanceRatio, factor=st.floats(0.1, 3.0)),
        st.builds(EquityRatio, factor=st.floats(0.1, 3.0)),
        st.builds(FreeMarginRatio, factor=st.floats(0.1, 3.0)),
        st.builds(RiskPercent, percent=st.floats(0.1, 5.0)),
    ))  # fmt: skip
    return CopyLink(
        link_id=f"l{n}", master=MASTER, follower=f"f{n}", sizing=sizing,
        max_lot=draw(st.sampled_from([None, None, None, 100.0, 0.5])),
        symbol_mapping=draw(st.sampled_from([SymbolMapping(), SymbolMapping(add_suffix=".m")])),
        reverse=draw(st.booleans()), copy_sl_tp=draw(st.booleans()),
        copy_pending=draw(st.sampled_from([True, True, False])),
        max_open_positions=draw(st.sampled_from([None, None, None, 1, 5])),
        max_signal_age_ms=draw(st.sampled_from([None, None, 1, 600_000])),
        magic=draw(st.sampled_from([0, 7])),
    )  # fmt: skip


@st.composite
def plausible_events(draw: st.DrawFn) -> MasterEvent:
    """A new copy or a follow-up with ordinary numbers (most orders come from these)."""
    common: dict[str, Any] = {
        "event_id": draw(st.sampled_from(["e1", "e-2:x"])), "master": MASTER, "symbol": SYMBOL,
        "ts_ns": NOW - draw(st.integers(0, 120_000_000_000)),
    }  # fmt: skip
    side = draw(st.sampled_from(list(Side)))
    price = draw(st.floats(1.0, 3000.0))
    levels = {
        "sl": draw(st.none() | st.just(price * 0.99)),
        "tp": draw(st.none() | st.just(price * 1.01)),
    }
    volume = draw(st.floats(0.01, 10.0))
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return PositionOpened(**common, position_id="p1", side=side, volume=volume, price=price,
                              **levels)  # fmt: skip
    if kind == 1:
        order_type = draw(st.sampled_from(list(OrderType)))
        return PendingOrderPlaced(**common, order_id="o1", order_type=order_type, volume=volume,
                                  price=price, **levels)  # fmt: skip
    if kind == 2:
        return PendingOrderTriggered(**common, order_id="o1", order_type=OrderType.BUY_LIMIT,
                                     position_id="p1", side=side, volume=volume, price=price,
                                     **levels)  # fmt: skip
    if kind == 3:
        return PositionModified(**common, position_id="p1", side=side, **levels)
    return PositionReduced(**common, position_id="p1", side=side, volume_before=volume,
                           volume_after=volume / 2, price=price)  # fmt: skip


@st.composite
def crowded_market(draw: st.DrawFn, plausible: bool) -> tuple[tuple[CompiledLink, ...], MarketView]:
    """Several link configurations, each shared by a few followers (so orders of one shape are
    copied from one another), with gaps in the view, stops, link states and trade modes —
    or a plausible world where most links get their order."""
    links: list[CopyLink] = []
    for n in range(draw(st.integers(1, 4))):
        if plausible:
            base = draw(plausible_links(n))
        else:
            base = draw(copy_links(n, gated=draw(st.booleans())))
        assume(_valid(base, CopyLink))
        for k in range(draw(st.integers(1, 4))):
            links.append(msgspec.structs.replace(base, link_id=f"l{n}-{k}", follower=f"f{n}-{k}"))
    accounts: dict[str, AccountState] = {}
    symbols: dict[tuple[str, str], SymbolSpec] = {}
    present = st.just(True) if plausible else st.sampled_from([False, True, True, True, True])
    states = plausible_accounts if plausible else account_states
    if draw(present):
        accounts[MASTER] = draw(states(MASTER))
    for link in links:
        if draw(present):
            accounts[link.follower] = draw(states(link.follower))
        for symbol in (SYMBOL, f"{SYMBOL}.m"):
            if draw(present):
                spec = draw(symbol_specs(link.follower, symbol))
                if plausible:
                    spec = msgspec.structs.replace(
                        spec, volume_min=spec.volume_step, volume_max=1000.0, tick_size=0.01,
                        tick_value=1.0,
                    )  # fmt: skip
                modes = [TradeMode.FULL] * (30 if plausible else 6) + list(TradeMode)
                mode = draw(st.sampled_from(modes))
                symbols[(link.follower, symbol)] = msgspec.structs.replace(spec, trade_mode=mode)
    if plausible:
        fx = {"EURUSD": draw(st.sampled_from([1.08, 1.1]))}
    else:
        rates = st.sampled_from([0.0, 0.5, 1.08, 150.0, float("inf")])
        fx = draw(st.dictionaries(st.sampled_from(["EURUSD", "USDJPY", "EURJPY"]), rates))
    stops: dict[str, EmergencyStop] = {}
    if draw(st.sampled_from([False] * (20 if plausible else 5) + [True])):
        target = draw(st.sampled_from([link.follower for link in links]))
        stops[stop_key(StopScope.ACCOUNT, target)] = EmergencyStop(
            scope=StopScope.ACCOUNT, target=target, active=draw(st.booleans()), ts_ns=NOW
        )
    link_states = {
        link.link_id: LinkState(paused=True, paused_rule="equity_stop")
        for link in links
        if draw(st.sampled_from([False] * (20 if plausible else 7) + [True]))
    }
    view = MarketView(
        accounts=accounts, symbols=symbols, fx_rates=fx, stops=stops, link_states=link_states
    )
    return tuple(CompiledLink(link) for link in links), view


@st.composite
def plausible_accounts(draw: st.DrawFn, account: str) -> AccountState:
    money = st.floats(5_000.0, 20_000.0)
    return AccountState(
        account=account, ts_ns=NOW, currency=draw(st.sampled_from(["USD", "USD", "EUR"])),
        balance=draw(money), equity=draw(money), free_margin=draw(money),
        open_positions=draw(st.integers(0, 6)),
    )  # fmt: skip


def wire(plans: list[tuple[CompiledLink, Any]]) -> list[tuple[str, bytes, bytes, Any]]:
    # As the bytes that go on the wire: a nan in a decision's numbers is not == nan.
    return [
        (cl.link_id, codec.encode(p.order), codec.encode(list(p.decisions)), p.daily_key)
        for cl, p in plans
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible=st.booleans(), data=st.data(), delay=DELAY)
def test_the_fan_out_planner_gives_exactly_the_reference_plans(
    plausible: bool, data: st.DataObject, delay: int
) -> None:
    event = data.draw(plausible_events() if plausible else master_events(), "event")
    assume(_valid(event, MasterEvent))
    links, view = data.draw(crowded_market(plausible), "world")
    if plausible:
        delay = min(delay, 10**9)
    now_ns = min(max(event.ts_ns + delay, 0), 2**62)
    trace = Trace(terminal_ns=event.ts_ns, replicator_in_ns=now_ns)

    reference = plan_event(event, links, view, now_ns, trace)
    fast = plan_fan_out(event, SymbolFanOut(links, event.symbol), view, now_ns, trace)

    assert wire(fast) == wire(reference)
    assert [cl for cl, _ in fast] == [cl for cl, _ in reference]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible=st.booleans(), data=st.data(), delay=DELAY)
def test_a_spliced_fan_out_is_byte_for_byte_the_reference_fan_out(
    plausible: bool, data: st.DataObject, delay: int
) -> None:
    """Batched by connector, the fast pass splices its orders into their batches: the
    messages are exactly those of the reference's plans encoded by msgspec."""
    event = data.draw(plausible_events() if plausible else master_events(), "event")
    assume(_valid(event, MasterEvent))
    links, view = data.draw(crowded_market(plausible), "world")
    connectors = st.sampled_from(["", "conn-a", "conn-b", "conn-c", "conn-c"])
    for account, state in list(view.accounts.items()):
        connector = data.draw(connectors, f"connector of {account}")
        view.accounts[account] = msgspec.structs.replace(state, connector=connector)
    if plausible:
        delay = min(delay, 10**9)
    now_ns = min(max(event.ts_ns + delay, 0), 2**62)
    trace = Trace(terminal_ns=event.ts_ns, replicator_in_ns=now_ns)

    reference = plan_event(event, links, view, now_ns, trace)
    expected_counts: dict[str, int] = {}
    expected = fan_out_publications(
        event, reference, view.accounts, "#s1of2", now_ns, expected_counts
    )
    batches = Batches()
    # Every shape spliced, however few links share it (a fan-out does so from 32).
    fan_out = SymbolFanOut(links, event.symbol, splice_min_links=data.draw(st.sampled_from([1, 3])))
    fast = plan_fan_out(event, fan_out, view, now_ns, trace, batches)
    counts: dict[str, int] = {}
    got = fan_out_publications(event, fast, view.accounts, "#s1of2", now_ns, counts, batches)

    assert got == expected
    assert counts == expected_counts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible=st.booleans(), data=st.data())
def test_a_fan_out_planned_again_reads_the_view_of_its_own_event(
    plausible: bool, data: st.DataObject
) -> None:
    """A compiled fan-out keeps what it last read from each follower's spec and account state
    while they are the same objects: planned on one view, then on another (new specs, new
    states, other connectors), it gives exactly the reference's fan-out of the second."""
    event = data.draw(plausible_events() if plausible else master_events(), "event")
    assume(_valid(event, MasterEvent))
    links, first = data.draw(crowded_market(plausible), "world")
    second = MarketView(
        accounts=dict(first.accounts), symbols=dict(first.symbols), fx_rates=first.fx_rates,
        stops=first.stops, link_states=first.link_states,
    )  # fmt: skip
    connectors = st.sampled_from(["", "conn-a", "conn-b"])
    for view, name in ((first, "first"), (second, "second")):
        for account, state in list(view.accounts.items()):
            view.accounts[account] = msgspec.structs.replace(
                state, connector=data.draw(connectors, f"{name} connector of {account}"),
                open_positions=data.draw(st.integers(0, 6), f"{name} positions of {account}"),
            )  # fmt: skip
    for key, spec in list(second.symbols.items()):
        if data.draw(st.booleans(), f"new spec for {key}"):
            step = data.draw(st.sampled_from([0.01, 0.1, 1.0]), f"step of {key}")
            second.symbols[key] = msgspec.structs.replace(
                spec, volume_step=step, volume_min=step,
                volume_max=data.draw(st.sampled_from([0.5, 5.0, 1000.0]), f"max of {key}"),
                trade_mode=data.draw(st.sampled_from([TradeMode.FULL, TradeMode.DISABLED])),
            )  # fmt: skip
    now_ns = event.ts_ns + 1_000_000
    trace = Trace(terminal_ns=event.ts_ns, replicator_in_ns=now_ns)
    fan_out = SymbolFanOut(links, event.symbol, splice_min_links=1)
    plan_fan_out(event, fan_out, first, now_ns, trace, Batches())  # what it reads is kept

    reference = plan_event(event, links, second, now_ns, trace)
    expected = fan_out_publications(event, reference, second.accounts, "", now_ns, {})
    batches = Batches()
    fast = plan_fan_out(event, fan_out, second, now_ns, trace, batches)
    assert fan_out_publications(event, fast, second.accounts, "", now_ns, {}, batches) == expected
    unbatched = plan_fan_out(event, fan_out, second, now_ns, trace)
    assert wire(unbatched) == wire(reference)


def test_a_held_order_withdrawn_after_planning_leaves_its_batch() -> None:
    """A daily trade limit may take an order back between planning and publishing: the
    order leaves its connector's batch, the spliced orders around it stay, in link order."""
    links, view = _plain_world(4)
    limited = msgspec.structs.replace(links[1].link, daily_trade_limit=1)
    links = (links[0], CompiledLink(limited), *links[2:])
    for cl in links:
        state = view.accounts[cl.link.follower]
        view.accounts[cl.link.follower] = msgspec.structs.replace(state, connector="conn")
    opened = PositionOpened(
        event_id="e1", master=MASTER, symbol=SYMBOL, ts_ns=NOW, position_id="p1",
        side=Side.BUY, volume=0.1, price=2000.0,
    )  # fmt: skip
    batches = Batches()
    fan_out = SymbolFanOut(links, SYMBOL, splice_min_links=1)
    plans = plan_fan_out(opened, fan_out, view, NOW, Trace(), batches)
    assert [cl.link_id for cl, _ in plans] == ["l1"]  # the others are spliced
    counted: dict[str, int] = {}
    [(_, payload, batch_id)] = fan_out_publications(
        opened, plans, view.accounts, "", NOW, counted, batches
    )
    batch = codec.follower_order_batch_decoder.decode(payload)
    assert batch_id == "e1@conn" and counted == {"open": 4}
    assert [o.link_id for o in batch.orders] == ["l0", "l1", "l2", "l3"]
    plans[0][1].order = None  # withdrawn, as ``_count_daily_trade`` does
    [(_, payload, _)] = fan_out_publications(opened, plans, view.accounts, "", NOW, {}, batches)
    batch = codec.follower_order_batch_decoder.decode(payload)
    assert [o.link_id for o in batch.orders] == ["l0", "l2", "l3"]
    assert [o.volume for o in batch.orders] == [0.1, 0.3, 0.1]


def test_a_shape_few_links_share_is_not_spliced() -> None:
    """Cutting a template costs more than splicing a few orders saves: below the threshold a
    batched fan-out keeps its orders as objects, in their batches' holes."""
    links, view = _plain_world(40)  # one order shape: the links differ in sizing only
    for cl in links:
        state = view.accounts[cl.link.follower]
        view.accounts[cl.link.follower] = msgspec.structs.replace(state, connector="conn")
    opened = PositionOpened(
        event_id="e1", master=MASTER, symbol=SYMBOL, ts_ns=NOW, position_id="p1",
        side=Side.BUY, volume=0.1, price=2000.0,
    )  # fmt: skip
    small = SymbolFanOut(links[:8], SYMBOL)
    assert not small.splices
    large = SymbolFanOut(links, SYMBOL)
    assert large.splices
    for fan_out, objects in ((small, 8), (large, 0)):
        batches = Batches()
        plans = plan_fan_out(opened, fan_out, view, NOW, Trace(), batches)
        assert len(plans) == objects
        messages = fan_out_publications(opened, plans, view.accounts, "", NOW, {}, batches)
        reference = plan_event(opened, fan_out.links, view, NOW, Trace())
        assert messages == fan_out_publications(opened, reference, view.accounts, "", NOW)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536])
def test_headers_are_msgspecs(n: int) -> None:
    assert codec.encode("x" * n).startswith(str_header(n))
    assert len(codec.encode("x" * n)) == len(str_header(n)) + n
    assert codec.encode([None] * n) == array_header(n) + b"\xc0" * n


def test_the_batch_envelope_can_be_spliced() -> None:
    assert AVAILABLE


def _plain_world(n: int) -> tuple[tuple[CompiledLink, ...], MarketView]:
    view = MarketView()
    links = []
    for i in range(n):
        follower = f"f{i}"
        links.append(CompiledLink(CopyLink(
            link_id=f"l{i}", master=MASTER, follower=follower,
            sizing=Multiplier(factor=1.0 + i % 3), max_lot=5.0,
        )))  # fmt: skip
        view.accounts[follower] = AccountState(
            account=follower, ts_ns=NOW, currency="USD", balance=1e4, equity=1e4
        )
        view.symbols[(follower, SYMBOL)] = SymbolSpec(
            account=follower, symbol=SYMBOL, contract_size=100, tick_size=0.01, tick_value=1,
            digits=2, volume_min=0.01, volume_max=100, volume_step=0.01,
        )  # fmt: skip
    return tuple(links), view


def test_plain_links_are_planned_without_the_per_link_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    links, view = _plain_world(6)
    opened = PositionOpened(
        event_id="e1", master=MASTER, symbol=SYMBOL, ts_ns=NOW, position_id="p1",
        side=Side.BUY, volume=0.07, price=2000.0, sl=1990.0,
    )  # fmt: skip
    closed = PositionClosed(
        event_id="e2", master=MASTER, symbol=SYMBOL, ts_ns=NOW, position_id="p1",
        side=Side.BUY, volume=0.07, price=2010.0,
    )  # fmt: skip
    expected_open = wire(plan_event(opened, links, view, NOW, Trace()))
    expected_close = wire(plan_event(closed, links, view, NOW, Trace()))

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reference was asked about a plain link")

    monkeypatch.setattr(fanout, "plan_event", refused)
    fan_out = SymbolFanOut(links, SYMBOL)
    plans = plan_fan_out(opened, fan_out, view, NOW, Trace())
    assert [type(p.order) for _, p in plans] == [FollowerOpen] * 6
    assert [p.order.volume for _, p in plans] == [0.07, 0.14, 0.21, 0.07, 0.14, 0.21]
    assert wire(plans) == expected_open
    closes = plan_fan_out(closed, fan_out, view, NOW, Trace())
    assert [type(p.order) for _, p in closes] == [FollowerClose] * 6
    assert wire(closes) == expected_close


def test_a_link_a_rule_speaks_on_is_planned_by_the_reference() -> None:
    links, view = _plain_world(3)
    # f1's volume is capped at the link's max lot: the reference tells it so.
    opened = PositionOpened(
        event_id="e1", master=MASTER, symbol=SYMBOL, ts_ns=NOW, position_id="p1",
        side=Side.BUY, volume=2.6, price=2000.0,
    )  # fmt: skip
    plans = plan_fan_out(opened, SymbolFanOut(links, SYMBOL), view, NOW, Trace())
    assert [(cl.link_id, p.order.volume, [d.rule.value for d in p.decisions])
            for cl, p in plans] == [
        ("l0", 2.6, []), ("l1", 5.0, ["max_lot"]), ("l2", 5.0, ["max_lot"]),
    ]  # fmt: skip


def test_the_compiled_fan_outs_follow_the_links() -> None:
    links, _ = _plain_world(2)
    by_master = {MASTER: links}
    cache = FanOutCache(lambda: by_master)
    first = cache.get(MASTER, SYMBOL)
    assert first is not None and cache.get(MASTER, SYMBOL) is first
    assert cache.get("nobody", SYMBOL) is None
    by_master[MASTER] = links[:1]
    assert cache.get(MASTER, SYMBOL) is first  # compiled until the links change
    cache.clear()
    again = cache.get(MASTER, SYMBOL)
    assert again is not None and [p.link_id for p in again.programs] == ["l0"]


def test_a_fan_outs_messages_batch_by_connector_and_count_each_kind_once() -> None:
    links, view = _plain_world(5)
    for i, cl in enumerate(links):
        state = view.accounts[cl.link.follower]
        connector = "" if i == 4 else f"conn-{i % 2}"
        view.accounts[cl.link.follower] = msgspec.structs.replace(state, connector=connector)
    opened = PositionOpened(
        event_id="e1", master=MASTER, symbol=SYMBOL, ts_ns=NOW, position_id="p1",
        side=Side.BUY, volume=2.6, price=2000.0,
    )  # fmt: skip
    plans = plan_fan_out(opened, SymbolFanOut(links, SYMBOL), view, NOW, Trace())
    counted = {"open": 3}
    messages = fan_out_publications(opened, plans, view.accounts, "#s1of2", NOW, counted)
    ids = [msg_id for _, _, msg_id in messages]
    # l1, l2 and l4 were capped (a decision each); l4 has no connector: a single order.
    assert ids == [
        "e1:l1:max_lot", "e1:l2:max_lot", "e1:l4", "e1:l4:max_lot", "e1@conn-0#s1of2",
        "e1@conn-1#s1of2",
    ]  # fmt: skip
    batches = [codec.follower_order_batch_decoder.decode(p) for _, p, i in messages if "@" in i]
    assert [[o.link_id for o in b.orders] for b in batches] == [["l0", "l2"], ["l1", "l3"]]
    assert counted == {"open": 8}
    unbatched = fan_out_publications(opened, plans, None, "", NOW)
    assert [i for _, _, i in unbatched] == [
        "e1:l0", "e1:l1", "e1:l1:max_lot", "e1:l2", "e1:l2:max_lot", "e1:l3", "e1:l4",
        "e1:l4:max_lot",
    ]  # fmt: skip
