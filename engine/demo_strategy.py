"""``tradecopy demo --source strategy``: the demo's master traded by the shipped SMA crossover.

The master is driven through the live signal path, nothing in between simulated: the demo's
paper venue publishes quotes, a ``SignalWorker`` builds candles from them and runs the
strategy once per closed candle in its sandbox, the signal is stored in TC_SIGNALS, the
``StrategyDrive`` turns it into manual orders on the master's connector (reading the master's
position from the ledger), and the master's events are copied by the replicator as any
master's are.

**Time.** A strategy needs candles, and a demo of half a minute has no closed one-minute
candle on the wall clock. So the venue replays the shipped bars with their own timestamps
(5-minute candles at 6 bars a second) and the worker's clock starts at the first bar and runs
at wall speed: it stays behind the quotes, so only a later quote closes a candle, as in the
backtest. Signal age is measured on that clock too; everything else (orders, fills, latency,
billing) is wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from connectors.paper.prices import PriceReplay
from engine.core.calendar import utc_datetime
from engine.signals.candles import ServerDay, Timeframe
from engine.signals.config import SignalWorkerConfig, StrategyDeployment
from engine.signals.driving import DriveConfig, DriveOutcome, StrategyDrive, drive_consumer_name
from engine.signals.messages import StrategySignal
from engine.signals.versions import StrategyVersion, new_version
from engine.signals.worker import SignalWorker
from schemas import codec, subjects
from schemas.orders import FollowerClose, FollowerOpen, FollowerOrder
from schemas.reports import ExecutionReport, OrderDone, OrderFilled
from schemas.streams import SIGNALS_STREAM

STRATEGY = "sma_cross"
#: Short averages on 5-minute candles: several crosses in the demo's half minute of bars.
PARAMETERS: dict[str, Any] = {"fast": 2, "slow": 4}
TIMEFRAME = Timeframe.M5
LOT = 0.1
#: Replay seconds per wall second: six one-minute bars, so a 5m candle closes every 0.83 s
#: and the sandboxed runs (an interpreter each) keep up on a small machine.
DEFAULT_SPEED = 360.0
DEFAULT_SECONDS = 30.0
#: The shipped bars carry server time read as UTC (as the backtest says): the day starts at
#: 00:00 UTC. Only 4h and 1d candles depend on it.
BARS_SERVER_DAY = ServerDay(timezone="UTC", starts_at="00:00")


def strategy_version() -> StrategyVersion:
    return new_version(shipped=STRATEGY, parameters=PARAMETERS, author="demo", created_ns=0)


def replay_clock(first_quote_ns: int) -> Callable[[], int]:
    """A clock that starts at the replay's first quote and runs at wall speed (see the module
    docstring): behind the replayed quotes, so a candle never closes on a timer."""
    offset = time.time_ns() - first_quote_ns
    return lambda: time.time_ns() - offset


class StrategySource:
    """The demo master's signal path: a worker and the drive, on the demo's NATS and database."""

    def __init__(
        self, nc: Any, js: Any, database_url: str, master: str, clock: Callable[[], int],
        log: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.nc = nc
        self.js = js
        self.database_url = database_url
        self.version = strategy_version()
        self.deployment = StrategyDeployment(
            version=self.version, symbol="XAUUSD", timeframe=TIMEFRAME, volume=LOT, master=master
        )
        self.clock = clock
        self.log = log
        self.signals = 0
        self.pool: Any = None
        self.worker: SignalWorker | None = None
        self.drive: StrategyDrive | None = None
        self._publisher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The drive first (its consumer exists before the first signal), then the worker."""
        claims = await self.js.key_value(subjects.KV_SIGNAL_CLAIMS)  # the stack made it
        self.pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=2)
        self.drive = StrategyDrive(
            self.nc, self.js, self.pool, DriveConfig(), [self.deployment],
            watch_deployments=False, clock=self.clock, on_signal=self._on_signal,
        )  # fmt: skip
        await self.drive.start()
        config = SignalWorkerConfig(worker_id="demo", deployments=[self.deployment],
                                    server_day=BARS_SERVER_DAY)  # fmt: skip
        self.worker = SignalWorker(config, self.nc, self.js, claims, clock=self.clock)
        await self.worker.start()
        self.log(f"strategy {STRATEGY} {PARAMETERS} ({self.version.version_id}) on XAUUSD "
                 f"{TIMEFRAME}, {LOT:g} lots: worker and drive running")  # fmt: skip

    def _on_signal(self, emitted: StrategySignal, outcome: DriveOutcome) -> None:
        if outcome is DriveOutcome.DELAYED:
            return  # it comes back
        self.signals += 1
        candle = utc_datetime(emitted.candle_close_ns).strftime("%m-%d %H:%M")
        what = {DriveOutcome.TRADED: "master trades", DriveOutcome.NOTHING: "master holds it"}
        self.log(f"signal: {emitted.signal.action} on the {emitted.timeframe} candle closing "
                 f"{candle} at {emitted.price:.2f}: "
                 f"{what.get(outcome, outcome.value)}")  # fmt: skip

    def publish_quotes(self, nc: Any, replay: PriceReplay) -> None:
        """Publish the replay's quotes on ``tc.v1.quotes.<symbol>`` with the bars' own times
        (the venue and the worker both listen), until ``stop``."""

        async def publish() -> None:
            async for quote in replay.quotes():
                await nc.publish(subjects.quotes(quote.symbol), codec.encode(quote))

        self._publisher = asyncio.create_task(publish())

    async def finish(self, timeout: float = 20.0) -> None:
        """Stop taking candles, then wait until the drive has acted on every stored signal."""
        if self.worker is not None:
            await self.worker.wait_idle()
            await self.worker.stop()
        name = drive_consumer_name(self.deployment)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self.js.consumer_info(SIGNALS_STREAM, name)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._publisher
        if self.worker is not None:
            await self.worker.stop()
        if self.drive is not None:
            await self.drive.stop()
        if self.pool is not None:
            await self.pool.close()


def unexpected_master_positions(
    venue: Any, master: str, orders: list[FollowerOrder], reports: dict[str, ExecutionReport]
) -> list[str]:
    """Master positions the drive's orders do not explain, and ones they made that are gone.

    The master trades only through the drive: every position it holds must be the fill of
    one of the drive's opens that no close of the drive has closed since, and every such
    position must still be there.
    """
    expected: dict[str, tuple[str, float]] = {}
    for order in (o for o in orders if o.follower == master):
        report = reports.get(order.order_id)
        if isinstance(order, FollowerOpen) and isinstance(report, OrderFilled):
            expected[report.position_id] = (report.side.value, round(report.volume, 8))
        elif isinstance(order, FollowerClose) and isinstance(report, OrderFilled | OrderDone):
            expected.pop(order.master_position_id, None)
    held = {p.position_id: (p.side.value, round(p.volume, 8)) for p in venue.positions(master)}
    problems = [f"{master}: holds {pid} {held[pid]} no signal made" for pid in
                held.keys() - expected.keys()]  # fmt: skip
    problems += [f"{master}: missing {pid} {expected[pid]} a signal opened" for pid in
                 expected.keys() - held.keys()]  # fmt: skip
    problems += [f"{master}: {pid} is {held[pid]}, the drive's orders say {expected[pid]}"
                 for pid in held.keys() & expected.keys()
                 if held[pid] != expected[pid]]  # fmt: skip
    return problems
