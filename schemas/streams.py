"""JetStream stream and KV bucket definitions: part of the contract, created idempotently."""

from __future__ import annotations

from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)

from schemas import subjects

DEFAULT_PARTITIONS = 16
DUPLICATE_WINDOW_S = 120.0

MASTER_EVENTS_STREAM = "TC_MASTER_EVENTS"
FOLLOWER_ORDERS_STREAM = "TC_FOLLOWER_ORDERS"
EXECUTION_REPORTS_STREAM = "TC_EXECUTION_REPORTS"
DECISIONS_STREAM = "TC_DECISIONS"
REJECTIONS_STREAM = "TC_REJECTIONS"
SIGNALS_STREAM = "TC_SIGNALS"
#: A worker that takes over a candle whose first runner died after publishing publishes the
#: same Nats-Msg-Id again, up to a claim lease plus a run later: an hour covers any lease.
SIGNALS_DUPLICATE_WINDOW_S = 3_600.0

DAY_S = 86_400.0


def replicator_consumer(partition: int) -> str:
    """The durable consumer replicators share on ``partition`` of the master-event stream.

    Part of the contract so that operators, tools and the local stack can watch it."""
    return f"replicator-p{partition}"


#: The durable pull consumers every ledger instance shares, one per stream it stores (the
#: account states come from the accounts bucket's stream). Part of the contract so that the
#: ledger's NATS role can be granted exactly these and operators can watch their lag.
LEDGER_CONSUMERS: tuple[tuple[str, str], ...] = (
    (MASTER_EVENTS_STREAM, "ledger-master-events"),
    (FOLLOWER_ORDERS_STREAM, "ledger-follower-orders"),
    (EXECUTION_REPORTS_STREAM, "ledger-execution-reports"),
    (DECISIONS_STREAM, "ledger-decisions"),
    (REJECTIONS_STREAM, "ledger-rejections"),
    (f"KV_{subjects.KV_ACCOUNTS}", "ledger-account-states"),
)


def master_events_stream(
    partitions: int = DEFAULT_PARTITIONS, storage: StorageType = StorageType.FILE
) -> StreamConfig:
    """Master events, partitioned by master account.

    The stream rewrites ``tc.v1.master.<master>.events`` to ``tc.v1.mp.<p>.<master>`` with
    ``p = partition(N, master)``, a stable hash; one consumer per partition with one message
    in flight keeps every master's events in order across any number of replicators.
    """
    return StreamConfig(
        name=MASTER_EVENTS_STREAM,
        subjects=[subjects.MASTER_EVENTS_IN],
        subject_transform=SubjectTransform(
            src=subjects.MASTER_EVENTS_IN,
            dest=f"{subjects.MASTER_PARTITIONED}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
        ),
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        max_age=7 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
        discard=DiscardPolicy.OLD,
    )


def follower_orders_stream(storage: StorageType = StorageType.FILE) -> StreamConfig:
    return StreamConfig(
        name=FOLLOWER_ORDERS_STREAM,
        subjects=[subjects.FOLLOWER_ORDERS, subjects.CONNECTOR_ORDERS],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        max_age=7 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def execution_reports_stream(storage: StorageType = StorageType.FILE) -> StreamConfig:
    return StreamConfig(
        name=EXECUTION_REPORTS_STREAM,
        subjects=[subjects.EXECUTION_REPORTS],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        max_age=30 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def decisions_stream(storage: StorageType = StorageType.FILE) -> StreamConfig:
    return StreamConfig(
        name=DECISIONS_STREAM,
        subjects=[subjects.DECISIONS],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        max_age=30 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def rejections_stream(storage: StorageType = StorageType.FILE) -> StreamConfig:
    """Master events the replicator refused, with the reason (``MasterEventRejected``).

    Kept as long as decisions: both answer "why was this not copied?"."""
    return StreamConfig(
        name=REJECTIONS_STREAM,
        subjects=[subjects.MASTER_REJECTIONS],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        max_age=30 * DAY_S,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def signals_stream(storage: StorageType = StorageType.FILE) -> StreamConfig:
    """Strategy runs: each closed candle's signal and each failed run, one message id per
    (strategy version, symbol, timeframe, candle), so a candle never signals twice."""
    return StreamConfig(
        name=SIGNALS_STREAM,
        subjects=[subjects.STRATEGY_RUNS],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        max_age=30 * DAY_S,
        duplicate_window=SIGNALS_DUPLICATE_WINDOW_S,
    )


def all_streams(
    partitions: int = DEFAULT_PARTITIONS, storage: StorageType = StorageType.FILE
) -> list[StreamConfig]:
    return [
        master_events_stream(partitions, storage),
        follower_orders_stream(storage),
        execution_reports_stream(storage),
        decisions_stream(storage),
        rejections_stream(storage),
        signals_stream(storage),
    ]


#: KV buckets and how much history each keeps.
KV_BUCKETS: dict[str, int] = {
    subjects.KV_LINKS: 5,
    subjects.KV_ACCOUNTS: 1,
    subjects.KV_SYMBOLS: 1,
    subjects.KV_FX: 1,
    subjects.KV_CONTROL: 10,
    subjects.KV_LINK_STATE: 1,
    subjects.KV_SIGNAL_CLAIMS: 1,
    subjects.KV_SIGNAL_DEPLOYMENTS: 1,
}

#: KV buckets whose keys expire (seconds); every other bucket keeps its keys until deleted.
#: A candle's claim must outlive the signals stream's duplicate window (a takeover republishes
#: under the run's id within it) and any lease x attempts (kept inside that window by the
#: worker's configuration): a day is far past both, and claims no longer pile up forever.
KV_MAX_AGE_S: dict[str, float] = {
    subjects.KV_SIGNAL_CLAIMS: DAY_S,
}
