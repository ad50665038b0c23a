"""Ledger benchmark: JetStream → the ledger process → PostgreSQL, next to a raw COPY floor.

Real nats-server and PostgreSQL (``--database-url``, ``TRADECOPY_DATABASE_URL``, else the
embedded server in a temporary directory), the ledger in its own process
(``python -m engine.ledger``), a scratch database of its own, dropped afterwards.

- **Ingest**: ``--messages`` follower orders, execution reports, decisions and master events
  wait in their streams; the ledger starts and stores them: messages per second from its
  first pull request to its last acknowledgement (every acknowledgement follows a commit).
- **Lag in steady flow**: as many messages again, published at ``--rate`` per second while the
  ledger runs: message stored in JetStream → its acknowledgement seen, i.e. committed (the
  harness listens on the acknowledgement subjects, so the ledger is measured from outside;
  sampled on decisions and master events, which ride in every batch with the rest).
- **Floor**: the same rows, already decoded, written with asyncpg's ``COPY`` into tables of
  the same shape (keys and indexes), a transaction per ``--batch`` rows: the database alone.

    python -m benchmarks.ledger [--messages 20000] [--rate 20000] [--batch 1000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from engine.ledger import store
from engine.ledger.records import Kind, rows_of
from engine.ledger.service import spawn_ledger, wait_for_ledger_drained
from engine.runtime.eventloop import run_async
from engine.runtime.natsserver import free_port
from engine.runtime.postgres import start_database
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.common import Side
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.master import PositionOpened
from schemas.orders import FollowerOpen
from schemas.reports import OrderFilled
from schemas.streams import (
    DECISIONS_STREAM,
    EXECUTION_REPORTS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    MASTER_EVENTS_STREAM,
)

FOLLOWERS = 100


def workload(count: int, tag: str) -> list[tuple[Kind, str, bytes]]:
    """``count`` messages as the copy path produces them: per master event, an order and a
    report per follower, and a decision per ten followers (kind, subject, payload)."""
    out: list[tuple[Kind, str, bytes]] = []
    seq = 0
    while len(out) < count:
        now = time.time_ns()
        event = PositionOpened(
            event_id=f"{tag}-e{seq}", master="bench-m", symbol="XAUUSD", ts_ns=now,
            position_id=f"p{seq}", side=Side.BUY, volume=0.1, price=2000.0,
        )  # fmt: skip
        out.append((Kind.MASTER_EVENT, subjects.master_events(event.master), codec.encode(event)))
        for f in range(FOLLOWERS):
            follower = f"bench-f{f:03d}"
            order = FollowerOpen(
                order_id=f"{event.event_id}:l{f}", link_id=f"l{f}", follower=follower,
                master=event.master, master_event_id=event.event_id, symbol="XAUUSD", ts_ns=now,
                master_position_id=event.position_id, side=Side.BUY, volume=0.1,
            )  # fmt: skip
            report = OrderFilled(
                order_id=order.order_id, link_id=order.link_id, follower=follower, ts_ns=now,
                symbol="XAUUSD", position_id=f"fp{seq}", side=Side.BUY, volume=0.1, price=2000.1,
            )  # fmt: skip
            out.append((Kind.FOLLOWER_ORDER, subjects.follower_orders(follower),
                        codec.encode(order)))  # fmt: skip
            out.append((Kind.EXECUTION_REPORT, subjects.execution_reports(follower),
                        codec.encode(report)))  # fmt: skip
            if f % 10 == 0:
                decision = CopyDecision(
                    decision_id=f"{order.order_id}:max_lot", link_id=order.link_id,
                    master=event.master, follower=follower, outcome=DecisionOutcome.REDUCED,
                    rule=DecisionRule.MAX_LOT, message="capped", ts_ns=now,
                    master_event_id=event.event_id,
                )  # fmt: skip
                out.append((Kind.DECISION, subjects.decisions(follower, order.link_id),
                            codec.encode(decision)))  # fmt: skip
        seq += 1
    return out[:count]


class AckWatch:
    """Every acknowledgement of the ledger's consumers, as the server routes it: its arrival
    time and the acknowledged message's stream timestamp (from the ack subject)."""

    def __init__(self) -> None:
        self.lags_ns: list[int] = []
        self.first_ns = 0
        self.last_ns = 0
        self.count = 0

    async def on_ack(self, msg: Any) -> None:
        now = time.time_ns()
        tokens = msg.subject.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the
        # 12-token form with domain and account hash ahead of the stream.
        stored_ns = int(tokens[7] if len(tokens) == 9 else tokens[9])
        if not self.count:
            self.first_ns = now
        self.last_ns = now
        self.count += 1
        self.lags_ns.append(now - stored_ns)


