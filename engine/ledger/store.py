"""Every SQL statement of the ledger's tables (parameterised, asyncpg).

Tables and who owns them (see README.md): this module owns ``account_tenants`` and every
``ledger_*`` table; other services read them through ``account_facts`` or views, never by
writing. A batch of every kind is stored by one statement (an ``INSERT`` per kind fed by
``unnest`` of its column arrays: one round trip, one transaction) that fills the tenant from
``account_tenants``, skips rows whose key is already stored (``ON CONFLICT DO NOTHING``:
redelivery and concurrent instances are harmless), and inserts in key order (two instances
writing overlapping batches lock rows in the same order, so they wait rather than deadlock).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from engine.ledger.records import DECODERS, Kind, Row
from engine.runtime.postgres import apply_migrations, load_migrations

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
COMPONENT = "ledger"

TABLES: dict[Kind, str] = {
    Kind.MASTER_EVENT: "ledger_master_events",
    Kind.FOLLOWER_ORDER: "ledger_follower_orders",
    Kind.EXECUTION_REPORT: "ledger_execution_reports",
    Kind.DECISION: "ledger_decisions",
    Kind.REJECTION: "ledger_rejections",
    Kind.ACCOUNT_STATE: "ledger_account_states",
}


#: The columns of each kind's rows (``engine.ledger.records``), in order; ``tenant`` is added
#: on insert.
ROW_COLUMNS: dict[Kind, tuple[str, ...]] = {
    Kind.MASTER_EVENT: ("event_id", "master", "type", "symbol", "position_id", "ts_ns",
                        "stream_seq", "payload"),
    Kind.FOLLOWER_ORDER: ("order_id", "follower", "master", "link_id", "master_event_id", "type",
                          "symbol", "ts_ns", "stream_seq", "batch_id", "payload"),
    Kind.EXECUTION_REPORT: ("order_id", "status", "follower", "link_id", "symbol", "position_id",
                            "ts_ns", "stream_seq", "payload"),
    Kind.DECISION: ("decision_id", "link_id", "master", "follower", "outcome", "rule",
                    "master_event_id", "ts_ns", "stream_seq", "payload"),
    Kind.REJECTION: ("rejection_id", "master", "reason", "event_id", "ts_ns", "stream_seq",
                     "payload"),
    Kind.ACCOUNT_STATE: ("account", "ts_ns", "currency", "balance_minor", "equity_minor",
                         "stream_seq", "payload"),
}  # fmt: skip


async def migrate(database_url: str) -> list[str]:
    """Apply the ledger's missing migrations (``migrations/NNNN_*.sql``); the versions applied
    now. ``tradecopy db migrate`` calls this."""
    return await apply_migrations(
        database_url, load_migrations(MIGRATIONS_DIR), component=COMPONENT
    )


# ------------------------------------------------------------------------ ingest

_INSERT: dict[Kind, str] = {
    Kind.MASTER_EVENT: """
INSERT INTO ledger_master_events
    (event_id, tenant, master, type, symbol, position_id, ts_ns, stream_seq, payload)
SELECT r.event_id, coalesce(t.tenant, $1), r.master, r.type, r.symbol, r.position_id,
       r.ts_ns, r.stream_seq, r.payload
FROM {rows}
LEFT JOIN account_tenants t ON t.account = r.master
ORDER BY r.event_id
ON CONFLICT (event_id) DO NOTHING""",
    Kind.FOLLOWER_ORDER: """
INSERT INTO ledger_follower_orders
    (order_id, tenant, follower, master, link_id, master_event_id, type, symbol, ts_ns,
     stream_seq, batch_id, payload)
SELECT r.order_id, coalesce(t.tenant, $1), r.follower, r.master, r.link_id,
       r.master_event_id, r.type, r.symbol, r.ts_ns, r.stream_seq, r.batch_id, r.payload
FROM {rows}
LEFT JOIN account_tenants t ON t.account = r.follower
ORDER BY r.order_id
ON CONFLICT (order_id) DO NOTHING""",
    Kind.EXECUTION_REPORT: """
