"""The strategy drive: each deployment's signals from TC_SIGNALS become manual orders on its
paper master account, so a strategy's trades are ordinary master events downstream.

The production counterpart of ``engine.backtest.LiveDriver``: the same ``orders_for`` rules,
but the master is a real account behind its connector, its position is what the ledger
recorded (``ledger_account_facts`` folded with ``fold_account``, as the API's TradingView path
reads it), and the orders travel as the API's manual orders do: ``FollowerOrder`` with
``manual=True`` on ``tc.v1.follower.<master>.orders``, stored in JetStream under their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Histogram

from engine.core.book import OpenPosition
from engine.core.volume import STEP_EPSILON
from engine.runtime.ledger_reads import (
    account_facts,
    open_positions,
    settled_orders,
    unreported_orders,
)
from engine.runtime.publishing import NotStored, publish_stored
from engine.signals.config import StrategyDeployment
from engine.signals.deployments import DeploymentsWatch
from engine.signals.drive import MasterOrder, OrderKind, net_position, orders_for
from engine.signals.messages import StrategySignal, run_id, signal_decoder
from schemas import codec, subjects
from schemas.account import SymbolSpec
from schemas.orders import (
    MANUAL_LINK_ID,
    FollowerClose,
    FollowerOpen,
    FollowerOrder,
    manual_order_id,
)
from schemas.streams import SIGNALS_STREAM

log = structlog.get_logger("tradecopy.signals.drive")

_Seconds = Annotated[float, msgspec.Meta(gt=0.0, le=86_400.0)]

SIGNALS_HANDLED = Counter(
    "tradecopy_signals_drive_signals_total",
    "Strategy signals the drive finished with, by outcome (traded, nothing to do, stale, "
    "repeated, below_minimum, invalid)",
    ["outcome"],
)
SIGNALS_DELAYED = Counter(
    "tradecopy_signals_drive_delayed_total",
    "Signals handed back for a later redelivery, by reason (ledger behind, no symbol spec, "
    "orders not stored, NATS or database errors)",
    ["reason"],
)
ORDERS_SENT = Counter(
    "tradecopy_signals_drive_orders_total", "Manual orders the drive stored for masters", ["kind"]
)
SIGNAL_DELAY = Histogram(
    "tradecopy_signals_drive_signal_age_seconds",
    "From the worker emitting a signal to the drive storing its orders",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


class DriveConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the drive treats a signal: its age limit, and how long it waits for the ledger."""

    max_signal_age_s: _Seconds = 300.0
    """A signal emitted longer ago than this (wall clock, from ``emitted_ns``) is acked and
    skipped: after an outage the drive never trades a candle the market has left behind.
    Its opens also carry this as ``expires_ns``, so a connector that is behind refuses them."""
    settle_timeout_s: _Seconds = 10.0
    """How long a signal waits for the ledger to show the reports of the drive's previous
    orders on the master; then it is handed back (nak) and tried again after ``retry_delay_s``."""
    settle_poll_s: _Seconds = 0.1
    retry_delay_s: _Seconds = 2.0
    ack_wait_s: _Seconds = 60.0
    """A signal not acked within this (a drive that died mid-signal) is redelivered; its
    orders' ids are the same, so what was already stored is dropped as a duplicate."""
    publish_timeout_s: _Seconds = 5.0
    fetch_timeout_s: _Seconds = 1.0

    def __post_init__(self) -> None:
        # A signal must be answered before the server gives it up for lost: the settle wait
        # and the publish attempts fit inside ack_wait, or every slow signal would act twice.
        longest = self.settle_timeout_s + 3 * self.publish_timeout_s
        if longest >= self.ack_wait_s:
            raise ValueError(
                f"ack_wait_s ({self.ack_wait_s:g}) must exceed settle_timeout_s + 3 x "
                f"publish_timeout_s ({longest:g})"
            )


class DriveOutcome(enum.StrEnum):
    TRADED = "traded"
    NOTHING = "nothing"
    """The master already holds what the signal asks (a repeat, or a hold)."""
    STALE = "stale"
    REPEATED = "repeated"
    """A candle before the last one this drive acted on for the deployment."""
    BELOW_MINIMUM = "below_minimum"
    INVALID = "invalid"
    """Another deployment's symbol or timeframe, or a message that does not decode."""
    DELAYED = "delayed"
    """Not acted on yet: handed back for redelivery (the reason is logged and counted)."""


