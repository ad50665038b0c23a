"""Prometheus metrics of the replicator."""

from __future__ import annotations

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


LINK_DECISIONS_NAME = "tradecopy_replicator_link_decisions_total"
_LINK_DECISIONS_HEADER = (
    f"# HELP {LINK_DECISIONS_NAME} Copy decisions published, per link: one series per link, "
    f"follower and outcome\n# TYPE {LINK_DECISIONS_NAME} counter\n"
).encode()
#: Series this module exposes as text beside the registry (``LinkDecisionCounters``).
TEXT_SERIES = frozenset({LINK_DECISIONS_NAME})
_OUTCOMES = tuple(DecisionOutcome)
_OUTCOME_INDEX = {outcome: i for i, outcome in enumerate(_OUTCOMES)}


def _label_value(text: str) -> str:
    """Escaped as the exposition format wants a label value."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _LinkSeries:
    __slots__ = ("counts", "follower", "link_id", "text")

    def __init__(self, link_id: str, follower: str) -> None:
        self.link_id = link_id
        self.follower = follower
        self.counts = [0] * len(_OUTCOMES)
        self.text = b""
        self.render()

    def render(self) -> None:
        labels = f'{{link="{_label_value(self.link_id)}",follower="{_label_value(self.follower)}"'
        self.text = "".join(
            f'{LINK_DECISIONS_NAME}{labels},outcome="{outcome.value}"}} {count}\n'
            for outcome, count in zip(_OUTCOMES, self.counts, strict=True)
        ).encode()


class LinkDecisionCounters:
    """The per-link decision counters (``tradecopy_replicator_link_decisions_total``), kept
    as exposition text that ``/metrics`` appends to the registry's.

    They are 4 series per link: 40,000 at 10,000 links. As ``prometheus_client`` children they
    cost ≈ 35 µs each to make and rendered at ≈ 0.9 s per scrape, all of it on the event loop
    that fans out. Here a link's four lines are rendered when the link becomes known and when
    one of its counts moves (decisions are few); a scrape joins the blocks, and the joined
    text is kept until the next change. Every known link has its series at 0 from the start,
    and a gone link's go with it, so the cardinality is the number of live links × 4.
    """

    __slots__ = ("_by_link", "_text")

    def __init__(self) -> None:
        self._by_link: dict[str, _LinkSeries] = {}
        self._text: bytes | None = None

    def count(self, link_id: str, follower: str, outcome: DecisionOutcome) -> None:
        """One more decision of ``outcome`` on the link."""
        series = self._series(link_id, follower)
        series.counts[_OUTCOME_INDEX[outcome]] += 1
        series.render()
        self._text = None

    def sync(self, links: typing.Iterable[tuple[str, str]]) -> None:
        """Exactly these (link id, follower) pairs have series; a link that moved to another
        follower starts again at 0."""
        wanted = dict(links)
        gone = [k for k in self._by_link if k not in wanted]
        for link_id in gone:
            del self._by_link[link_id]
        for link_id, follower in wanted.items():
            self._series(link_id, follower)
        if gone:
            self._text = None

    def clear(self) -> None:
        self.sync(())

    def exposition(self) -> bytes:
        """The family in the text exposition format (nothing when no link is known)."""
        if self._text is None:
            blocks = [series.text for series in self._by_link.values()]
            self._text = _LINK_DECISIONS_HEADER + b"".join(blocks) if blocks else b""
        return self._text

    def _series(self, link_id: str, follower: str) -> _LinkSeries:
        series = self._by_link.get(link_id)
        if series is None or series.follower != follower:
            series = self._by_link[link_id] = _LinkSeries(link_id, follower)
            self._text = None
        return series


STAGE_DECODE = STAGE_LATENCY.labels("decode")
STAGE_RULES = STAGE_LATENCY.labels("rules")
STAGE_PUBLISH = STAGE_LATENCY.labels("publish")
STAGE_TOTAL = STAGE_LATENCY.labels("total")