INSERT INTO ledger_execution_reports
    (order_id, status, tenant, follower, link_id, symbol, position_id, ts_ns, stream_seq,
     payload)
SELECT r.order_id, r.status, coalesce(t.tenant, $1), r.follower, r.link_id, r.symbol,
       r.position_id, r.ts_ns, r.stream_seq, r.payload
FROM {rows}
LEFT JOIN account_tenants t ON t.account = r.follower
ORDER BY r.order_id, r.status
ON CONFLICT (order_id, status) DO NOTHING""",
    Kind.DECISION: """
INSERT INTO ledger_decisions
    (decision_id, tenant, link_id, master, follower, outcome, rule, master_event_id, ts_ns,
     stream_seq, payload)
SELECT r.decision_id, coalesce(t.tenant, $1), r.link_id, r.master, r.follower, r.outcome,
       r.rule, r.master_event_id, r.ts_ns, r.stream_seq, r.payload
FROM {rows}
LEFT JOIN account_tenants t ON t.account = r.follower
ORDER BY r.decision_id
ON CONFLICT (decision_id) DO NOTHING""",
    Kind.REJECTION: """
INSERT INTO ledger_rejections
    (rejection_id, tenant, master, reason, event_id, ts_ns, stream_seq, payload)
SELECT r.rejection_id, coalesce(t.tenant, $1), r.master, r.reason, r.event_id, r.ts_ns,
       r.stream_seq, r.payload
FROM {rows}
LEFT JOIN account_tenants t ON t.account = r.master
ORDER BY r.rejection_id
ON CONFLICT (rejection_id) DO NOTHING""",
    Kind.ACCOUNT_STATE: """
INSERT INTO ledger_account_states
    (account, ts_ns, tenant, currency, balance_minor, equity_minor, stream_seq, payload)
SELECT r.account, r.ts_ns, coalesce(t.tenant, $1), r.currency, r.balance_minor,
       r.equity_minor, r.stream_seq, r.payload
