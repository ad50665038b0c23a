"""The strategy worker: candles from quotes, each candle's run claimed, sandboxed, published."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from nats.js.api import StorageType

from engine.runtime.http import OpsServer
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsconn import connect
from engine.runtime.publishing import NotStored, publish_stored
from engine.signals import metrics
from engine.signals.candles import Candle, CandleBuilder, Timeframe
from engine.signals.claims import CandleClaims, ClaimState, HeldClaim
from engine.signals.config import SignalWorkerConfig, StrategyDeployment
from engine.signals.deployments import DeploymentsWatch
from engine.signals.messages import StrategyRunFailed, StrategySignal, encoder, run_id
from engine.signals.sandbox import (
    FailureKind,
    SandboxOutcome,
    StrategyFailure,
    run_strategy,
)
from engine.signals.strategy import SignalAction
from schemas import subjects
from schemas.market import Quote

log = structlog.get_logger("tradecopy.signals")

_quote_decoder = msgspec.msgpack.Decoder(Quote)

#: One run of a strategy on a series: (version id, symbol, timeframe).
RunKey = tuple[str, str, Timeframe]


def run_key(deployment: StrategyDeployment) -> RunKey:
    return (deployment.version.version_id, deployment.symbol, deployment.timeframe)


class _Series:
    """One (symbol, timeframe): its candle builder, its recent candles, its deployments."""

    def __init__(self, builder: CandleBuilder, history: int) -> None:
        self.builder = builder
        self.candles: deque[Candle] = deque(maxlen=history)
        self.deployments: list[StrategyDeployment] = []


class SignalWorker:
    """Runs each deployed strategy version once per closed candle, with any number of peers.

    Every worker builds the same candles from the same quotes; for each closed candle and
    deployment it claims the run (``CandleClaims``), and the one holding the claim runs the
    strategy in the sandbox and publishes the outcome under the run's id.
    """

    def __init__(
        self,
        config: SignalWorkerConfig,
        nc: Any,
        js: Any,
        claims_kv: Any,
        *,
        clock: Callable[[], int] = time.time_ns,
        deployments_kv: Any = None,
    ) -> None:
        """``deployments_kv``: the ``tc_signal_deployments`` bucket, watched from
        :meth:`start` (its deployments run beside the configuration's); none: the
        configuration's deployments only."""
        self.config = config
        self.nc = nc
        self.js = js
        self.clock = clock
        self.claims = CandleClaims(
            claims_kv, config.worker_id, config.lease_s, poll_s=config.poll_s, clock=clock
        )
        self.series: dict[tuple[str, Timeframe], _Series] = {}
        self._configured: dict[RunKey, StrategyDeployment] = {
            run_key(d): d for d in config.deployments
        }
        self._bucket = (
            None
            if deployments_kv is None
            else DeploymentsWatch(deployments_kv, self._apply, component="worker")
        )
        self._quote_subs: dict[str, Any] = {}
        self._arrange(self.deployments)
        self._slots = asyncio.Semaphore(config.max_concurrent_runs)
        self._subscriptions: list[Any] = []
        self._runs: set[asyncio.Task[None]] = set()
        self._timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take quotes for the configured deployments and, with a deployments bucket, the
        bucket's (returns once the bucket's current values are running)."""
        await self._subscribe_quotes()
        self._timer = asyncio.create_task(self._close_quiet_candles())
        if self._bucket is not None:
            await self._bucket.start()
        metrics.DEPLOYMENTS.set(len(self.deployments))
        log.info(
            "signal_worker_started",
            worker=self.config.worker_id,
            deployments=self.deployment_names(),
        )

    async def stop(self) -> None:
        """Stop taking quotes; runs in progress are cancelled (their claims' leases expire and
        a peer takes them over)."""
        if self._bucket is not None:
            await self._bucket.stop()
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subscriptions.clear()
        self._quote_subs.clear()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._runs):
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)

    # ------------------------------------------------------------------ deployments

    @property
    def deployments(self) -> dict[RunKey, StrategyDeployment]:
        """What runs now, by (version, symbol, timeframe): the configuration's, and the
        bucket's, which replace the configuration's of the same run."""
        merged = dict(self._configured)
        for deployment in ({} if self._bucket is None else self._bucket.current).values():
            merged[run_key(deployment)] = deployment
        return merged

    def deployment_names(self) -> list[str]:
        return sorted(f"{v}:{symbol}:{tf}" for v, symbol, tf in self.deployments)

    def _arrange(self, wanted: dict[RunKey, StrategyDeployment]) -> None:
        """Point each series at its deployments; a series that keeps one keeps its candles
        (and the candle it is building), one that loses all of them is dropped. A removed
        deployment's runs already started finish; it starts no more."""
        grouped: dict[tuple[str, Timeframe], list[StrategyDeployment]] = {}
        for deployment in wanted.values():
            grouped.setdefault((deployment.symbol, deployment.timeframe), []).append(deployment)
        for key in [k for k in self.series if k not in grouped]:
            del self.series[key]
        for (symbol, timeframe), deployments in grouped.items():
            history = max(d.history for d in deployments)
            series = self.series.get((symbol, timeframe))
            if series is None:
                builder = CandleBuilder(symbol, timeframe, self.config.server_day)
                series = self.series[(symbol, timeframe)] = _Series(builder, history)
            elif (series.candles.maxlen or 0) < history:
                # The deque keeps the longest history any deployment on the series asks for.
                series.candles = deque(series.candles, maxlen=history)
            series.deployments = deployments

    async def _subscribe_quotes(self) -> None:
        """Quotes of exactly the symbols some series needs."""
        symbols = {symbol for symbol, _ in self.series}
        for symbol in sorted(symbols - set(self._quote_subs)):
            sub = await self.nc.subscribe(subjects.quotes(symbol), cb=self._on_quote_message)
            self._quote_subs[symbol] = sub
            self._subscriptions.append(sub)
        for symbol in sorted(set(self._quote_subs) - symbols):
            sub = self._quote_subs.pop(symbol)
            with contextlib.suppress(ValueError):
                self._subscriptions.remove(sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.nc.flush()

    async def _apply(self) -> None:
        """Point the series at the deployments and take exactly the quotes they need."""
        self._arrange(self.deployments)
        await self._subscribe_quotes()
        metrics.DEPLOYMENTS.set(len(self.deployments))

    def health(self) -> dict[str, object]:
        connected = bool(self.nc.is_connected)
        return {
            "ok": connected,
            "reason": "" if connected else "NATS connection lost",
            "worker": self.config.worker_id,
            "runs_in_progress": len(self._runs),
            "deployments": len(self.deployments),
        }

    async def wait_idle(self) -> None:
        """Until every run started so far has finished (tests, orderly shutdown)."""
        while self._runs:
            await asyncio.gather(*list(self._runs), return_exceptions=True)

    # ------------------------------------------------------------------ candles

    async def _on_quote_message(self, msg: Any) -> None:
        try:
            quote = _quote_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("quote_invalid", subject=msg.subject, error=str(exc))
            return
        self.on_quote(quote)

    def on_quote(self, quote: Quote) -> None:
        for (symbol, _), series in self.series.items():
            if symbol == quote.symbol:
                closed = series.builder.on_quote(quote)
                if closed is not None:
                    self._candle_closed(series, closed)

    async def _close_quiet_candles(self) -> None:
        grace_ns = int(self.config.close_grace_s * 1e9)
        while True:
            now = self.clock()
            for series in self.series.values():
                closed = series.builder.close_due(now - grace_ns)
                if closed is not None:
                    self._candle_closed(series, closed)
            await asyncio.sleep(0.25)

    def _candle_closed(self, series: _Series, candle: Candle) -> None:
        metrics.CANDLES_CLOSED.labels(candle.timeframe.value).inc()
        series.candles.append(candle)
        window = tuple(series.candles)
        for deployment in series.deployments:
            task = asyncio.create_task(
                self.run_candle(deployment, window[-deployment.history :], candle)
            )
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    # ------------------------------------------------------------------ one run

    async def run_candle(
        self, deployment: StrategyDeployment, candles: tuple[Candle, ...], candle: Candle
    ) -> None:
        """Claim, run and publish one deployment's run on ``candle`` (the last of ``candles``)."""
        version = deployment.version.version_id
        key = run_id(version, candle.symbol, candle.timeframe, candle.close_time_ns)
        bound = log.bind(worker=self.config.worker_id, run=key)
        try:
            while True:
                # A free run slot first, then the claim: a busy worker does not claim candles
                # it cannot start, so an idle peer claims them instead.
                async with self._slots:
                    held = await self.claims.try_acquire(key)
                    if held is None:
                        metrics.CANDLES_SKIPPED.inc()
                        bound.info("strategy_run_skipped", reason="finished by another worker")
                        return
                    if isinstance(held, HeldClaim):
                        if await self._run_held(deployment, candles, candle, key, held, bound):
                            return
                        continue
                await asyncio.sleep(self.claims.wait_s(held))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS unavailable: the lease expires and a peer takes over
            bound.error("strategy_run_abandoned", error=repr(exc))

    async def _run_held(
        self,
        deployment: StrategyDeployment,
        candles: tuple[Candle, ...],
        candle: Candle,
        key: str,
        held: HeldClaim,
        bound: Any,
    ) -> bool:
        """Run a held claim to its end; ``False`` when its outcome could not be stored."""
        version = deployment.version.version_id
        if held.claim.attempt > self.config.max_attempts:
            outcome: SandboxOutcome = StrategyFailure(
                kind=FailureKind.CRASH,
                message=f"not run again: {held.claim.attempt - 1} workers took this candle and "
                f"none finished it",
            )
        else:
            bound.info("strategy_run_started", attempt=held.claim.attempt, candles=len(candles))
            outcome = await run_strategy(deployment.version, candles, self.config.limits)
            metrics.RUN_SECONDS.observe(outcome.elapsed_s)
        now = self.clock()
        if isinstance(outcome, StrategyFailure):
            metrics.RUNS.labels(outcome.kind.value).inc()
            metrics.RUN_FAILURES.labels(version, outcome.kind.value).inc()
            bound.error(
                "strategy_run_failed",
                kind=outcome.kind.value,
                message=outcome.message,
                elapsed_s=round(outcome.elapsed_s, 3),
            )
            failure = StrategyRunFailed(
                version_id=version,
                symbol=candle.symbol,
                timeframe=candle.timeframe,
                candle_close_ns=candle.close_time_ns,
                kind=outcome.kind,
                message=outcome.message,
                worker=self.config.worker_id,
                failed_ns=now,
            )
            # Its own id: a failed attempt's record never stops a later attempt's signal.
            failure_id = f"{key}.failed"
            publication = (subjects.strategy_failures(version), encoder.encode(failure), failure_id)
            state, summary = ClaimState.FAILED, f"{outcome.kind}: {outcome.message}"
        else:
            action = outcome.signal.action
            metrics.RUNS.labels(action.value).inc()
            bound.info(
                "strategy_run_finished",
                action=action.value,
                elapsed_s=round(outcome.elapsed_s, 3),
            )
            publication = None
            if action is not SignalAction.HOLD:
                emitted = StrategySignal(
                    version_id=version,
                    symbol=candle.symbol,
                    timeframe=candle.timeframe,
                    candle_close_ns=candle.close_time_ns,
                    signal=outcome.signal,
                    price=candle.close,
                    worker=self.config.worker_id,
                    emitted_ns=now,
                )
                publication = (subjects.strategy_signals(version), encoder.encode(emitted), key)
            state, summary = ClaimState.DONE, action.value
        if publication is not None:
            try:
                # The run's id as Nats-Msg-Id: a takeover after this worker published but
                # before it marked the claim finished publishes a duplicate JetStream drops.
                await publish_stored(
                    self.js, [publication], timeout_s=self.config.publish_timeout_s, attempts=3
                )
            except NotStored as exc:
                metrics.PUBLISH_FAILURES.inc()
                bound.error("strategy_outcome_not_stored", error=str(exc))
                # Keep the claim running: its lease ends and the run is taken over, here or
                # by a peer, so the outcome is not lost.
                return False
            bound.info("strategy_outcome_published", subject=publication[0])
        await self.claims.finish(held, state, summary)
        return True


async def run_worker(
    config: SignalWorkerConfig, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """Connect, make sure the stream and the claims bucket exist, run until ``stop`` is set;
    ``started`` is set once the worker takes quotes."""
    if not config.nats_url:
        raise ValueError("the worker's configuration names no NATS server (nats_url)")
    nc = await connect(config.nats_url, f"tradecopy-signals-{config.worker_id}")
    try:
        js = nc.jetstream()
        storage = StorageType.MEMORY if config.memory_storage else StorageType.FILE
        await ensure_streams(js, None, storage)
        buckets = await ensure_buckets(js, storage)
        worker = SignalWorker(
            config,
            nc,
            js,
            buckets[subjects.KV_SIGNAL_CLAIMS],
            deployments_kv=buckets[subjects.KV_SIGNAL_DEPLOYMENTS],
        )
        await worker.start()
        ops = None
        if config.metrics_port is not None:
            ops = OpsServer(config.metrics_host, config.metrics_port, worker.health)
            await ops.start()
            log.info("ops_listening", host=config.metrics_host, port=ops.port)
        if started is not None:
            started.set()
        try:
            await stop.wait()
        finally:
            if ops is not None:
                await ops.stop()
            await worker.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
