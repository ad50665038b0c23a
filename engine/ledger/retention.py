"""Retention: follower orders and copy decisions are kept for three months (configurable).

Master events, execution reports, account states and rejections are the account's history
(positions, P&L, statistics, billing read them) and are kept. ``prune`` deletes in chunks of
``chunk`` rows, each chunk its own transaction, skipping rows another pruner holds: running it
twice, or twice at once, deletes each row once and never blocks a ledger writer for long.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import asyncpg
import structlog

from engine.ledger import store
from engine.ledger.records import Kind

log = structlog.get_logger("tradecopy.ledger.retention")

ORDERS_MONTHS = 3
DECISIONS_MONTHS = 3


def months_before(now_ns: int, months: int) -> int:
    """``now_ns`` moved back ``months`` calendar months (UTC; the 31st becomes the last day
    of a shorter month), in UTC nanoseconds."""
    now = datetime.fromtimestamp(now_ns // 1_000_000_000, UTC)
    index = now.year * 12 + (now.month - 1) - months
    year, month = divmod(index, 12)
    day = min(now.day, calendar.monthrange(year, month + 1)[1])
    then = now.replace(year=year, month=month + 1, day=day)
    return int(then.timestamp()) * 1_000_000_000 + now_ns % 1_000_000_000


async def prune(
    database_url: str,
    now_ns: int,
    *,
    orders_months: int = ORDERS_MONTHS,
    decisions_months: int = DECISIONS_MONTHS,
    chunk: int = 5_000,
) -> dict[str, int]:
    """Delete follower orders and decisions older than their retention; rows deleted per
    kind by this run."""
    if min(orders_months, decisions_months) < 1 or chunk < 1:
        raise ValueError("retention is at least one month, chunks at least one row")
    cutoffs = {
        Kind.FOLLOWER_ORDER: months_before(now_ns, orders_months),
        Kind.DECISION: months_before(now_ns, decisions_months),
    }
    deleted: dict[str, int] = {}
    conn = await asyncpg.connect(database_url)
    try:
        for kind, before_ns in cutoffs.items():
            total = 0
            while True:
                async with conn.transaction():
                    n = await store.delete_older_than(conn, kind, before_ns, chunk)
                total += n
                if n < chunk:
                    break
            deleted[kind.value] = total
            log.info("ledger_pruned", kind=kind.value, before_ns=before_ns, rows=total)
    finally:
        await conn.close()
    return deleted