def percentile_ms(samples_ns: list[int], q: float) -> float:
    if not samples_ns:
        return 0.0
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1e6


async def publish_all(
    nc: Any, js: Any, messages: list[tuple[Kind, str, bytes]], rate: float
) -> None:
    """Publish at ``rate`` messages per second (0: at once), then wait until the streams hold
    them all. Plain publishes, as a load generator may: the streams store them all the same,
    and the harness spends no time on publish acknowledgements the ledger does not see."""
    streams = {
        Kind.MASTER_EVENT: MASTER_EVENTS_STREAM,
        Kind.FOLLOWER_ORDER: FOLLOWER_ORDERS_STREAM,
        Kind.EXECUTION_REPORT: EXECUTION_REPORTS_STREAM,
        Kind.DECISION: DECISIONS_STREAM,
    }
    before = {name: (await js.stream_info(name)).state.messages for name in streams.values()}
    want = dict(before)
    for kind, _, _ in messages:
        want[streams[kind]] += 1
    tick_s = 0.002
    per_tick = len(messages) if rate <= 0 else max(1, round(rate * tick_s))
    start = time.perf_counter()
    for i in range(0, len(messages), per_tick):
        for _, subject, payload in messages[i : i + per_tick]:
            await nc.publish(subject, payload)
        if rate > 0:
            delay = start + (i + per_tick) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        elif i % 2_000 == 0:
            await nc.flush()  # keep the server's inbound buffer from overflowing
    await nc.flush()
    deadline = time.monotonic() + 60
    for name, count in want.items():
        while (await js.stream_info(name)).state.messages < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not store every message published")
            await asyncio.sleep(0.01)


