"""The replicator service: consumes master events by partition, publishes follower orders.

Ordering and failover (see docs/architecture.md): the master-event stream hashes each master
to one of N partitions; each partition has one durable push consumer with one message in
flight (``max_ack_pending=1``) delivering to a queue group that every instance joins, so any
instance can take any event, yet a master's next event is not delivered before the previous
one's orders are stored and the event acknowledged. An instance that dies mid-fan-out leaves
its event unacknowledged; after ``ack_wait`` another instance redoes it, and JetStream's
``Nats-Msg-Id`` dedup drops the orders that were already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from engine.core.calendar import trading_day
from engine.replicator import fanout, metrics, splice
from engine.replicator.config import ReplicatorConfig, owns_link
from engine.replicator.facts import CompiledLink
from engine.replicator.fanout import fan_out_publications, plan_fan_out
from engine.replicator.live import LiveView
from engine.replicator.protection import has_equity_protection, track_equity
from engine.replicator.rules import CopyPlan, daily_limit_reached, plan_event
from engine.replicator.sanity import arrival_judged, check_master_event
from engine.replicator.splice import Batches
from engine.replicator.state import LinkState, link_state_decoder, link_state_encoder
from engine.runtime.http import ProgressWatch
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.memory import keep_heap
from engine.runtime.natsconn import connect
from engine.runtime.publishing import NotStored, Publication, publish_stored
from schemas import codec, subjects
from schemas.account import AccountState
from schemas.decisions import CopyDecision, DecisionOutcome
from schemas.master import MasterEvent
from schemas.orders import FollowerCloseAll
from schemas.rejections import MasterEventRejected, RejectionReason
from schemas.streams import MASTER_EVENTS_STREAM, replicator_consumer

log = structlog.get_logger("tradecopy.replicator")

_CAS_RETRIES = 5
#: The longest a failed fan-out waits before its next delivery (the delay doubles up to it).
_REDELIVERY_DELAY_MAX_S = 10.0
#: Failures that sending the same messages again can never fix.
_NEVER_STORABLE = (nats.errors.MaxPayloadError, nats.js.errors.BadRequestError)
#: Longest reason text in a rejection: an exception's repr can be anything.
_MESSAGE_MAX = 1_000


DELIVER_GROUP = "tc-replicators"


def deliver_subject(partition: int, shard: int = 0, shards: int = 1) -> str:
    """Where partition ``partition``'s consumer (of one link shard) pushes; outside every
    stream's subjects."""
    base = f"{subjects.PREFIX}.deliver.replicator.p{partition}"
    return base if shards == 1 else f"{base}.s{shard}of{shards}"


def consumer_name(partition: int, shard: int = 0, shards: int = 1) -> str:
    """The durable consumer of one partition for one link shard: each shard reads every event
    of the partition, in order, at its own pace (unsharded: the contract's name)."""
    base = replicator_consumer(partition)
    return base if shards == 1 else f"{base}-s{shard}of{shards}"


def deliver_group(shard: int = 0, shards: int = 1) -> str:
    """The queue group of one link shard's instances."""
    return DELIVER_GROUP if shards == 1 else f"{DELIVER_GROUP}-s{shard}of{shards}"


