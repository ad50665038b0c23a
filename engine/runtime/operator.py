"""What an operator reads from NATS: links and their state, emergency stops, copy decisions,
streams, consumer lag, and whether replicators and connectors are alive.

Read-only except ``check_stop_target`` (a guard before a write). Everything comes from the
contract's streams and buckets; the command line only presents it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.kv import KeyValue

from engine.core.errors import TradecopyError
from engine.runtime.jetstream import live_keys
from schemas import codec, subjects
from schemas.account import AccountState, TerminalStatus
from schemas.control import EmergencyStop, StopScope, stop_key
from schemas.decisions import CopyDecision
from schemas.links import CopyLink, Sizing
from schemas.streams import DECISIONS_STREAM, MASTER_EVENTS_STREAM, all_streams

#: An account whose latest state is older than this is reported as silent.
STALE_AFTER_S = 10.0
#: How long a read waits for the next stored message before it gives up.
READ_TIMEOUT_S = 5.0

#: Given a link's raw ``tc_link_state`` entry, the rule that paused it, or None when copying
#: (the replicator owns that format: the caller decodes it).
PausedBy = Callable[[bytes], str | None]


class UnknownStopTarget(TradecopyError):
    """An emergency stop named a link or account nothing in NATS knows."""


# ------------------------------------------------------------------------------ links


class LinkView(msgspec.Struct, frozen=True, kw_only=True):
    """One copy link as the operator sees it: configuration and whether it copies now."""

    link_id: str
    master: str
    follower: str
    sizing: str
    enabled: bool
    paused_by: str | None = None
    """The protection rule that paused the link (``tradecopy links resume`` lifts it)."""
    stopped_by: list[str] = []
    """Emergency stops in force over this link: ``global``, ``account.<f>``, ``link.<id>``."""

    @property
    def state(self) -> str:
        if self.stopped_by:
            return "STOPPED (" + ", ".join(self.stopped_by) + ")"
        if not self.enabled:
            return "disabled"
        if self.paused_by is not None:
            return f"paused ({self.paused_by})"
        return "copying"


def describe_sizing(sizing: Sizing) -> str:
    """``multiplier ×2``, ``fixed_lot 0.01``, ``risk_percent 1 %`` …: the rule in a few words."""
    fields = msgspec.structs.asdict(sizing)
    mode = type(sizing).__struct_config__.tag
    parts = [str(mode)]
    for name, value in fields.items():
        if value is None:
            continue
        if name == "factor":
            parts.append(f"×{value:g}")
        elif name == "percent":
            parts.append(f"{value:g} %")
        elif isinstance(value, float):
            parts.append(f"{value:g}")
        else:
            parts.append(str(value))
    return " ".join(parts)


async def _entries(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    """Every live key of a bucket and its value."""
    try:
        kv = await js.key_value(bucket)
        keys = await live_keys(js, kv, bucket)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        return {}  # nothing bootstrapped yet: nothing to show
    out: dict[str, bytes] = {}
    for key in keys:
        value = await _get(kv, key)
        if value is not None:
            out[key] = value
    return out


async def _get(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    return entry.value


async def read_links(js: JetStreamContext) -> list[CopyLink]:
    """Every link in the ``tc_links`` bucket, by id."""
    raw = await _entries(js, subjects.KV_LINKS)
    return [codec.copy_link_decoder.decode(raw[key]) for key in sorted(raw)]


async def read_stops(js: JetStreamContext, *, active_only: bool = True) -> list[EmergencyStop]:
    """The emergency stops in the ``tc_control`` bucket (those in force, unless told)."""
    raw = await _entries(js, subjects.KV_CONTROL)
    stops = [codec.emergency_stop_decoder.decode(raw[key]) for key in sorted(raw)]
    return [s for s in stops if s.active or not active_only]


async def read_account_states(js: JetStreamContext) -> dict[str, AccountState]:
    """The latest state every connector published, by account."""
    raw = await _entries(js, subjects.KV_ACCOUNTS)
    return {key: codec.account_state_decoder.decode(value) for key, value in raw.items()}


def stops_over(link: CopyLink, stops: Iterable[EmergencyStop]) -> list[str]:
    """The keys of the stops in force that freeze ``link``."""
    keys = {
        stop_key(StopScope.GLOBAL),
        stop_key(StopScope.ACCOUNT, link.follower),
        stop_key(StopScope.LINK, link.link_id),
    }
    return [s.key for s in stops if s.active and s.key in keys]


async def link_views(js: JetStreamContext, paused_by: PausedBy) -> list[LinkView]:
    links = await read_links(js)
    stops = await read_stops(js)
    states = await _entries(js, subjects.KV_LINK_STATE)
    views = []
    for link in links:
        state = states.get(link.link_id)
        views.append(
            LinkView(
                link_id=link.link_id,
                master=link.master,
                follower=link.follower,
                sizing=describe_sizing(link.sizing),
                enabled=link.enabled,
                paused_by=None if state is None else paused_by(state),
                stopped_by=stops_over(link, stops),
            )
        )
    return views


# --------------------------------------------------------------------- stop targets


@dataclass(frozen=True, slots=True)
class KnownTargets:
    links: frozenset[str]
    accounts: frozenset[str]


async def known_targets(js: JetStreamContext) -> KnownTargets:
    """Links in the links bucket; accounts named by a link or seen in an account state."""
    links = await read_links(js)
    accounts = {a for link in links for a in (link.master, link.follower)}
    accounts |= set(await read_account_states(js))
    return KnownTargets(frozenset(x.link_id for x in links), frozenset(accounts))


async def check_stop_target(js: JetStreamContext, scope: StopScope, target: str) -> None:
    """Raise ``UnknownStopTarget``, saying what is known, when ``target`` names nothing."""
    if scope is StopScope.GLOBAL:
        return
    known = await known_targets(js)
    names = known.links if scope is StopScope.LINK else known.accounts
    if target in names:
        return
    plural = "links" if scope is StopScope.LINK else "accounts"
    listed = ", ".join(sorted(names)) if names else "none"
    raise UnknownStopTarget(
        f"unknown {scope.value} {target!r}; known {plural}: {listed} (--force sets the stop anyway)"
    )


# ------------------------------------------------------------------------ decisions


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """Which decisions to show; follower and link narrow the subject, the rest is decoded."""

    follower: str | None = None
    link: str | None = None
    rule: str | None = None
    master: str | None = None

    @property
    def subject(self) -> str:
        return subjects.decisions(self.follower or "*", self.link or "*")

    def matches(self, decision: CopyDecision) -> bool:
        return (
            (self.rule is None or decision.rule.value == self.rule)
            and (self.master is None or decision.master == self.master)
            and (self.follower is None or decision.follower == self.follower)
            and (self.link is None or decision.link_id == self.link)
        )


async def _reader(js: JetStreamContext, flt: DecisionFilter, start: int) -> Any:
    """An ordered (ephemeral, flow-controlled) consumer of the decisions from ``start`` on."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    return await js.subscribe(
        flt.subject, stream=DECISIONS_STREAM, ordered_consumer=True, config=config
    )


