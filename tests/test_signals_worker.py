"""Strategy workers on a real nats-server: one run per candle, takeovers, failures recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_until
from nats.js import JetStreamContext
from nats.js.api import StorageType

from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsserver import EmbeddedNats
from engine.runtime.publishing import publish_stored
from engine.signals import metrics
from engine.signals.candles import Timeframe
from engine.signals.claims import CandleClaims, ClaimState, decode_claim
from engine.signals.config import SignalWorkerConfig, StrategyDeployment
from engine.signals.messages import failure_decoder, run_id, signal_decoder
from engine.signals.sandbox import FailureKind, SandboxLimits
from engine.signals.strategy import SignalAction
from engine.signals.versions import StrategyVersion, new_version
from engine.signals.worker import SignalWorker
from schemas import codec, subjects
from schemas.market import Quote
from schemas.signals import deployment_encoder
from schemas.streams import SIGNALS_STREAM

HERE = Path(__file__).parent
MINUTE_NS = 60_000_000_000
SYMBOL = "XAUUSD"

SLEEPY_BUYER = """
import time
from engine.signals.strategy import Signal

def strategy(candles, params):
    time.sleep(params["sleep_s"])
    return Signal(action="buy", comment=f"bought at {candles.close[-1]}")
"""

CRASHES_ON_FIRST_CANDLE = """
from engine.signals.strategy import HOLD, Signal

def strategy(candles, params):
    if len(candles) == 1:
        raise RuntimeError("division by zero volatility")
    return Signal(action="sell", comment=f"{len(candles)} candles")
