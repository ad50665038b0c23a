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
from engine.replicator import metrics
from engine.replicator.config import ReplicatorConfig
from engine.replicator.facts import CompiledLink
from engine.replicator.live import LiveView
from engine.replicator.protection import has_equity_protection, track_equity
from engine.replicator.rules import CopyPlan, daily_limit_reached, plan_event
from engine.replicator.state import LinkState, link_state_encoder
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsconn import connect
from schemas import codec, subjects
from schemas.account import AccountState
from schemas.decisions import CopyDecision, DecisionOutcome
from schemas.master import MasterEvent
from schemas.orders import FollowerCloseAll, FollowerOrder, FollowerOrderBatch
from schemas.streams import MASTER_EVENTS_STREAM, replicator_consumer

log = structlog.get_logger("tradecopy.replicator")

MSG_ID = "Nats-Msg-Id"
_CAS_RETRIES = 5


DELIVER_GROUP = "tc-replicators"


def deliver_subject(partition: int) -> str:
    """Where partition ``partition``'s consumer pushes; outside every stream's subjects."""
    return f"{subjects.PREFIX}.deliver.replicator.p{partition}"


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

    async def start(self) -> None:
        cfg = self.config
        self.nc = await connect(cfg.nats_url, f"tradecopy-replicator-{cfg.instance}")
        # A large pending-publish allowance: one fan-out may hold 1,000+ unacknowledged orders.
        self.js = self.nc.jetstream(publish_async_max_pending=65_536)
        storage = StorageType.MEMORY if cfg.memory_storage else StorageType.FILE
        await ensure_streams(self.js, cfg.partitions, storage)
        buckets = await ensure_buckets(self.js, storage)
        self.live = LiveView(buckets)
        self.live.on_follower_account(self._on_follower_account)
        await self.live.start()
        for partition in range(cfg.partitions):
            await self._subscribe(partition)
        for partition in range(cfg.partitions):
            await self._ensure_consumer(partition)
        self._tasks.append(asyncio.create_task(self._poll_lag()))
        tune_gc()
        log.info(
            "replicator_started",
            instance=cfg.instance,
            partitions=cfg.partitions,
            links=len(self.live.links),
            nats=cfg.nats_url,
        )

    async def stop(self) -> None:
        self._stopping.set()
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

    def health(self) -> dict[str, object]:
        connected = self.nc is not None and self.nc.is_connected
        return {
            "ok": bool(connected and self.live is not None),
            "instance": self.config.instance,
            "nats_connected": connected,
            "links": 0 if self.live is None else len(self.live.links),
            "events_processed": self.events_processed,
        }

    async def _ensure_consumer(self, partition: int) -> None:
        """The partition's durable push consumer, shared by every instance's queue group."""
        name = replicator_consumer(partition)
        config = ConsumerConfig(
            durable_name=name,
            deliver_subject=deliver_subject(partition),
            deliver_group=DELIVER_GROUP,
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

    async def _subscribe(self, partition: int) -> None:
        # One callback task per subscription: a partition's events run one after another,
        # and with max_ack_pending=1 the server sends the next only after the ack.
        sub = await self.nc.subscribe(
            deliver_subject(partition), queue=DELIVER_GROUP, cb=self._on_master_message
        )
        self._subscriptions.append(sub)

    async def _on_master_message(self, msg: Any) -> None:
        try:
            await self.handle_master_event(msg)
        except Exception as exc:
            # Unacknowledged: redelivered after ack_wait, dedup keeps the redo exact.
            metrics.PUBLISH_FAILURES.inc()
            log.error("master_event_failed", subject=msg.subject, error=repr(exc))

    async def handle_master_event(self, msg: Any) -> None:
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
            await msg.term()
            return
        t1 = time.perf_counter()
        metrics.STAGE_DECODE.observe(t1 - t0)
        metrics.EVENTS.labels(type(event).__name__).inc()
        assert self.live is not None
        links = self.live.links_by_master.get(event.master, ())
        if not links:
            await msg.ack()
            self.events_processed += 1
            return
        trace = msgspec.structs.replace(
            event.trace, replicator_in_ns=t_in, replicator_out_ns=time.time_ns()
        )
        view = self.live.view
        now_ns = t_in
        plans = plan_event(event, links, view, now_ns, trace)
        t2 = time.perf_counter()
        metrics.STAGE_RULES.observe(t2 - t1)
        try:
            await self._count_daily_trades(event, plans, now_ns)
            await self._publish_plans(event, plans)
        except (nats.errors.Error, TimeoutError, ConnectionError) as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.error("fan_out_failed", event_id=event.event_id, error=repr(exc))
            # Transient (NATS away, slow, reconnecting): redelivered, dedup makes the redo exact.
            await msg.nak(delay=0.5)
            return
        except Exception as exc:
            # The same event would fail the same way forever and block its partition: take it
            # out (it stays in the stream for inspection), count it and say why.
            metrics.BAD_MESSAGES.labels("fan_out").inc()
            log.error("fan_out_impossible", event_id=event.event_id, error=repr(exc))
            await msg.term()
            return
        t3 = time.perf_counter()
        await msg.ack()
        metrics.STAGE_PUBLISH.observe(t3 - t2)
        metrics.STAGE_TOTAL.observe(t3 - t0)
        self.events_processed += 1

    async def _publish_plans(
        self, event: MasterEvent, plans: list[tuple[CompiledLink, CopyPlan]]
    ) -> None:
        """Publish every order and decision, then wait for all their acks at once."""
        publish = self.js.publish_async
        encode = codec.encode
        futures = []
        batches: dict[str, list[FollowerOrder]] = {}
        accounts = self.live.view.accounts if self.config.batch_by_connector else None
        for cl, plan in plans:
            order = plan.order
            if order is not None:
                state = None if accounts is None else accounts.get(cl.link.follower)
                if state is not None and state.connector:
                    batches.setdefault(state.connector, []).append(order)
                else:
                    futures.append(
                        await publish(
                            cl.order_subject, encode(order), headers={MSG_ID: order.order_id}
                        )
                    )
            for decision in plan.decisions:
                futures.append(
                    await publish(
                        cl.decision_subject,
                        encode(decision),
                        headers={MSG_ID: decision.decision_id},
                    )
                )
        if batches:
            now_ns = time.time_ns()
            for connector, orders in batches.items():
                batch = FollowerOrderBatch(
                    batch_id=f"{event.event_id}@{connector}",
                    connector=connector,
                    master=event.master,
                    master_event_id=event.event_id,
                    ts_ns=now_ns,
                    orders=orders,
                )
                futures.append(
                    await publish(
                        subjects.connector_orders(connector),
                        encode(batch),
                        headers={MSG_ID: batch.batch_id},
                    )
                )
        if not futures:
            return
        acks = await asyncio.gather(*futures)
        for cl, plan in plans:
            if plan.order is not None:
                metrics.ORDERS_PUBLISHED.labels(plan.order.__struct_config__.tag).inc()
            for decision in plan.decisions:
                metrics.DECISIONS.labels(decision.rule.value, decision.outcome.value).inc()
                log.info(
                    "copy_decision",
                    link=cl.link_id,
                    rule=decision.rule.value,
                    outcome=decision.outcome.value,
                    message=decision.message,
                )
        del acks

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
        """Compare-and-set loop on one link's state entry."""
        assert self.live is not None
        kv = self.live.buckets[subjects.KV_LINK_STATE]
        state = self.live.view.link_state(link_id)
        revision = self.live.link_state_revisions.get(link_id, 0)
        for _ in range(_CAS_RETRIES):
            new = change(state)
            if new is None:
                return state
            payload = link_state_encoder.encode(new)
            try:
                if revision:
                    revision = await kv.update(link_id, payload, last=revision)
                else:
                    revision = await kv.create(link_id, payload)
            except nats.js.errors.KeyWrongLastSequenceError:
                state, revision = await self._read_link_state(link_id)
                continue
            self.live.remember_link_state(link_id, new, revision)
            return new
        raise RuntimeError(f"link state {link_id} kept changing under {_CAS_RETRIES} updates")

    async def _read_link_state(self, link_id: str) -> tuple[LinkState, int]:
        from engine.replicator.state import link_state_decoder

        assert self.live is not None
        kv = self.live.buckets[subjects.KV_LINK_STATE]
        try:
            entry = await kv.get(link_id)
        except nats.js.errors.KeyNotFoundError:
            return LinkState(), 0
        if entry.value is None:
            return LinkState(), entry.revision or 0
        return link_state_decoder.decode(entry.value), entry.revision or 0

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
            await self.js.publish(
                cl.decision_subject, codec.encode(decision), headers={MSG_ID: decision.decision_id}
            )
            metrics.DECISIONS.labels(trigger.rule.value, outcome.value).inc()
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
        await self.js.publish(
            cl.order_subject, codec.encode(order), headers={MSG_ID: order.order_id}
        )
        metrics.ORDERS_PUBLISHED.labels("close_all").inc()

        def sent(current: LinkState) -> LinkState | None:
            if not current.close_all_pending or current.paused_ns != state.paused_ns:
                return None
            return msgspec.structs.replace(current, close_all_pending=False)

        await self._update_link_state(cl.link_id, sent)

    async def _poll_lag(self) -> None:
        while not self._stopping.is_set():
            for partition in range(self.config.partitions):
                try:
                    info = await self.js.consumer_info(
                        MASTER_EVENTS_STREAM, replicator_consumer(partition)
                    )
                except Exception:
                    continue
                metrics.CONSUMER_LAG.labels(str(partition)).set(
                    info.num_pending + info.num_ack_pending
                )
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


async def run_replicator(config: ReplicatorConfig) -> None:
    """Run until cancelled or signalled; serves /metrics and /healthz when a port is set."""
    import signal

    from engine.runtime.http import OpsServer

    replicator = Replicator(config)
    await replicator.start()
    ops = None
    if config.metrics_port is not None:
        ops = OpsServer(config.metrics_host, config.metrics_port, replicator.health)
        await ops.start()
        log.info("ops_listening", host=config.metrics_host, port=ops.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if ops is not None:
            await ops.stop()
        await replicator.stop()
