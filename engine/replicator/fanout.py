"""The fan-out planner: one master event × every link of its master, in one pass.

The same decisions as ``rules.plan_event`` (the reference, one link at a time through every
gate), computed the way a fan-out of thousands of links can afford. What does not depend on
the event is compiled once per (master, symbol) when the links change (``LiveView`` drops the
compiled fan-outs on every link change): the follower's symbol, the key of its symbol spec,
which gates can speak on the link at all, the sizing constants, and the *shape* of its orders
(the link fields an order carries besides its ids). Per event, one pass over the links does
what is left: the account and spec lookups (kept live by the KV watches), the sizing and the
step rounding, and the order, copied from the first order of the same shape with only the
per-link fields replaced.

The fast pass handles the common case only: a link whose every gate passes and whose volume
fits its symbol without a reduction. Any link where a rule could speak — a decision, a skip,
a cap, a forced minimum, an emergency stop in the view, a link-state rule — is planned by the
reference ``plan_link`` instead, so every decision comes from one place and the fast pass can
only ever produce the orders the reference would (``tests/test_fast_path.py`` proves it on
random links, events and views).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from msgspec.structs import replace

from engine.core.volume import STEP_EPSILON, decimals
from engine.replicator.facts import CompiledLink, EventFacts, MarketView
from engine.replicator.fx import conversion_rate
from engine.replicator.orders import follow_up_order, new_copy_order
from engine.replicator.rules import CopyPlan, plan_event
from engine.replicator.splice import (
    FOLLOW_UP_FIELDS,
    NEW_COPY_FIELDS,
    Batches,
    Cut,
    LinkBytes,
    cut,
)
from engine.runtime.publishing import Publication
from schemas import codec, subjects
from schemas.account import AccountState, SymbolSpec, TradeMode
from schemas.common import Trace
from schemas.links import (
    BalanceRatio,
    CopyLink,
    EquityRatio,
    FixedLot,
    FreeMarginRatio,
    Multiplier,
)
from schemas.master import (
    MasterEvent,
    PendingOrderCancelled,
    PendingOrderModified,
    PositionModified,
    PositionReduced,
)
from schemas.orders import FollowerOrder, FollowerOrderBatch

# Sizing modes the fast pass computes itself; the risk modes go through the reference.
_FIXED, _MULTIPLIER, _BALANCE, _EQUITY, _FREE_MARGIN, _REFERENCE = range(6)
_FULL = TradeMode.FULL
#: Whether this module runs compiled (Cython, built at install time where a C compiler is
#: there; ``setup.py``) or as Python source. Both plan exactly alike: ``tests/test_fast_path.py``
#: runs its properties on both.
COMPILED = not __file__.endswith((".py", ".pyc"))  # (.pyc: an install without sources)
#: Links of one order shape from which a batched fan-out splices their orders (cutting the
#: template costs ≈ 14 µs, splicing saves ≈ 0.6 µs per order: even at ≈ 24 links).
SPLICE_MIN_LINKS = 32


class LinkProgram:
    """One link compiled for one master symbol: everything its plan needs that no event
    changes."""

    __slots__ = (
        "cap",
        "cl",
        "connector",
        "copy_modifications",
        "copy_partial_closes",
        "copy_pending",
        "cut_follow_up",
        "cut_new",
        "factor",
        "follow_up_fast",
        "follow_up_shape",
        "follower",
        "link_cap",
        "link_id",
        "max_open_positions",
        "max_signal_age_ms",
        "new_copy_shape",
        "open_fast",
        "pending_fast",
        "sizing_group",
        "sizing_kind",
        "spec",
        "spec_full",
        "spec_key",
        "splice_follow_up",
        "splice_new",
        "state",
        "symbol",
        "volume_min",
        "volume_step",
        "wire",
    )

    def __init__(self, cl: CompiledLink, master_symbol: str) -> None:
        link = cl.link
        self.cl = cl
        self.link_id = cl.link_id
        # Interned, as the live view interns its keys: a lookup then finds the very same
        # strings and compares no characters (``LiveView``).
        self.follower = sys.intern(link.follower)
        self.symbol = sys.intern(cl.follower_symbol(master_symbol))
        self.spec_key = (self.follower, self.symbol)
        # Gates that can speak on a new copy whatever the event: such a link always goes
        # through the reference (disabled, static filters, trading hours, link-state rules).
        simple = (
            link.enabled
            and not cl.has_static_filters
            and link.trading_hours is None
            and not cl.uses_link_state
        )
        self.open_fast = simple
        self.pending_fast = simple and link.copy_pending
        self.max_signal_age_ms = link.max_signal_age_ms
        self.max_open_positions = link.max_open_positions
        self.link_cap = link.max_lot
        self.factor = 0.0
        self.sizing_kind = _sizing_kind(link)
        #: Set by SymbolFanOut: links of one fixed lot or one multiplier size alike (-1: the
        #: ratio modes, whose volume depends on the follower's account).
        self.sizing_group = -1
        sizing = link.sizing
        if isinstance(sizing, FixedLot):
            self.factor = sizing.lots
        elif isinstance(sizing, Multiplier | BalanceRatio | EquityRatio | FreeMarginRatio):
            self.factor = sizing.factor
        # Numbered by SymbolFanOut: links of one shape build orders equal but for their ids.
        self.new_copy_shape = 0
        self.follow_up_shape = 0
        self.follow_up_fast = not cl.has_static_filters
        self.copy_partial_closes = link.copy_partial_closes
        self.copy_modifications = link.copy_sl_tp and link.copy_sl_tp_modifications
        self.copy_pending = link.copy_pending
        # Set by SymbolFanOut: whether orders of this link's shape are cut (``cut_*``), and
        # whether this link's own orders are spliced into their batches (``splice_*``).
        self.cut_new = self.cut_follow_up = False
        self.splice_new = self.splice_follow_up = False
        self.wire = LinkBytes(self.link_id, self.follower, self.symbol)
        # What the last event read from the follower's spec and account state, kept while
        # they are the same (frozen) objects: a spec changes rarely, a state now and then.
        self.spec: SymbolSpec | None = None
        self.spec_full = False
        self.cap = self.volume_step = self.volume_min = 0.0
        self.state: AccountState | None = None
        self.connector = ""

    def read_spec(self, spec: SymbolSpec) -> None:
        """Keep what the fast pass reads from ``spec``: whether it trades fully, the most a
        copy may be (the link's max lot when below the symbol's maximum), step and minimum."""
        self.spec_full = spec.trade_mode is _FULL
        link_cap = self.link_cap
        self.cap = (
            link_cap if link_cap is not None and link_cap < spec.volume_max else (spec.volume_max)
        )
        self.volume_step = spec.volume_step
        self.volume_min = spec.volume_min
        self.spec = spec  # last: a read that raised is read again

    def read_state(self, state: AccountState) -> None:
        # Interned: neighbouring links compare their connectors by identity.
        self.connector = sys.intern(state.connector)
        self.state = state


class _Rounding:
    """A raw volume rounded to a step: the step, the rounded volume and its msgpack."""

    __slots__ = ("encoded", "step", "volume")

    def __init__(self, step: float, volume: float, encoded: bytes) -> None:
        self.step = step
        self.volume = volume
        self.encoded = encoded


def _new_copy_shape(link: CopyLink) -> tuple[Any, ...]:
    """Everything ``new_copy_order`` reads from the link besides its ids (``follow_up_order``
    reads ``copy_sl_tp`` and ``reverse``)."""
    return (
        link.reverse, link.copy_sl_tp, link.magic, link.max_price_deviation,
        link.deviation_policy, link.deviation_wait_ms, link.max_signal_age_ms,
    )  # fmt: skip


def _sizing_kind(link: CopyLink) -> int:
    sizing = link.sizing
    if isinstance(sizing, FixedLot):
        return _FIXED
    if isinstance(sizing, Multiplier):
        return _MULTIPLIER
    if isinstance(sizing, BalanceRatio):
        return _BALANCE
    if isinstance(sizing, EquityRatio):
        return _EQUITY
    if isinstance(sizing, FreeMarginRatio):
        return _FREE_MARGIN
    return _REFERENCE


class SymbolFanOut:
    """Every link of one master, compiled for one of its symbols, in link order."""

    __slots__ = (
        "follow_up_shapes", "links", "new_copy_shapes", "programs", "sizing_groups", "splices",
    )  # fmt: skip

    def __init__(
        self,
        links: Sequence[CompiledLink],
        master_symbol: str,
        splice_min_links: int = SPLICE_MIN_LINKS,
    ) -> None:
        self.links = tuple(links)
        self.programs = tuple(LinkProgram(cl, master_symbol) for cl in links)
        # Shapes numbered once here: hashing a shape per link and event would cost more
        # than the rest of the link's plan (an enum's hash is Python code).
        new_copy: dict[tuple[Any, ...], int] = {}
        follow_up: dict[tuple[Any, ...], int] = {}
        for program in self.programs:
            link = program.cl.link
            program.new_copy_shape = new_copy.setdefault(_new_copy_shape(link), len(new_copy))
            program.follow_up_shape = follow_up.setdefault(
                (link.copy_sl_tp, link.reverse), len(follow_up)
            )
        self.new_copy_shapes = len(new_copy)
        # Links whose raw volume is the same for every event: rounded (and spliced) once per
        # event and group, found by index instead of by volume.
        groups: dict[tuple[int, float], int] = {}
        for program in self.programs:
            if program.sizing_kind in (_FIXED, _MULTIPLIER):
                key = (program.sizing_kind, program.factor)
                program.sizing_group = groups.setdefault(key, len(groups))
        self.sizing_groups = len(groups)
        self.follow_up_shapes = len(follow_up)
        # Cutting a template costs about as much as splicing two dozen orders saves: a shape
        # is spliced only when enough links share it. A daily trade limit may withdraw an order
        # after planning: such a link's orders stay objects.
        new_counts = Counter(p.new_copy_shape for p in self.programs)
        follow_up_counts = Counter(p.follow_up_shape for p in self.programs)
        for program in self.programs:
            program.cut_new = new_counts[program.new_copy_shape] >= splice_min_links
            program.cut_follow_up = follow_up_counts[program.follow_up_shape] >= splice_min_links
            free = program.cl.link.daily_trade_limit is None
            program.splice_new = free and program.cut_new
            program.splice_follow_up = free and program.cut_follow_up
        #: Whether a batched fan-out of these links is worth splicing at all.
        self.splices = any(p.cut_new or p.cut_follow_up for p in self.programs)


class FanOutCache:
    """Compiled fan-outs by (master, symbol); dropped whole when any link changes."""

    __slots__ = ("_by_key", "_links_by_master")

    def __init__(self, links_by_master: Callable[[], dict[str, tuple[CompiledLink, ...]]]):
        self._links_by_master = links_by_master
        self._by_key: dict[tuple[str, str], SymbolFanOut] = {}

    def clear(self) -> None:
        self._by_key = {}

    def get(self, master: str, symbol: str) -> SymbolFanOut | None:
        key = (master, symbol)
        fan_out = self._by_key.get(key)
        if fan_out is None:
            links = self._links_by_master().get(master)
            if not links:
                return None
            fan_out = self._by_key[key] = SymbolFanOut(links, symbol)
        return fan_out


_EMPTY: tuple[()] = ()


def plan_fan_out(
    event: MasterEvent,
    fan_out: SymbolFanOut,
    view: MarketView,
    now_ns: int,
    trace: Trace,
    batches: Batches | None = None,
) -> list[tuple[CompiledLink, CopyPlan]]:
    """Every link's plan for one event — exactly ``rules.plan_event``'s, in the same order.

    With ``batches`` (a fan-out batched by connector), the orders of followers a connector
    serves go into ``batches`` as they are planned: spliced bytes where the fast pass made
    the order (no plan is returned for those), a hole for the others (their plans are
    returned as usual). ``fan_out_publications`` with the same ``batches`` publishes both."""
    facts = EventFacts(event, now_ns)
    programs = fan_out.programs
    if view.stops:
        # An emergency stop (even an inactive entry) is rare: let the reference judge it.
        return _reference(event, facts, programs, view, now_ns, trace, batches)
    if facts.is_new_copy:
        return _plan_new_copies(
            event, facts, programs, fan_out.new_copy_shapes, fan_out.sizing_groups, view,
            now_ns, trace, batches,
        )  # fmt: skip
    return _plan_follow_ups(
        event, facts, programs, fan_out.follow_up_shapes, view, now_ns, trace, batches
    )


def _hold(
    batches: Batches | None, accounts: dict[str, AccountState], follower: str, plan: CopyPlan
) -> None:
    """An order the fast pass did not splice keeps its place in its connector's batch."""
    if batches is not None and plan.order is not None:
        state = accounts.get(follower)
        if state is not None and state.connector:
            batches.hold(state.connector, plan)