def drive_consumer_name(deployment: StrategyDeployment) -> str:
    """The deployment's durable consumer on TC_SIGNALS: one per (version, symbol, timeframe,
    master), so moving a deployment to another master starts a fresh consumer."""
    key = "\x00".join(
        (deployment.version.version_id, deployment.symbol, deployment.timeframe, deployment.master)
    )
    return "signals-drive-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def deployment_id(deployment: StrategyDeployment) -> str:
    return f"{deployment.version.version_id}:{deployment.symbol}:{deployment.timeframe}"


def lots_for(volume: float, spec: SymbolSpec) -> float:
    """The deployment's lot rounded down to the master symbol's step, at most its maximum
    (0.0 when that falls below the minimum)."""
    steps = math.floor(volume / spec.volume_step + STEP_EPSILON)
    lots = min(round(steps * spec.volume_step, 8), spec.volume_max)
    return lots if lots >= spec.volume_min - STEP_EPSILON else 0.0


def master_orders(
    deployment: StrategyDeployment,
    emitted: StrategySignal,
    held: list[OpenPosition],
    orders: list[MasterOrder],
    volume: float,
    now_ns: int,
    expires_ns: int,
) -> list[FollowerOrder]:
    """``orders_for``'s orders as the master's manual orders.

    Ids come from the signal's run id and the step's place (a close also names the position
    it closes): a redelivered signal that still finds the master where the first delivery
    found it makes the same orders, which JetStream and the connector's journal execute once.
    """
    master = deployment.master
    run = run_id(emitted.version_id, emitted.symbol, emitted.timeframe, emitted.candle_close_ns)
    base: dict[str, Any] = {
        "link_id": MANUAL_LINK_ID, "follower": master, "master": master,
        "symbol": deployment.symbol, "ts_ns": now_ns, "manual": True,
    }  # fmt: skip
    out: list[FollowerOrder] = []
    for step, order in enumerate(orders):
        if order.kind is OrderKind.OPEN:
            order_id = manual_order_id(master, f"{run}:{step}")
            out.append(FollowerOpen(
                **base, order_id=order_id, master_event_id=order_id, master_position_id=order_id,
                side=order.side, volume=volume, sl=order.sl, tp=order.tp,
                comment=(order.comment or f"sv {emitted.version_id[3:15]}")[:31],
                expires_ns=expires_ns,
            ))  # fmt: skip
            continue
        for position in held:
            if position.symbol != deployment.symbol or position.side is not order.side:
                continue
            order_id = manual_order_id(master, f"{run}:{step}:{position.position_id}")
            out.append(FollowerClose(
                **base, order_id=order_id, master_event_id=order_id,
                master_position_id=position.position_id, ratio=1.0,
            ))  # fmt: skip
    return out


