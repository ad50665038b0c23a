"""The strategy drive against real servers: signals in TC_SIGNALS trade a paper master through
its connector, the ledger records it, a replicator copies it to a follower; repeated signals
trade once, a quick reverse waits for the ledger, stale signals are skipped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from conftest import wait_until

from engine.core.book import OpenPosition
from engine.ledger import store as ledger_store
from engine.ledger.config import LedgerConfig
from engine.ledger.service import Ledger, wait_for_ledger
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.links import apply_links
from engine.runtime.processes import spawn_replicator, stop_process, wait_for_replicator
from engine.signals.candles import Timeframe
from engine.signals.config import StrategyDeployment
from engine.signals.drive import MasterOrder, OrderKind
from engine.signals.driving import (
    DriveConfig,
    DriveOutcome,
    StrategyDrive,
    drive_consumer_name,
    lots_for,
    master_orders,
)
from engine.signals.messages import StrategySignal, encoder, run_id
from engine.signals.strategy import Signal, SignalAction
from engine.signals.versions import new_version
from schemas import subjects
from schemas.account import SymbolSpec
from schemas.common import Side
from schemas.links import CopyLink
from schemas.orders import FollowerClose, FollowerOpen
from schemas.streams import FOLLOWER_ORDERS_STREAM, SIGNALS_STREAM

MASTER = "drive-master"
FOLLOWER = "drive-follower"
CONNECTOR = "paper-drive"
SYMBOL = "XAUUSD"
MINUTE_NS = 60_000_000_000
VERSION = new_version(shipped="sma_cross", parameters={"fast": 2, "slow": 5}, author="t",
                      created_ns=0)  # fmt: skip
DEPLOYMENT = StrategyDeployment(version=VERSION, symbol=SYMBOL, timeframe=Timeframe.M1,
                                volume=0.1, master=MASTER)  # fmt: skip


def _signal(action: SignalAction, minute: int, *, age_s: float = 0.0) -> StrategySignal:
    return StrategySignal(
        version_id=VERSION.version_id, symbol=SYMBOL, timeframe=Timeframe.M1,
        candle_close_ns=1_771_200_000_000_000_000 + minute * MINUTE_NS,
        signal=Signal(action=action), price=2_000.0, worker="test",
        emitted_ns=time.time_ns() - int(age_s * 1e9),
    )  # fmt: skip


async def _publish(js: Any, signal: StrategySignal, msg_id: str | None = None) -> None:
    run = run_id(signal.version_id, signal.symbol, signal.timeframe, signal.candle_close_ns)
    await js.publish(subjects.strategy_signals(signal.version_id), encoder.encode(signal),
                     headers={"Nats-Msg-Id": msg_id or run})  # fmt: skip


# ------------------------------------------------------------------------------ pure parts


SPEC = SymbolSpec(account=MASTER, symbol=SYMBOL, digits=2, volume_min=0.01, volume_max=1.0,
                  volume_step=0.01, contract_size=100.0, tick_size=0.01,
                  tick_value=1.0)  # fmt: skip


def test_the_lot_is_rounded_down_to_the_step_and_capped_and_refused_below_the_minimum() -> None:
    assert lots_for(0.129, SPEC) == pytest.approx(0.12)
    assert lots_for(5.0, SPEC) == pytest.approx(1.0)
    assert lots_for(0.005, SPEC) == 0.0


def test_order_ids_come_from_the_run_and_the_step_so_a_redelivery_makes_the_same_orders() -> None:
    held = [OpenPosition(account=MASTER, position_id="p7", origin_position_id="p7", symbol=SYMBOL,
                         side=Side.BUY, volume=0.1, open_price=1.0, open_ts_ns=1)]  # fmt: skip
    orders = [MasterOrder(kind=OrderKind.CLOSE, side=Side.BUY, volume=0.1),
              MasterOrder(kind=OrderKind.OPEN, side=Side.SELL, volume=0.1)]  # fmt: skip
    signal = _signal(SignalAction.SELL, 3)
    first = master_orders(DEPLOYMENT, signal, held, orders, 0.1, 1, 2)
    again = master_orders(DEPLOYMENT, signal, held, orders, 0.1, 99, 2)
    assert [o.order_id for o in first] == [o.order_id for o in again]
    close, open_ = first
    assert isinstance(close, FollowerClose) and close.master_position_id == "p7"
    assert isinstance(open_, FollowerOpen) and open_.side is Side.SELL and open_.manual
    assert open_.follower == open_.master == MASTER and open_.expires_ns == 2
    later = master_orders(DEPLOYMENT, _signal(SignalAction.SELL, 4), held, orders, 0.1, 1, 2)
    assert not {o.order_id for o in later} & {o.order_id for o in first}


def test_each_deployment_and_master_gets_its_own_durable_consumer() -> None:
    other = msgspec.structs.replace(DEPLOYMENT, master="another-master")
    assert drive_consumer_name(DEPLOYMENT) == drive_consumer_name(DEPLOYMENT)
    assert drive_consumer_name(DEPLOYMENT) != drive_consumer_name(other)
    assert drive_consumer_name(DEPLOYMENT).startswith("signals-drive-")


# ------------------------------------------------------------------------------ live


@dataclass
class Desk:
    drive: StrategyDrive
    venue: Any
    js: Any
    ledger: Ledger
    ledger_config: LedgerConfig

    def held(self, account: str) -> list[tuple[Side, float]]:
        return sorted((p.side, round(p.volume, 8)) for p in self.venue.positions(account))

    def outcomes(self) -> list[DriveOutcome]:
        return [outcome for _, outcome in self.drive.handled]

    async def orders_on_master(self) -> int:
        subject = subjects.follower_orders(MASTER)
        info = await self.js.stream_info(FOLLOWER_ORDERS_STREAM, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())


@pytest.fixture
async def desk(
    nats_server: Any, nc: Any, js: Any, database_url: str, tmp_path: Path
) -> AsyncIterator[Desk]:
    from connectors.paper.connector import PaperConnector, PaperTerminal
    from connectors.paper.model import XAUUSD
    from connectors.paper.prices import PriceReplay, load_bars

    await ledger_store.migrate(database_url)
    await ensure_streams(js)
    await ensure_buckets(js)
    accounts = [(MASTER, "USD", 10_000.0, 100, "master"), (FOLLOWER, "USD", 10_000.0, 100,
                                                            "follower")]  # fmt: skip
    terminal = PaperTerminal.open(tmp_path / "paper.state", accounts, (XAUUSD,), {})
    replay = PriceReplay(load_bars(), start=420, speed=60.0, stamp_wall_clock=True)
    connector = PaperConnector(nc, CONNECTOR, terminal, replay)
    ledger_config = LedgerConfig(nats_url=nats_server.url, database_url=database_url)
    ledger = Ledger(ledger_config, database_url)
    replicator = spawn_replicator(nats_server.url, instance="drive")
    link = CopyLink(link_id="drive-link", master=MASTER, follower=FOLLOWER)
    await apply_links(await js.key_value(subjects.KV_LINKS), [link])
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    config = DriveConfig(settle_timeout_s=10.0, retry_delay_s=0.5, max_signal_age_s=120.0,
                         ack_wait_s=30.0, publish_timeout_s=2.0)  # fmt: skip
    drive = StrategyDrive(nc, js, pool, config, [DEPLOYMENT], watch_deployments=False)
    await connector.start()
    await ledger.start()
    try:
        await wait_for_replicator(js)
        await wait_for_ledger(js)
        symbols = await js.key_value(subjects.KV_SYMBOLS)

        async def priced() -> bool:
            try:
                return connector.quotes > 0 and bool(
                    await symbols.get(subjects.symbol_key(MASTER, SYMBOL))
                )
            except Exception:
                return False

        await wait_until(priced, "prices and the master's symbol spec")
        await drive.start()
        desk = Desk(drive, terminal.venue, js, ledger, ledger_config)
        yield desk
    finally:
        await drive.stop()
        stop_process(replicator)
        await desk.ledger.stop()
        await connector.stop()
        await pool.close()


async def test_a_buy_signal_opens_the_master_and_the_copy_reaches_the_follower(desk: Desk) -> None:
    await _publish(desk.js, _signal(SignalAction.BUY, 1))
    await wait_until(lambda: desk.held(MASTER) == [(Side.BUY, 0.1)], "the master opens a buy")
    await wait_until(lambda: len(desk.held(FOLLOWER)) == 1, "the follower copies it")
    assert desk.held(FOLLOWER)[0][0] is Side.BUY
    assert desk.outcomes() == [DriveOutcome.TRADED]
    assert await desk.orders_on_master() == 1


async def test_a_signal_delivered_again_trades_once(desk: Desk) -> None:
    buy = _signal(SignalAction.BUY, 1)
    await _publish(desk.js, buy)
    await wait_until(lambda: desk.held(MASTER) == [(Side.BUY, 0.1)], "the master opens a buy")
    # The same signal stored again under another message id (JetStream cannot drop it) ...
    await _publish(desk.js, buy, msg_id="another-id")
    await wait_until(lambda: len(desk.outcomes()) == 2, "the copy handled")
    # ... and handed to the drive again as a consumer redelivers an unacked message.
    assert await desk.drive.act(DEPLOYMENT, buy) is DriveOutcome.NOTHING
    assert desk.outcomes() == [DriveOutcome.TRADED, DriveOutcome.NOTHING, DriveOutcome.NOTHING]
    await asyncio.sleep(1.0)  # a second trade would have landed by now
    assert desk.held(MASTER) == [(Side.BUY, 0.1)]
    assert len(desk.held(FOLLOWER)) == 1
    assert await desk.orders_on_master() == 1


async def test_a_signal_whose_ack_is_lost_is_redelivered_and_trades_once(desk: Desk) -> None:
    # A drive whose ack never reaches the server (it died after storing the orders): the
    # server redelivers after ack_wait, and the redelivery finds the master already long.
    quick = DriveConfig(settle_timeout_s=1.0, publish_timeout_s=0.5, ack_wait_s=3.0,
                        retry_delay_s=0.5)  # fmt: skip
    deployment = msgspec.structs.replace(DEPLOYMENT, timeframe=Timeframe.M5)
    drive = StrategyDrive(desk.drive.nc, desk.js, desk.drive.pool, quick, [deployment],
                          watch_deployments=False)  # fmt: skip
    lost: list[object] = []
    answer = drive._answer

    async def first_ack_lost(send: Any) -> None:
        if not lost:
            lost.append(send)
            return
        await answer(send)

    drive._answer = first_ack_lost  # type: ignore[method-assign]
    await drive.start()
    try:
        signal = msgspec.structs.replace(_signal(SignalAction.BUY, 5), timeframe=Timeframe.M5)
        await _publish(desk.js, signal)
        await wait_until(lambda: len(drive.handled) == 2, "the redelivery handled", timeout=30)
        assert [o for _, o in drive.handled] == [DriveOutcome.TRADED, DriveOutcome.NOTHING]
        info = await desk.js.consumer_info(SIGNALS_STREAM, drive_consumer_name(deployment))
        assert info.num_ack_pending == 0 and info.num_pending == 0  # acked the second time
        assert desk.held(MASTER) == [(Side.BUY, 0.1)]
        assert await desk.orders_on_master() == 1
    finally:
        await drive.stop()


async def test_a_sell_right_after_a_buy_waits_for_the_ledger_and_reverses_the_master(
    desk: Desk,
) -> None:
    # Back to back: the sell must read the position the buy made, not the flat one before.
    await _publish(desk.js, _signal(SignalAction.BUY, 1))
    await _publish(desk.js, _signal(SignalAction.SELL, 2))
    await wait_until(lambda: len(desk.outcomes()) == 2, "both signals handled", timeout=60)
    await wait_until(lambda: desk.held(MASTER) == [(Side.SELL, 0.1)], "the master reversed")
    await wait_until(
        lambda: [side for side, _ in desk.held(FOLLOWER)] == [Side.SELL], "the copy reversed"
    )
    assert desk.outcomes() == [DriveOutcome.TRADED, DriveOutcome.TRADED]
    assert await desk.orders_on_master() == 3  # open buy; close buy, open sell


async def test_a_stale_signal_is_acked_and_skipped(desk: Desk) -> None:
    await _publish(desk.js, _signal(SignalAction.BUY, 1, age_s=600.0))
    await wait_until(lambda: desk.outcomes() == [DriveOutcome.STALE], "the stale signal skipped")
    info = await desk.js.consumer_info(SIGNALS_STREAM, drive_consumer_name(DEPLOYMENT))
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await asyncio.sleep(0.5)
    assert desk.held(MASTER) == []
    assert await desk.orders_on_master() == 0


async def test_while_the_ledger_is_behind_the_next_signal_waits_and_then_trades(desk: Desk) -> None:
    desk.drive.config = msgspec.structs.replace(desk.drive.config, settle_timeout_s=0.5)
    await desk.ledger.stop()
    await _publish(desk.js, _signal(SignalAction.BUY, 1))
    await wait_until(lambda: desk.held(MASTER) == [(Side.BUY, 0.1)], "the master opens a buy")
    await _publish(desk.js, _signal(SignalAction.SELL, 2))
    # The ledger has not recorded the buy's report: the sell is handed back, again and again.
    await wait_until(lambda: desk.outcomes().count(DriveOutcome.DELAYED) >= 2, "the sell delayed")
    assert desk.held(MASTER) == [(Side.BUY, 0.1)]
    desk.ledger = Ledger(desk.ledger_config, desk.ledger_config.database_url or "")
    await desk.ledger.start()
    await wait_until(lambda: desk.held(MASTER) == [(Side.SELL, 0.1)], "the master reversed")
    assert desk.outcomes()[-1] is DriveOutcome.TRADED
    assert desk.outcomes().count(DriveOutcome.TRADED) == 2


# ------------------------------------------------------------------------------ the service


async def _consumer_exists(js: Any, deployment: StrategyDeployment) -> bool:
    try:
        await js.consumer_info(SIGNALS_STREAM, drive_consumer_name(deployment))
    except Exception:
        return False
    return True


async def test_the_service_drives_configured_and_bucket_deployments_only_with_a_database(
    nats_server: Any, js: Any, database_url: str
) -> None:
    from engine.signals.config import SignalWorkerConfig
    from engine.signals.service import run_signals

    config = SignalWorkerConfig(worker_id="svc", nats_url=nats_server.url,
                                deployments=[DEPLOYMENT])  # fmt: skip

    async def running(url: str | None) -> tuple[asyncio.Event, asyncio.Task[None]]:
        stop, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_signals(config, stop, started, database_url=url))
        await asyncio.wait_for(started.wait(), 30)
        return stop, task

    stop, task = await running(None)  # no database: the worker alone
    assert not await _consumer_exists(js, DEPLOYMENT)
    stop.set()
    await task

    stop, task = await running(database_url)
    try:
        assert await _consumer_exists(js, DEPLOYMENT)
        # A deployment put in the bucket at run time is driven too.
        other = msgspec.structs.replace(DEPLOYMENT, timeframe=Timeframe.M5, master="other-master")
        kv = await js.key_value(subjects.KV_SIGNAL_DEPLOYMENTS)
        key = subjects.deployment_key(VERSION.version_id, SYMBOL, Timeframe.M5)
        await kv.put(key, msgspec.json.encode(other))
        await kv.put("garbage", b"{not json")  # logged and counted, the others go on
        await wait_until(lambda: _consumer_exists(js, other), "the bucket's deployment driven")
    finally:
        stop.set()
        await task
