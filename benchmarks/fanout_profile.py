"""Where a fan-out's time goes, stage by stage, in instructions (deterministic, for callgrind).

Builds one master with N followers shaped like ``benchmarks.fanout``'s batched case (one
connector per 100 followers) in memory, then repeats one stage of the replicator's hot path
``--repeat`` times. Under ``valgrind --tool=callgrind`` the instruction count of a run with
``--repeat K`` minus a run with ``--repeat 0`` (the same set-up) is the stage's cost;
``--callgrind`` does exactly that for every stage and prints instructions per link:

    python -m benchmarks.fanout_profile --callgrind [--followers 1000] [--repeat 5]

Stages: ``decode`` (the master event, once per event), ``rules-reference`` (``plan_event``,
link by link), ``sizing-reference`` (``size_follower_volume`` alone, its share of the rules),
``rules-fan-out`` (``plan_fan_out``, the planner, every order an object), ``encode`` (batches
built and encoded by ``fan_out_publications``, orders counted by type, the metric bumped once
per type and fan-out), ``spliced`` (both as the service runs them batched: orders spliced into
their connectors' batches as they are planned, ``engine/replicator/splice.py``),
``metrics-per-order`` (the order metric bumped once per order, as the service did before),
and ``publish`` (the batches handed to nats-py and their acks awaited, against a real
nats-server, which callgrind does not trace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.replicator import metrics
from engine.replicator.facts import CompiledLink, MarketView
from engine.replicator.fanout import SymbolFanOut, fan_out_publications, plan_fan_out
from engine.replicator.rules import plan_event
from engine.replicator.service import tune_gc
from engine.replicator.sizing import size_follower_volume
from engine.replicator.splice import Batches
from engine.runtime.eventloop import run_async
from schemas import codec
from schemas.account import AccountState, SymbolSpec
from schemas.common import Side, Trace
from schemas.links import CopyLink, Multiplier
from schemas.master import PositionOpened

SYMBOL = "XAUUSD"
STAGES = (
    "decode",
    "rules-reference",
    "sizing-reference",
    "rules-fan-out",
    "encode",
    "spliced",
    "metrics-per-order",
    "publish",
)
NOW = 1_768_474_800_000_000_000


def world(n: int) -> tuple[tuple[CompiledLink, ...], MarketView]:
    """``benchmarks.fanout``'s batched case, in memory."""
    view = MarketView()
    links = []
    for i in range(n):
        follower = f"bench-f{i:05d}"
        links.append(CompiledLink(CopyLink(
            link_id=f"bench-{i:05d}", master="bench-m", follower=follower,
            sizing=Multiplier(factor=1.0 + (i % 5) * 0.5), max_lot=5.0,
        )))  # fmt: skip
        view.accounts[follower] = AccountState(
            account=follower, ts_ns=NOW, currency="USD", balance=1e4, equity=1e4,
            free_margin=1e4, connector=f"bench-conn-{i // 100:03d}",
        )  # fmt: skip
        view.symbols[(follower, SYMBOL)] = SymbolSpec(
            account=follower, symbol=SYMBOL, contract_size=100.0, tick_size=0.01,
            tick_value=1.0, digits=2, volume_min=0.01, volume_max=100.0, volume_step=0.01,
        )  # fmt: skip
    return tuple(links), view


def master_event(seq: int) -> PositionOpened:
    return PositionOpened(
        event_id=f"bench-m-{seq}", master="bench-m", symbol=SYMBOL, ts_ns=NOW,
        position_id=str(1_000_000 + seq), side=Side.BUY if seq % 2 else Side.SELL,
        volume=0.1, price=2000.0, sl=1990.0, tp=2100.0,
    )  # fmt: skip


async def run_stage(stage: str, n: int, repeat: int) -> None:
    links, view = world(n)
    fan_out = SymbolFanOut(links, SYMBOL)
    trace = Trace()
    event = master_event(0)
    payload = codec.encode(event)
    plans = plan_fan_out(event, fan_out, view, NOW, trace)
    messages = fan_out_publications(event, plans, view.accounts, "", NOW)
    tune_gc()  # as the service does once it has started
    stack = None
    if stage == "publish":
        from engine.runtime.stack import LocalStack

        tmp = tempfile.mkdtemp(prefix="tc-profile-")
        stack = LocalStack(Path(tmp) / "nats", name="profile", secure=False)
        await stack.start()
        js = stack.nc.jetstream(publish_async_max_pending=65_536)
    try:
        for k in range(repeat):
            if stage == "decode":
                codec.master_event_decoder.decode(payload)
            elif stage == "rules-reference":
                plan_event(event, links, view, NOW, trace)
            elif stage == "sizing-reference":
                for cl in links:
                    link = cl.link
                    size_follower_volume(
                        link, master_volume=event.volume, sl_distance=10.0, master_state=None,
                        follower_state=view.accounts[link.follower],
                        spec=view.symbols[(link.follower, SYMBOL)], fx_rates=view.fx_rates,
                    )  # fmt: skip
            elif stage == "rules-fan-out":
                plan_fan_out(event, fan_out, view, NOW, trace)
            elif stage == "spliced":
                batches = Batches()
                planned = plan_fan_out(event, fan_out, view, NOW, trace, batches)
                counted = {}
                fan_out_publications(event, planned, view.accounts, "", NOW, counted, batches)
                for tag, count in counted.items():
                    metrics.ORDERS_PUBLISHED.labels(tag).inc(count)
            elif stage == "encode":
                counted: dict[str, int] = {}
                fan_out_publications(event, plans, view.accounts, "", NOW, counted)
                for tag, count in counted.items():
                    metrics.ORDERS_PUBLISHED.labels(tag).inc(count)
            elif stage == "metrics-per-order":
                for _, plan in plans:
                    metrics.ORDERS_PUBLISHED.labels(plan.order.__struct_config__.tag).inc()
            elif stage == "publish":
                futures = [
                    await js.publish_async(subject, data, headers={"Nats-Msg-Id": f"{k}:{i}"})
                    for i, (subject, data, _) in enumerate(messages)
                ]
                await asyncio.gather(*futures)
            else:
                raise SystemExit(f"unknown stage {stage!r}")
    finally:
        if stack is not None:
            await stack.stop()


def _instructions(stage: str, n: int, repeat: int) -> int:
    """Instructions callgrind counts for one run (the same hash seed every time)."""
    with tempfile.TemporaryDirectory(prefix="tc-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-m", "benchmarks.fanout_profile", "--stage", stage,
             "--followers", str(n), "--repeat", str(repeat)],
            check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        if summary is None:
            raise RuntimeError("no totals in the callgrind output")
        return int(summary.group(1))


def callgrind_table(stages: list[str], n: int, repeat: int) -> dict[str, Any]:
    rows = {}
    for stage in stages:
        base = _instructions(stage, n, 0)
        total = _instructions(stage, n, repeat)
        rows[stage] = {"instructions_per_link": round((total - base) / (repeat * n))}
        print(f"{stage:<22} {rows[stage]['instructions_per_link']:>10,} instructions per link",
              flush=True)  # fmt: skip
    return {"followers": n, "repeat": repeat, "stages": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="every stage under callgrind")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.callgrind:
        stages = [s for s in args.stages.split(",") if s]
        result = callgrind_table(stages, args.followers, args.repeat)
        if args.json:
            print(json.dumps(result))
        return 0
    if args.stage is None:
        parser.error("--stage or --callgrind")
    t0 = time.perf_counter()
    run_async(run_stage(args.stage, args.followers, args.repeat))
    print(f"{args.stage}: {time.perf_counter() - t0:.3f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
