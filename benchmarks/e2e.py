"""End to end on paper venues: master fill → follower fill, through NATS and the replicator.

A paper master and a paper follower (each behind its own connector runtime and NATS user, as in
production), the replicator in its own process, real XAUUSD prices. The master opens and closes
positions; each follower execution report carries the trace, so every hop is measured.
``--sync default,always`` repeats every case on a server that fsyncs before every ack:

    python -m benchmarks.e2e [--trades 200] [--gaps-ms 0,20] [--sync default] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.fanout import percentiles, sync_settings
from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import bar_to_ticks, load_bars
from engine.core.errors import TradecopyError
from engine.runtime.eventloop import run_async
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.common import Side
from schemas.links import CopyLink
from schemas.reports import OrderFilled
from schemas.streams import EXECUTION_REPORTS_STREAM

HOPS = (
    ("master fill → event published", "terminal_ns", "connector_ns"),
    ("event published → replicator in", "connector_ns", "replicator_in_ns"),
    ("replicator in → orders out", "replicator_in_ns", "replicator_out_ns"),
    ("orders out → follower connector", "replicator_out_ns", "follower_connector_ns"),
    ("follower connector → follower fill", "follower_connector_ns", "follower_terminal_ns"),
    ("master fill → follower fill", "terminal_ns", "follower_terminal_ns"),
)


async def run(trades: int, gap_ms: float, sync: str = "default") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tc-e2e-") as tmp:
        root = Path(tmp)
        stack = LocalStack(
            root / "nats", name="e2e", sync_interval=None if sync == "default" else sync
        )
        await stack.add_connector("e2e-pm", masters=["e2e-m"])
        await stack.add_connector("e2e-pf", followers=["e2e-f"])
        await stack.start()
        connectors: list[PaperConnector] = []
        try:
            nc_master = await stack.connect("e2e-master", stack.connector_user("e2e-pm"))
            nc_follower = await stack.connect("e2e-follower", stack.connector_user("e2e-pf"))
            js = stack.js  # the operator reads every report
            await stack.apply_links([CopyLink(link_id="e2e", master="e2e-m", follower="e2e-f")])
            stack.spawn_replicators(instance="e2e")
            master_t = PaperTerminal.open(root / "m.state", [("e2e-m", "USD", 1e5, 100, "master")])
            follower_t = PaperTerminal.open(
                root / "f.state", [("e2e-f", "USD", 1e5, 100, "follower")]
            )
            master = PaperConnector(nc_master, "e2e-pm", master_t, None)
            follower = PaperConnector(nc_follower, "e2e-pf", follower_t, None)
            connectors += [master, follower]
            await master.start()
            await follower.start()
            quotes = [q for bar in load_bars()[:400] for q in bar_to_ticks(bar, "XAUUSD")]
            fills: dict[str, OrderFilled] = {}
            arrived = asyncio.Event()

            async def on_report(msg: Any) -> None:
                report = codec.execution_report_decoder.decode(msg.data)
                if isinstance(report, OrderFilled):
                    fills[report.order_id] = report
                    arrived.set()

            await js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                               cb=on_report, ordered_consumer=True)  # fmt: skip
            await stack.wait_for_replicator()
            for i in range(trades + 10):  # the first 10 warm up
                quote = msgspec.structs.replace(quotes[i % len(quotes)], ts_ns=time.time_ns())
                master_t.on_quote(quote)
                follower_t.on_quote(quote)
                result = await (
                    master.trade(lambda v: v.market_order("e2e-m", "XAUUSD", Side.BUY, 0.1))
                    if i % 2 == 0
                    else master.trade(
                        lambda v: v.close_position("e2e-m", v.positions("e2e-m")[0].position_id)
                    )
                )
                want = f"{result.transactions[0].event_id}:e2e"
                deadline = time.monotonic() + 10
                while want not in fills and time.monotonic() < deadline:
                    arrived.clear()
                    await asyncio.wait_for(arrived.wait(), 10)
                if i < 10:
                    fills.pop(want, None)
                await asyncio.sleep(gap_ms / 1000)
            traces = [f.trace for f in fills.values()]
            result_hops = {}
            for label, start, end in HOPS:
                samples = [getattr(t, end) - getattr(t, start) for t in traces]
                p = percentiles(samples)
                result_hops[label] = {"p50_us": round(p.p50_us, 1), "p99_us": round(p.p99_us, 1),
                                      "max_us": round(p.max_us, 1)}  # fmt: skip
            return {"fills": len(traces), "hops": result_hops}
        finally:
            for connector in connectors:
                await connector.stop()
            await stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=200)
    parser.add_argument(
        "--gaps-ms",
        default="0,20",
        help="pauses between master trades to measure, comma-separated: 0 is a steady flow; "
        "a pause lets every process go idle, and waking costs latency on each hop",
    )
    parser.add_argument(
        "--sync",
        default="default",
        help="JetStream fsync settings, comma-separated: default (the server's), always, or a "
        "duration (1s); each case runs once per setting",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    try:
        syncs = sync_settings(args.sync)
    except TradecopyError as exc:
        parser.error(str(exc))
    cases = []
    for sync in syncs:
        for gap in (float(g) for g in args.gaps_ms.split(",") if g.strip()):
            result = run_async(run(args.trades, gap, sync))
            cases.append({"gap_ms": gap, "sync": sync, **result})
            print(f"\nend to end on paper venues, 1 follower, {result['fills']} fills, "
                  f"{gap:g} ms between master trades, JetStream sync: {sync}")  # fmt: skip
            print(f"{'hop':<38} {'p50 µs':>9} {'p99 µs':>9} {'max µs':>9}")
            for label, h in result["hops"].items():
                print(f"{label:<38} {h['p50_us']:>9.1f} {h['p99_us']:>9.1f} {h['max_us']:>9.1f}")
    if args.json:
        print(json.dumps({"cases": cases}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
