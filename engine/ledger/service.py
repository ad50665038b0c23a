"""The ledger service: JetStream in, PostgreSQL out, acknowledged only after commit.

One durable pull consumer per stream (``ledger-<kind>``), shared by every ledger instance.
Messages stream in through pull requests kept open; each writer takes what has arrived, up
to ``batch_max`` messages of each stream, writes it in one statement
(one transaction, one commit, one WAL flush, for all kinds) on its own connection, and
acknowledges those messages once the transaction has committed. Several writers run at once,
so one batch is inserted while another's commit waits for its fsync.

An instance killed at any moment leaves its batch unacknowledged; JetStream delivers it again
(to any instance) after ``ack_wait`` and the unique keys skip what was already committed.
Nothing is lost, nothing is doubled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from engine.ledger import metrics, store
from engine.ledger.config import LedgerConfig
from engine.ledger.records import TS_INDEX, BadMessage, Kind, Row, rows_of
from engine.runtime.http import ProgressWatch
from engine.runtime.natsconn import connect
from engine.runtime.postgres import ENV_DATABASE_URL
from schemas.streams import LEDGER_CONSUMERS

log = structlog.get_logger("tradecopy.ledger")

_STATUS = "Status"
#: How often an idle writer looks at its pull requests (renews the expired ones).
_IDLE_CHECK_S = 0.25

#: Failures a later attempt may not see again: the connection, the server, lock order.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresConnectionError,
)


@dataclass(frozen=True, slots=True)
class Source:
    """A stream the ledger stores, and the durable consumer all instances share on it."""

    kind: Kind
    stream: str
    durable: str


_KINDS = (Kind.MASTER_EVENT, Kind.FOLLOWER_ORDER, Kind.EXECUTION_REPORT, Kind.DECISION,
          Kind.REJECTION, Kind.ACCOUNT_STATE)  # fmt: skip
#: The streams in the order of the contract's LEDGER_CONSUMERS, each with its kind of row.
SOURCES = tuple(
    Source(kind, stream, durable)
    for kind, (stream, durable) in zip(_KINDS, LEDGER_CONSUMERS, strict=True)
)


class Ledger:
    def __init__(self, config: LedgerConfig, database_url: str) -> None:
        self.config = config
        self.database_url = database_url
        self.nc: Any = None
        self.js: Any = None
        self.pool: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._arrived = asyncio.Event()
        self._pullers: list[_Puller] = []
        self._progress = {source.kind: ProgressWatch() for source in SOURCES}
        self._database_ok = True
        self.messages_stored = 0

    async def start(self) -> None:
        cfg = self.config
        # One connection per writer, and one spare for retries while another reconnects.
        self.pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=cfg.writers + 1
        )
        self.nc = await connect(cfg.nats_url, f"tradecopy-ledger-{cfg.instance}")
        self.js = self.nc.jetstream()
        for source in SOURCES:
            self._pullers.append(await self._subscribe(source))
        for _ in range(cfg.writers):
            self._tasks.append(asyncio.create_task(self._write_loop()))
        self._tasks.append(asyncio.create_task(self._watch()))
        for source in SOURCES:
            metrics.STALL.labels(source.kind.value).set_function(
                lambda kind=source.kind: self.stall_s(kind)
            )
        log.info("ledger_started", instance=cfg.instance, nats=cfg.nats_url)

    async def stop(self) -> None:
        self._stopping.set()
        for source in SOURCES:
            metrics.STALL.labels(source.kind.value).set_function(lambda: 0.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for puller in self._pullers:
            # Delivered, never written: straight back to JetStream for another instance.
            with contextlib.suppress(Exception):
                await puller.give_back()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)  # the last acknowledgements
            await self.nc.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
        log.info("ledger_stopped", instance=self.config.instance)

    def stall_s(self, kind: Kind) -> float:
        """Seconds the kind's shared consumer has had messages pending or unacknowledged
        without its acknowledgement floor moving (as last polled); 0 while it moves."""
        return self._progress[kind].stalled_for()

    def health(self) -> dict[str, object]:
        """Connected to NATS and PostgreSQL, writers running, every consumer moving; a
        reason for each that is not (``/healthz`` answers 503 with them)."""
        connected = bool(self.nc is not None and self.nc.is_connected)
        running = bool(self._tasks) and not any(task.done() for task in self._tasks)
        stalled = [
            source.kind.value
            for source in SOURCES
            if self.stall_s(source.kind) >= self.config.stall_after_s
        ]
        reasons = []
        if not connected:
            reasons.append("NATS is not connected")
        if not self._database_ok:
            reasons.append("PostgreSQL does not answer")
        if not running:
            reasons.append("a writer has stopped")
        if stalled:
            reasons.append(f"consumers of {stalled} have had messages pending without progress "
                           f"for {self.config.stall_after_s:g} s or more")  # fmt: skip
        return {
            "ok": not reasons,
            "reason": "; ".join(reasons),
            "instance": self.config.instance,
            "nats_connected": connected,
            "database_ok": self._database_ok,
            "stalled_consumers": stalled,
            "messages_stored": self.messages_stored,
        }

    async def _watch(self) -> None:
        """Every ``health_poll_s``: the backlog and progress of each shared consumer, and
        whether PostgreSQL answers (an idle ledger writes nothing that would tell)."""
        cfg = self.config
        while not self._stopping.is_set():
            for source in SOURCES:
                try:
                    info = await asyncio.wait_for(
                        self.js.consumer_info(source.stream, source.durable), cfg.health_poll_s
                    )
                except Exception:
                    continue  # NATS away: health says so through nats_connected
                backlog = info.num_pending + info.num_ack_pending
                metrics.CONSUMER_BACKLOG.labels(source.kind.value).set(backlog)
                self._progress[source.kind].observe(backlog > 0, info.ack_floor.stream_seq)
            try:
                async with self.pool.acquire(timeout=cfg.health_poll_s) as conn:
                    await conn.fetchval("SELECT 1", timeout=cfg.health_poll_s)
                self._database_ok = True
            except Exception as exc:
                if self._database_ok:
                    log.warning("ledger_database_unreachable", error=repr(exc))
                self._database_ok = False
            metrics.DATABASE_UP.set(1 if self._database_ok else 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), cfg.health_poll_s)

    async def _subscribe(self, source: Source) -> _Puller:
        """The source's durable pull consumer (created by the first instance), pulled from."""
        config = ConsumerConfig(
            durable_name=source.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait_s,
            max_ack_pending=self.config.max_ack_pending,
            max_deliver=-1,
            max_waiting=512,
        )
        try:
            await self.js.consumer_info(source.stream, source.durable)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):
                # Another instance may create it first: the same config, nothing to do.
                await self.js.add_consumer(source.stream, config)
        puller = _Puller(
            self.nc, source, self.config.batch_max, self.config.pull_expires_s, self._arrived
        )
        await puller.start()
        return puller

    async def _write_loop(self) -> None:
        """Take what has arrived on every stream, store it, acknowledge it; repeat. Each writer
        holds a connection of its own while it writes."""
        while not self._stopping.is_set():
            # Cleared before taking, never after: a message that arrives once this writer has
            # looked sets it again, so no writer sleeps with work waiting.
            self._arrived.clear()
            taken: list[tuple[Kind, Any]] = []
            for puller in self._pullers:
                taken += [(puller.kind, msg) for msg in puller.take()]
            for puller in self._pullers:
                await puller.renew_if_due()
            if taken:
                try:
                    await self._settle(taken)
                except Exception as exc:
                    # NATS away mid-acknowledgement, say: whatever was not acknowledged is
                    # delivered again, and the keys skip what was stored.
                    log.error("ledger_settle_failed", messages=len(taken), error=repr(exc))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), _IDLE_CHECK_S)

    async def _settle(self, taken: list[tuple[Kind, Any]]) -> None:
        """Store one batch and acknowledge it; on failure leave it for redelivery."""
        rows: dict[Kind, list[Row]] = {}
        good: list[tuple[Kind, Any]] = []
        for kind, msg in taken:
            try:
                rows.setdefault(kind, []).extend(
                    rows_of(kind, msg.subject, msg.data, _stream_seq(msg))
                )
            except BadMessage as exc:
                metrics.BAD_MESSAGES.labels(kind.value, exc.reason).inc()
                log.error("ledger_bad_message", kind=kind.value, subject=msg.subject,
                          stream_seq=_stream_seq(msg), error=str(exc))  # fmt: skip
                await msg.term()
                continue
            good.append((kind, msg))
        if not good:
            return
        try:
            inserted = await self._write(rows, good)
        except Exception as exc:
            for kind in rows:
                metrics.WRITE_FAILURES.labels(kind.value).inc()
            log.error("ledger_batch_failed", messages=len(good), error=repr(exc))
            for _, msg in good:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
            return
        await self._acknowledge([msg for _, msg in good])
        self._account(rows, good, inserted)

    async def _acknowledge(self, msgs: list[Any]) -> None:
        """Only ever after the batch's commit: an acknowledgement tells JetStream the
        message is safe, and it never delivers it again."""
        for msg in msgs:
            await msg.ack()

    async def _write(
        self, rows: dict[Kind, list[Row]], msgs: list[tuple[Kind, Any]]
    ) -> dict[Kind, int]:
        """Commit the batch's rows, every kind, in one transaction, retrying transient
        failures; the number of rows that were new, per kind."""
        cfg = self.config
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                async with self.pool.acquire() as conn:
                    inserted = await store.insert_batch(conn, rows, cfg.default_tenant)
                elapsed = time.perf_counter() - started
                self._database_ok = True
                for kind in rows:
                    metrics.COMMIT_LATENCY.labels(kind.value).observe(elapsed)
                return inserted
            except asyncpg.exceptions.DataError:
                # A value PostgreSQL refuses: find the message(s) that carry it.
                return await self._write_one_by_one(rows, msgs)
            except _TRANSIENT as exc:
                if not isinstance(exc, asyncpg.exceptions.DeadlockDetectedError):
                    self._database_ok = False
                if attempt >= cfg.write_attempts or self._stopping.is_set():
                    raise
                for kind in rows:
                    metrics.WRITE_FAILURES.labels(kind.value).inc()
                log.warning("ledger_write_retry", attempt=attempt, error=repr(exc),
                            retry_in_s=delay)  # fmt: skip
                for _, msg in msgs:  # still ours: do not let ack_wait hand it to another
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_one_by_one(
        self, rows: dict[Kind, list[Row]], msgs: list[tuple[Kind, Any]]
    ) -> dict[Kind, int]:
        """Each message in a transaction of its own; the ones PostgreSQL refuses are dropped
        (terminated, counted), so one bad value never holds a stream up."""
        inserted = dict.fromkeys(rows, 0)
        keep = []
        tenant = self.config.default_tenant
        for kind, msg in msgs:
            one = rows_of(kind, msg.subject, msg.data, _stream_seq(msg))
            try:
                async with self.pool.acquire() as conn:
                    inserted[kind] += await store.insert_rows(conn, kind, one, tenant)
            except asyncpg.exceptions.DataError as exc:
                metrics.BAD_MESSAGES.labels(kind.value, "refused_by_database").inc()
                log.error("ledger_bad_message", kind=kind.value, subject=msg.subject,
                          stream_seq=_stream_seq(msg), error=repr(exc))  # fmt: skip
                await msg.term()
                continue
            keep.append((kind, msg))
        msgs[:] = keep
        return inserted

    def _account(
        self, rows: dict[Kind, list[Row]], msgs: list[tuple[Kind, Any]], inserted: dict[Kind, int]
    ) -> None:
        now_ns = time.time_ns()
        messages: dict[Kind, int] = {}
        for kind, _ in msgs:
            messages[kind] = messages.get(kind, 0) + 1
        for kind, kind_rows in rows.items():
            label = kind.value
            # The batch's oldest message: one observation per batch and kind keeps the hot
            # path short, and the histogram errs towards lag, never away from it.
            ts = TS_INDEX[kind]
            oldest = min((row[ts] for row in kind_rows), default=now_ns)
            metrics.LAG.labels(label).observe(max(now_ns - oldest, 0) / 1e9)
            new = inserted.get(kind, 0)
            metrics.ROWS_STORED.labels(label).inc(new)
            if len(kind_rows) > new:
                metrics.DUPLICATES.labels(label).inc(len(kind_rows) - new)
        for kind, count in messages.items():
            metrics.MESSAGES.labels(kind.value).inc(count)
            metrics.BATCH_SIZE.labels(kind.value).observe(count)
        self.messages_stored += len(msgs)


