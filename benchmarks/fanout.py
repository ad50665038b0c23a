"""Fan-out benchmark: master event published → last follower order received.

Real nats-server (from the wheel), the replicator in its own process, and in the same run
the floor: a bare relay process that consumes the same kind of master event and publishes
the same number of pre-encoded orders to the same stream with the same acknowledgement
policy. Cases alternate event by event between replicator and floor so both see the same
machine conditions. Every process runs as its own NATS user (the replicator and the floor as
the replicator, the simulated connectors as connectors), as in production.

``--sync default,always`` runs everything once per JetStream fsync setting, one server each:
the cost of ``sync_interval: always`` (fsync before every ack) next to the default.

``--instances 1,2`` runs every case once per number of replicator processes: with n > 1 the
master's links are split into n link shards (``tradecopy replicator run --shard i/n``), each
process planning one, so one master's fan-out is planned in parallel. A batched fan-out is
then one batch per connector and shard; the floor publishes as many messages.

    python -m benchmarks.fanout [--followers 1,100,1000] [--events 200] [--instances 1]
                                [--sync default] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from engine.core.errors import TradecopyError
from engine.replicator.config import link_shard
from engine.runtime.eventloop import run_async
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.natsauth import Role
from engine.runtime.natsserver import check_sync_interval
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.account import AccountState, SymbolSpec
from schemas.common import Side
from schemas.links import CopyLink, Multiplier
from schemas.master import PositionOpened
from schemas.streams import FOLLOWER_ORDERS_STREAM

SYMBOL = "XAUUSD"


@dataclass(slots=True)
class Percentiles:
    p50_us: float
    p99_us: float
    max_us: float


def percentiles(samples_ns: list[int]) -> Percentiles:
    ordered = sorted(samples_ns)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index] / 1e3

    return Percentiles(pick(0.50), pick(0.99), ordered[-1] / 1e3)


class OrderCounter:
    """Counts follower orders as a JetStream consumer receives them (i.e. once stored)."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done: asyncio.Event = asyncio.Event()
        self.done_ns = 0

    def expect(self, n: int) -> None:
        self.count = 0
        self.target = n
        self.done = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        self.count += 1
        if self.count == self.target:
            self.done_ns = time.perf_counter_ns()
            self.done.set()


FOLLOWERS_PER_CONNECTOR = 100