def _reference(
    event: MasterEvent,
    facts: EventFacts,
    programs: Sequence[LinkProgram],
    view: MarketView,
    now_ns: int,
    trace: Trace,
    batches: Batches | None,
) -> list[tuple[CompiledLink, CopyPlan]]:
    plans = []
    for program in programs:
        plan = _reference_plan(event, facts, program.cl, view, now_ns, trace)
        if plan is not None:
            plans.append((program.cl, plan))
            _hold(batches, view.accounts, program.follower, plan)
    return plans


def _reference_plan(
    event: MasterEvent,
    facts: EventFacts,
    cl: CompiledLink,
    view: MarketView,
    now_ns: int,
    trace: Trace,
) -> CopyPlan | None:
    """``rules.plan_event``'s treatment of one link, including its internal-error skip."""
    plans = plan_event(event, (cl,), view, now_ns, trace, facts)
    return plans[0][1] if plans else None


def _plan_new_copies(
    event: Any,
    facts: EventFacts,
    programs: Sequence[LinkProgram],
    shapes: int,
    groups: int,
    view: MarketView,
    now_ns: int,
    trace: Trace,
    batches: Batches | None,
) -> list[tuple[CompiledLink, CopyPlan]]:
    accounts = view.accounts
    symbols = view.symbols
    is_pending = facts.is_pending
    age_ms = (now_ns - event.ts_ns) / 1e6
    master_volume = event.volume
    daily_key = facts.daily_key
    event_id = event.event_id
    master_state: AccountState | None = accounts.get(event.master)
    rates: dict[str, float | None] = {}
    # Per order shape (numbered 0 … shapes - 1): the template order, and its cut.
    templates: list[Any] = [None] * shapes
    cuts: list[Cut | None] = [None] * shapes
    by_connector = None if batches is None else batches.chunks
    encode = codec.encode
    # (The step it was rounded to, the rounded volume, its msgpack): by sizing group, and by
    # raw volume for the ratio modes.
    roundings: list[_Rounding | None] = [None] * groups
    on_step: dict[float, _Rounding] = {}
    # By sizing group: (the cut's prefixes for one link id length, the volume's msgpack, the
    # prefix); both compared by identity.
    group_prefixes: list[tuple[dict[Any, bytes], bytes, bytes] | None] = [None] * groups
    encoded = b""
    # The last connector's batch, and the last cut's memos for the last link id length and
    # symbol: neighbouring links mostly share them, which saves a lookup each.
    last_connector = ""
    chunks: list[bytes] = []
    last_cut = None
    last_len = -1
    last_symbol = None
    prefixes: dict[Any, bytes] = {}
    rest = b""
    plans: list[tuple[CompiledLink, CopyPlan]] = []
    append = plans.append
    floor = math.floor
    # As locals the compiled build compares them in C, not as Python objects.
    inf = math.inf
    fixed = _FIXED
    multiplier = _MULTIPLIER
    for p in programs:
        try:
            volume = -1.0
            if p.pending_fast if is_pending else p.open_fast:
                follower_state = accounts.get(p.follower)
                spec = symbols.get(p.spec_key)
                if follower_state is not None and spec is not None:
                    if spec is not p.spec:
                        p.read_spec(spec)
                    if follower_state is not p.state:
                        p.read_state(follower_state)
                    if (
                        p.spec_full
                        and (p.max_signal_age_ms is None or not age_ms > p.max_signal_age_ms)
                        and (
                            p.max_open_positions is None
                            or is_pending
                            or follower_state.open_positions < p.max_open_positions
                        )
                    ):
                        kind = p.sizing_kind
                        if kind == multiplier:
                            volume = master_volume * p.factor
                        elif kind == fixed:
                            volume = p.factor
                        else:
                            volume = _ratio_volume(p, master_volume, master_state,
                                                   follower_state, view, rates)  # fmt: skip
                        # Not finite, capped, nothing, or below the minimum: the reference
                        # tells the follower why (a skip or a reduction).
                        # (NaN fails the first test, so the second is ``isfinite``.)
                        if volume > 0.0 and volume < inf and not volume > p.cap:
                            step = p.volume_step
                            group = p.sizing_group
                            rounding = roundings[group] if group >= 0 else on_step.get(volume)
                            if rounding is None or rounding.step != step:
                                # Followers of one sizing share their raw volume: rounded once.
                                rounded = round(
                                    floor(volume / step + STEP_EPSILON) * step, decimals(step)
                                )
                                rounding = _Rounding(step, rounded, encode(rounded))
                                if group >= 0:
                                    roundings[group] = rounding
                                else:
                                    on_step[volume] = rounding
                            volume = rounding.volume
                            encoded = rounding.encoded
                            if not volume >= p.volume_min:
                                volume = -1.0
                        else:
                            volume = -1.0
            if volume < 0.0:
                plan = _reference_plan(event, facts, p.cl, view, now_ns, trace)
                if plan is not None:
                    append((p.cl, plan))
                    _hold(batches, accounts, p.follower, plan)
                continue
            shape = p.new_copy_shape
            template = templates[shape]
            if template is None:
                cl = p.cl
                link = cl.link
                side = facts.master_side.flipped() if link.reverse else facts.master_side
                template = templates[shape] = new_copy_order(
                    event, facts, cl, symbol=p.symbol, side=side, volume=volume,
                    now_ns=now_ns, trace=trace,
                )  # fmt: skip
                order = template
                if batches is not None and p.cut_new:
                    c = cuts[shape] = cut(template, event_id, NEW_COPY_FIELDS)
                    if c is not None:
                        batches.tag = c.tag
            else:
                order = None
            connector = p.connector
            if by_connector is not None and connector and p.splice_new:
                c = cuts[shape]
                if c is not None:
                    # The order as bytes: the template's pieces around this link's fields.
                    w = p.wire
                    if c is not last_cut:
                        last_cut = c
                        last_len = -1
                        last_symbol = None
                    if w.link_len != last_len:
                        prefixes = c.prefixes_for(w.link_len)
                        last_len = w.link_len
                    group = p.sizing_group
                    memo = group_prefixes[group] if group >= 0 else None
                    if memo is not None and memo[0] is prefixes and memo[1] is encoded:
                        prefix = memo[2]
                    else:
                        prefix = prefixes.get(volume)
                        if prefix is None:
                            prefix = prefixes[volume] = c.prefix(w.link_len, encoded)
                        if group >= 0:
                            group_prefixes[group] = (prefixes, encoded, prefix)
                    if w.symbol is not last_symbol:
                        rest = c.rest(w.symbol)
                        last_symbol = w.symbol
                    if connector != last_connector:
                        chunks = _chunks_of(by_connector, connector)
                        last_connector = connector
                    chunks.extend((prefix, w.ident, rest))
                    continue
            if order is None:
                order = replace(
                    template, order_id=f"{event_id}:{p.link_id}", link_id=p.link_id,
                    follower=p.follower, symbol=p.symbol, volume=volume,
                )  # fmt: skip
            plan = CopyPlan(order, _EMPTY, daily_key)
            append((p.cl, plan))
            if by_connector is not None and connector:
                batches.hold(connector, plan)  # type: ignore[union-attr]
        except Exception:
            # Whatever went wrong, the reference decides (and names an internal error).
            plan = _reference_plan(event, facts, p.cl, view, now_ns, trace)
            if plan is not None:
                append((p.cl, plan))
                _hold(batches, accounts, p.follower, plan)
    return plans