class _Delay(Exception):
    """The signal cannot be acted on yet: hand it back for redelivery."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Running:
    """One deployment being driven: its consumer and the task fetching from it."""

    def __init__(self, deployment: StrategyDeployment, sub: Any, task: asyncio.Task[None]) -> None:
        self.deployment = deployment
        self.sub = sub
        self.task = task


class StrategyDrive:
    """Drives every deployment that names a master: the configured ones and those in the KV
    bucket ``tc_signal_deployments`` (watched: a put starts or replaces, a delete stops).

    Per deployment: a durable consumer on TC_SIGNALS filtered to the version's signals subject,
    explicit ack, one signal in flight, so signals act in stream order. Per master: one signal
    at a time across its deployments, and before acting the drive waits (bounded) until the
    ledger holds each order it sent the master before together with its report, so two quick
    signals never act on a position the ledger has not caught up with.
    """

    def __init__(
        self,
        nc: Any,
        js: Any,
        pool: Any,
        config: DriveConfig | None = None,
        deployments: Iterable[StrategyDeployment] = (),
        *,
        watch_deployments: bool = True,
        clock: Callable[[], int] = time.time_ns,
        on_signal: Callable[[StrategySignal, DriveOutcome], None] | None = None,
    ) -> None:
        """``clock`` is the one the workers stamp ``emitted_ns`` with: a signal's age is
        measured on it. Orders are stamped with the wall clock, as reports are.
        ``on_signal`` hears what became of each signal (a demo's log)."""
        self.nc = nc
        self.js = js
        self.pool = pool
        self.config = config or DriveConfig()
        self.clock = clock
        self.watch_deployments = watch_deployments
        self._configured = {deployment_id(d): d for d in deployments if d.master}
        self._bucket: DeploymentsWatch | None = None
        self._reconciling = asyncio.Lock()
        self._running: dict[str, _Running] = {}
        self._master_locks: dict[str, asyncio.Lock] = {}
        #: Orders sent per master whose report the ledger has not shown yet.
        self._pending: dict[str, set[str]] = {}
        #: The last candle acted on per deployment: an older or equal one is a repeat.
        self._last_candle: dict[str, int] = {}
        self._symbols: Any = None
        #: The latest outcomes (deployment, outcome), oldest first: tests and a demo's log.
        self.handled: deque[tuple[str, DriveOutcome]] = deque(maxlen=1_000)
        self.on_signal = on_signal

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the configured deployments and, when watching, the bucket's (returns once
        the bucket's current deployments are running)."""
        self._symbols = await self.js.key_value(subjects.KV_SYMBOLS)
        if self.watch_deployments:
            kv = await self.js.key_value(subjects.KV_SIGNAL_DEPLOYMENTS)
            self._bucket = DeploymentsWatch(kv, self._reconcile, component="drive")
            await self._bucket.start()
        await self._reconcile()
        log.info("strategy_drive_started", deployments=sorted(self._running))

    async def stop(self) -> None:
        if self._bucket is not None:
            await self._bucket.stop()
        for key in list(self._running):
            await self._stop_one(key)

    def health(self) -> dict[str, object]:
        return {"deployments_driven": sorted(self._running)}

    @property
    def deployments(self) -> dict[str, StrategyDeployment]:
        """What the drive runs now, by (version, symbol, timeframe): a deployment in the
        bucket replaces the configuration's of the same run."""
        merged = dict(self._configured)
        for deployment in ({} if self._bucket is None else self._bucket.current).values():
            key = deployment_id(deployment)
            if deployment.master:
                merged[key] = deployment
            else:  # the bucket says: signals only
                merged.pop(key, None)
        return merged

    async def _reconcile(self) -> None:
        # start() and the bucket's watch both reconcile: one at a time, or both would start
        # the same deployment and orphan one of its pulls.
        async with self._reconciling:
            await self._reconcile_now()

    async def _reconcile_now(self) -> None:
        wanted = self.deployments
        for key in [k for k, r in self._running.items() if wanted.get(k) != r.deployment]:
            await self._stop_one(key)
        for key, deployment in wanted.items():
            if key not in self._running:
                await self._start_one(key, deployment)

    async def _start_one(self, key: str, deployment: StrategyDeployment) -> None:
        name = drive_consumer_name(deployment)
        config = ConsumerConfig(
            durable_name=name,
            filter_subject=subjects.strategy_signals(deployment.version.version_id),
            ack_policy=AckPolicy.EXPLICIT,
            # A new deployment trades the signals from now on; an existing consumer resumes
            # where its acknowledgements end (the age limit skips what went stale meanwhile).
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=self.config.ack_wait_s,
            max_ack_pending=1,
            max_deliver=-1,
        )
        sub = await self.js.pull_subscribe(
            config.filter_subject, durable=name, stream=SIGNALS_STREAM, config=config
        )
        task = asyncio.create_task(self._pull(deployment, sub))
        self._running[key] = _Running(deployment, sub, task)
        log.info("drive_deployment_started", deployment=key, master=deployment.master,
                 consumer=name)  # fmt: skip

    async def _stop_one(self, key: str) -> None:
        running = self._running.pop(key)
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task
        with contextlib.suppress(Exception):
            await running.sub.unsubscribe()
        log.info("drive_deployment_stopped", deployment=key)

    # ------------------------------------------------------------------ consuming

    async def _pull(self, deployment: StrategyDeployment, sub: Any) -> None:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=self.config.fetch_timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a reconnect in progress: try again shortly
                log.warning("drive_fetch_failed", deployment=deployment_id(deployment),
                            error=repr(exc))  # fmt: skip
                await asyncio.sleep(self.config.retry_delay_s)
                continue
            for msg in msgs:
                await self._on_message(deployment, msg)

    async def _on_message(self, deployment: StrategyDeployment, msg: Any) -> None:
        try:
            emitted = signal_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._done(deployment, DriveOutcome.INVALID)
            log.error("drive_signal_invalid", deployment=deployment_id(deployment),
                      subject=msg.subject, error=str(exc))  # fmt: skip
            await self._answer(msg.term)
            return
        outcome = await self.act(deployment, emitted)
        if outcome is DriveOutcome.DELAYED:
            await self._answer(lambda: msg.nak(delay=self.config.retry_delay_s))
        else:
            await self._answer(msg.ack)

    @staticmethod
    async def _answer(send: Callable[[], Any]) -> None:
        try:
            await send()
        except Exception as exc:  # unanswered: redelivered after ack_wait, acted on once
            log.warning("drive_ack_failed", error=repr(exc))

    def _done(self, deployment: StrategyDeployment, outcome: DriveOutcome) -> DriveOutcome:
        if outcome is not DriveOutcome.DELAYED:
            SIGNALS_HANDLED.labels(outcome.value).inc()
        self.handled.append((deployment_id(deployment), outcome))
        return outcome

    # ------------------------------------------------------------------ one signal

    async def act(self, deployment: StrategyDeployment, emitted: StrategySignal) -> DriveOutcome:
        """Trade one signal of the deployment on its master; what became of it.

        Never raises for the signal's sake: a fault the next delivery may not meet (the
        ledger behind, no symbol spec yet, NATS or the database away) is ``DELAYED``.
        """
        key = deployment_id(deployment)
        bound = log.bind(deployment=key, master=deployment.master,
                         candle_close_ns=emitted.candle_close_ns,
                         action=emitted.signal.action.value)  # fmt: skip
        if (emitted.version_id, emitted.symbol, emitted.timeframe) != (
            deployment.version.version_id,
            deployment.symbol,
            deployment.timeframe,
        ):
            # The version's subject carries its other symbols' and timeframes' signals too.
            return self._done(deployment, DriveOutcome.INVALID if emitted.version_id !=
                              deployment.version.version_id else DriveOutcome.NOTHING)  # fmt: skip
        now = self.clock()
        age_s = (now - emitted.emitted_ns) / 1e9
        if age_s > self.config.max_signal_age_s:
            bound.warning("drive_signal_stale", age_s=round(age_s, 1),
                          max_age_s=self.config.max_signal_age_s)  # fmt: skip
            return self._done(deployment, DriveOutcome.STALE)
        # Only an older candle is skipped here: the same candle again (a redelivery) goes on
        # to the position check and its deterministic ids, which must hold anyway because
        # this memory does not survive a restart.
        if emitted.candle_close_ns < self._last_candle.get(key, -1):
            bound.info("drive_signal_repeated", last=self._last_candle[key])
            return self._done(deployment, DriveOutcome.REPEATED)
        lock = self._master_locks.setdefault(deployment.master, asyncio.Lock())
        async with lock:
            try:
                outcome = await self._trade(deployment, emitted, bound)
            except _Delay as exc:
                SIGNALS_DELAYED.labels(exc.reason).inc()
                bound.warning("drive_signal_delayed", reason=exc.reason, error=str(exc),
                              retry_s=self.config.retry_delay_s)  # fmt: skip
                outcome = DriveOutcome.DELAYED
            except Exception as exc:
                # Whatever else went wrong, the deployment's consumer must go on: the signal
                # comes back after the delay (its orders' ids are the same), loudly.
                SIGNALS_DELAYED.labels("error").inc()
                bound.exception("drive_signal_failed", error=repr(exc))
                outcome = DriveOutcome.DELAYED
        if outcome is not DriveOutcome.DELAYED:
            self._last_candle[key] = max(self._last_candle.get(key, -1), emitted.candle_close_ns)
        if self.on_signal is not None:
            self.on_signal(emitted, outcome)
        return self._done(deployment, outcome)

    async def _trade(
        self, deployment: StrategyDeployment, emitted: StrategySignal, bound: Any
    ) -> DriveOutcome:
        master = deployment.master
        held = [p for p in await self._settled_positions(master) if p.symbol == deployment.symbol]
        position = net_position(held, deployment.symbol)
        orders = orders_for(emitted, position, deployment.volume)
        if not orders:
            bound.info("drive_signal_nothing_to_do", position=position)
            return DriveOutcome.NOTHING
        volume = deployment.volume
        if any(o.kind is OrderKind.OPEN for o in orders):
            spec = await self._symbol_spec(master, deployment.symbol)
            volume = lots_for(deployment.volume, spec)
            if volume <= 0:
                bound.error("drive_volume_below_minimum", volume=deployment.volume,
                            volume_min=spec.volume_min, volume_step=spec.volume_step)  # fmt: skip
                return DriveOutcome.BELOW_MINIMUM
        # The age left to the signal, on the wall clock the connector judges ``expires_ns``
        # by (the signal's own clock may be another: a replay's, a skewed worker's).
        now = time.time_ns()
        left_ns = int(self.config.max_signal_age_s * 1e9) - (self.clock() - emitted.emitted_ns)
        manual = master_orders(deployment, emitted, held, orders, volume, now, now + left_ns)
        publications = [
            (subjects.follower_orders(master), codec.encode(o), o.order_id) for o in manual
        ]
        pending = self._pending.setdefault(master, set())
        # Pending before they go out: a report can arrive before the ack of the publish.
        pending.update(o.order_id for o in manual)
        try:
            await publish_stored(
                self.js, publications, timeout_s=self.config.publish_timeout_s, attempts=3
            )
        except (NotStored, nats.errors.Error) as exc:
            # Some may be stored: they stay pending, and the redelivery makes the same ids.
            raise _Delay("not_stored", str(exc)) from None
        for o in manual:
            ORDERS_SENT.labels("open" if isinstance(o, FollowerOpen) else "close").inc()
        SIGNAL_DELAY.observe(max(0.0, (self.clock() - emitted.emitted_ns) / 1e9))
        bound.info("drive_orders_sent", position=position,
                   orders=[f"{o.kind}:{o.side}" for o in orders],
                   order_ids=[o.order_id for o in manual], volume=volume)  # fmt: skip
        return DriveOutcome.TRADED

    async def _settled_positions(self, master: str) -> list[OpenPosition]:
        """The master's open positions once the ledger holds every order the drive sent it
        with its report (the fold needs both), and a report of every order sent to it within
        the signal age limit (a drive restarted with orders in flight); ``_Delay`` on timeout."""
        pending = self._pending.setdefault(master, set())
        deadline = time.monotonic() + self.config.settle_timeout_s
        since_ns = time.time_ns() - int(self.config.max_signal_age_s * 1e9)
        while True:
            try:
                async with self.pool.acquire() as conn:
                    facts = await account_facts(conn, master)
            except (OSError, TimeoutError) as exc:
                raise _Delay("database", repr(exc)) from None
            except Exception as exc:  # asyncpg's errors: the database is away or refused
                raise _Delay("database", repr(exc)) from None
            pending.difference_update(settled_orders(master, facts))
            waiting = unreported_orders(master, facts, since_ns) | pending
            if not waiting:
                return open_positions(master, facts)
            if time.monotonic() >= deadline:
                raise _Delay(
                    "ledger_behind",
                    f"the ledger shows no report yet of {len(waiting)} order(s) on {master}",
                )
            await asyncio.sleep(self.config.settle_poll_s)

    async def _symbol_spec(self, master: str, symbol: str) -> SymbolSpec:
        try:
            entry = await self._symbols.get(subjects.symbol_key(master, symbol))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise _Delay("no_symbol_spec", f"{master} publishes no spec of {symbol}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise _Delay("nats", repr(exc)) from None
        if not entry.value:
            raise _Delay("no_symbol_spec", f"{master} publishes no spec of {symbol}")
        return codec.symbol_spec_decoder.decode(entry.value)
