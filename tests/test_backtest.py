"""The backtest: the live candle path and paper venue without the network, and the proof that a
live run over the same bars makes the same trades."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from conftest import wait_until
from nats.js import JetStreamContext
from nats.js.api import StorageType

from connectors.paper.prices import DEFAULT_BARS_PATH, Bar, PriceReplay, load_bars
from connectors.paper.venue import PaperVenue
from engine.backtest import (
    BARS_SERVER_DAY,
    DEFAULT_ACCOUNT,
    BacktestError,
    LiveDriver,
    MasterDrive,
    main,
    run_backtest,
)
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsserver import EmbeddedNats
from engine.signals.candles import Timeframe, bucket_of
from engine.signals.config import SignalWorkerConfig, StrategyDeployment
from engine.signals.versions import new_version
from engine.signals.worker import SignalWorker
from schemas import codec, subjects
from schemas.streams import SIGNALS_STREAM

SYMBOL = "XAUUSD"
HOUR_NS = 3_600_000_000_000
#: Short averages and stops: many trades in two days, closed by signals, SL and TP alike.
PARAMS = {"fast": 5, "slow": 12, "sl_distance": 10.0, "tp_distance": 15.0}
LOT = 0.1


def _first_hours(hours: int) -> list[Bar]:
    bars = load_bars()
    return [bar for bar in bars if bar.ts_ns < bars[0].ts_ns + hours * HOUR_NS]


def _bars_file(tmp_path: Path, count: int) -> Path:
    """The first ``count`` shipped bars, as an MT5 export file."""
    lines = DEFAULT_BARS_PATH.read_text(encoding="utf-8-sig").splitlines()
    path = tmp_path / "bars.csv"
    path.write_text("\n".join(lines[: count + 1]) + "\n")
    return path


async def _stored_signals(js: JetStreamContext, version_id: str) -> int:
    subject = subjects.strategy_signals(version_id)
    info = await js.stream_info(SIGNALS_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_a_live_run_and_a_backtest_over_the_same_bars_make_the_same_trades(
    nats_server: EmbeddedNats, nc: Any, js: JetStreamContext
) -> None:
    bars = _first_hours(46)  # the first two trading days
    version = new_version(shipped="sma_cross", parameters=PARAMS, author="alice", created_ns=1)
    backtest = await run_backtest(version, bars, timeframe="15m", volume=LOT)
    assert len(backtest.trades) >= 10
    assert {t.reason for t in backtest.trades} == {"manual", "sl", "tp"}

    # The live path: a real worker (candles, claims, the sandbox, JetStream) and the live
    # driver trading its signals on a venue fed by the quotes on NATS.
    await ensure_streams(js, None, StorageType.MEMORY)
    buckets = await ensure_buckets(js, StorageType.MEMORY)
    deployment = StrategyDeployment(version=version, symbol=SYMBOL, timeframe=Timeframe.M15)
    config = SignalWorkerConfig(
        worker_id="w1", deployments=[deployment], server_day=BARS_SERVER_DAY
    )
    # The bars are from the past: on the wall clock the quiet-candle timer would close every
    # candle before its quotes arrived. The worker's clock stays at the bars' start, so only
    # quotes close candles, as in the backtest.
    clock_ns = bars[0].ts_ns
    worker = SignalWorker(
        config, nc, js, buckets[subjects.KV_SIGNAL_CLAIMS], clock=lambda: clock_ns
    )
    venue = PaperVenue()
    venue.open_account(DEFAULT_ACCOUNT)
    drive = MasterDrive(venue, DEFAULT_ACCOUNT, SYMBOL, Timeframe.M15, LOT)
    driver = LiveDriver(nc, js, version.version_id, drive)
    publisher = await nats.connect(nats_server.url)
    await worker.start()
    await driver.start()
    series = worker.series[(SYMBOL, Timeframe.M15)]
    published = 0
    try:
        forming_end = None
        # The paper venue's own replay of the bars (flat out), sent as the quote publisher
        # sends them: one connection, core NATS, in order.
        async for quote in PriceReplay(bars, SYMBOL, speed=0).quotes():
            await publisher.publish(subjects.quotes(SYMBOL), codec.encode(quote))
            published += 1
            start, end = bucket_of(Timeframe.M15, quote.ts_ns, BARS_SERVER_DAY)
            if forming_end is not None and start >= forming_end:
                # This quote closes a candle. Like a strategy that answers before the next
                # quote, let the run finish and the driver trade before publishing more.
                await publisher.flush()
                closed = forming_end
                await wait_until(
                    lambda closed=closed: (
                        series.candles and series.candles[-1].close_time_ns == closed
                    ),
                    "the worker to close the candle",
                )
                await worker.wait_idle()
                stored = await _stored_signals(js, version.version_id)
                await wait_until(lambda stored=stored: driver.handled == stored, "the driver")
            forming_end = end
        await publisher.flush()
        await wait_until(lambda: drive.quotes == published, "the driver's quotes", timeout=30)
        await worker.wait_idle()
    finally:
        await publisher.close()
        await driver.stop()
        await worker.stop()

    trades, still_open, stats = drive.trades()
    assert driver.handled == backtest.signals
    assert trades == backtest.trades
    assert still_open == backtest.open_trades
    assert stats == backtest.stats
    assert drive.rejected == backtest.rejected == []


async def test_the_sandbox_gives_the_in_process_backtest() -> None:
    bars = _first_hours(12)
    in_process = await run_backtest("sma_cross", bars, params=PARAMS)
    sandboxed = await run_backtest("sma_cross", bars, params=PARAMS, sandbox=True)
    assert in_process.signals >= 2 and in_process.trades
    assert sandboxed.trades == in_process.trades
    assert sandboxed.open_trades == in_process.open_trades
    assert sandboxed.stats == in_process.stats and sandboxed.failures == 0


async def test_the_backtest_is_faster_than_real_time_and_matches_the_shipped_signal_count() -> None:
    result = await run_backtest("sma_cross", None)  # every shipped bar, 15m candles
    # The same count the strategy contract's test pins for signals_over (41 on 15m candles).
    assert result.signals == 41 and result.candles == 905
    assert len(result.trades) + len(result.open_trades) == 41  # every signal after the first
    # reverses: one close and one open each
    assert result.stats.trades == len(result.trades)
    assert result.wall_s * 1_000 < result.simulated_s


async def test_an_uploaded_source_runs_in_the_sandbox_even_without_asking(tmp_path: Path) -> None:
    source = (
        "from engine.signals.strategy import HOLD, Signal\n"
        "import os\n"
        "def strategy(candles, params):\n"
        "    if len(candles) == 3:\n"
        "        os.system('true')\n"  # refused in the sandbox only
        "    return Signal(action='buy') if len(candles) == 2 else HOLD\n"
    )
    version = new_version(source=source, parameters={}, author="alice", created_ns=1)
    result = await run_backtest(version, _first_hours(1))
    assert result.failures == 1  # the os.system candle: forbidden, as in the worker
    assert result.signals == 1 and len(result.open_trades) == 1
    # The same version from its JSON file; an edited file is refused, never run under its id.
    path = tmp_path / "version.json"
    path.write_bytes(msgspec.json.encode(version))
    from_file = await run_backtest(str(path), _first_hours(1))
    assert from_file.version_id == version.version_id
    assert from_file.open_trades == result.open_trades
    path.write_bytes(msgspec.json.encode(msgspec.structs.replace(version, source=source + "#")))
    with pytest.raises(BacktestError, match="code does not match"):
        await run_backtest(str(path), _first_hours(1))


async def test_unknown_strategies_and_stray_parameters_are_refused() -> None:
    with pytest.raises(BacktestError, match="neither a shipped strategy"):
        await run_backtest("no_such_strategy", _first_hours(1))
    with pytest.raises(BacktestError, match="sma_cross parameters"):
        await run_backtest("sma_cross", _first_hours(1), params={"fast": 30, "slow": 10})
    with pytest.raises(BacktestError, match="unknown timeframe"):
        await run_backtest("sma_cross", _first_hours(1), timeframe="7m")


def test_the_command_prints_the_ledgers_statistics_and_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bars = _bars_file(tmp_path, 1_500)
    params = json.dumps(PARAMS)
    assert main("sma_cross", str(bars), timeframe="15m", params=params) == 0
    text = capsys.readouterr().out
    for row in ("trades", "net profit", "gain", "max drawdown", "profit factor", "win rate"):
        assert f"  {row} " in text
    assert "Sharpe" in text and "sqrt(252)" in text
    assert "1500 bars" in text and "x real time" in text and "s wall" in text

    assert main("sma_cross", str(bars), timeframe="15m", params=params, json=True) == 0
    out = capsys.readouterr().out
    last = out.rstrip("\n").split("\n")[-1]
    summary = json.loads(last)
    assert summary["bars"] == 1_500 and summary["timeframe"] == "15m"
    assert summary["stats"]["trades"] == len(summary["trades"]) > 0
    assert f"{summary['stats']['trades']} (" in text
    assert summary["simulated_s"] > summary["wall_s"]


def test_the_command_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main("sma_crossing", None) == 2
    assert "neither a shipped strategy" in capsys.readouterr().err
    assert main("sma_cross", None, params="[1]") == 2
    assert "--params must be a JSON object" in capsys.readouterr().err
    broken = tmp_path / "broken.csv"
    lines = _bars_file(tmp_path, 3).read_text().splitlines()
    lines[1] = lines[1].replace("\t", " ", 1)  # eight fields on line 2
    broken.write_text("\n".join(lines) + "\n")
    assert main("sma_cross", str(broken)) == 2
    assert "broken.csv:2" in capsys.readouterr().err