def _chunks_of(by_connector: dict[str, list[bytes]], connector: str) -> list[bytes]:
    """The connector's batch pieces (a new batch for its first order)."""
    chunks = by_connector.get(connector)
    if chunks is None:
        chunks = by_connector[connector] = []
    return chunks


def _ratio_volume(
    p: LinkProgram,
    master_volume: float,
    master_state: AccountState | None,
    follower_state: AccountState,
    view: MarketView,
    rates: dict[str, float | None],
) -> float:
    """``sizing.raw_volume`` of the ratio modes, the same float operations in the same order;
    -1.0 where the reference has something to say (and for the risk modes)."""
    kind = p.sizing_kind
    if kind == _REFERENCE or master_state is None:
        return -1.0
    if kind == _BALANCE:
        f_value, m_value = follower_state.balance, master_state.balance
    elif kind == _EQUITY:
        f_value, m_value = follower_state.equity, master_state.equity
    else:
        f_value, m_value = follower_state.free_margin, master_state.free_margin
    currency = follower_state.currency
    if currency in rates:
        rate = rates[currency]
    else:
        rate = rates[currency] = conversion_rate(view.fx_rates, currency, master_state.currency)
    if rate is None or not m_value > 0 or not math.isfinite(m_value):
        return -1.0
    return master_volume * max(f_value, 0.0) * rate / m_value * p.factor


