"""Prometheus metrics of the ledger."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from engine.ledger.records import DROP_REASONS, Kind

_SECONDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

MESSAGES = Counter(
    "tradecopy_ledger_messages_total", "Messages committed and acknowledged", ["kind"]
)
ROWS_STORED = Counter("tradecopy_ledger_rows_stored_total", "Rows inserted", ["kind"])
DUPLICATES = Counter(
    "tradecopy_ledger_duplicates_ignored_total",
    "Rows already stored (redelivery, another instance, republished ids), left as they were",
    ["kind"],
)
BAD_MESSAGES = Counter(
    "tradecopy_ledger_bad_messages_total", "Messages that cannot be stored", ["kind", "reason"]
)
WRITE_FAILURES = Counter(
    "tradecopy_ledger_write_failures_total",
    "Batch commits that failed (and were retried)",
    ["kind"],
)
BATCH_SIZE = Histogram(
    "tradecopy_ledger_batch_messages",
    "Messages per committed batch",
    ["kind"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000),
)
COMMIT_LATENCY = Histogram(
    "tradecopy_ledger_commit_seconds",
    "Time from a batch's first statement to its commit",
    ["kind"],
    buckets=_SECONDS,
)
LAG = Histogram(
    "tradecopy_ledger_lag_seconds",
    "Committed minus the own timestamp (ts_ns) of the oldest message of each batch",
    ["kind"],
    buckets=_SECONDS,
)

CONSUMER_BACKLOG = Gauge(
    "tradecopy_ledger_consumer_backlog",
    "Messages of the kind's shared consumer not yet acknowledged (pending and in flight), "
    "as last polled",
    ["kind"],
)
STALL = Gauge(
    "tradecopy_ledger_stall_seconds",
    "Seconds the kind's shared consumer has had a backlog without its acknowledgement floor "
    "moving (0 while it moves)",
    ["kind"],
)
DATABASE_UP = Gauge("tradecopy_ledger_database_up", "1 while PostgreSQL answers the ledger")


def initialise() -> None:
    """A series at zero for every label value there is (every kind, every drop reason), so
    ``rate()`` and ``increase()`` see the first event and a dashboard shows zeros, not gaps."""
    for kind in Kind:
        for metric in (MESSAGES, ROWS_STORED, DUPLICATES, WRITE_FAILURES, BATCH_SIZE,
                       COMMIT_LATENCY, LAG, CONSUMER_BACKLOG, STALL):  # fmt: skip
            metric.labels(kind.value)
        for reason in DROP_REASONS:
            BAD_MESSAGES.labels(kind.value, reason)
    DATABASE_UP.set(1)


initialise()
