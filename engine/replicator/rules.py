"""The copy rules: one master event × one link → a follower order and/or copy decisions.

A plan is three steps, each in its own module: the gates (``gates.py``) say whether the event
may be copied on the link, sizing (``sizing.py``) says how many lots, and the builders
(``orders.py``) make the order. Pure functions over a ``MarketView`` (``facts.py``); the
service does all I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from engine.replicator.facts import CompiledLink, EventFacts, MarketView
from engine.replicator.gates import admit_follow_up, admit_new_copy, daily_limit_skip
from engine.replicator.notes import RuleNote
from engine.replicator.orders import follow_up_order, new_copy_order
from engine.replicator.sizing import size_follower_volume
from schemas.common import Trace
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.master import MasterEvent, PendingOrderPlaced, PendingOrderTriggered, PositionOpened
from schemas.orders import FollowerOrder


class CopyPlan(msgspec.Struct, gc=False):
    """What one link makes of one event (a Struct: built in C, thousands per fan-out)."""

    order: FollowerOrder | None = None
    decisions: Sequence[CopyDecision] = []
    """A list; the fan-out planner's plain orders share one empty tuple."""
    daily_key: str | None = None
    """Set when the order is a new copy that counts toward the link's daily trade limit."""


def copy_decision(
    event: MasterEvent,
    cl: CompiledLink,
    now_ns: int,
    note: RuleNote,
    outcome: DecisionOutcome = DecisionOutcome.SKIPPED,
) -> CopyDecision:
    """The decision the follower is told about: which rule, what it said, the numbers."""
    return CopyDecision(
        decision_id=f"{event.event_id}:{cl.link_id}:{note.rule.value}",
        link_id=cl.link_id,
        master=event.master,
        follower=cl.link.follower,
        outcome=outcome,
        rule=note.rule,
        message=note.message,
        ts_ns=now_ns,
        master_event_id=event.event_id,
        numbers=note.numbers or {},
    )


def skipped(event: MasterEvent, cl: CompiledLink, now_ns: int, note: RuleNote) -> CopyPlan:
    return CopyPlan(decisions=[copy_decision(event, cl, now_ns, note)])


def daily_limit_reached(
    event: MasterEvent, cl: CompiledLink, now_ns: int, trades_today: int, today: str
) -> CopyPlan:
    """The daily trade limit's skip, when the service's compare-and-set finds it reached."""
    limit = cl.link.daily_trade_limit
    assert limit is not None
    return skipped(event, cl, now_ns, daily_limit_skip(limit, trades_today, today))


_NOTHING = CopyPlan()


def plan_copy(
    event: MasterEvent, cl: CompiledLink, view: MarketView, now_ns: int, trace: Trace
) -> CopyPlan:
    """Apply every copy rule of ``cl`` to ``event``."""
    return plan_link(event, EventFacts(event, now_ns), cl, view, now_ns, trace)


def plan_link(
    event: MasterEvent,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan:
    if facts.is_new_copy:
        return _plan_new_copy(event, facts, cl, view, now_ns, trace)  # type: ignore[arg-type]
    return _plan_follow_up(event, facts, cl, view, now_ns, trace)


def plan_event(
    event: MasterEvent,
    links: tuple[CompiledLink, ...],
    view: MarketView,
    now_ns: int,
    trace: Trace,
    facts: EventFacts | None = None,
) -> list[tuple[CompiledLink, CopyPlan]]:
    """Every link's plan for one event, leaving out links with nothing to publish.

    The reference planner: each link through every gate, one after another. The service
    plans with ``fanout.plan_fan_out``, which gives exactly the same plans."""
    if facts is None:
        facts = EventFacts(event, now_ns)
    plans = []
    for cl in links:
        try:
            plan = plan_link(event, facts, cl, view, now_ns, trace)
        except Exception as exc:
            # A defect in one link's rules must not stop the copies of every other link.
            plan = skipped(event, cl, now_ns, RuleNote(
                DecisionRule.INTERNAL_ERROR, f"the copy rules failed on this event: {exc!r}",
                {"error": repr(exc)},
            ))  # fmt: skip
        if plan.order is not None or plan.decisions:
            plans.append((cl, plan))
    return plans


def _plan_new_copy(
    event: PositionOpened | PendingOrderTriggered | PendingOrderPlaced,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan:
    admitted = admit_new_copy(event, facts, cl, view, now_ns)
    if type(admitted) is RuleNote:
        return skipped(event, cl, now_ns, admitted)
    follower_state, spec, symbol, side = admitted
    link = cl.link
    # Risk sizing measures the follower's stop: on reverse copy that is the master's TP.
    stop_level = event.tp if link.reverse else event.sl
    sized = size_follower_volume(
        link,
        master_volume=event.volume,
        sl_distance=None if stop_level is None else abs(event.price - stop_level),
        master_state=view.accounts.get(link.master),
        follower_state=follower_state,
        spec=spec,
        fx_rates=view.fx_rates,
    )
    if sized.skip is not None:
        return skipped(event, cl, now_ns, sized.skip)
    plan = CopyPlan(
        daily_key=facts.daily_key,
        decisions=[
            copy_decision(event, cl, now_ns, note, DecisionOutcome.REDUCED)
            for note in sized.reductions
        ],
    )
    plan.order = new_copy_order(
        event, facts, cl, symbol=symbol, side=side, volume=sized.volume,
        now_ns=now_ns, trace=trace,
    )  # fmt: skip
    return plan


def _plan_follow_up(
    event: MasterEvent,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan:
    """Modifications, closes and pending changes of something the link may have copied."""
    admitted = admit_follow_up(event, facts, cl, view)
    if admitted is False:
        return _NOTHING
    if isinstance(admitted, RuleNote):
        return skipped(event, cl, now_ns, admitted)
    return CopyPlan(order=follow_up_order(event, cl, now_ns=now_ns, trace=trace))