def _plan_follow_ups(
    event: MasterEvent,
    facts: EventFacts,
    programs: Sequence[LinkProgram],
    shapes: int,
    view: MarketView,
    now_ns: int,
    trace: Trace,
    batches: Batches | None,
) -> list[tuple[CompiledLink, CopyPlan]]:
    """Closes, modifications and pending changes: no stop in the view, so a link either sends
    the change, stays silent, or (a kind of change it does not copy) is told why."""
    reduced = isinstance(event, PositionReduced)
    modified = isinstance(event, PositionModified)
    pending_change = isinstance(event, PendingOrderModified | PendingOrderCancelled)
    event_id = event.event_id
    accounts = view.accounts
    templates: list[Any] = [None] * shapes
    cuts: list[Cut | None] = [None] * shapes
    by_connector = None if batches is None else batches.chunks
    last_connector = ""
    chunks: list[bytes] = []
    last_cut = None
    last_len = -1
    last_symbol = None
    prefix = rest = b""
    plans: list[tuple[CompiledLink, CopyPlan]] = []
    append = plans.append
    for p in programs:
        if (
            not p.follow_up_fast
            or (reduced and not p.copy_partial_closes)
            or (modified and not p.copy_modifications)
            or (pending_change and not p.copy_pending)
        ):
            plan = _reference_plan(event, facts, p.cl, view, now_ns, trace)
            if plan is not None:
                append((p.cl, plan))
                _hold(batches, accounts, p.follower, plan)
            continue
        try:
            shape = p.follow_up_shape
            template = templates[shape]
            if template is None:
                order = template = templates[shape] = follow_up_order(
                    event, p.cl, now_ns=now_ns, trace=trace
                )
                if batches is not None and p.cut_follow_up:
                    c = cuts[shape] = cut(template, event_id, FOLLOW_UP_FIELDS)
                    if c is not None:
                        batches.tag = c.tag
            else:
                order = None
            connector = ""
            if by_connector is not None:
                state = accounts.get(p.follower)
                if state is not None:
                    if state is not p.state:
                        p.read_state(state)
                    connector = p.connector
                c = cuts[shape] if p.splice_follow_up else None
                if connector and c is not None:
                    w = p.wire
                    if c is not last_cut:
                        last_cut = c
                        last_len = -1
                        last_symbol = None
                    if w.link_len != last_len:
                        prefix = c.prefix(w.link_len)
                        last_len = w.link_len
                    if w.symbol is not last_symbol:
                        rest = c.rest(w.symbol)
                        last_symbol = w.symbol
                    if connector != last_connector:
                        chunks = _chunks_of(by_connector, connector)
                        last_connector = connector
                    chunks.extend((prefix, w.ident, rest))
                    continue
            if order is None:
                order = replace(
                    template, order_id=f"{event_id}:{p.link_id}", link_id=p.link_id,
                    follower=p.follower, symbol=p.symbol,
                )  # fmt: skip
        except Exception:
            plan = _reference_plan(event, facts, p.cl, view, now_ns, trace)
            if plan is not None:
                append((p.cl, plan))
                _hold(batches, accounts, p.follower, plan)
            continue
        plan = CopyPlan(order, _EMPTY)
        append((p.cl, plan))
        if connector:
            batches.hold(connector, plan)  # type: ignore[union-attr]
    return plans