async def wait_acked(watch: AckWatch, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while watch.count < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ledger acknowledged {watch.count} of {count} in {timeout:g}s")
        await asyncio.sleep(0.01)


_SAMPLED = (Kind.DECISION, Kind.MASTER_EVENT)


async def wait_drained(js: Any, timeout: float) -> None:
    if not await wait_for_ledger_drained(js, timeout):
        raise RuntimeError(f"messages still with the ledger after {timeout:g}s")


async def copy_floor(
    database_url: str, messages: list[tuple[Kind, str, bytes]], batch: int
) -> float:
    """Messages per second of raw ``COPY`` of the same rows into same-shaped tables."""
    rows_by_kind: dict[Kind, list[tuple[Any, ...]]] = {}
    for seq, (kind, subject, payload) in enumerate(messages, 1):
        for row in rows_of(kind, subject, payload, seq):
            rows_by_kind.setdefault(kind, []).append(("floor", *row))
    conn = await asyncpg.connect(database_url)
    try:
        for kind in rows_by_kind:
            table = store.TABLES[kind]
            await conn.execute(f"CREATE TABLE floor_{table} (LIKE {table} INCLUDING ALL)")
        # Interleaved as the streams deliver them, a transaction per batch of each kind.
        started = time.perf_counter()
        for offset in range(0, max(len(r) for r in rows_by_kind.values()), batch):
            for kind, rows in rows_by_kind.items():
                chunk = rows[offset : offset + batch]
                if chunk:
                    async with conn.transaction():
                        await conn.copy_records_to_table(
                            f"floor_{store.TABLES[kind]}", records=chunk,
                            columns=["tenant", *store.ROW_COLUMNS[kind]],
                        )  # fmt: skip
        return len(messages) / (time.perf_counter() - started)
    finally:
        await conn.close()


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def run_ledger_bench(
    messages: int = 20_000,
    rate: float = 20_000.0,
    batch: int = 1_000,
    database_url: str | None = None,
    writers: int = 2,
) -> dict[str, Any]:
    """Ingest rate and steady-flow lag of the ledger, and the COPY floor, in one run."""
    with tempfile.TemporaryDirectory(prefix="tc-bench-ledger-") as tmp:
        server_url, embedded = await start_database(database_url, root=Path(tmp) / "postgres")
        scratch = f"tc_bench_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(server_url)
        await admin.execute(f'CREATE DATABASE "{scratch}"')
        await admin.close()
        db_url = _with_database(server_url, scratch)
        stack = LocalStack(Path(tmp) / "nats", partitions=4, name="bench-ledger", secure=False)
        ledger: subprocess.Popen[bytes] | None = None
        try:
            await stack.start()
            await store.migrate(db_url)
            js = stack.nc.jetstream(publish_async_max_pending=65_536)
            # Ingest: a backlog in the streams, then the ledger; every acknowledgement watched
            # (the harness has nothing else to do meanwhile).
            backlog = workload(messages, "a")
            await publish_all(stack.nc, js, backlog, 0)
            # From the ledger's first pull request (seen on its subject) to its last ack.
            every = AckWatch()
            all_acks = await stack.nc.subscribe("$JS.ACK.>", cb=every.on_ack)
            pulls: list[int] = []

            async def on_pull(msg: Any) -> None:
                pulls.append(time.time_ns())

            pull_watch = await stack.nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=on_pull)
            debug = bool(os.environ.get("TC_BENCH_DEBUG"))
            metrics_port = free_port()
            ledger = spawn_ledger(
                stack.url, db_url, instance="bench", metrics_port=metrics_port,
                log_level="debug" if debug else "error", quiet=not debug,
                extra_args=["--batch-max", str(batch), "--writers", str(writers)],
            )  # fmt: skip
            await wait_acked(every, messages, 120)
            ingest = messages / max((every.last_ns - min(pulls)) / 1e9, 1e-9)
            await all_acks.unsubscribe()
            await pull_watch.unsubscribe()
            before = await ledger_metrics(metrics_port)

            # Steady flow: the ledger caught up and running, messages at ``rate``.
            # Sampled: the acknowledgements of decisions and master events (every batch of the
            # ledger mixes all kinds), so the harness's own load stays small while it publishes.
            await asyncio.sleep(0.5)
            steady_flow = workload(messages, "b")
            sampled = [m for m in steady_flow if m[0] in _SAMPLED]
            # The harness's own heap (two workloads) out of the cyclic collector's way: its
            # pauses would delay the acknowledgements it times and be counted as lag.
            gc.collect()
            gc.freeze()
            wal_before = await _wal_position(db_url)
            watch = AckWatch()
            subs = [
                await stack.nc.subscribe(f"$JS.ACK.{stream}.>", cb=watch.on_ack)
                for stream in (DECISIONS_STREAM, MASTER_EVENTS_STREAM)
            ]
            await publish_all(stack.nc, js, steady_flow, rate)
            await wait_acked(watch, len(sampled), 120)
            await wait_drained(js, 120)
            lags = watch.lags_ns
            gc.unfreeze()
            after = await ledger_metrics(metrics_port)
            wal_after = await _wal_position(db_url)
            steady = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
            for sub in subs:
                await sub.unsubscribe()
            stored = await _stored_rows(db_url)
            if stored != 2 * messages:
                raise RuntimeError(f"the ledger stored {stored} rows of {2 * messages}")

            floor = await copy_floor(db_url, backlog, batch)
            return {
                "messages": messages,
                "msgs_per_s": round(ingest),
                "lag_p50_ms": round(percentile_ms(lags, 0.50), 2),
                "lag_p99_ms": round(percentile_ms(lags, 0.99), 2),
                "floor_msgs_per_s": round(floor),
                "rate": rate,
                "lag_max_ms": round(percentile_ms(lags, 1.0), 2),
                "steady_commits": round(steady.get("commits", 0)),
                "steady_commit_ms": round(
                    1e3 * steady.get("commit_s", 0) / max(steady.get("commits", 0), 1), 2
                ),
                "steady_wal_mb": round((wal_after[0] - wal_before[0]) / 2**20, 1),
                "steady_wal_segments": wal_after[0] // wal_after[1]
                - wal_before[0] // wal_before[1],
            }
        finally:
            if ledger is not None:
                ledger.terminate()
                try:
                    ledger.wait(10)
                except subprocess.TimeoutExpired:
                    ledger.kill()
                    ledger.wait()
            await stack.stop()
            admin = await asyncpg.connect(server_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            await admin.close()
            if embedded is not None:
                await embedded.stop()


async def ledger_metrics(port: int) -> dict[str, float]:
    """Commits and their total time, from the ledger's own /metrics (one commit is observed
    once per kind it wrote: the master-event kind is left out so it counts each once)."""
    import aiohttp

    out = {"commits": 0.0, "commit_s": 0.0}
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url, timeout=5) as response:
        text = await response.text()
    for line in text.splitlines():
        if (
            not line.startswith("tradecopy_ledger_commit_seconds_")
            or "execution_report" not in line
        ):
            continue
        name, value = line.split(" ")
        if name.startswith("tradecopy_ledger_commit_seconds_count"):
            out["commits"] += float(value)
        elif name.startswith("tradecopy_ledger_commit_seconds_sum"):
            out["commit_s"] += float(value)
    return out


