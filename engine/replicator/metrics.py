"""Prometheus metrics of the replicator."""

from __future__ import annotations

import contextlib
import typing

from prometheus_client import Counter, Gauge, Histogram

from schemas.decisions import DecisionOutcome, DecisionRule
from schemas.master import MasterEvent
from schemas.orders import FollowerOrder
from schemas.rejections import RejectionReason
from schemas.streams import KV_BUCKETS

# Microsecond-to-second buckets: the hop budget is 100 µs p50 and 1 ms p99.
_LATENCY_BUCKETS = (
    20e-6,
    50e-6,
    100e-6,
    200e-6,
    500e-6,
    1e-3,
    2e-3,
    5e-3,
    10e-3,
    20e-3,
    50e-3,
    0.1,
    0.5,
    1.0,
)

STAGE_LATENCY = Histogram(
    "tradecopy_replicator_stage_latency_seconds",
    "Time spent per master event in each replicator stage",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
EVENTS = Counter("tradecopy_replicator_events_total", "Master events processed", ["type"])
ORDERS_PUBLISHED = Counter(
    "tradecopy_replicator_orders_published_total", "Follower orders published", ["order_type"]
)
DECISIONS = Counter(
    "tradecopy_replicator_decisions_total", "Copy decisions published", ["rule", "outcome"]
)
LINK_DECISIONS = Counter(
    "tradecopy_replicator_link_decisions_total",
    "Copy decisions published, per link: one series per link, follower and outcome",
    ["link", "follower", "outcome"],
)
CONSUMER_LAG = Gauge(
    "tradecopy_replicator_consumer_lag",
    "Master events waiting in a partition's consumer",
    ["partition"],
)
BAD_MESSAGES = Counter(
    "tradecopy_replicator_bad_messages_total", "Messages that could not be decoded", ["reason"]
)
PUBLISH_FAILURES = Counter(
    "tradecopy_replicator_publish_failures_total",
    "Fan-outs that failed to store and were left for redelivery",
)
REJECTIONS = Counter(
    "tradecopy_replicator_rejections_total",
    "Master events refused (published on tc.v1.master.<account>.rejections)",
    ["reason"],
)
FUTURE_DATED = Counter(
    "tradecopy_replicator_future_dated_events_total",
    "Master events dated beyond the clock-skew tolerance, judged by their arrival time",
)
PUBLISH_RETRIES = Counter(
    "tradecopy_replicator_publish_retries_total",
    "Messages sent again (same Nats-Msg-Id) because JetStream did not confirm them in time",
)
PARTITION_STALL = Gauge(
    "tradecopy_replicator_partition_stall_seconds",
    "Seconds a partition has had master events pending without progress (0 when idle)",
    ["partition"],
)

# Every label value known in advance exists from the start: an alert on rate() then sees the
# first rejection, bad message or decision too (a series born at 1 has no rate).
for _reason in RejectionReason:
    REJECTIONS.labels(_reason.value)
for _bad in ("master_event", "fan_out", *(f"kv_{bucket}" for bucket in KV_BUCKETS)):
    BAD_MESSAGES.labels(_bad)
for _event_type in typing.get_args(MasterEvent):
    EVENTS.labels(_event_type.__name__)
for _order_type in typing.get_args(FollowerOrder):
    ORDERS_PUBLISHED.labels(_order_type.__struct_config__.tag)
#: Every (rule, outcome) child made once: a decision counts through a dict lookup.
DECISIONS_BY_RULE = {
    (rule, outcome): DECISIONS.labels(rule.value, outcome.value)
    for rule in DecisionRule
    for outcome in DecisionOutcome
}


class LinkDecisionCounters:
    """The per-link decision counters, one child per outcome, made once per link.

    The fan-out counts through these children (a dict lookup), never through ``labels()``
    per event. ``sync`` makes every known link's series exist at 0 from the moment the link
    is known, and removes the series of links that are gone, so the cardinality is the
    number of live links × 4 outcomes.
    """

    __slots__ = ("_by_link",)

    def __init__(self) -> None:
        self._by_link: dict[str, tuple[str, dict[DecisionOutcome, typing.Any]]] = {}

    def of(self, link_id: str, follower: str) -> dict[DecisionOutcome, typing.Any]:
        known = self._by_link.get(link_id)
        if known is None or known[0] != follower:
            if known is not None:
                self._remove(link_id, known[0])
            children = {
                o: LINK_DECISIONS.labels(link_id, follower, o.value) for o in DecisionOutcome
            }
            known = self._by_link[link_id] = (follower, children)
        return known[1]

    def sync(self, links: typing.Iterable[tuple[str, str]]) -> None:
        """Exactly these (link id, follower) pairs have series."""
        wanted = dict(links)
        for link_id in [k for k in self._by_link if k not in wanted]:
            self._remove(link_id, self._by_link.pop(link_id)[0])
        for link_id, follower in wanted.items():
            self.of(link_id, follower)

    def clear(self) -> None:
        self.sync(())

    def _remove(self, link_id: str, follower: str) -> None:
        for outcome in DecisionOutcome:
            # Another instance in this process may have removed it first.
            with contextlib.suppress(KeyError):
                LINK_DECISIONS.remove(link_id, follower, outcome.value)


STAGE_DECODE = STAGE_LATENCY.labels("decode")
STAGE_RULES = STAGE_LATENCY.labels("rules")
STAGE_PUBLISH = STAGE_LATENCY.labels("publish")
STAGE_TOTAL = STAGE_LATENCY.labels("total")