async def _read_range(
    js: JetStreamContext, flt: DecisionFilter, start: int, end: int
) -> list[CopyDecision]:
    """The decisions matching ``flt`` stored at sequences ``start`` … ``end``."""
    sub = await _reader(js, flt, start)
    found: list[CopyDecision] = []
    try:
        info = await sub.consumer_info()
        # Pending counts only what is not yet pushed: what was pushed already is ours to read.
        delivered = info.delivered.consumer_seq if info.delivered else 0
        if not info.num_pending and not delivered:
            return found
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            meta = msg.metadata
            if meta.sequence.stream > end:
                break
            decision = codec.decision_decoder.decode(msg.data)
            if flt.matches(decision):
                found.append(decision)
            if meta.sequence.stream >= end or not meta.num_pending:
                break
    finally:
        await sub.unsubscribe()
    return found


async def recent_decisions(
    js: JetStreamContext, flt: DecisionFilter, last: int
) -> tuple[list[CopyDecision], int]:
    """The last ``last`` decisions matching ``flt``, oldest first, and the stream's last
    sequence (where ``follow_decisions`` goes on). Reads backwards in growing windows, so a
    long stream is not read whole for a few recent decisions."""
    state = (await js.stream_info(DECISIONS_STREAM)).state
    if not state.messages or last <= 0:
        return [], state.last_seq
    found: list[CopyDecision] = []
    end, window = state.last_seq, max(4 * last, 256)
    while True:
        start = max(state.first_seq, end - window + 1)
        found = await _read_range(js, flt, start, end) + found
        if len(found) >= last or start <= state.first_seq:
            break
        end, window = start - 1, window * 4
    return found[-last:], state.last_seq


async def follow_decisions(
    js: JetStreamContext, flt: DecisionFilter, after_seq: int
) -> AsyncIterator[CopyDecision]:
    """Every decision matching ``flt`` stored after ``after_seq``, as it is stored."""
    sub = await _reader(js, flt, after_seq + 1)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            decision = codec.decision_decoder.decode(msg.data)
            if flt.matches(decision):
                yield decision
    finally:
        await sub.unsubscribe()


# --------------------------------------------------------------------------- status


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int


class ConsumerStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One durable consumer and its lag: what waits, what is out, what came back."""

    stream: str
    name: str
    num_pending: int
    """Stored, matching, not yet delivered: the backlog."""
    ack_pending: int
    """Delivered, not yet acknowledged: in someone's hands."""
    redelivered: int
    ack_floor: int
    push_bound: bool | None
    """Push consumers: someone is subscribed to its deliver subject now."""
    last_active_ns: int | None
    """When it last delivered a message."""


