"""Prometheus metrics of the replicator."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from schemas.rejections import RejectionReason

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

# Every reason exists from the start: an alert on rate() then sees the first rejection too.
for _reason in RejectionReason:
    REJECTIONS.labels(_reason.value)

STAGE_DECODE = STAGE_LATENCY.labels("decode")
STAGE_RULES = STAGE_LATENCY.labels("rules")
STAGE_PUBLISH = STAGE_LATENCY.labels("publish")
STAGE_TOTAL = STAGE_LATENCY.labels("total")