class Replicator:
    def __init__(self, config: ReplicatorConfig) -> None:
        self.config = config
        self.nc: Any = None
        self.js: Any = None
        self.live: LiveView | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._subscriptions: list[Any] = []
        self.events_processed = 0
        self._skew_ns = int(config.clock_skew_s * 1e9)
        # Liveness by progress, per partition: the consumer's ack floor (all instances) and
        # the event this instance is working on right now (monotonic start time).
        self._partition_progress = {p: ProgressWatch() for p in range(config.partitions)}
        self._in_flight: dict[int, float] = {}
        self._link_decisions = metrics.LinkDecisionCounters()
        self._links_synced = -1  # the live view's ``links_changes`` the series last matched
        # Two link shards may both batch for one connector: their batch ids must differ, or
        # JetStream's dedup would drop one shard's batch as the other's copy.
        self._batch_suffix = "" if config.shards == 1 else f"#s{config.shard}of{config.shards}"

    async def start(self) -> None:
        cfg = self.config
        self.nc = await connect(cfg.nats_url, f"tradecopy-replicator-{cfg.instance}")
        # A large pending-publish allowance: one fan-out may hold 1,000+ unacknowledged orders.
        self.js = self.nc.jetstream(publish_async_max_pending=65_536)
        storage = StorageType.MEMORY if cfg.memory_storage else StorageType.FILE
        await ensure_streams(self.js, cfg.partitions, storage)
        buckets = await ensure_buckets(self.js, storage)
        self.live = LiveView(
            buckets, None if cfg.shards == 1 else lambda link_id: owns_link(cfg, link_id)
        )
        self.live.on_follower_account(self._on_follower_account)
        await self.live.start()
        self._sync_link_metrics()
        for partition in range(cfg.partitions):
            await self._subscribe(partition)
        for partition in range(cfg.partitions):
            await self._ensure_consumer(partition)
            metrics.PARTITION_STALL.labels(str(partition)).set_function(
                lambda p=partition: self.partition_stall_s(p)
            )
        self._tasks.append(asyncio.create_task(self._poll_lag()))
        tune_gc()
        heap_kept = keep_heap()
        log.info(
            "replicator_started",
            instance=cfg.instance,
            planner="compiled" if fanout.COMPILED else "python",
            heap_kept=heap_kept,
            partitions=cfg.partitions,
            shard=f"{cfg.shard}/{cfg.shards}",
            links=len(self.live.links),
            nats=cfg.nats_url,
        )

    async def stop(self) -> None:
        self._stopping.set()
        for partition in range(self.config.partitions):
            metrics.PARTITION_STALL.labels(str(partition)).set_function(lambda: 0.0)
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.live is not None:
            await self.live.stop()
        if self.nc is not None and not self.nc.is_closed:
            # Every fan-out has been acknowledged or left for redelivery, so close is safe
            # (drain() would wait for in-flight deliveries this instance will not finish).
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            await self.nc.close()
        log.info("replicator_stopped", instance=self.config.instance)

    def partition_stall_s(self, partition: int) -> float:
        """Seconds the partition has had work pending without progress; 0 when it moves.

        The larger of two views: the shared consumer (events pending, ack floor not moving,
        as last polled) and this instance's own event in hand (a task that does not return).
        """
        stalled = self._partition_progress[partition].stalled_for()
        started = self._in_flight.get(partition)
        if started is not None:
            stalled = max(stalled, time.monotonic() - started)
        return stalled

    def health(self) -> dict[str, object]:
        """Up, connected, and every partition with work moving: a stalled one is not ok, and
        ``reason`` says why (``/healthz`` answers 503 with it)."""
        connected = bool(self.nc is not None and self.nc.is_connected)
        stalls = {p: self.partition_stall_s(p) for p in range(self.config.partitions)}
        stalled = [p for p, seconds in stalls.items() if seconds >= self.config.stall_after_s]
        reasons = []
        if not connected:
            reasons.append("NATS is not connected")
        if self.live is None:
            reasons.append("not started")
        if stalled:
            reasons.append(f"partitions {stalled} have had master events pending without "
                           f"progress for {self.config.stall_after_s:g} s or more")  # fmt: skip
        return {
            "ok": not reasons,
            "reason": "; ".join(reasons),
            "instance": self.config.instance,
            "nats_connected": connected,
            "links": 0 if self.live is None else len(self.live.links),
            "events_processed": self.events_processed,
            "stalled_partitions": stalled,
            "longest_stall_s": round(max(stalls.values(), default=0.0), 3),
        }

    async def _ensure_consumer(self, partition: int) -> None:
        """The partition's durable push consumer, shared by every instance's queue group."""
        shard, shards = self.config.shard, self.config.shards
        name = consumer_name(partition, shard, shards)
        config = ConsumerConfig(
            durable_name=name,
            deliver_subject=deliver_subject(partition, shard, shards),
            deliver_group=deliver_group(shard, shards),
            filter_subject=subjects.master_partition_filter(partition),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait_s,
            max_ack_pending=1,
            max_deliver=-1,
        )
        try:
            info = await self.js.consumer_info(MASTER_EVENTS_STREAM, name)
        except nats.js.errors.NotFoundError:
            start = await self._layout_floor(partition)
            if start is not None:
                # A new shard layout takes over where the old one's acknowledgements end: the
                # stream's older events were copied already (a layout change replays at most
                # the events between the old shards' floors, which the order ids dedup).
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = start
                log.info("replicator_consumer_takes_over", consumer=name, start_seq=start)
            try:
                await self.js.add_consumer(MASTER_EVENTS_STREAM, config)
            except nats.js.errors.BadRequestError:
                # Another instance created it first; the same config, nothing to do.
                await self.js.consumer_info(MASTER_EVENTS_STREAM, name)
            return
        if info.config.deliver_subject != config.deliver_subject:
            # A pull consumer of an older layout: replace it where its acknowledgements end.
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = floor + 1
            await self.js.delete_consumer(MASTER_EVENTS_STREAM, name)
            await self.js.add_consumer(MASTER_EVENTS_STREAM, config)

    async def _layout_floor(self, partition: int) -> int | None:
        """Where a new consumer of ``partition`` starts when consumers of another shard layout
        (another number of shards) read it already: after the lowest of their acknowledgement
        floors. None when there are none: a new deployment copies the stream from its start,
        and the shards of one layout all start there together."""
        wanted = subjects.master_partition_filter(partition)
        shards = self.config.shards
        ours = {consumer_name(partition, i, shards) for i in range(shards)}
        others = {consumer_name(partition)} if shards > 1 else set()
        base = f"{consumer_name(partition)}-s"
        floors = [
            info.ack_floor.stream_seq if info.ack_floor else 0
            for info in await self.js.consumers_info(MASTER_EVENTS_STREAM)
            if info.config.filter_subject == wanted
            and info.name not in ours
            and (info.name in others or (info.name or "").startswith(base))
        ]
        return min(floors) + 1 if floors else None

    async def _subscribe(self, partition: int) -> None:
        # One callback task per subscription: a partition's events run one after another,
        # and with max_ack_pending=1 the server sends the next only after the ack.
        in_flight = self._in_flight

        async def on_message(msg: Any) -> None:
            in_flight[partition] = time.monotonic()
            try:
                await self._on_master_message(msg)
            finally:
                del in_flight[partition]

        shard, shards = self.config.shard, self.config.shards
        sub = await self.nc.subscribe(
            deliver_subject(partition, shard, shards), queue=deliver_group(shard, shards),
            cb=on_message,
        )  # fmt: skip
        self._subscriptions.append(sub)

    async def _on_master_message(self, msg: Any) -> None:
        try:
            await self.handle_master_event(msg)
        except Exception as exc:
            # Unacknowledged: redelivered after ack_wait, dedup keeps the redo exact.
            metrics.PUBLISH_FAILURES.inc()
            log.error("master_event_failed", subject=msg.subject, error=repr(exc))

    async def handle_master_event(self, msg: Any) -> None:
        """Decode, check, plan and fan out one master event; acknowledge it once stored.

        Whatever goes wrong ends in one of three ways, so no event holds its partition:
        a refusal (term, with a ``MasterEventRejected`` on the master's rejections subject),
        a redelivery after a delay (NATS did not store the fan-out, bounded by
        ``max_deliveries``), or — when even that answer cannot be sent — ``ack_wait``.
        """
        t_in = time.time_ns()
        t0 = time.perf_counter()
        try:
            event: MasterEvent = codec.master_event_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            # (msgspec raises UnicodeDecodeError for a msgpack string that is not UTF-8.)
            metrics.BAD_MESSAGES.labels("master_event").inc()
            log.error(
                "master_event_invalid", subject=msg.subject, error=str(exc), size=len(msg.data)
            )
            # The message stays in the stream for inspection; redelivering it cannot help.
            await self._refuse(
                msg, None, RejectionReason.INVALID_PAYLOAD, f"not a master event: {exc}",
                {"size": len(msg.data)},
            )  # fmt: skip
            return
        t1 = time.perf_counter()
        metrics.STAGE_DECODE.observe(t1 - t0)
        metrics.EVENTS.labels(type(event).__name__).inc()
        assert self.live is not None
        view = self.live.view
        now_ns = t_in
        # Everything between decoding and publishing is pure: an exception here is a defect
        # that fails the same way on every delivery, so it is said and the partition moves on.
        links: tuple[CompiledLink, ...] = ()
        plans: list[tuple[CompiledLink, CopyPlan]] = []
        batches: Batches | None = None
        try:
            refusal = check_master_event(
                event,
                subjects.master_from_subject(msg.subject),
                view.symbols.get((event.master, event.symbol)),
            )
            if refusal is None:
                if arrival_judged(event.ts_ns, now_ns, self._skew_ns):
                    event = self._judged_by_arrival(event, now_ns)
                fan_out = self.live.fan_outs.get(event.master, event.symbol)
                if fan_out is not None:
                    links = fan_out.links
                    trace = msgspec.structs.replace(
                        event.trace, replicator_in_ns=t_in, replicator_out_ns=time.time_ns()
                    )
                    if self.config.planner == "reference":
                        plans = plan_event(event, links, view, now_ns, trace)
                    else:
                        if self.config.batch_by_connector and splice.AVAILABLE and fan_out.splices:
                            batches = Batches()  # a fan-out worth splicing
                        plans = plan_fan_out(event, fan_out, view, now_ns, trace, batches)
        except Exception as exc:
            log.exception("copy_rules_failed", event_id=event.event_id)
            await self._refuse(
                msg, event, RejectionReason.PLANNING_FAILED,
                f"the copy rules failed on this event: {exc!r}", {"error": repr(exc)},
            )  # fmt: skip
            return
        if refusal is not None:
            await self._refuse(msg, event, *refusal)
            return
        if not links:
            await msg.ack()  # nobody copies this master
            self.events_processed += 1
            return
        t2 = time.perf_counter()
        metrics.STAGE_RULES.observe(t2 - t1)
        try:
            await self._count_daily_trades(event, plans, now_ns)
            await self._publish_plans(event, plans, msg, batches)
        except _NEVER_STORABLE as exc:
            await self._fan_out_impossible(msg, event, exc)
            return
        except NotStored as exc:
            if isinstance(exc.cause, nats.js.errors.BadRequestError):
                # The stream refused the message itself (400): no delivery can change that.
                await self._fan_out_impossible(msg, event, exc)
                return
            await self._retry_later(msg, event, exc)
            return
        except (_LinkStateContention, nats.errors.Error, TimeoutError, ConnectionError) as exc:
            await self._retry_later(msg, event, exc)
            return
        except Exception as exc:
            await self._fan_out_impossible(msg, event, exc)
            return
        t3 = time.perf_counter()
        await msg.ack()
        metrics.STAGE_PUBLISH.observe(t3 - t2)
        metrics.STAGE_TOTAL.observe(t3 - t0)
        self.events_processed += 1

    async def _retry_later(self, msg: Any, event: MasterEvent, exc: Exception) -> None:
        """Transient (NATS away, slow, reconnecting): delivered again after a delay, and dedup
        makes the redo exact — up to ``max_deliveries``, then given up with a rejection."""
        metrics.PUBLISH_FAILURES.inc()
        delivered = _deliveries(msg)
        log.error("fan_out_failed", event_id=event.event_id, error=repr(exc),
                  delivery=delivered, max_deliveries=self.config.max_deliveries)  # fmt: skip
        if delivered < self.config.max_deliveries:
            await msg.nak(delay=self._redelivery_delay(delivered))
            return
        await self._refuse(
            msg, event, RejectionReason.PUBLISH_FAILED,
            f"NATS did not store the fan-out in {delivered} deliveries: {exc!r}",
            {"deliveries": delivered, "error": repr(exc)},
        )  # fmt: skip

    def _judged_by_arrival(self, event: MasterEvent, arrival_ns: int) -> MasterEvent:
        """A timestamp beyond the clock-skew tolerance is never trusted: the arrival time
        stands in for it, so a future date cannot stretch the signal age or the day."""
        metrics.FUTURE_DATED.inc()
        log.warning(
            "master_event_future_dated",
            event_id=event.event_id,
            master=event.master,
            ahead_s=round((event.ts_ns - arrival_ns) / 1e9, 3),
            clock_skew_s=self.config.clock_skew_s,
        )
        return msgspec.structs.replace(event, ts_ns=arrival_ns)

    def _redelivery_delay(self, delivered: int) -> float:
        return min(
            self.config.redelivery_delay_s * 2 ** max(delivered - 1, 0), _REDELIVERY_DELAY_MAX_S
        )

    async def _fan_out_impossible(self, msg: Any, event: MasterEvent, exc: Exception) -> None:
        # The same event would fail the same way forever and block its partition: take it
        # out (it stays in the stream for inspection), count it and say why.
        metrics.BAD_MESSAGES.labels("fan_out").inc()
        log.error("fan_out_impossible", event_id=event.event_id, error=repr(exc))
        await self._refuse(
            msg, event, RejectionReason.FAN_OUT_IMPOSSIBLE,
            f"the follower orders cannot be stored: {exc!r}", {"error": repr(exc)},
        )  # fmt: skip

    async def _refuse(
        self,
        msg: Any,
        event: MasterEvent | None,
        reason: RejectionReason,
        message: str,
        numbers: dict[str, float | str | None],
    ) -> None:
        """Take the event out of its partition (``term``; it stays in the stream) and tell
        its producer why on ``tc.v1.master.<account>.rejections``.

        The rejection is stored before the event is terminated. If NATS will not store it,
        the event is delivered again later; after ``max_deliveries`` it is terminated anyway
        (logged), because a producer's silence is better than a partition that never moves.
        """
        cfg = self.config
        master = subjects.master_from_subject(msg.subject) or "unknown"
        seq = _stream_seq(msg)
        rejection = MasterEventRejected(
            rejection_id=f"rejected:{seq}",
            master=master,
            subject=subjects.master_events(master),
            reason=reason,
            message=message[:_MESSAGE_MAX],
            ts_ns=time.time_ns(),
            event_id="" if event is None else event.event_id,
            event_type="" if event is None else event.__struct_config__.tag,
            stream_seq=seq,
            numbers=numbers,
        )
        log.warning(
            "master_event_rejected",
            reason=reason.value,
            master=master,
            event_id=rejection.event_id,
            stream_seq=seq,
            message=rejection.message,
        )
        publication: Publication = (
            subjects.master_rejections(master),
            codec.encode(rejection),
            rejection.rejection_id,
        )
        try:
            await publish_stored(
                self.js, [publication], timeout_s=cfg.publish_timeout_s,
                attempts=cfg.publish_attempts, retried=metrics.PUBLISH_RETRIES.inc,
            )  # fmt: skip
        except Exception as exc:
            delivered = _deliveries(msg)
            log.error("rejection_not_stored", master=master, stream_seq=seq, error=repr(exc),
                      delivery=delivered)  # fmt: skip
            if delivered < cfg.max_deliveries:
                await msg.nak(delay=self._redelivery_delay(delivered))
                return
        metrics.REJECTIONS.labels(reason.value).inc()
        await msg.term()

    async def _publish_plans(
        self,
        event: MasterEvent,
        plans: list[tuple[CompiledLink, CopyPlan]],
        msg: Any = None,
        batches: Batches | None = None,
    ) -> None:
        """Store every order and decision: all sent at once, their acks awaited together,
        each wait bounded (``publish_stored``). ``batches``: the connectors' batches the
        planner filled (``fanout.plan_fan_out``)."""
        accounts = self.live.view.accounts if self.config.batch_by_connector else None
        published: dict[str, int] = {}
        messages = fan_out_publications(
            event, plans, accounts, self._batch_suffix, time.time_ns(), published, batches
        )
        if not messages:
            return
        cfg = self.config
        # While it retries, the event stays this instance's: tell the server it is in progress.
        await publish_stored(
            self.js, messages, timeout_s=cfg.publish_timeout_s, attempts=cfg.publish_attempts,
            retried=metrics.PUBLISH_RETRIES.inc,
            before_retry=None if msg is None else msg.in_progress,
        )  # fmt: skip
        self._count_published(plans, published)

    def _count_published(
        self, plans: list[tuple[CompiledLink, CopyPlan]], published: dict[str, int]
    ) -> None:
        """Metrics and logs of a stored fan-out: decisions one by one (they are few), orders
        once per kind."""
        for cl, plan in plans:
            if not plan.decisions:
                continue
            for decision in plan.decisions:
                metrics.DECISIONS_BY_RULE[decision.rule, decision.outcome].inc()
                self._link_decisions.count(cl.link_id, cl.link.follower, decision.outcome)
                log.info(
                    "copy_decision",
                    link=cl.link_id,
                    rule=decision.rule.value,
                    outcome=decision.outcome.value,
                    message=decision.message,
                )
        # Counted once per kind of order and fan-out, not once per follower.
        for tag, count in published.items():
            metrics.ORDERS_PUBLISHED.labels(tag).inc(count)

    async def _count_daily_trades(
        self, event: MasterEvent, plans: list[tuple[CompiledLink, CopyPlan]], now_ns: int
    ) -> None:
        """Count every new copy toward its link's daily limit: all links at once, so a fan-out
        waits one KV round trip however many of its links have a limit."""
        counted = [
            self._count_daily_trade(event, cl, plan, now_ns)
            for cl, plan in plans
            if plan.daily_key is not None and cl.link.daily_trade_limit is not None
        ]
        if not counted:
            return
        # Let every count finish before raising, so none is left running after a redelivery.
        for result in await asyncio.gather(*counted, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _count_daily_trade(
        self, event: MasterEvent, cl: CompiledLink, plan: CopyPlan, now_ns: int
    ) -> None:
        """Record the copy in the link's daily count, or turn it into a skip if the count is full.

        Compare-and-set on the KV entry: a stale cache can only undercount, and the write fails
        then, so the limit is checked again on the fresh value.
        """
        assert self.live is not None and plan.daily_key is not None
        limit = cl.link.daily_trade_limit
        assert limit is not None
        today = trading_day(now_ns)

        def change(state: LinkState) -> LinkState | None:
            opened = state.opened_today(today)
            if plan.daily_key in opened:
                return None
            if len(opened) >= limit:
                raise _LimitReached(len(opened))
            new = msgspec.structs.replace(state)
            if new.day != today:
                new.day, new.day_start_equity = today, None
            new.opened = [*opened, plan.daily_key]
            return new

        try:
            await self._update_link_state(cl.link_id, change)
        except _LimitReached as full:
            plan.order = None
            plan.daily_key = None
            plan.decisions = daily_limit_reached(event, cl, now_ns, full.count, today).decisions

    async def _update_link_state(self, link_id: str, change: Any) -> LinkState:
        """Compare-and-set loop on one link's state entry, every round trip bounded.

        A write whose answer does not come in time may or may not have landed: the entry is
        read again and ``change`` decides on what is really there (it returns None when the
        change is already in), so retrying is exact.
        """
        assert self.live is not None
        kv = self.live.buckets[subjects.KV_LINK_STATE]
        timeout_s = self.config.publish_timeout_s
        state = self.live.view.link_state(link_id)
        revision = self.live.link_state_revisions.get(link_id, 0)
        for _ in range(_CAS_RETRIES):
            new = change(state)
            if new is None:
                return state
            payload = link_state_encoder.encode(new)
            try:
                if revision:
                    revision = await asyncio.wait_for(
                        kv.update(link_id, payload, last=revision), timeout_s
                    )
                else:
                    revision = await asyncio.wait_for(kv.create(link_id, payload), timeout_s)
            except (nats.js.errors.KeyWrongLastSequenceError, TimeoutError):
                state, revision = await self._read_link_state(link_id)
                continue
            self.live.remember_link_state(link_id, new, revision)
            return new
        raise _LinkStateContention(
            f"link state {link_id} kept changing (or not answering) under {_CAS_RETRIES} updates"
        )

    async def _read_link_state(self, link_id: str) -> tuple[LinkState, int]:
        assert self.live is not None
        kv = self.live.buckets[subjects.KV_LINK_STATE]
        try:
            entry = await asyncio.wait_for(kv.get(link_id), self.config.publish_timeout_s)
        except nats.js.errors.KeyNotFoundError:
            return LinkState(), 0
        if entry.value is None:
            return LinkState(), entry.revision or 0
        return link_state_decoder.decode(entry.value), entry.revision or 0

    async def _store(self, subject: str, payload: bytes, msg_id: str) -> None:
        """One message outside a fan-out (a protection's decision or close-all), bounded."""
        cfg = self.config
        await publish_stored(
            self.js, [(subject, payload, msg_id)], timeout_s=cfg.publish_timeout_s,
            attempts=cfg.publish_attempts, retried=metrics.PUBLISH_RETRIES.inc,
        )  # fmt: skip

    async def _on_follower_account(self, account: AccountState) -> None:
        """Equity protections: every instance evaluates, compare-and-set lets one pause."""
        assert self.live is not None
        for cl in self.live.links_by_follower.get(account.account, ()):
            if not has_equity_protection(cl.link):
                continue
            try:
                await self._protect(cl, account)
            except Exception as exc:
                log.error("protection_failed", link=cl.link_id, error=repr(exc))

    async def _protect(self, cl: CompiledLink, account: AccountState) -> None:
        now_ns = time.time_ns()
        fired: list[Any] = []

        def change(state: LinkState) -> LinkState | None:
            new, trigger = track_equity(cl.link, account, state, now_ns)
            fired[:] = [trigger]
            return None if new == state else new

        state = await self._update_link_state(cl.link_id, change)
        trigger = fired[0] if fired else None
        if trigger is not None:
            outcome = (
                DecisionOutcome.CLOSED_ALL if state.close_all_pending else DecisionOutcome.PAUSED
            )
            decision = CopyDecision(
                decision_id=f"protect:{cl.link_id}:{trigger.rule.value}:{state.paused_ns}",
                link_id=cl.link_id,
                master=cl.link.master,
                follower=cl.link.follower,
                outcome=outcome,
                rule=trigger.rule,
                message=f"{trigger.message}: link paused"
                + (", closing everything it opened" if state.close_all_pending else ""),
                ts_ns=now_ns,
                numbers=trigger.numbers,
            )
            await self._store(cl.decision_subject, codec.encode(decision), decision.decision_id)
            metrics.DECISIONS_BY_RULE[trigger.rule, outcome].inc()
            self._link_decisions.count(cl.link_id, cl.link.follower, outcome)
            log.warning(
                "link_paused", link=cl.link_id, rule=trigger.rule.value, message=trigger.message
            )
        if state.close_all_pending:
            await self._close_all(cl, state, now_ns)

    async def _close_all(self, cl: CompiledLink, state: LinkState, now_ns: int) -> None:
        order = FollowerCloseAll(
            order_id=f"close_all:{cl.link_id}:{state.paused_ns}",
            link_id=cl.link_id,
            follower=cl.link.follower,
            master=cl.link.master,
            master_event_id="",
            symbol="",
            ts_ns=now_ns,
            reason=state.paused_rule,
        )
        await self._store(cl.order_subject, codec.encode(order), order.order_id)
        metrics.ORDERS_PUBLISHED.labels("close_all").inc()

        def sent(current: LinkState) -> LinkState | None:
            if not current.close_all_pending or current.paused_ns != state.paused_ns:
                return None
            return msgspec.structs.replace(current, close_all_pending=False)

        await self._update_link_state(cl.link_id, sent)

    def _sync_link_metrics(self) -> None:
        """Every known link's decision series at 0 from the start; gone links' removed. Only
        after the links changed: a pass over 10,000 links holds the event loop ≈ 3 ms."""
        live = self.live
        if live is not None and live.links_changes != self._links_synced:
            self._link_decisions.sync((k, cl.link.follower) for k, cl in live.links.items())
            self._links_synced = live.links_changes

    def link_metrics(self) -> bytes:
        """The per-link decision series, for ``/metrics``."""
        return self._link_decisions.exposition()

    async def _poll_lag(self) -> None:
        """Each partition's backlog and progress, as the shared consumer sees it."""
        while not self._stopping.is_set():
            self._sync_link_metrics()
            for partition in range(self.config.partitions):
                try:
                    name = consumer_name(partition, self.config.shard, self.config.shards)
                    info = await asyncio.wait_for(
                        self.js.consumer_info(MASTER_EVENTS_STREAM, name),
                        self.config.publish_timeout_s,
                    )
                except Exception:
                    continue  # NATS away: health says so through nats_connected
                pending = info.num_pending + info.num_ack_pending
                metrics.CONSUMER_LAG.labels(str(partition)).set(pending)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                self._partition_progress[partition].observe(pending > 0, floor)
            await asyncio.sleep(self.config.lag_poll_s)


def tune_gc() -> None:
    """Keep the cyclic collector off the hot path.

    A fan-out allocates thousands of short-lived, acyclic objects (freed by reference
    counting), which would trigger many generation-0 passes over a large heap of cached
    links and specs. Freezing the heap built at start-up and raising the thresholds turns
    multi-millisecond pauses into rare ones; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


class _LimitReached(Exception):
    def __init__(self, count: int) -> None:
        self.count = count


class _LinkStateContention(Exception):
    """The link-state entry kept changing or not answering: worth another delivery."""


def _deliveries(msg: Any) -> int:
    """How many times JetStream has delivered this message (1 on the first delivery)."""
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:
        return 1


def _stream_seq(msg: Any) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return 0


async def run_replicator(config: ReplicatorConfig) -> None:
    """Run until cancelled or signalled; serves /metrics and /healthz when a port is set."""
    import signal

    from engine.runtime.http import OpsServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    replicator = await _start_until_up(config, stop)
    if replicator is None:
        return
    ops = None
    if config.metrics_port is not None:
        ops = OpsServer(
            config.metrics_host, config.metrics_port, replicator.health, replicator.link_metrics
        )
        await ops.start()
        log.info("ops_listening", host=config.metrics_host, port=ops.port)
    try:
        await stop.wait()
    finally:
        if ops is not None:
            await ops.stop()
        await replicator.stop()


async def _start_until_up(config: ReplicatorConfig, stop: asyncio.Event) -> Replicator | None:
    """Start, retrying with backoff while NATS is away or restarting (crash-only: a replicator
    started during a NATS restart waits for it instead of exiting). None when told to stop."""
    delay = 0.5
    while not stop.is_set():
        replicator = Replicator(config)
        try:
            await replicator.start()
            return replicator
        except (nats.errors.Error, TimeoutError, ConnectionError) as exc:
            if isinstance(exc, nats.errors.AuthorizationError):
                raise  # the wrong key stays wrong: say so and exit
            log.warning("replicator_start_failed", error=repr(exc), retry_in_s=delay)
            with contextlib.suppress(Exception):
                await replicator.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 10.0)
    return None