class AccountStatus(msgspec.Struct, frozen=True, kw_only=True):
    """An account's latest state: the connector's heartbeat, and its terminal."""

    account: str
    connector: str
    ts_ns: int
    age_s: float
    alive: bool
    balance: float
    equity: float
    currency: str
    open_positions: int
    terminal: TerminalStatus | None = None


class ConnectorStatus(msgspec.Struct, frozen=True, kw_only=True):
    connector: str
    alive: bool
    last_heartbeat_ns: int
    accounts: list[str]
    order_consumer_bound: bool | None = None
    """Its order consumer is push-bound (None: no order consumer, e.g. masters only)."""


class ReplicatorStatus(msgspec.Struct, frozen=True, kw_only=True):
    alive: bool
    """Some replicator is subscribed to every partition of the master-event stream."""
    partitions: int
    bound_partitions: int
    last_active_ns: int | None
    pending: int
    ack_pending: int


class StackStatus(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    ts_ns: int
    streams: list[StreamStatus]
    consumers: list[ConsumerStatus]
    replicators: ReplicatorStatus
    connectors: list[ConnectorStatus]
    accounts: list[AccountStatus]


def _ns(when: object) -> int | None:
    ts = getattr(when, "timestamp", None)
    return None if ts is None else int(ts() * 1e9)


def _consumer_status(info: ConsumerInfo) -> ConsumerStatus:
    delivered = info.delivered
    return ConsumerStatus(
        stream=info.stream_name, name=info.name,
        num_pending=info.num_pending or 0, ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
        push_bound=bool(info.push_bound) if info.config.deliver_subject else None,
        last_active_ns=_ns(delivered.last_active) if delivered else None,
    )  # fmt: skip


async def _consumers(js: JetStreamContext, stream: str) -> list[ConsumerStatus]:
    """Every durable consumer of ``stream`` (ephemeral readers, like ours, are left out)."""
    infos = await js.consumers_info(stream)
    return [_consumer_status(i) for i in infos if i.config.durable_name]


def _replicators(consumers: list[ConsumerStatus]) -> ReplicatorStatus:
    ours = [c for c in consumers if c.stream == MASTER_EVENTS_STREAM]
    active = [c.last_active_ns for c in ours if c.last_active_ns]
    bound = sum(1 for c in ours if c.push_bound)
    return ReplicatorStatus(
        alive=bool(ours) and bound == len(ours), partitions=len(ours), bound_partitions=bound,
        last_active_ns=max(active) if active else None,
        pending=sum(c.num_pending for c in ours), ack_pending=sum(c.ack_pending for c in ours),
    )  # fmt: skip


def _accounts(states: dict[str, AccountState], now_ns: int, stale_s: float) -> list[AccountStatus]:
    rows = []
    for account in sorted(states):
        state = states[account]
        age = max(0.0, (now_ns - state.ts_ns) / 1e9)
        rows.append(
            AccountStatus(
                account=account,
                connector=state.connector,
                ts_ns=state.ts_ns,
                age_s=round(age, 3),
                alive=age <= stale_s,
                balance=state.balance,
                equity=state.equity,
                currency=state.currency,
                open_positions=state.open_positions,
                terminal=state.terminal,
            )
        )
    return rows


def _connectors(
    accounts: list[AccountStatus], consumers: list[ConsumerStatus]
) -> list[ConnectorStatus]:
    by_connector: dict[str, list[AccountStatus]] = {}
    for row in accounts:
        by_connector.setdefault(row.connector or "?", []).append(row)
    order_consumers = {c.name: c for c in consumers if c.name.startswith("connector-")}
    out = []
    for connector in sorted(by_connector):
        rows = by_connector[connector]
        consumer = order_consumers.get(f"connector-{connector}")
        out.append(
            ConnectorStatus(
                connector=connector,
                alive=any(r.alive for r in rows),
                last_heartbeat_ns=max(r.ts_ns for r in rows),
                accounts=[r.account for r in rows],
                order_consumer_bound=None if consumer is None else bool(consumer.push_bound),
            )
        )
    return out


async def stack_status(
    js: JetStreamContext, url: str, stale_s: float = STALE_AFTER_S
) -> StackStatus:
    """Streams, consumers and their lag, replicators and connectors: one snapshot."""
    streams: list[StreamStatus] = []
    consumers: list[ConsumerStatus] = []
    for config in all_streams():
        name = config.name or ""
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            continue
        state = info.state
        streams.append(
            StreamStatus(
                name=name,
                messages=state.messages,
                bytes=state.bytes,
                first_seq=state.first_seq,
                last_seq=state.last_seq,
                consumers=state.consumer_count,
            )
        )
        consumers += await _consumers(js, name)
    now = time.time_ns()
    accounts = _accounts(await read_account_states(js), now, stale_s)
    return StackStatus(
        url=url, ts_ns=now, streams=streams, consumers=consumers,
        replicators=_replicators(consumers), connectors=_connectors(accounts, consumers),
        accounts=accounts,
    )  # fmt: skip