"""


def _version(source: str, **parameters: Any) -> StrategyVersion:
    return new_version(source=source, parameters=parameters, author="alice", created_ns=1)


def _future_minute() -> int:
    """A minute a day ahead: the workers' quiet-candle timer never closes it on its own."""
    return (time.time_ns() // MINUTE_NS + 24 * 60) * MINUTE_NS


def _quote(ts_ns: int, bid: float) -> Quote:
    return Quote(symbol=SYMBOL, bid=bid, ask=bid + 0.2, ts_ns=ts_ns)


async def _signals(js: JetStreamContext, version_id: str, subject_of: Any) -> list[Any]:
    """Every message stored on the version's subject, in order."""
    try:
        info = await js.stream_info(SIGNALS_STREAM, subjects_filter=subject_of(version_id))
    except Exception:
        return []
    count = (info.state.subjects or {}).get(subject_of(version_id), 0)
    if not count:
        return []
    sub = await js.subscribe(subject_of(version_id), ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=5) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def _count(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(SIGNALS_STREAM, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


class _WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, worker_id: str) -> None:
        self.proc = proc
        self.worker_id = worker_id
        self.log_lines: list[dict[str, Any]] = []

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines if line.get("event") == name]


async def _start_worker(
    tmp_path: Path, url: str, worker_id: str, deployment: StrategyDeployment, **settings: Any
) -> _WorkerProcess:
    config = SignalWorkerConfig(
        worker_id=worker_id, nats_url=url, deployments=[deployment], **settings
    )
    path = tmp_path / f"{worker_id}.json"
    path.write_bytes(msgspec.json.encode(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "signals_worker_proc.py"),
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line == b"ready\n", line
    return _WorkerProcess(proc, worker_id)


async def _stop(workers: list[_WorkerProcess]) -> None:
    for worker in workers:
        if worker.proc.returncode is None:
            worker.proc.terminate()
    for worker in workers:
        assert worker.proc.stderr is not None
        stderr = await asyncio.wait_for(worker.proc.stderr.read(), 30)
        await worker.proc.wait()
        for raw in stderr.splitlines():
            with contextlib.suppress(ValueError):
                worker.log_lines.append(json.loads(raw))


@pytest.fixture
async def streams(js: JetStreamContext) -> AsyncIterator[dict[str, Any]]:
    await ensure_streams(js, None, StorageType.MEMORY)
    yield await ensure_buckets(js, StorageType.MEMORY)


async def _publish_one_candle(nc: Any, minute: int) -> None:
    """Two quotes in the candle, then one in the next minute: that closes it, in every worker."""
    for ts, bid in ((minute + 5_000_000_000, 2650.0), (minute + 30_000_000_000, 2651.5)):
        await nc.publish(subjects.quotes(SYMBOL), codec.encode(_quote(ts, bid)))
    await nc.publish(
        subjects.quotes(SYMBOL), codec.encode(_quote(minute + MINUTE_NS + 1_000_000_000, 2652.0))
    )
    await nc.flush()


async def test_two_worker_processes_run_one_candle_once_and_publish_one_signal(
    tmp_path: Path, nats_server: EmbeddedNats, nc: Any, js: JetStreamContext, streams: Any
) -> None:
    version = _version(SLEEPY_BUYER, sleep_s=0.5)
    deployment = StrategyDeployment(version=version, symbol=SYMBOL, timeframe=Timeframe.M1)
    workers = [
        await _start_worker(tmp_path, nats_server.url, name, deployment, poll_s=0.1)
        for name in ("w1", "w2")
    ]
    minute = _future_minute()
    key = run_id(version.version_id, SYMBOL, Timeframe.M1, minute + MINUTE_NS)
    kv = streams[subjects.KV_SIGNAL_CLAIMS]
    try:
        await _publish_one_candle(nc, minute)

        async def finished() -> bool:
            claims = CandleClaims(kv, "test", 1.0)
            claim = await claims.read(key)
            return claim is not None and claim.state is ClaimState.DONE

        await wait_until(finished, "the candle's claim to be done", timeout=30)
        # Both workers closed the candle; the one that lost the claim waits for the other's
        # result and must then stand down, not run it again: give it time to misbehave.
        await asyncio.sleep(1.0)
    finally:
        await _stop(workers)
    started = [e for w in workers for e in w.events("strategy_run_started")]
    ran = [e for w in workers for e in w.events("strategy_run_finished")]
    skipped = [e for w in workers for e in w.events("strategy_run_skipped")]
    assert len(started) == 1 and len(ran) == 1, [w.log_lines for w in workers]
    assert len(skipped) == 1 and skipped[0]["worker"] != ran[0]["worker"]
    [message] = await _signals(js, version.version_id, subjects.strategy_signals)
    emitted = signal_decoder.decode(message.data)
    assert message.headers is not None and message.headers["Nats-Msg-Id"] == key
    assert emitted.version_id == version.version_id
    assert emitted.candle_close_ns == minute + MINUTE_NS
    assert emitted.signal.action is SignalAction.BUY
    assert emitted.signal.comment == "bought at 2651.5"  # the candle's close
    assert emitted.worker == ran[0]["worker"]


def _sandbox_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


async def test_a_worker_killed_mid_candle_is_taken_over_after_its_lease_and_signals_once(
    tmp_path: Path, nats_server: EmbeddedNats, nc: Any, js: JetStreamContext, streams: Any
) -> None:
    version = _version(SLEEPY_BUYER, sleep_s=2.0)
    deployment = StrategyDeployment(version=version, symbol=SYMBOL, timeframe=Timeframe.M1)
    settings = {
        "limits": SandboxLimits(wall_s=5.0, cpu_s=5),
        "lease_margin_s": 1.0,
        "poll_s": 0.1,
    }
    workers = {
        name: await _start_worker(tmp_path, nats_server.url, name, deployment, **settings)
        for name in ("w1", "w2")
    }
    minute = _future_minute()
    key = run_id(version.version_id, SYMBOL, Timeframe.M1, minute + MINUTE_NS)
    kv = streams[subjects.KV_SIGNAL_CLAIMS]
    reader = CandleClaims(kv, "test", 1.0)
    try:
        await _publish_one_candle(nc, minute)
        await wait_until(lambda: reader.read(key), "a worker to claim the candle", timeout=30)
        claim = await reader.read(key)
        assert claim is not None and claim.state is ClaimState.RUNNING and claim.attempt == 1
        holder = workers[claim.worker]
        # Kill it while its strategy sleeps: mid-execution, claim held, nothing published.
        await wait_until(
            lambda: _sandbox_children(holder.proc.pid), "the holder to start its sandbox"
        )
        [child] = _sandbox_children(holder.proc.pid)
        killed_at = time.time_ns()
        holder.proc.send_signal(signal.SIGKILL)
        await holder.proc.wait()

        async def done() -> bool:
            claim = await reader.read(key)
            return claim is not None and claim.state is ClaimState.DONE

        await wait_until(done, "the other worker to finish the candle", timeout=30)
        # The orphaned sandbox died with its worker instead of running on.
        assert not Path(f"/proc/{child}").exists() or _is_zombie(child)
        await asyncio.sleep(1.0)
    finally:
        await _stop(list(workers.values()))
    final = await reader.read(key)
    assert final is not None
    survivor = next(w for w in workers.values() if w is not holder)
    assert final.worker == survivor.worker_id and final.attempt == 2
    # Taken over only once the lease ran out, not while the holder might still be alive.
    assert final.lease_until_ns - settings["limits"].wall_s * 1e9 - 1e9 >= claim.lease_until_ns
    assert final.lease_until_ns > killed_at
    assert len(holder.events("strategy_run_started")) == 1
    assert holder.events("strategy_run_finished") == []
    assert len(survivor.events("claim_taken_over")) == 1
    assert len(survivor.events("strategy_run_finished")) == 1
    messages = await _signals(js, version.version_id, subjects.strategy_signals)
    assert len(messages) == 1
    assert signal_decoder.decode(messages[0].data).worker == survivor.worker_id


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_a_crashing_strategy_is_recorded_as_failed_and_the_next_candle_still_runs(
    nc: Any, js: JetStreamContext, streams: Any
) -> None:
    version = _version(CRASHES_ON_FIRST_CANDLE)
    config = SignalWorkerConfig(
        worker_id="w1",
        nats_url="unused",
        deployments=[StrategyDeployment(version=version, symbol=SYMBOL, timeframe=Timeframe.M1)],
    )
    worker = SignalWorker(config, nc, js, streams[subjects.KV_SIGNAL_CLAIMS])
    failures = metrics.RUN_FAILURES.labels(version.version_id, "crash")
    failures_before = failures._value.get()
    minute = _future_minute()
    for ts, bid in ((minute, 2650.0), (minute + MINUTE_NS, 2655.0), (minute + 2 * MINUTE_NS, 1.0)):
        worker.on_quote(_quote(ts, bid))
    await worker.wait_idle()
    [failed] = await _signals(js, version.version_id, subjects.strategy_failures)
    record = failure_decoder.decode(failed.data)
    assert record.kind is FailureKind.CRASH
    assert record.message == "RuntimeError: division by zero volatility (line 6)"
    assert record.candle_close_ns == minute + MINUTE_NS and record.worker == "w1"
    assert failures._value.get() == failures_before + 1
    first = run_id(version.version_id, SYMBOL, Timeframe.M1, minute + MINUTE_NS)
    assert failed.headers is not None and failed.headers["Nats-Msg-Id"] == f"{first}.failed"
    claim = decode_claim((await streams[subjects.KV_SIGNAL_CLAIMS].get(first)).value)
    assert claim.state is ClaimState.FAILED and claim.outcome.startswith("crash: RuntimeError")
    [emitted] = await _signals(js, version.version_id, subjects.strategy_signals)
    assert signal_decoder.decode(emitted.data).candle_close_ns == minute + 2 * MINUTE_NS
    assert signal_decoder.decode(emitted.data).signal.comment == "2 candles"


async def test_a_live_claim_is_never_taken_over_and_a_finished_one_is_never_rerun(
    js: JetStreamContext, streams: Any
) -> None:
    kv = streams[subjects.KV_SIGNAL_CLAIMS]
    now = [1_000 * 10**9]
    first = CandleClaims(kv, "w1", 10.0, poll_s=0.01, clock=lambda: now[0])
    second = CandleClaims(kv, "w2", 10.0, poll_s=0.01, clock=lambda: now[0])
    held = await first.acquire("sv-x.XAUUSD.1m.1")
    assert held is not None
    waiting = asyncio.create_task(second.acquire("sv-x.XAUUSD.1m.1"))
    now[0] += 9 * 10**9  # still inside the lease
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert await first.finish(held, ClaimState.DONE, "buy")
    assert await asyncio.wait_for(waiting, 5) is None  # finished: stand down
    assert await second.acquire("sv-x.XAUUSD.1m.1") is None


async def test_of_many_workers_after_a_lease_exactly_one_takes_over(
    js: JetStreamContext, streams: Any
) -> None:
    kv = streams[subjects.KV_SIGNAL_CLAIMS]
    now = [1_000 * 10**9]
    dead = CandleClaims(kv, "dead", 10.0, clock=lambda: now[0])
    held = await dead.acquire("sv-x.XAUUSD.1m.2")
    assert held is not None
    now[0] += 11 * 10**9  # the lease is over
    peers = [CandleClaims(kv, f"w{i}", 10.0, poll_s=0.01, clock=lambda: now[0]) for i in range(8)]
    results = await asyncio.gather(
        *(asyncio.wait_for(p.acquire("sv-x.XAUUSD.1m.2"), 0.5) for p in peers),
        return_exceptions=True,
    )
    # One takes over; the rest wait on the new holder's live lease (and time out here).
    taken = [r for r in results if not isinstance(r, BaseException)]
    assert len(taken) == 1 and taken[0] is not None and taken[0].claim.attempt == 2
    assert all(isinstance(r, TimeoutError) for r in results if r not in taken)
    # The dead worker, had it only stalled, can no longer mark the run as its own.
    assert not await dead.finish(held, ClaimState.DONE, "buy")


async def test_a_signal_published_twice_under_one_run_id_is_stored_once(
    js: JetStreamContext, streams: Any
) -> None:
    # What makes a takeover after a half-finished run safe: the run's id is the message id.
    subject = subjects.strategy_signals("sv-000000000000000000000000")
    for payload in (b"first", b"second"):
        await publish_stored(js, [(subject, payload, "sv-0.XAUUSD.1m.1")], timeout_s=5, attempts=1)
    assert await _count(js, subject) == 1


def test_the_worker_refuses_a_lease_the_duplicate_window_cannot_cover() -> None:
    version = _version(SLEEPY_BUYER, sleep_s=0.0)
    deployment = StrategyDeployment(version=version, symbol=SYMBOL, timeframe=Timeframe.M1)
    with pytest.raises(ValueError, match="duplicate window"):
        SignalWorkerConfig(
            worker_id="w1",
            deployments=[deployment],
            limits=SandboxLimits(wall_s=600.0, cpu_s=600),
            lease_margin_s=1_000.0,
            max_attempts=3,
        )


def test_the_worker_refuses_a_configured_version_edited_after_upload() -> None:
    version = _version(SLEEPY_BUYER, sleep_s=0.0)
    edited = msgspec.structs.replace(version, source=version.source + "\nimport os\n")
    deployment = StrategyDeployment(version=edited, symbol=SYMBOL, timeframe=Timeframe.M1)
    with pytest.raises(ValueError, match="does not match"):
        SignalWorkerConfig(worker_id="w1", deployments=[deployment])


async def test_a_quiet_market_candle_closes_on_the_timer_and_runs(
    nc: Any, js: JetStreamContext, streams: Any
) -> None:
    version = _version(SLEEPY_BUYER, sleep_s=0.0)
    config = SignalWorkerConfig(
        worker_id="w1",
        deployments=[StrategyDeployment(version=version, symbol=SYMBOL, timeframe=Timeframe.M1)],
        close_grace_s=2.0,
    )
    minute = _future_minute()
    now = [minute + 10_000_000_000]
    worker = SignalWorker(config, nc, js, streams[subjects.KV_SIGNAL_CLAIMS], clock=lambda: now[0])
    await worker.start()
    try:
        await nc.publish(subjects.quotes(SYMBOL), codec.encode(_quote(now[0], 2650.0)))
        await nc.flush()
        series = worker.series[(SYMBOL, Timeframe.M1)]
        await wait_until(lambda: series.builder.forming_close_time_ns, "a candle to open")
        now[0] = minute + MINUTE_NS + 1_000_000_000  # the candle ended; still inside the grace
        await asyncio.sleep(0.6)
        assert await _count(js, subjects.strategy_signals(version.version_id)) == 0
        now[0] = minute + MINUTE_NS + 2_000_000_000  # no quote came: the timer closes it
        await wait_until(
            lambda: _count(js, subjects.strategy_signals(version.version_id)),
            "the timer-closed candle's signal",
        )
    finally:
        await worker.stop()
    [message] = await _signals(js, version.version_id, subjects.strategy_signals)
    assert signal_decoder.decode(message.data).candle_close_ns == minute + MINUTE_NS


def test_a_worker_configuration_loads_from_json(tmp_path: Path) -> None:
    from engine.signals.config import load_config

    version = new_version(shipped="rsi_reversal", parameters={}, author="ops", created_ns=1)
    config = SignalWorkerConfig(
        worker_id="signals-1",
        nats_url="nats://nats:4222",
        deployments=[StrategyDeployment(version=version, symbol="usdjpy.", timeframe="15m")],
    )
    path = tmp_path / "worker.json"
    path.write_bytes(msgspec.json.encode(config))
    assert load_config(path) == config
    path.write_text(path.read_text().replace("worker_id", "worker"))
    with pytest.raises(msgspec.ValidationError, match="unknown field `worker`"):
        load_config(path)


async def test_a_busy_worker_claims_no_candle_it_cannot_start(
    nc: Any, js: JetStreamContext, streams: Any
) -> None:
    slow, slower = _version(SLEEPY_BUYER, sleep_s=1.0), _version(SLEEPY_BUYER, sleep_s=1.5)
    config = SignalWorkerConfig(
        worker_id="w1",
        deployments=[
            StrategyDeployment(version=v, symbol=SYMBOL, timeframe=Timeframe.M1)
            for v in (slow, slower)
        ],
        max_concurrent_runs=1,
    )
    kv = streams[subjects.KV_SIGNAL_CLAIMS]
    worker = SignalWorker(config, nc, js, kv)
    reader = CandleClaims(kv, "test", 1.0)
    minute = _future_minute()
    keys = [run_id(v.version_id, SYMBOL, Timeframe.M1, minute + MINUTE_NS) for v in (slow, slower)]

    async def claimed() -> list[bool]:
        return [await reader.read(key) is not None for key in keys]

    for ts in (minute, minute + MINUTE_NS):
        worker.on_quote(_quote(ts, 2650.0))
    await wait_until(lambda: _any(claimed()), "the first claim")
    # One slot: the second run is not claimed while the first runs (a peer may take it).
    assert sum(await claimed()) == 1
    await worker.wait_idle()
    for key in keys:
        claim = await reader.read(key)
        assert claim is not None and claim.state is ClaimState.DONE and claim.worker == "w1"


async def _any(values: Any) -> bool:
    return any(await values)


async def _deploy(kv: Any, deployment: StrategyDeployment) -> str:
    key = subjects.deployment_key(
        deployment.version.version_id, deployment.symbol, deployment.timeframe
    )
    await kv.put(key, deployment_encoder.encode(deployment))
    return key


async def test_deployments_put_in_the_bucket_run_and_deleted_ones_stop(
    nc: Any, js: JetStreamContext, streams: Any
) -> None:
    configured = _version(SLEEPY_BUYER, sleep_s=0.0)
    live = _version(SLEEPY_BUYER, sleep_s=0.0, tag="live")
    config = SignalWorkerConfig(
        worker_id="w1",
        deployments=[StrategyDeployment(version=configured, symbol=SYMBOL, timeframe="1m")],
    )
    deployments_kv = streams[subjects.KV_SIGNAL_DEPLOYMENTS]
    worker = SignalWorker(
        config, nc, js, streams[subjects.KV_SIGNAL_CLAIMS], deployments_kv=deployments_kv
    )
    live_name = f"{live.version_id}:{SYMBOL}:1m"
    minute = _future_minute()
    await worker.start()
    try:
        key = await _deploy(
            deployments_kv,
            StrategyDeployment(version=live, symbol=SYMBOL, timeframe="1m", master="paper-1"),
        )
        await wait_until(lambda: live_name in worker.deployment_names(), "the put to deploy")
        await _publish_one_candle(nc, minute)
        for version in (configured, live):
            await wait_until(
                lambda v=version: _count(js, subjects.strategy_signals(v.version_id)),
                "a signal of each deployment",
                timeout=30,
            )

        await deployments_kv.delete(key)
        await wait_until(lambda: live_name not in worker.deployment_names(), "the delete")
        await _publish_one_candle(nc, minute + MINUTE_NS)

        async def configured_ran_twice() -> bool:
            return await _count(js, subjects.strategy_signals(configured.version_id)) == 2

        await wait_until(configured_ran_twice, "the configured deployment's second candle")
        await worker.wait_idle()
    finally:
        await worker.stop()
    # The configuration's deployment stays; the deleted one ran on the first candle only.
    assert await _count(js, subjects.strategy_signals(live.version_id)) == 1
    [message] = await _signals(js, live.version_id, subjects.strategy_signals)
    assert signal_decoder.decode(message.data).candle_close_ns == minute + MINUTE_NS


async def test_a_bucket_value_that_does_not_decode_or_verify_is_counted_and_skipped(
    nc: Any, js: JetStreamContext, streams: Any
) -> None:
    good = _version(SLEEPY_BUYER, sleep_s=0.0, tag="good")
    edited = _version(SLEEPY_BUYER, sleep_s=0.0, tag="edited")
    edited = msgspec.structs.replace(edited, source=edited.source + "\nimport os\n")
    moved = _version(SLEEPY_BUYER, sleep_s=0.0, tag="moved")
    deployments_kv = streams[subjects.KV_SIGNAL_DEPLOYMENTS]
    # Already in the bucket when the worker starts: loaded before start() returns.
    await _deploy(deployments_kv, StrategyDeployment(version=good, symbol=SYMBOL, timeframe="1m"))
    await deployments_kv.put(f"{good.version_id}.GARBAGE.1m", b"\x93not json")
    config = SignalWorkerConfig(worker_id="w1")
    worker = SignalWorker(
        config, nc, js, streams[subjects.KV_SIGNAL_CLAIMS], deployments_kv=deployments_kv
    )
    invalid_before = metrics.DEPLOYMENTS_INVALID._value.get()
    await worker.start()
    try:
        assert worker.deployment_names() == [f"{good.version_id}:{SYMBOL}:1m"]
        assert metrics.DEPLOYMENTS_INVALID._value.get() == invalid_before + 1
        # A version edited after upload, and a deployment stored under another run's key.
        await _deploy(
            deployments_kv, StrategyDeployment(version=edited, symbol=SYMBOL, timeframe="1m")
        )
        await deployments_kv.put(
            f"{moved.version_id}.EURUSD.1m",
            deployment_encoder.encode(
                StrategyDeployment(version=moved, symbol=SYMBOL, timeframe="1m")
            ),
        )

        async def both_counted() -> bool:
            return metrics.DEPLOYMENTS_INVALID._value.get() == invalid_before + 3

        await wait_until(both_counted, "the two invalid values to be counted")
        assert worker.deployment_names() == [f"{good.version_id}:{SYMBOL}:1m"]
        minute = _future_minute()
        await _publish_one_candle(nc, minute)
        await wait_until(
            lambda: _count(js, subjects.strategy_signals(good.version_id)),
            "the valid deployment's signal",
            timeout=30,
        )
        await worker.wait_idle()
    finally:
        await worker.stop()
    for skipped in (edited, moved):
        assert await _count(js, subjects.strategy_signals(skipped.version_id)) == 0


async def test_claims_expire_after_a_day_and_an_existing_claims_bucket_is_updated(
    js: JetStreamContext,
) -> None:
    from nats.js.api import KeyValueConfig

    from schemas.streams import DAY_S, KV_MAX_AGE_S, SIGNALS_DUPLICATE_WINDOW_S

    # Made before claims expired: no age limit.
    await js.create_key_value(
        KeyValueConfig(bucket=subjects.KV_SIGNAL_CLAIMS, history=1, storage=StorageType.MEMORY)
    )
    stream = f"KV_{subjects.KV_SIGNAL_CLAIMS}"
    assert not (await js.stream_info(stream)).config.max_age
    await ensure_buckets(js, StorageType.MEMORY)
    config = (await js.stream_info(stream)).config
    assert config.max_age == KV_MAX_AGE_S[subjects.KV_SIGNAL_CLAIMS] == DAY_S
    # Longer than the stream's duplicate window, inside which a takeover republishes a run.
    assert DAY_S > SIGNALS_DUPLICATE_WINDOW_S
    # Buckets the contract keeps forever stay so.
    assert not (await js.stream_info(f"KV_{subjects.KV_SIGNAL_DEPLOYMENTS}")).config.max_age
    # A bucket created now has the limit at once; ensuring again changes nothing.
    await js.delete_key_value(subjects.KV_SIGNAL_CLAIMS)
    await ensure_buckets(js, StorageType.MEMORY)
    await ensure_buckets(js, StorageType.MEMORY)
    assert (await js.stream_info(stream)).config.max_age == DAY_S