class _Puller:
    """Messages of one durable pull consumer, taken as they arrive.

    One pull request of ``batch_max`` messages is kept open (renewed when it is used up or
    expires): messages stream in while the previous batch commits, so a batch is whatever
    arrived meanwhile. Nothing waits for a batch to fill, which keeps the lag of a quiet
    stream at about one commit, and a backlog drains ``batch_max`` messages per commit.

    Measured against a window of ``2 × batch_max`` kept topped up by several requests at
    once (so that a commit slower than a request's worth of messages does not leave them in
    the stream): no better at 20,000 msgs/s, and more often in the slower of the two regimes
    the benchmark settles in (``benchmarks/README.md``, "ledger"). Whether messages wait in
    the stream or in this buffer while every writer is busy, they wait for the same writer.
    """

    def __init__(
        self, nc: Any, source: Source, batch_max: int, expires_s: float, arrived: asyncio.Event
    ) -> None:
        self.nc = nc
        self.kind = source.kind
        self.batch_max = batch_max
        self.expires_s = expires_s
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{source.stream}.{source.durable}"
        self._arrived = arrived
        self._buffer: collections.deque[Any] = collections.deque()
        self._left = 0
        self._until = 0.0
        self._pause_until = 0.0
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.nc.new_inbox(), cb=self._on_message)
        await self._request()

    async def _on_message(self, msg: Any) -> None:
        self._buffer.append(msg)
        self._arrived.set()

    async def _request(self) -> None:
        self._left = self.batch_max
        # A request the server forgot (NATS restarted, we reconnected) is renewed after this.
        self._until = time.monotonic() + self.expires_s + 1.0
        request = {"batch": self.batch_max, "expires": int(self.expires_s * 1e9)}
        try:
            await self.nc.publish(self.subject, orjson.dumps(request), reply=self._sub.subject)
        except nats.errors.Error as exc:
            log.warning("ledger_pull_failed", subject=self.subject, error=repr(exc))
            self._until = time.monotonic() + 0.5

    def take(self) -> list[Any]:
        """Everything that has arrived, up to ``batch_max`` messages."""
        msgs: list[Any] = []
        buffer = self._buffer
        while buffer and len(msgs) < self.batch_max:
            msg = buffer.popleft()
            if msg.data or not msg.headers or _STATUS not in msg.headers:
                msgs.append(msg)
                self._left -= 1
            elif msg.headers[_STATUS] != "100":
                # 408: the request expired; 409: the server ended it (leadership, limits).
                self._left = 0
                if msg.headers[_STATUS] == "409":
                    self._pause_until = time.monotonic() + 0.1
        return msgs

    async def renew_if_due(self) -> None:
        now = time.monotonic()
        if (self._left <= 0 or now > self._until) and now >= self._pause_until:
            await self._request()

    async def give_back(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for msg in self.take():
            await msg.nak()


def _stream_seq(msg: Any) -> int:
    """The message's stream sequence, from its ack subject: ``$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.…`` (9 tokens), or 12 with a domain and account hash ahead."""
    tokens = msg.reply.split(".")
    try:
        return int(tokens[5] if len(tokens) == 9 else tokens[7])
    except (IndexError, ValueError):
        return 0


def spawn_ledger(
    nats_url: str,
    database_url: str,
    *,
    instance: str = "local",
    metrics_port: int = -1,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    quiet: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``tradecopy ledger run`` with this interpreter. ``env`` (default: ours) carries
    its NATS credentials; the database URL (it may hold a password) goes there too, never on
    the command line."""
    args = [sys.executable, "-P", "-m", "engine.cli", "ledger", "run", "--nats-url", nats_url,
            "--instance", instance,
            "--metrics-port", str(metrics_port), "--log-level", log_level, *extra_args]  # fmt: skip
    child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    child_env[ENV_DATABASE_URL] = database_url
    return subprocess.Popen(
        args,
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
    )


async def wait_for_ledger(js: Any, timeout: float = 30.0) -> None:
    """Until a ledger consumes: its durable consumers exist once it has started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for source in SOURCES:
                await js.consumer_info(source.stream, source.durable)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ledger consuming within {timeout:g} s") from None
            await asyncio.sleep(0.1)


async def wait_for_ledger_drained(js: Any, timeout: float = 30.0) -> bool:
    """Until every ledger consumer has nothing pending or unacknowledged; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = 0
        for source in SOURCES:
            info = await js.consumer_info(source.stream, source.durable)
            busy += info.num_pending + info.num_ack_pending
        if not busy:
            return True
        await asyncio.sleep(0.02)
    return False


async def run_ledger(config: LedgerConfig) -> None:
    """Run until cancelled or signalled; serves /metrics and /healthz when a port is set.

    The database is ``config.database_url``, else ``TRADECOPY_DATABASE_URL``, else the
    embedded PostgreSQL under the state directory (started here, stopped on exit)."""
    import signal

    from engine.runtime.http import OpsServer
    from engine.runtime.postgres import start_database

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    database_url, embedded = await start_database(config.database_url)
    try:
        if config.migrate:
            await store.migrate(database_url)
        ledger = await _start_until_up(config, database_url, stop)
        if ledger is None:
            return
        # Batches allocate many short-lived, acyclic objects: keep the cyclic collector's
        # passes over the start-up heap off the path every message waits on.
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        ops = None
        if config.metrics_port is not None:
            ops = OpsServer(config.metrics_host, config.metrics_port, ledger.health)
            await ops.start()
            log.info("ops_listening", host=config.metrics_host, port=ops.port)
        try:
            await stop.wait()
        finally:
            if ops is not None:
                await ops.stop()
            await ledger.stop()
    finally:
        if embedded is not None:
            await embedded.stop()


async def _start_until_up(
    config: LedgerConfig, database_url: str, stop: asyncio.Event
) -> Ledger | None:
    """Start, retrying with backoff while NATS, the streams or the database are not there
    yet (crash-only: started before them, it waits). None when told to stop."""
    delay = 0.5
    while not stop.is_set():
        ledger = Ledger(config, database_url)
        try:
            await ledger.start()
            return ledger
        except (nats.errors.Error, TimeoutError, OSError, asyncpg.PostgresError) as exc:
            if isinstance(exc, nats.errors.AuthorizationError):
                raise
            log.warning("ledger_start_failed", error=repr(exc), retry_in_s=delay)
            with contextlib.suppress(Exception):
                await ledger.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 10.0)
    return None