async def _wal_position(database_url: str) -> tuple[int, int]:
    """The server's WAL insert position in bytes, and its WAL segment size: how much WAL a
    phase wrote, and into how many segments it crossed (each new segment is a file the
    server creates, or recycles, in the commit path)."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint,"
            " pg_size_bytes(current_setting('wal_segment_size'))"
        )
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


async def _stored_rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return sum((await store.stored_counts(conn)).values())
    finally:
        await conn.close()


def render(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "ledger: JetStream → ledger process → PostgreSQL (acknowledged after commit)",
            f"  ingest of a {result['messages']:,}-message backlog   "
            f"{result['msgs_per_s']:>10,} msgs/s",
            f"  raw COPY of the same rows (floor)       {result['floor_msgs_per_s']:>10,} msgs/s",
            f"  steady flow at {result['rate']:,.0f} msgs/s: lag p50 {result['lag_p50_ms']:.2f} ms,"
            f" p99 {result['lag_p99_ms']:.2f} ms, max {result['lag_max_ms']:.2f} ms",
            f"  steady flow: {result['steady_commits']} commits with execution reports, "
            f"{result['steady_commit_ms']:.2f} ms each (one INSERT statement and its commit); "
            f"{result['steady_wal_mb']:.1f} MB of WAL, {result['steady_wal_segments']} new "
            "WAL segment(s)",
            "  budget: >= 20,000 msgs/s, lag p99 <= 50 ms",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--rate", type=float, default=20_000.0, help="messages per second in the steady-flow phase"
    )
    parser.add_argument("--batch", type=int, default=1_000, help="most messages per commit")
    parser.add_argument("--writers", type=int, default=2, help="the ledger's batches in flight")
    parser.add_argument(
        "--database-url",
        default=None,
        help="a server to create a scratch database on (default: "
        "TRADECOPY_DATABASE_URL, else embedded PostgreSQL)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)  # fmt: skip
    if args.messages < 1 or args.rate <= 0 or args.batch < 1:
        parser.error("--messages, --rate and --batch must be positive")
    result = run_async(
        run_ledger_bench(args.messages, args.rate, args.batch, args.database_url, args.writers)
    )
    print(render(result))
    if args.json:
        keys = ("messages", "msgs_per_s", "lag_p50_ms", "lag_p99_ms", "floor_msgs_per_s")
        print(json.dumps({key: result[key] for key in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