FROM {rows}
LEFT JOIN account_tenants t ON t.account = r.account
ORDER BY r.account, r.ts_ns
ON CONFLICT (account, ts_ns) DO NOTHING""",
}


_BIGINT_COLUMNS = frozenset({"ts_ns", "stream_seq", "balance_minor", "equity_minor"})


def _array_type(column: str) -> str:
    if column in _BIGINT_COLUMNS:
        return "bigint[]"
    return "bytea[]" if column == "payload" else "text[]"


@functools.lru_cache(maxsize=64)
def _batch_statement(kinds: tuple[Kind, ...]) -> str:
    """One statement storing a batch of these kinds: an ``INSERT`` per kind fed by ``unnest``
    of its columns (``$2``…; ``$1`` is the default tenant), each counting its new rows."""
    inserts = []
    number = 2
    for i, kind in enumerate(kinds):
        columns = ROW_COLUMNS[kind]
        params = ", ".join(
            f"${number + j}::{_array_type(column)}" for j, column in enumerate(columns)
        )
        number += len(columns)
        rows = f"unnest({params}) AS r ({', '.join(columns)})"
        inserts.append(f"k{i} AS ({_INSERT[kind].format(rows=rows)}\nRETURNING 1)")
    counts = ", ".join(f"(SELECT count(*) FROM k{i})" for i in range(len(kinds)))
    return f"WITH {', '.join(inserts)}\nSELECT {counts}"


async def insert_batch(
    conn: Any, rows: Mapping[Kind, list[Row]], default_tenant: str
) -> dict[Kind, int]:
    """Store one batch of any kinds (rows from ``engine.ledger.records``) in one statement,
    hence one transaction and one round trip; the number of rows that were new, per kind."""
    kinds = tuple(kind for kind in Kind if rows.get(kind))
    if not kinds:
        return {}
    args: list[Any] = [default_tenant]
    for kind in kinds:
        args += [list(column) for column in zip(*rows[kind], strict=True)]
    counts = await conn.fetchrow(_batch_statement(kinds), *args)
    return {kind: int(counts[i]) for i, kind in enumerate(kinds)}


async def insert_rows(conn: Any, kind: Kind, rows: list[Row], default_tenant: str) -> int:
    """Store rows of one kind; the number that were new."""
    return (await insert_batch(conn, {kind: rows}, default_tenant)).get(kind, 0)


# ------------------------------------------------------------------------ tenants


async def set_account_tenant(conn: Any, account: str, tenant: str) -> None:
    """Put ``account`` under ``tenant`` from now on (rows already stored keep theirs)."""
    await conn.execute(
        "INSERT INTO account_tenants (account, tenant) VALUES ($1, $2)"
        " ON CONFLICT (account) DO UPDATE SET tenant = excluded.tenant, updated_at = now()",
        account,
        tenant,
    )


async def account_tenant(conn: Any, account: str, default_tenant: str) -> str:
    tenant: str | None = await conn.fetchval(
        "SELECT tenant FROM account_tenants WHERE account = $1", account
    )
    return default_tenant if tenant is None else tenant


# ------------------------------------------------------------------------ reads

_ACCOUNT_FACTS = """
SELECT kind, ts_ns, stream_seq, payload FROM (
    SELECT 'master_event' AS kind, ts_ns, stream_seq, payload
      FROM ledger_master_events WHERE master = $1
    UNION ALL
    SELECT 'follower_order', ts_ns, stream_seq, payload
      FROM ledger_follower_orders WHERE follower = $1
    UNION ALL
    SELECT 'execution_report', ts_ns, stream_seq, payload
      FROM ledger_execution_reports WHERE follower = $1
    UNION ALL
    SELECT 'decision', ts_ns, stream_seq, payload
      FROM ledger_decisions WHERE follower = $1
    UNION ALL
    SELECT 'account_state', ts_ns, stream_seq, payload
      FROM ledger_account_states WHERE account = $1
) facts
ORDER BY ts_ns, stream_seq"""


async def account_facts(conn: Any, account: str) -> list[object]:
    """Every stored master event, follower order, execution report, copy decision and account
    state of one account, decoded into the contract's types, in time order (``ts_ns``, then stream
    sequence). The positions and statistics folds read exactly this list."""
    rows = await conn.fetch(_ACCOUNT_FACTS, account)
    return [DECODERS[Kind(row["kind"])].decode(row["payload"]) for row in rows]


async def stored_counts(conn: Any, since: datetime | None = None) -> dict[Kind, int]:
    """Rows per kind, all or those stored since ``since`` (the demo's summary, tests)."""
    counts = {}
    for kind, table in TABLES.items():
        if since is None:
            n = await conn.fetchval(f"SELECT count(*) FROM {table}")
        else:
            n = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE stored_at >= $1", since)
        counts[kind] = int(n)
    return counts


# ------------------------------------------------------------------------ retention

#: The tables retention prunes, and the column their age is read from.
PRUNABLE = {Kind.FOLLOWER_ORDER: TABLES[Kind.FOLLOWER_ORDER], Kind.DECISION: TABLES[Kind.DECISION]}


async def delete_older_than(conn: Any, kind: Kind, before_ns: int, limit: int) -> int:
    """Delete up to ``limit`` rows of ``kind`` dated before ``before_ns``; rows another
    pruner holds are skipped (it deletes them), so concurrent runs never wait on each other."""
    table = PRUNABLE[kind]
    status: str = await conn.execute(
        f"DELETE FROM {table} WHERE ctid IN ("
        f" SELECT ctid FROM {table} WHERE ts_ns < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        before_ns,
        limit,
    )
    return int(status.rsplit(" ", 1)[1])


async def connect(database_url: str) -> Any:
    """One connection (jobs, tests); the service keeps a pool."""
    return await asyncpg.connect(database_url)
