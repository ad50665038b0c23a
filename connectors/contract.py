"""The connector contract: what every terminal connector does on NATS, in one place.

A connector (paper venue, bridge EA, MetaTrader5 package) supplies a ``Terminal`` — the
venue-specific half — and ``ConnectorRuntime`` does the rest, identically for all of them:

1. **Master events**: every trade transaction on a master account is published to
   ``tc.v1.master.<account>.events`` with ``Nats-Msg-Id = event_id`` and the connector's
   timestamp in ``trace.connector_ns``.
2. **Account state and symbol specs** go to the ``tc_accounts`` / ``tc_symbols`` KV buckets on
   start, after every change, and at least every ``state_interval_s`` (equity moves with price).
3. **Follower orders** are consumed from a durable consumer per connector (per-account subjects
   plus the connector's batch subject), strictly in stream order, and executed through
   ``Terminal.execute``, which must be idempotent by order id: a redelivered order returns the
   original outcome and executes nothing. At receipt the runtime gives each order its report
   builder (``connectors.reports.OrderReports``): the trace stamped with
   ``follower_connector_ns``, and the one decision whether an open arrived after its
   ``expires_ns`` (max signal age). A terminal builds every report through it.
4. **Execution reports** are published to ``tc.v1.follower.<account>.reports`` with
   ``Nats-Msg-Id = report:<order id>``; only then is the order acknowledged. Outcome policy:
   *rejected* only on definitive evidence from the venue; a timeout or disconnect is *unknown*
   and reconciliation settles it.
5. **Reconciliation** runs on every (re)start: ``Terminal.unpublished_events`` returns master
   events that were recorded but possibly never published (an outbox), which are published again
   (JetStream dedup drops the ones already stored), then states and specs are republished. Orders
   that were not acknowledged are redelivered by JetStream and settled by idempotent execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter

from connectors.reports import OrderReports
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.account import AccountState, SymbolSpec
from schemas.master import MasterEvent
from schemas.orders import FollowerOpen, FollowerOrder
from schemas.reports import ExecutionReport
from schemas.streams import FOLLOWER_ORDERS_STREAM

log = structlog.get_logger("tradecopy.connector")

MSG_ID = "Nats-Msg-Id"
#: Orders in flight per connector; run in stream order, acknowledged after their reports.
ORDER_BATCH = 256
#: After a failed batch: first wait before resuming at the ack floor, doubling up to the max.
RETRY_BACKOFF_S = 0.25
RETRY_BACKOFF_MAX_S = 5.0
BAD_ORDERS = Counter(
    "tradecopy_connector_bad_orders_total", "Follower orders that could not be decoded"
)


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
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(publish_async_max_pending=65_536)
        self.connector_id = connector_id
        self.terminal = terminal
        self.partitions = partitions
        self.state_interval_s = state_interval_s
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

    @property
    def durable(self) -> str:
        return f"connector-{self.connector_id}"

    async def start(self) -> None:
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
        if self.terminal.follower_accounts():
            await self._subscribe_orders()
            self._tasks.append(asyncio.create_task(self._consume_orders()))
        self._tasks.append(asyncio.create_task(self._publish_states()))

    async def stop(self) -> None:
        self._stopping.set()
        self._state_changed.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._order_sub is not None:
            # Stop the push; what was pushed and not acknowledged is redelivered to the next start.
            with contextlib.suppress(Exception):
                await self._order_sub.unsubscribe()
            self._order_sub = None

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
        now = time.time_ns()
        futures = []
        for event in events:
            stamped = msgspec.structs.replace(
                event, trace=msgspec.structs.replace(event.trace, connector_ns=now)
            )
            futures.append(
                await self.js.publish_async(
                    subjects.master_events(event.master),
                    codec.encode(stamped),
                    headers={MSG_ID: event.event_id},
                )
            )
        if while_in_flight is not None:
            await asyncio.sleep(0)  # let the client's flusher put the events on the wire
            while_in_flight()
        await asyncio.gather(*futures)
        self.terminal.published(events)
        self.mark_dirty(*{e.master for e in events})

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

    # ------------------------------------------------------------ follower orders

    async def _ensure_order_consumer(self, deliver_subject: str) -> None:
        """Create the connector's durable consumer, or re-create it at its ack floor.

        Crash-only start: orders a dead connector had taken but not acknowledged must run
        before any newer order (a close must not overtake its open), so on every start the
        consumer restarts just after the last contiguously acknowledged order. Orders that did
        run before the crash come back too, and idempotent execution returns their outcome.
        It pushes to this process's inbox: no pull round trip between an order and its run.
        """
        filters = [subjects.follower_orders(a) for a in sorted(self.terminal.follower_accounts())]
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

        async def arrived(msg: Any) -> None:
            queue.put_nowait(msg)

        deliver = self.nc.new_inbox()
        # Subscribe first: the consumer starts pushing the moment it exists.
        self._order_sub = await self.nc.subscribe(deliver, cb=arrived, pending_msgs_limit=-1)
        await self._ensure_order_consumer(deliver)

    async def _consume_orders(self) -> None:
        backoff = RETRY_BACKOFF_S
        while not self._stopping.is_set():
            queue = self._order_queue
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < ORDER_BATCH:
                batch.append(queue.get_nowait())
            try:
                await self.handle_order_messages(batch)
                backoff = RETRY_BACKOFF_S
            except Exception as exc:
                # Later orders must not run before these (a close before its open), so do
                # what a restart does: drop what is queued here and resume at the ack floor;
                # idempotent execution settles whatever of the batch already ran.
                log.error("orders_failed", connector=self.connector_id, error=repr(exc),
                          retry_in_s=backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX_S)
                await self._resubscribe_orders()

    async def _resubscribe_orders(self) -> None:
        if self._order_sub is not None:
            with contextlib.suppress(Exception):
                await self._order_sub.unsubscribe()
        await self._subscribe_orders()

    async def publish_report(self, report: ExecutionReport, msg_id: str) -> None:
        """A report outside the order flow, e.g. an unknown outcome settled later."""
        trace = msgspec.structs.replace(report.trace, report_ns=time.time_ns())
        await self.js.publish(
            subjects.execution_reports(report.follower),
            codec.encode(msgspec.structs.replace(report, trace=trace)),
            headers={MSG_ID: msg_id},
        )
        self.mark_dirty(report.follower)

    async def handle_order_messages(self, msgs: Sequence[Any]) -> None:
        """Execute a batch in stream order, persist once, report, then acknowledge.

        Reports go out only after the terminal committed its state, and messages are
        acknowledged only after their reports are stored: a crash at any point redelivers
        orders whose outcome is not both durable and reported. Each order's signal age is
        judged here, by the time the batch arrived (``reports_at_receipt``).
        """
        received_ns = time.time_ns()
        mine = set(self.terminal.follower_accounts())
        outcomes: list[ExecutionReport] = []
        for msg in msgs:
            try:
                if msg.subject.startswith(f"{subjects.PREFIX}.connector."):
                    orders = codec.follower_order_batch_decoder.decode(msg.data).orders
                else:
                    orders = [codec.follower_order_decoder.decode(msg.data)]
            except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
                BAD_ORDERS.inc()
                log.error("follower_order_invalid", subject=msg.subject, error=str(exc))
                await msg.term()
                continue
            for order in orders:
                if order.follower not in mine:
                    log.warning(
                        "order_for_unknown_account", follower=order.follower, order=order.order_id
                    )
                    continue
                reports = reports_at_receipt(order, received_ns)
                outcomes.append(await self.terminal.execute(order, reports))
        if outcomes:
            self.terminal.commit()
            now = time.time_ns()
            futures = []
            for report in outcomes:
                trace = msgspec.structs.replace(report.trace, report_ns=now)
                report = msgspec.structs.replace(report, trace=trace)
                futures.append(
                    await self.js.publish_async(
                        subjects.execution_reports(report.follower),
                        codec.encode(report),
                        headers={MSG_ID: report_id(report.order_id)},
                    )
                )
                self.mark_dirty(report.follower)
            await asyncio.gather(*futures)
            self.orders_executed += len(outcomes)
        for msg in msgs:
            if msg.metadata.num_delivered is not None:
                with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                    await msg.ack()
