"""The connector contract: what every terminal connector does on NATS, in one place.

A connector (paper venue, bridge EA, MetaTrader5 package) supplies a ``Terminal`` — the
venue-specific half — and ``ConnectorRuntime`` does the rest, identically for all of them:

1. **Master events**: every trade transaction on a master account is published to
   ``tc.v1.master.<account>.events`` with ``Nats-Msg-Id = event_id`` and the connector's
   timestamp in ``trace.connector_ns``.
2. **Account state and symbol specs** go to the ``tc_accounts`` / ``tc_symbols`` KV buckets on
   start, after every change, and at least every ``state_interval_s`` (equity moves with price).
3. **Follower orders** are consumed from a durable consumer per connector (per-account subjects
   plus the connector's batch subject) and executed through ``Terminal.execute``, which must
   be idempotent by order id: a redelivered order returns the original outcome and executes
   nothing. Each follower account's orders run strictly in stream order (a close never
   overtakes its open); different accounts run side by side, so one account waiting for its
   price (``deviation_policy = wait``) never holds up another. ``execute`` may therefore be
   awaited for several accounts at once, never twice at once for one account. An order is
   executed only if it arrived where its follower's orders belong: on
   ``tc.v1.follower.<its follower>.orders``, or in a batch on this connector's own subject
   that names this connector; anything else is refused (terminated, counted, logged). At
   receipt the runtime gives each order its report builder
   (``connectors.reports.OrderReports``): the trace stamped with ``follower_connector_ns``,
   and the one decision whether an open arrived after its ``expires_ns`` (max signal age). A
   terminal builds every report through it.
4. **Execution reports** are published to ``tc.v1.follower.<account>.reports`` with
   ``Nats-Msg-Id = report:<order id>``; only then is the order acknowledged. Outcome policy:
   *rejected* only on definitive evidence from the venue; a timeout or disconnect is *unknown*
   and reconciliation settles it.
5. **Reconciliation** runs on every (re)start: ``Terminal.unpublished_events`` returns master
   events that were recorded but possibly never published (an outbox), which are published again
   (JetStream dedup drops the ones already stored), then states and specs are republished. Orders
   that were not acknowledged are redelivered by JetStream and settled by idempotent execution.
   An outbox left behind by a failed publish is retried every ``progress_poll_s`` as well.
6. **No wait without a bound.** Every publish waits at most ``publish_timeout_s`` for its
   acknowledgement, is retried with the same ``Nats-Msg-Id`` up to ``publish_attempts``
   times, and then fails into the normal redelivery path (orders: resume at the ack floor;
   master events: stay in the outbox). ``health()`` reports a connector whose orders or
   master events are pending without progress for ``stall_after_s`` as not ok.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Gauge, Histogram

from connectors.reports import OrderReports
from engine.runtime.http import ProgressWatch
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.publishing import Publication, publish_stored
from schemas import codec, subjects
from schemas.account import AccountState, SymbolSpec
from schemas.master import MasterEvent
from schemas.orders import DeviationPolicy, FollowerOpen, FollowerOrder
from schemas.reports import ExecutionReport
from schemas.streams import FOLLOWER_ORDERS_STREAM

log = structlog.get_logger("tradecopy.connector")

#: Orders in flight per connector; run in stream order, acknowledged after their reports.
ORDER_BATCH = 256
#: After a failed batch: first wait before resuming at the ack floor, doubling up to the max.
RETRY_BACKOFF_S = 0.25
RETRY_BACKOFF_MAX_S = 5.0
#: Failures further apart than this start again from the first backoff.
_CALM_S = 30.0
BAD_ORDERS = Counter(
    "tradecopy_connector_bad_orders_total", "Follower orders that could not be decoded"
)
REFUSED_ORDERS = Counter(
    "tradecopy_connector_refused_orders_total",
    "Follower orders not executed because of where they came from",
    ["reason"],
)
PUBLISH_RETRIES = Counter(
    "tradecopy_connector_publish_retries_total",
    "Messages sent again (same Nats-Msg-Id) because JetStream did not confirm them in time",
)
STALL = Gauge(
    "tradecopy_connector_stall_seconds",
    "Seconds a connector has had work pending without progress (0 when idle)",
    ["connector", "work"],
)
ORDERS = Counter(
    "tradecopy_connector_orders_total",
    "Follower orders executed and reported, by the report's outcome",
    ["connector", "outcome"],
)
ORDER_LATENCY = Histogram(
    "tradecopy_connector_order_seconds",
    "Follower order received by the connector → its execution report stored",
    ["connector"],
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 1.0, 5.0, 30.0, 90.0),
)
MASTER_EVENTS = Counter(
    "tradecopy_connector_master_events_total",
    "Master events stored in JetStream by the connector",
    ["connector"],
)
NATS_CONNECTED = Gauge(
    "tradecopy_connector_nats_connected", "1 while the connector is connected to NATS",
    ["connector"],
)  # fmt: skip
TERMINAL_CONNECTED = Gauge(
    "tradecopy_connector_terminal_connected",
    "1 while the terminal behind a configured account is connected and has told its state; "
    "0 also for one that never connected",
    ["connector", "account", "role"],
)
#: The outcomes an execution report can have (its tag), each with a series from the start.
REPORT_OUTCOMES = tuple(t.__struct_config__.tag for t in typing.get_args(ExecutionReport))
#: Refusal reasons: an order on another account's subject, a batch naming another connector,
#: an order in this connector's batch for an account it does not serve.
SUBJECT_MISMATCH = "subject_mismatch"
FOREIGN_BATCH = "foreign_batch"
ACCOUNT_NOT_SERVED = "account_not_served"
for _reason in (SUBJECT_MISMATCH, FOREIGN_BATCH, ACCOUNT_NOT_SERVED):
    REFUSED_ORDERS.labels(_reason)

#: Put in the order queue to wake the consumer after a failure elsewhere.
_FAILED = object()


class Terminal(Protocol):
    """The venue-specific half of a connector."""

    def master_accounts(self) -> Sequence[str]: ...

    def follower_accounts(self) -> Sequence[str]: ...

    def account_state(self, account: str) -> AccountState | None:
        """None while the terminal has not told us (then nothing is published for it)."""
        ...

    def symbol_specs(self, account: str) -> Iterable[SymbolSpec]: ...

    async def execute(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        """Execute once per order id; a repeated id returns the first outcome unchanged.

        ``reports`` (made by the runtime at receipt) builds the outcome. The checks run in this
        order: first the evidence that the order, or its copy, ran before (a stored report, the
        copy of the master position, its opening deal) and then its outcome is reported again;
        only then, if ``reports.signal_expired``, ``reports.expired()`` without trading. A
        redelivered open that filled before its signal expired must report that fill, never
        "expired".
        """
        ...

    def unpublished_events(self) -> list[MasterEvent]:
        """Master events that may not have been published yet (the outbox)."""
        ...

    def published(self, events: Sequence[MasterEvent]) -> None:
        """These events are stored in JetStream: drop them from the outbox."""
        ...

    def commit(self) -> None:
        """Make the outcomes of the orders executed so far durable (before they are reported)."""
        ...


def report_id(order_id: str) -> str:
    return f"report:{order_id}"


def reports_at_receipt(order: FollowerOrder, received_ns: int) -> OrderReports:
    """The order's report builder as it arrives: the hop's stamp, and whether its signal
    expired, judged once by the time of receipt (not when the terminal gets to it)."""
    trace = msgspec.structs.replace(order.trace, follower_connector_ns=received_ns)
    expires_ns = order.expires_ns if isinstance(order, FollowerOpen) else 0
    return OrderReports(order, trace, signal_expired=0 < expires_ns < received_ns)


class ConnectorRuntime:
    def __init__(
        self,
        nc: Any,
        connector_id: str,
        terminal: Terminal,
        *,
        partitions: int | None = None,
        state_interval_s: float = 1.0,
        publish_timeout_s: float = 5.0,
        publish_attempts: int = 3,
        stall_after_s: float = 90.0,
        progress_poll_s: float = 5.0,
    ) -> None:
        """``stall_after_s`` must exceed the longest an order may legitimately take: a
        deviation wait (≤ 60 s by the link contract) plus the publish attempts."""
        self.nc = nc
        self.js = nc.jetstream(publish_async_max_pending=65_536)
        self.connector_id = connector_id
        self.terminal = terminal
        self.partitions = partitions
        self.state_interval_s = state_interval_s
        self.publish_timeout_s = publish_timeout_s
        self.publish_attempts = publish_attempts
        self.stall_after_s = stall_after_s
        self.progress_poll_s = progress_poll_s
        self.buckets: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._dirty: set[str] = set()
        self._state_changed = asyncio.Event()
        self.orders_executed = 0
        # A trade and a quote-triggered SL may publish at once: one master's events must not
        # interleave, so publication is one at a time.
        self._publish_lock = asyncio.Lock()
        self._order_sub: Any = None
        self._order_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._followers = frozenset(terminal.follower_accounts())
        self._masters = frozenset(terminal.master_accounts())
        # A master account takes manual orders too (a signal source drives a paper master
        # through the API): its subject is consumed like a follower's.
        self._order_accounts = self._followers | self._masters
        # Per follower account, its orders not yet executed, in stream order (see _run_lane).
        self._lanes: dict[str, deque[tuple[FollowerOrder, OrderReports, _Delivery]]] = {}
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        # Executed, not yet committed and reported (see _settle).
        self._settling: list[tuple[ExecutionReport, _Delivery]] = []
        self._settle_wanted = asyncio.Event()
        self._settle_lock = asyncio.Lock()
        self._order_failure: BaseException | None = None
        self._backoff = RETRY_BACKOFF_S
        self._failed_at = -_CALM_S
        self._started = False
        # Liveness by progress: orders taken but not done, master events not yet stored.
        self._orders_progress = ProgressWatch()
        self._events_progress = ProgressWatch()
        # Labelled children made once: the order path counts through a dict, not labels().
        self._orders_by_outcome = {o: ORDERS.labels(connector_id, o) for o in REPORT_OUTCOMES}
        self._order_latency = ORDER_LATENCY.labels(connector_id)
        self._master_events = MASTER_EVENTS.labels(connector_id)

    @property
    def durable(self) -> str:
        return f"connector-{self.connector_id}"

    async def start(self) -> None:
        self._watch_connections()
        await ensure_streams(self.js, self.partitions)
        self.buckets = await ensure_buckets(self.js)
        outbox = self.terminal.unpublished_events()
        if outbox:
            log.info("reconcile_republish", connector=self.connector_id, events=len(outbox))
            await self.publish_master_events(outbox)
        accounts = {*self.terminal.master_accounts(), *self.terminal.follower_accounts()}
        for account in sorted(accounts):
            await self._publish_specs(account)
            await self._publish_state(account)
        if self._order_accounts:
            await self._subscribe_orders()
            self._tasks.append(asyncio.create_task(self._consume_orders()))
            self._tasks.append(asyncio.create_task(self._settle_orders()))
        self._tasks.append(asyncio.create_task(self._publish_states()))
        self._tasks.append(asyncio.create_task(self._watch_progress()))
        STALL.labels(self.connector_id, "orders").set_function(self._orders_progress.stalled_for)
        STALL.labels(self.connector_id, "master_events").set_function(
            self._events_progress.stalled_for
        )
        self._started = True

    def _watch_connections(self) -> None:
        """Series for NATS and every configured account's terminal, from before the start:
        a terminal that never connected shows 0, not nothing."""
        NATS_CONNECTED.labels(self.connector_id).set_function(
            lambda: float(bool(self._started and self.nc.is_connected))
        )
        terminal = self.terminal
        for role, accounts in (("master", terminal.master_accounts()),
                               ("follower", terminal.follower_accounts())):  # fmt: skip
            for account in accounts:
                TERMINAL_CONNECTED.labels(self.connector_id, account, role).set_function(
                    lambda a=account: self._terminal_connected(a)
                )

    def _terminal_connected(self, account: str) -> float:
        if not self._started:
            return 0.0
        try:
            state = self.terminal.account_state(account)
        except Exception:  # a terminal that cannot say is not connected; /metrics must answer
            return 0.0
        if state is None:
            return 0.0  # the terminal has not told its state yet: never connected
        # No terminal status: an in-process venue (paper), there whenever the connector is.
        return float(state.terminal is None or state.terminal.connected)

    async def stop(self) -> None:
        self._stopping.set()
        self._state_changed.set()
        if self._started:
            for work in ("orders", "master_events"):
                STALL.labels(self.connector_id, work).set_function(lambda: 0.0)
        self._started = False
        tasks = [*self._tasks, *self._lane_tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._order_sub is not None:
            # Stop the push; what was pushed and not acknowledged is redelivered to the next start.
            with contextlib.suppress(Exception):
                await self._order_sub.unsubscribe()
            self._order_sub = None

    def health(self) -> dict[str, object]:
        """Up, connected and making progress: NATS away, or orders or master events pending
        without progress for ``stall_after_s``, make it not ok (``/healthz`` answers 503),
        and ``reason`` says which."""
        connected = bool(self.nc.is_connected)
        orders_s = self._orders_progress.stalled_for()
        events_s = self._events_progress.stalled_for()
        stalled = max(orders_s, events_s) >= self.stall_after_s
        reasons = []
        if not connected:
            reasons.append("NATS is not connected")
        if not self._started:
            reasons.append("not started")
        for work, seconds in (("follower orders", orders_s), ("master events", events_s)):
            if seconds >= self.stall_after_s:
                reasons.append(f"{work} pending without progress for {seconds:.0f} s")
        return {
            "ok": not reasons,
            "reason": "; ".join(reasons),
            "connector": self.connector_id,
            "nats_connected": connected,
            "orders_executed": self.orders_executed,
            "orders_stall_s": round(orders_s, 3),
            "master_events_stall_s": round(events_s, 3),
            "stalled": stalled,
        }

    # ------------------------------------------------------------- master events

    async def publish_master_events(self, events: Sequence[MasterEvent]) -> None:
        """Publish in order and wait until all are stored; then they leave the outbox."""
        if not events:
            return
        async with self._publish_lock:
            await self._publish_master_events(events)

    async def flush_outbox(self, while_in_flight: Callable[[], None] | None = None) -> None:
        """Publish every master event the terminal has not published yet, oldest first.

        Publishing the whole outbox, not just the newest trade's events, keeps a master's
        events in order even after a publish failed: the left-behind event goes first.
        ``while_in_flight`` (e.g. persisting the terminal) runs once the events are on the
        wire and before their acks are awaited, so its time does not add to the hop.
        """
        async with self._publish_lock:
            pending = self.terminal.unpublished_events()
            if pending:
                await self._publish_master_events(pending, while_in_flight)
            elif while_in_flight is not None:
                while_in_flight()

    async def _publish_master_events(
        self, events: Sequence[MasterEvent], while_in_flight: Callable[[], None] | None = None
    ) -> None:
        self._events_progress.working()
        now = time.time_ns()
        messages: list[Publication] = []
        for event in events:
            stamped = msgspec.structs.replace(
                event, trace=msgspec.structs.replace(event.trace, connector_ns=now)
            )
            messages.append(
                (subjects.master_events(event.master), codec.encode(stamped), event.event_id)
            )
        # Not stored in time: the events stay in the outbox, and the next flush (a trade, or
        # the periodic retry) sends them again, oldest first.
        await publish_stored(
            self.js, messages, timeout_s=self.publish_timeout_s,
            attempts=self.publish_attempts, retried=PUBLISH_RETRIES.inc,
            on_the_wire=while_in_flight,
        )  # fmt: skip
        self.terminal.published(events)
        self._master_events.inc(len(events))
        self._events_progress.advanced(still_pending=False)
        self.mark_dirty(*{e.master for e in events})

    async def _retry_outbox(self) -> None:
        """Send what a failed publish left in the outbox, even if no new trade comes."""
        if self._publish_lock.locked() or not self.terminal.unpublished_events():
            return
        try:
            await self.flush_outbox()
        except Exception as exc:  # still failing: the next round tries again
            log.warning("outbox_retry_failed", connector=self.connector_id, error=repr(exc))

    # -------------------------------------------------------------- state & specs

    def mark_dirty(self, *accounts: str) -> None:
        """Republish these accounts' state soon (coalesced)."""
        self._dirty.update(accounts)
        self._state_changed.set()

    async def refresh_account(self, account: str) -> None:
        """Publish an account's symbol specs and state now (a terminal (re)connected)."""
        await self._publish_specs(account)
        await self._publish_state(account)

    async def _publish_state(self, account: str) -> None:
        state = self.terminal.account_state(account)
        if state is None:
            return
        if self.connector_id and not state.connector:
            state = msgspec.structs.replace(state, connector=self.connector_id)
        await self.buckets[subjects.KV_ACCOUNTS].put(account, codec.encode(state))

    async def _publish_specs(self, account: str) -> None:
        for spec in self.terminal.symbol_specs(account):
            await self.buckets[subjects.KV_SYMBOLS].put(
                subjects.symbol_key(account, spec.symbol), codec.encode(spec)
            )

    async def _publish_states(self) -> None:
        accounts = {*self.terminal.master_accounts(), *self.terminal.follower_accounts()}
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), self.state_interval_s)
            self._state_changed.clear()
            due = set(self._dirty) if self._dirty else set(accounts)
            self._dirty.clear()
            for account in sorted(due):
                try:
                    await self._publish_state(account)
                except Exception as exc:  # NATS reconnecting: the next round catches up
                    log.warning("account_state_publish_failed", account=account, error=repr(exc))

    # ------------------------------------------------------------------ progress

    async def _watch_progress(self) -> None:
        """Every ``progress_poll_s``: retry a left-behind outbox, and ask the order consumer
        whether orders are waiting that never arrived here (a push lost in a restart)."""
        while not self._stopping.is_set():
            await asyncio.sleep(self.progress_poll_s)
            await self._retry_outbox()
            if self._order_sub is None:
                continue
            try:
                info = await asyncio.wait_for(
                    self.js.consumer_info(FOLLOWER_ORDERS_STREAM, self.durable),
                    self.publish_timeout_s,
                )
            except Exception:
                continue  # NATS away or the consumer being re-created: health tells the rest
            if info.num_pending or info.num_ack_pending:
                self._orders_progress.working()
            elif not self._orders_in_hand():
                self._orders_progress.advanced(still_pending=False)

    # ------------------------------------------------------------ follower orders

    async def _ensure_order_consumer(self, deliver_subject: str) -> None:
        """Create the connector's durable consumer, or re-create it at its ack floor.

        Crash-only start: orders a dead connector had taken but not acknowledged must run
        before any newer order (a close must not overtake its open), so on every start the
        consumer restarts just after the last contiguously acknowledged order. Orders that did
        run before the crash come back too, and idempotent execution returns their outcome.
        It pushes to this process's inbox: no pull round trip between an order and its run.
        """
        filters = [subjects.follower_orders(a) for a in sorted(self._order_accounts)]
        filters.append(subjects.connector_orders(self.connector_id))
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_subject=deliver_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            filter_subjects=filters,
            max_ack_pending=ORDER_BATCH,
            ack_wait=30.0,
        )
        try:
            info = await self.js.consumer_info(FOLLOWER_ORDERS_STREAM, self.durable)
        except nats.js.errors.NotFoundError:
            # A new connector starts from now (an explicit sequence, so a re-creation knows
            # where it began): week-old opens must not execute on first start.
            stream = await self.js.stream_info(FOLLOWER_ORDERS_STREAM)
            config.opt_start_seq = stream.state.last_seq + 1
            await self.js.add_consumer(FOLLOWER_ORDERS_STREAM, config)
            return
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        config.opt_start_seq = max(floor + 1, info.config.opt_start_seq or 1)
        await self.js.delete_consumer(FOLLOWER_ORDERS_STREAM, self.durable)
        await self.js.add_consumer(FOLLOWER_ORDERS_STREAM, config)
        log.info(
            "order_consumer_resumed", connector=self.connector_id, from_seq=config.opt_start_seq
        )

    async def _subscribe_orders(self) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._order_queue = queue
        progress = self._orders_progress

        async def arrived(msg: Any) -> None:
            queue.put_nowait(msg)
            progress.working()

        deliver = self.nc.new_inbox()
        # Subscribe first: the consumer starts pushing the moment it exists.
        self._order_sub = await self.nc.subscribe(deliver, cb=arrived, pending_msgs_limit=-1)
        await self._ensure_order_consumer(deliver)

    async def _consume_orders(self) -> None:
        """Take what arrived, check it and hand each order to its account's lane.

        Never waits on an order itself, so one account's slow order (a deviation wait) holds
        up no other account. After a failure it does what a restart does: the lanes stop at
        their next order, whatever finished is settled, everything queued is dropped and the
        consumer resumes at the ack floor (idempotent execution settles what already ran).
        """
        while not self._stopping.is_set():
            queue = self._order_queue
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < ORDER_BATCH:
                batch.append(queue.get_nowait())
            if self._order_failure is None and not any(m is _FAILED for m in batch):
                await self.handle_order_messages(batch)
            if self._order_failure is not None:
                await self._recover_from_failure(self._order_failure)

    async def _recover_from_failure(self, failure: BaseException) -> None:
        now = time.monotonic()
        if now - self._failed_at > _CALM_S:
            self._backoff = RETRY_BACKOFF_S  # the first failure after a calm spell
        self._failed_at = now
        backoff = self._backoff
        log.error("orders_failed", connector=self.connector_id, error=repr(failure),
                  retry_in_s=backoff)  # fmt: skip
        for lane in self._lanes.values():
            lane.clear()  # later orders must not run before the failed one: they come back
        running = list(self._lane_tasks.values())
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        with contextlib.suppress(Exception):  # not stored: those orders come back too
            await self._settle()
        await asyncio.sleep(backoff)
        self._backoff = min(backoff * 2, RETRY_BACKOFF_MAX_S)
        self._order_failure = None
        try:
            await self._resubscribe_orders()
        except Exception as exc:  # NATS still away: fail again, retry later
            self._fail_orders(exc)

    def _fail_orders(self, failure: BaseException) -> None:
        """Stop taking orders and resume at the ack floor (see ``_consume_orders``)."""
        if self._order_failure is None:
            self._order_failure = failure
            self._order_queue.put_nowait(_FAILED)  # wake the consumer if it is idle

    async def _resubscribe_orders(self) -> None:
        if self._order_sub is not None:
            with contextlib.suppress(Exception):
                await self._order_sub.unsubscribe()
        await self._subscribe_orders()

    async def publish_report(self, report: ExecutionReport, msg_id: str) -> None:
        """A report outside the order flow, e.g. an unknown outcome settled later."""
        trace = msgspec.structs.replace(report.trace, report_ns=time.time_ns())
        payload = codec.encode(msgspec.structs.replace(report, trace=trace))
        await publish_stored(
            self.js, [(subjects.execution_reports(report.follower), payload, msg_id)],
            timeout_s=self.publish_timeout_s, attempts=self.publish_attempts,
            retried=PUBLISH_RETRIES.inc,
        )  # fmt: skip
        self.mark_dirty(report.follower)

    async def handle_order_messages(self, msgs: Sequence[Any]) -> None:
        """Check each message and run its orders, in stream order per follower account.

        Orders of an account run one after another, so a close never overtakes its open.
        When a batch holds one account's orders and none of them may wait for its price, they
        run right here and are settled at once (the usual hop: no task to spawn). Otherwise
        each account's orders go to its lane (``_run_lane``), and lanes run side by side, so
        one account's deviation wait holds up no other; an account whose lane is still busy
        keeps using it. Each order's signal age is judged here, by the time the batch arrived
        (``reports_at_receipt``). A message is acknowledged once every order in it is settled
        (``_settle``).
        """
        received_ns = time.time_ns()
        mine, masters = self._order_accounts, self._masters
        runs: dict[str, list[tuple[FollowerOrder, OrderReports, _Delivery]]] = {}
        for msg in msgs:
            orders = self._orders_to_execute(msg)
            if orders is None:
                # Never executed, never redelivered: it stays in the stream for inspection.
                await msg.term()
                continue
            delivery = _Delivery(msg)
            for order in orders:
                follower = order.follower
                if follower not in mine or (follower in masters and not order.manual):
                    # A master trades what its owner (or the API for it) asks: never a copy.
                    REFUSED_ORDERS.labels(ACCOUNT_NOT_SERVED).inc()
                    log.warning("order_for_unknown_account", follower=follower,
                                order=order.order_id)  # fmt: skip
                    continue
                delivery.open += 1
                run = runs.get(follower)
                if run is None:
                    run = runs[follower] = []
                run.append((order, reports_at_receipt(order, received_ns), delivery))
            if delivery.open == 0:
                await delivery.acknowledge()  # nothing in it for this connector to run
        if len(runs) == 1:
            [(account, run)] = runs.items()
            if account not in self._lane_tasks and not any(_may_wait(w[0]) for w in run):
                await self._run_inline(run)
                return
        for account, run in runs.items():
            lane = self._lanes.get(account)
            if lane is None:
                lane = self._lanes[account] = deque()
            lane.extend(run)
            if account not in self._lane_tasks:
                self._lane_tasks[account] = asyncio.create_task(self._run_lane(account))

    async def _run_inline(self, run: list[tuple[FollowerOrder, OrderReports, _Delivery]]) -> None:
        """One account's orders that cannot wait long: run and settle them here."""
        for order, reports, delivery in run:
            try:
                report = await self.terminal.execute(order, reports)
            except Exception as exc:
                self._fail_orders(exc)
                break
            self._settling.append((report, delivery))
        try:
            await self._settle()
        except Exception as exc:
            self._fail_orders(exc)

    async def _run_lane(self, account: str) -> None:
        """One account's orders in stream order; ends when its lane is empty."""
        lane = self._lanes[account]
        try:
            while lane and self._order_failure is None:
                order, reports, delivery = lane.popleft()
                try:
                    report = await self.terminal.execute(order, reports)
                except Exception as exc:
                    # This account's later orders must not run before this one: start over
                    # from the ack floor, as a restart would.
                    self._fail_orders(exc)
                    return
                self._settling.append((report, delivery))
                self._settle_wanted.set()
                self._orders_progress.advanced(still_pending=True)
        finally:
            del self._lane_tasks[account]

    async def _settle_orders(self) -> None:
        """Settle executed orders as they come: many lanes' outcomes in one commit."""
        while not self._stopping.is_set():
            await self._settle_wanted.wait()
            self._settle_wanted.clear()
            try:
                await self._settle()
            except Exception as exc:
                self._fail_orders(exc)

    async def _settle(self) -> None:
        """Persist the terminal once, store the reports, then acknowledge every message whose
        orders are all reported: a crash at any point redelivers orders whose outcome is not
        both durable and reported."""
        async with self._settle_lock:
            if not self._settling:
                return
            settled, self._settling = self._settling, []
            self.terminal.commit()
            now = time.time_ns()
            messages: list[Publication] = []
            for report, _ in settled:
                trace = msgspec.structs.replace(report.trace, report_ns=now)
                stamped = msgspec.structs.replace(report, trace=trace)
                messages.append((subjects.execution_reports(report.follower),
                                 codec.encode(stamped), report_id(report.order_id)))  # fmt: skip
                self.mark_dirty(report.follower)
            await publish_stored(
                self.js, messages, timeout_s=self.publish_timeout_s,
                attempts=self.publish_attempts, retried=PUBLISH_RETRIES.inc,
            )  # fmt: skip
            self.orders_executed += len(settled)
            # Manual orders on a master account left master events: publish them now (the
            # commit above made them durable; a failure leaves them to the periodic retry).
            await self._retry_outbox()
            done_ns, outcomes = time.time_ns(), self._orders_by_outcome
            latency = self._order_latency
            for report, _ in settled:
                outcomes[report.__struct_config__.tag].inc()
                received_ns = report.trace.follower_connector_ns
                if received_ns:
                    latency.observe(max(done_ns - received_ns, 0) / 1e9)
            for _, delivery in settled:
                delivery.open -= 1
                if delivery.open == 0:
                    await delivery.acknowledge()
            self._orders_progress.advanced(still_pending=self._orders_in_hand())

    def _orders_in_hand(self) -> bool:
        return bool(self._lane_tasks or self._settling or not self._order_queue.empty())

    def _orders_to_execute(self, msg: Any) -> Sequence[FollowerOrder] | None:
        """The orders a message carries, or None when it must not run at all (logged and
        counted): undecodable, or not where its follower's orders belong."""
        subject = msg.subject
        try:
            if subject.startswith(f"{subjects.PREFIX}.connector."):
                batch = codec.follower_order_batch_decoder.decode(msg.data)
                if batch.connector != self.connector_id or subject != subjects.connector_orders(
                    self.connector_id
                ):
                    REFUSED_ORDERS.labels(FOREIGN_BATCH).inc()
                    log.error("order_batch_refused", subject=subject, connector=batch.connector,
                              batch=batch.batch_id, reason=FOREIGN_BATCH)  # fmt: skip
                    return None
                return batch.orders
            order: FollowerOrder = codec.follower_order_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            BAD_ORDERS.inc()
            log.error("follower_order_invalid", subject=subject, error=str(exc))
            return None
        if subject != subjects.follower_orders(order.follower):
            # Whoever may publish on one account's subject must not trade another account.
            REFUSED_ORDERS.labels(SUBJECT_MISMATCH).inc()
            log.error("follower_order_refused", subject=subject, follower=order.follower,
                      order=order.order_id, reason=SUBJECT_MISMATCH)  # fmt: skip
            return None
        return (order,)


def _may_wait(order: FollowerOrder) -> bool:
    """An open that may wait for its price (``deviation_policy = wait``): up to 60 s."""
    return (
        isinstance(order, FollowerOpen)
        and order.deviation_policy is DeviationPolicy.WAIT
        and order.max_price_deviation is not None
        and order.deviation_wait_ms > 0
    )


class _Delivery:
    """One follower-order message in flight: acknowledged once every order it carries for
    this connector is executed, committed and reported."""

    __slots__ = ("msg", "open")

    def __init__(self, msg: Any) -> None:
        self.msg = msg
        self.open = 0

    async def acknowledge(self) -> None:
        msg = self.msg
        if msg.metadata.num_delivered is not None:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await msg.ack()
