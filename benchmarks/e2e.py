"""End to end on paper venues: master fill → follower fill, through NATS and the replicator.

A paper master and a paper follower (each behind its own connector runtime and NATS user, as in
production), the replicator in its own process, real XAUUSD prices. The master opens and closes
positions; each follower execution report carries the trace, so every hop is measured.
``--sync default,always`` repeats every case on a server that fsyncs before every ack.

The floor, in the same run and woken the same way: a bare relay process
(``benchmarks.floor_relay``, running as the replicator) over the same two JetStream hops — a
master event published into the master-event stream, pushed to the relay, one pre-encoded order
stored in the follower-orders stream and pushed to a connector's durable consumer in this
process. With a pause, trade and floor event alternate, each followed by the same pause, so
with ``--gap-ms 1500`` every process has gone idle before each of them; in steady flow
(``0``) the floor's events run back to back after the trades:

    python -m benchmarks.e2e [--trades 200] [--gap-ms 0,20] [--sync default] [--json]

``--json`` ends with one line: the last case's ``p50_us``, ``p99_us`` (master fill → follower
fill), ``floor_p50_us``, ``floor_p99_us``, ``ratio_p50``, and every case under ``cases``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from benchmarks.fanout import percentiles, sync_settings
from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import bar_to_ticks, load_bars
from engine.core.errors import TradecopyError
from engine.runtime.eventloop import run_async
from engine.runtime.natsauth import Role, connector_durable
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.common import Side
from schemas.links import CopyLink
from schemas.master import PositionOpened
from schemas.reports import OrderFilled
from schemas.streams import EXECUTION_REPORTS_STREAM, FOLLOWER_ORDERS_STREAM

WARM_UP = 10
FLOOR_CONNECTOR, FLOOR_MASTER, FLOOR_FOLLOWER = "e2e-floor", "e2e-floor-m", "e2e-floor-f"


class FloorHops:
    """The floor's two JetStream hops, as a connector on both ends sees them: a master event
    published, and the relay's order pushed to a durable consumer like a connector's."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.arrived = asyncio.Event()
        self.arrived_ns = 0

    async def start(self) -> None:
        async def on_order(msg: Any) -> None:
            self.arrived_ns = time.perf_counter_ns()
            self.arrived.set()
            await msg.ack()

        deliver = self.nc.new_inbox()
        await self.nc.subscribe(deliver, cb=on_order, pending_msgs_limit=-1)
        await self.js.add_consumer(
            FOLLOWER_ORDERS_STREAM,
            ConsumerConfig(
                durable_name=connector_durable(FLOOR_CONNECTOR), deliver_subject=deliver,
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
                filter_subject=subjects.follower_orders(FLOOR_FOLLOWER), max_ack_pending=256,
                ack_wait=30.0,
            ),
        )  # fmt: skip

    async def one(self, seq: int) -> int:
        """Publish one master event; the time until the relay's order arrives (ns)."""
        payload = codec.encode(
            PositionOpened(
                event_id=f"floor-{seq}", master=FLOOR_MASTER, symbol="XAUUSD",
                ts_ns=time.time_ns(), position_id=str(seq), side=Side.BUY, volume=0.1,
                price=2000.0,
            )
        )  # fmt: skip
        self.arrived.clear()
        t0 = time.perf_counter_ns()
        # As a connector publishes: stored with its id, the ack awaited beside the hop.
        ack = await self.js.publish_async(
            subjects.master_events(FLOOR_MASTER), payload, headers={"Nats-Msg-Id": f"f{seq}"}
        )
        await asyncio.wait_for(self.arrived.wait(), 10)
        await ack
        return self.arrived_ns - t0


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
        await stack.add_connector(FLOOR_CONNECTOR, masters=[FLOOR_MASTER],
                                  followers=[FLOOR_FOLLOWER])  # fmt: skip
        await stack.start()
        connectors: list[PaperConnector] = []
        relay: subprocess.Popen[bytes] | None = None
        try:
            nc_master = await stack.connect("e2e-master", stack.connector_user("e2e-pm"))
            nc_follower = await stack.connect("e2e-follower", stack.connector_user("e2e-pf"))
            js = stack.js  # the operator reads every report
            await stack.apply_links([CopyLink(link_id="e2e", master="e2e-m", follower="e2e-f")])
            stack.spawn_replicators(instance="e2e")
            relay = subprocess.Popen(
                [sys.executable, "-P", "-m", "benchmarks.floor_relay", "--nats-url", stack.url,
                 "--master", FLOOR_MASTER, "--followers", FLOOR_FOLLOWER, "--durable",
                 "floor-e2e"],
                env={**stack.child_env(stack.user(Role.REPLICATOR)), "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            floor = FloorHops(
                await stack.connect("e2e-floor", stack.connector_user(FLOOR_CONNECTOR))
            )
            await floor.start()
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
            floor_ns: list[int] = []
            for i in range(trades + WARM_UP):
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
                if i < WARM_UP:
                    fills.pop(want, None)
                await asyncio.sleep(gap_ms / 1000)
                if gap_ms > 0:
                    # The floor, woken after the same pause (the relay's first events also
                    # warm it up: it may still be subscribing when the first one is stored).
                    hop = await floor.one(i)
                    if i >= WARM_UP:
                        floor_ns.append(hop)
                    await asyncio.sleep(gap_ms / 1000)
            if gap_ms <= 0:
                # Steady flow: the floor's events back to back too, after ours.
                for i in range(trades + WARM_UP):
                    hop = await floor.one(i)
                    if i >= WARM_UP:
                        floor_ns.append(hop)
            traces = [f.trace for f in fills.values()]
            result_hops = {}
            for label, start, end in HOPS:
                samples = [getattr(t, end) - getattr(t, start) for t in traces]
                p = percentiles(samples)
                result_hops[label] = {"p50_us": round(p.p50_us, 1), "p99_us": round(p.p99_us, 1),
                                      "max_us": round(p.max_us, 1)}  # fmt: skip
            whole = result_hops["master fill → follower fill"]
            f = percentiles(floor_ns)
            return {
                "fills": len(traces),
                "hops": result_hops,
                "p50_us": whole["p50_us"],
                "p99_us": whole["p99_us"],
                "floor_p50_us": round(f.p50_us, 1),
                "floor_p99_us": round(f.p99_us, 1),
                "ratio_p50": round(whole["p50_us"] / f.p50_us, 3),
            }
        finally:
            for connector in connectors:
                await connector.stop()
            if relay is not None:
                relay.terminate()
                try:
                    relay.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    relay.kill()
            await stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=200)
    parser.add_argument(
        "--gap-ms",
        "--gaps-ms",
        dest="gaps_ms",
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
            floor = f"{result['floor_p50_us']:>9.1f} {result['floor_p99_us']:>9.1f}"
            print(f"{'floor: bare relay, the same two hops':<38} {floor}")
            print(f"ratio p50 (master fill → follower fill / floor): {result['ratio_p50']:.2f}")
    if args.json and cases:
        last = cases[-1]
        keys = ("p50_us", "p99_us", "floor_p50_us", "floor_p99_us", "ratio_p50")
        print(json.dumps({**{k: last[k] for k in keys}, "gap_ms": last["gap_ms"],
                          "sync": last["sync"], "cases": cases}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