def connectors_for(n: int) -> int:
    return -(-n // FOLLOWERS_PER_CONNECTOR)


def case_link_id(n: int, batched: bool, i: int) -> str:
    return f"bench-{'b' if batched else 's'}{n}-{i:04d}"


def case_messages(n: int, batched: bool, shards: int) -> int:
    """Messages one event of a case becomes: one per order, or one per connector and shard."""
    if not batched:
        return n
    return len(
        {(i // FOLLOWERS_PER_CONNECTOR, link_shard(case_link_id(n, batched, i), shards))
         for i in range(n)}
    )  # fmt: skip


def case_accounts(n: int, batched: bool) -> tuple[str, str, list[str]]:
    """The master, the floor's master and the followers of a case (names fixed up front, so
    every simulated connector's NATS user can be made before the server starts)."""
    tag = "b" if batched else "s"
    return f"bench-m{tag}{n}", f"floor-m{tag}{n}", [f"bench-f{tag}{n}-{i:04d}" for i in range(n)]


def case_connector(n: int, batched: bool) -> str:
    """The simulated connector that publishes a case's master events and account states."""
    return f"bench-{'b' if batched else 's'}{n}"


async def _seed_case(
    links: Any, accounts: dict[str, Any], n: int, batched: bool
) -> tuple[str, str, list[str]]:
    """Links (``links``: the operator's bucket), account states and symbol specs (``accounts``:
    the case connector's buckets) for one master with ``n`` followers.

    Batched followers name their connector in their account state (100 per connector), so
    the replicator groups their orders; the others get one message per order.
    """
    master, floor_master, followers = case_accounts(n, batched)
    now = time.time_ns()

    async def seed_follower(i: int, follower: str) -> None:
        link = CopyLink(
            link_id=case_link_id(n, batched, i),
            master=master,
            follower=follower,
            sizing=Multiplier(factor=1.0 + (i % 5) * 0.5),
            max_lot=5.0,
        )
        state = AccountState(
            account=follower,
            ts_ns=now,
            currency="USD",
            balance=10_000.0,
            equity=10_000.0,
            free_margin=10_000.0,
            connector=f"bench-conn-{i // FOLLOWERS_PER_CONNECTOR:03d}" if batched else "",
        )
        spec = SymbolSpec(
            account=follower,
            symbol=SYMBOL,
            contract_size=100.0,
            tick_size=0.01,
            tick_value=1.0,
            digits=2,
            volume_min=0.01,
            volume_max=100.0,
            volume_step=0.01,
        )
        await accounts[subjects.KV_ACCOUNTS].put(follower, codec.encode(state))
        await accounts[subjects.KV_SYMBOLS].put(
            subjects.symbol_key(follower, SYMBOL), codec.encode(spec)
        )
        await links.put(link.link_id, codec.encode(link))

    for start in range(0, n, 100):
        await asyncio.gather(
            *(seed_follower(i, f) for i, f in enumerate(followers[start : start + 100], start))
        )
    return master, floor_master, followers


def _cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds of these processes so far (None where /proc is missing)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _event(master: str, seq: int) -> bytes:
    now = time.time_ns()
    return codec.encode(
        PositionOpened(
            event_id=f"{master}-{seq}",
            master=master,
            symbol=SYMBOL,
            ts_ns=now,
            position_id=str(1_000_000 + seq),
            side=Side.BUY if seq % 2 else Side.SELL,
            volume=0.1,
            price=2000.0,
            sl=1990.0,
            tp=2100.0,
        )
    )


async def _one(nc: Any, counter: OrderCounter, master: str, seq: int, n: int) -> int:
    payload = _event(master, seq)
    counter.expect(n)
    t0 = time.perf_counter_ns()
    await nc.publish(subjects.master_events(master), payload)
    await asyncio.wait_for(counter.done.wait(), timeout=30)
    return counter.done_ns - t0


async def _wait_ready(nc: Any, counter: OrderCounter, master: str, n: int) -> None:
    """Warm-up events until the process behind ``master`` answers with all ``n`` orders."""
    deadline = time.monotonic() + 60
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        counter.expect(n)
        await nc.publish(subjects.master_events(master), _event(master, -seq))
        try:
            await asyncio.wait_for(counter.done.wait(), timeout=2)
        except TimeoutError:
            continue
        await asyncio.sleep(0.2)  # let stragglers of earlier warm-ups drain
        if counter.count == n:
            return
    raise RuntimeError(f"no complete fan-out for {master} within 60 s")


async def run(
    follower_counts: list[int],
    events: int,
    modes: list[str],
    partitions: int = 16,
    sync: str = "default",
    instances: int = 1,
) -> dict[str, Any]:
    """One server (``sync``: its JetStream fsync setting), every case on it, planned by
    ``instances`` replicator processes (one link shard each)."""
    with tempfile.TemporaryDirectory(prefix="tc-bench-") as tmp:
        stack = LocalStack(
            Path(tmp) / "nats", partitions=partitions, name="bench",
            sync_interval=None if sync == "default" else sync,
        )  # fmt: skip
        plan = [(m, n) for m in modes for n in follower_counts]
        for mode, n in plan:
            master, floor_master, followers = case_accounts(n, mode == "batch")
            await stack.add_connector(
                case_connector(n, mode == "batch"),
                masters=[master, floor_master], followers=followers,
            )  # fmt: skip
        await stack.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            js = stack.js
            debug = bool(os.environ.get("TC_BENCH_DEBUG"))
            stack.spawn_replicators(
                instances, instance="bench", batch_by_connector=True, shards=instances,
                log_level="debug" if debug else "warning", quiet=not debug,
            )  # fmt: skip
            # The floor consumes and publishes exactly what the replicator does, as it.
            floor_env = {**stack.child_env(stack.user(Role.REPLICATOR)), "PYTHONUNBUFFERED": "1"}
            counter = OrderCounter()
            await js.subscribe(
                "tc.v1.*.*.orders", stream=FOLLOWER_ORDERS_STREAM, cb=counter.on_msg,
                ordered_consumer=True,
                deliver_policy=nats.js.api.DeliverPolicy.NEW,
            )  # fmt: skip
            cases = []
            for mode, n in plan:
                batched = mode == "batch"
                name = case_connector(n, batched)
                nc = await stack.connect(f"bench-{name}", stack.connector_user(name))
                accounts = await ensure_buckets(nc.jetstream())
                master, floor_master, followers = await _seed_case(
                    stack.buckets[subjects.KV_LINKS], accounts, n, batched
                )
                messages = case_messages(n, batched, instances)
                followers_file = Path(tmp) / f"followers-{mode}-{n}.txt"
                followers_file.write_text("\n".join(followers), encoding="utf-8")
                floor = subprocess.Popen(
                    [sys.executable, "-P", "-m", "benchmarks.floor_relay", "--nats-url", stack.url,
                     "--master", floor_master, "--followers-file", str(followers_file),
                     "--durable", f"floor-{mode}-{n}",
                     "--batches", str(messages if batched else 0)],
                    env=floor_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                procs.append(floor)
                await _wait_ready(nc, counter, master, messages)
                await _wait_ready(nc, counter, floor_master, messages)
                ours: list[int] = []
                bare: list[int] = []
                # Large fan-outs store megabytes per event: fewer events, still ≥ 20.
                case_events = events if n < 1000 else max(events // (2 if n < 10_000 else 10), 20)
                replicators = [proc.pid for proc in stack.replicators]
                cpu_before = (_cpu_s(replicators), _cpu_s([floor.pid]))
                for seq in range(case_events):
                    ours.append(await _one(nc, counter, master, seq, messages))
                    bare.append(await _one(nc, counter, floor_master, seq, messages))
                cpu_after = (_cpu_s(replicators), _cpu_s([floor.pid]))
                floor.terminate()
                p, f = percentiles(ours), percentiles(bare)
                cpu = [
                    None if a is None or b is None else round((a - b) / case_events * 1e6)
                    for a, b in zip(cpu_after, cpu_before, strict=True)
                ]
                cases.append(
                    {
                        "mode": mode,
                        "followers": n,
                        "instances": instances,
                        "sync": sync,
                        "messages_per_event": messages,
                        "events": case_events,
                        "p50_us": round(p.p50_us, 1),
                        "p99_us": round(p.p99_us, 1),
                        "max_us": round(p.max_us, 1),
                        "floor_p50_us": round(f.p50_us, 1),
                        "floor_p99_us": round(f.p99_us, 1),
                        "floor_max_us": round(f.max_us, 1),
                        # CPU the processes used per event, whatever else runs on the machine
                        # (Linux; coarse: the kernel counts in clock ticks).
                        "cpu_us_per_event": cpu[0],
                        "floor_cpu_us_per_event": cpu[1],
                        "ratio_p50": round(p.p50_us / f.p50_us, 3),
                        "ratio_p99": round(p.p99_us / f.p99_us, 3),
                        "per_link_us": round(p.p50_us / n, 3),
                        "excess_per_link_us": round((p.p50_us - f.p50_us) / n, 3),
                    }
                )
            return {"cases": cases}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            await stack.stop()


_COLUMNS = (
    ("mode", "mode", "{:>9}"),
    ("followers", "followers", "{:>9}"),
    ("procs", "instances", "{:>5}"),
    ("msgs", "messages_per_event", "{:>5}"),
    ("events", "events", "{:>6}"),
    ("p50 µs", "p50_us", "{:>9.1f}"),
    ("p99 µs", "p99_us", "{:>9.1f}"),
    ("max µs", "max_us", "{:>9.1f}"),
    ("floor p50", "floor_p50_us", "{:>9.1f}"),
    ("floor p99", "floor_p99_us", "{:>9.1f}"),
    ("ratio p50", "ratio_p50", "{:>9.2f}"),
    ("ratio p99", "ratio_p99", "{:>9.2f}"),
    ("µs/link", "per_link_us", "{:>9.3f}"),
)


def render(result: dict[str, Any]) -> str:
    widths = [int(fmt[3:].rstrip("}").split(".")[0].rstrip("f")) for _, _, fmt in _COLUMNS]
    header = "  ".join(
        f"{title:>{width}}" for (title, _, _), width in zip(_COLUMNS, widths, strict=True)
    )
    lines = []
    for sync in dict.fromkeys(case.get("sync", "default") for case in result["cases"]):
        lines += [
            "fan-out: master event published → last follower order stored and received; "
            f"JetStream sync: {sync}",
            header,
            "-" * len(header),
        ]
        for case in result["cases"]:
            if case.get("sync", "default") == sync:
                lines.append("  ".join(fmt.format(case[key]) for _, key, fmt in _COLUMNS))
        lines.append("")
    return "\n".join(lines).rstrip()


def sync_settings(text: str) -> list[str]:
    """``default,always`` → the settings to measure, each checked (a duration such as 1s)."""
    settings = [part.strip() for part in text.split(",") if part.strip()]
    for setting in settings:
        if setting != "default":
            check_sync_interval(setting)
    return settings or ["default"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", default="1,100,1000")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument(
        "--modes",
        default="per-order,batch",
        help="per-order: one message per follower order; batch: one per connector",
    )
    parser.add_argument(
        "--sync",
        default="default",
        help="JetStream fsync settings, comma-separated: default (the server's), always, or a "
        "duration (1s); each runs every case on a server of its own",
    )
    parser.add_argument(
        "--instances",
        default="1",
        help="replicator processes, comma-separated (2: the links split into 2 link shards); "
        "each runs every case on a server of its own",
    )
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.followers.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"per-order", "batch"}
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    try:
        syncs = sync_settings(args.sync)
    except TradecopyError as exc:
        parser.error(str(exc))
    instance_counts = [int(x) for x in args.instances.split(",") if x.strip()]
    if not instance_counts or min(instance_counts) < 1:
        parser.error("--instances wants counts of 1 or more")
    cases: list[dict[str, Any]] = []
    for sync in syncs:
        for instances in instance_counts:
            cases += run_async(run(counts, args.events, modes, sync=sync, instances=instances))[
                "cases"
            ]
    result = {"cases": cases}
    print(render(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