def fan_out_publications(
    event: MasterEvent,
    plans: Sequence[tuple[CompiledLink, CopyPlan]],
    accounts: dict[str, AccountState] | None,
    batch_suffix: str,
    now_ns: int,
    counted: dict[str, int] | None = None,
    spliced: Batches | None = None,
) -> list[Publication]:
    """Every message of one fan-out, each encoded once: with ``accounts`` (batching by
    connector), one ``FollowerOrderBatch`` per connector named in a follower's account state
    and single orders for the others; every decision on its own subject. ``counted`` gets
    the number of orders of each type (for the metrics, bumped once per fan-out).

    With ``spliced`` (the ``batches`` the fan-out was planned with), the batches are those
    the planner filled, and an order it did not place in one is a single order."""
    encode = codec.encode
    messages: list[Publication] = []
    batches: dict[str, list[FollowerOrder]] = {}
    every_order: list[FollowerOrder] = []
    placed = None if spliced is None else spliced.placed
    for cl, plan in plans:
        order = plan.order
        if order is not None:
            every_order.append(order)
            if placed is not None:
                state = None
                if id(plan) in placed:
                    order = None  # in its connector's batch already
            else:
                state = None if accounts is None else accounts.get(cl.link.follower)
            if order is None:
                pass
            elif state is not None and state.connector:
                orders = batches.get(state.connector)
                if orders is None:
                    orders = batches[state.connector] = []
                orders.append(order)
            else:
                messages.append((cl.order_subject, encode(order), order.order_id))
        if plan.decisions:
            for decision in plan.decisions:
                messages.append((cl.decision_subject, encode(decision), decision.decision_id))
    for connector, orders in batches.items():
        batch_id = f"{event.event_id}@{connector}{batch_suffix}"
        batch = FollowerOrderBatch(
            batch_id=batch_id, connector=connector, master=event.master,
            master_event_id=event.event_id, ts_ns=now_ns, orders=orders,
        )  # fmt: skip
        messages.append((subjects.connector_orders(connector), encode(batch), batch_id))
    if spliced is not None:
        messages.extend(spliced.messages(
            event.event_id, event.master, batch_suffix, now_ns,
            {} if counted is None else counted,
        ))  # fmt: skip
    if counted is not None and every_order:
        kinds = set(map(type, every_order))  # one kind per event, unless the rules change
        for kind in kinds:
            tag = kind.__struct_config__.tag  # type: ignore[attr-defined]
            count = (
                len(every_order)
                if len(kinds) == 1
                else sum(type(order) is kind for order in every_order)
            )
            counted[tag] = counted.get(tag, 0) + count
    return messages
