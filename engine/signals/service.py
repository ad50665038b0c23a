"""The signals service: the strategy worker and the drive of the strategies' masters in one process.

``tradecopy signals run`` runs this. The worker (``worker.SignalWorker``) turns quotes into
candles and each candle into one sandboxed run whose signal lands in TC_SIGNALS; the drive
(``driving.StrategyDrive``) turns the signals of every deployment that names a master into
that master's manual orders. The drive reads the masters' positions from the ledger's view,
so it needs the database; without one the process runs the worker alone and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import structlog
from nats.js.api import StorageType

from engine.runtime.http import OpsServer
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsconn import connect
from engine.signals.config import SignalWorkerConfig
from engine.signals.driving import DriveConfig, StrategyDrive
from engine.signals.worker import SignalWorker
from schemas import subjects

log = structlog.get_logger("tradecopy.signals")


async def run_signals(
    config: SignalWorkerConfig,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
    *,
    database_url: str | None = None,
    drive: DriveConfig | None = None,
) -> None:
    """Connect, make sure the streams and buckets exist, run the worker and (with a database)
    the drive until ``stop`` is set; ``started`` is set once both take messages."""
    if not config.nats_url:
        raise ValueError("the worker's configuration names no NATS server (nats_url)")
    nc = await connect(config.nats_url, f"tradecopy-signals-{config.worker_id}")
    pool: Any = None
    driver: StrategyDrive | None = None
    worker: SignalWorker | None = None
    ops: OpsServer | None = None
    try:
        js = nc.jetstream()
        storage = StorageType.MEMORY if config.memory_storage else StorageType.FILE
        await ensure_streams(js, None, storage)
        buckets = await ensure_buckets(js, storage)
        if database_url:
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
            # The drive first: its consumers exist before the worker's first signal.
            driver = StrategyDrive(nc, js, pool, drive, config.deployments)
            await driver.start()
        else:
            log.warning(
                "strategy_drive_off",
                reason="no database: the drive reads the masters' positions from the ledger; "
                "signals are published but no master trades them",
            )
        worker = SignalWorker(
            config, nc, js, buckets[subjects.KV_SIGNAL_CLAIMS],
            deployments_kv=buckets[subjects.KV_SIGNAL_DEPLOYMENTS],
        )  # fmt: skip
        await worker.start()
        if config.metrics_port is not None:
            health = _health(worker, driver)
            ops = OpsServer(config.metrics_host, config.metrics_port, health)
            await ops.start()
            log.info("ops_listening", host=config.metrics_host, port=ops.port)
        if started is not None:
            started.set()
        await stop.wait()
    finally:
        if ops is not None:
            await ops.stop()
        if worker is not None:
            await worker.stop()
        if driver is not None:
            await driver.stop()
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close()
        with contextlib.suppress(Exception):
            await nc.drain()


def _health(worker: SignalWorker, driver: StrategyDrive | None) -> Any:
    def health() -> dict[str, object]:
        report = worker.health()
        report["drive"] = "off (no database)" if driver is None else driver.health()
        return report

    return health
