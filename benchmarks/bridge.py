"""Bridge benchmark: master transaction on a paper terminal → follower fill on another.

Two paper terminals speak the bridge protocol over real ZeroMQ sockets to two bridge
connectors (one per role, as a terminal farm would run them), NATS JetStream and the
replicator in its own process in between. Every order is accounted for: lost (no definitive
report: neither filled, done nor rejected), duplicated (two fills for one order id), and timed
from the master's fill to the follower's fill (trace stamps). The bridge links run CURVE, as
deployed (a key pair per connector and per terminal); ``--plaintext`` measures without it:

    python -m benchmarks.bridge [--trades 200] [--plaintext] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import zmq

from benchmarks.fanout import percentiles
from connectors.bridge.config import BridgeConfig, BridgeTerminalConfig
from connectors.bridge.connector import BridgeConnector
from connectors.bridge.paper_terminal import PaperBridgeTerminal
from connectors.paper.prices import bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from engine.runtime.eventloop import run_async
from engine.runtime.stack import LocalStack
from schemas import codec, subjects
from schemas.common import Side
from schemas.links import CopyLink
from schemas.reports import OrderFilled, OrderUnknown
from schemas.streams import EXECUTION_REPORTS_STREAM, FOLLOWER_ORDERS_STREAM

HOPS = (
    ("master fill → master connector", "terminal_ns", "connector_ns"),
    ("master connector → replicator", "connector_ns", "replicator_in_ns"),
    ("replicator", "replicator_in_ns", "replicator_out_ns"),
    ("replicator → follower connector", "replicator_out_ns", "follower_connector_ns"),
    ("follower connector → follower fill", "follower_connector_ns", "follower_terminal_ns"),
)
TOKEN_M = "bench-master-token-0001"
TOKEN_F = "bench-follower-token-001"


def _key_pair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


async def run(trades: int, gap_ms: float, plaintext: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tc-bridge-") as tmp:
        root = Path(tmp)
        stack = LocalStack(root / "nats", name="bridge-bench")
        await stack.add_connector("bridge-masters", masters=["bm"])
        await stack.add_connector("bridge-followers", followers=["bf"])
        await stack.start()
        parts: list[Any] = []
        try:
            js = stack.js  # the operator watches orders and reports
            nc = await stack.connect("bridge-bench-m", stack.connector_user("bridge-masters"))
            await stack.apply_links([CopyLink(link_id="bridge", master="bm", follower="bf")])
            stack.spawn_replicators(instance="bridge")
            # A key pair per connector and per terminal, as deployed (unused in plaintext).
            keys = {name: _key_pair() for name in ("masters", "followers", "bm", "bf")}

            def connector(name: str, account: str, token: str, role: str) -> BridgeConnector:
                terminal = BridgeTerminalConfig(account=account, token=token, role=role,
                                                curve_public_key=keys[account][0])  # fmt: skip
                config = BridgeConfig(connector_id=f"bridge-{name}", endpoint="tcp://127.0.0.1:0",
                                      terminals=[terminal], plaintext=plaintext)  # fmt: skip
                return BridgeConnector(config, root / f"{name}.state",
                                       secret_key=None if plaintext else keys[name][1])  # fmt: skip

            masters = connector("masters", "bm", TOKEN_M, "master")
            followers = connector("followers", "bf", TOKEN_F, "follower")
            nc_f = await stack.connect("bridge-bench-f", stack.connector_user("bridge-followers"))
            await masters.start(nc)
            await followers.start(nc_f)
            parts += [masters, followers]
            venue_m, venue_f = PaperVenue(), PaperVenue()
            venue_m.open_account("bm", "USD", 100_000.0)
            venue_f.open_account("bf", "USD", 100_000.0)
            quotes = [q for bar in load_bars()[:400] for q in bar_to_ticks(bar, "XAUUSD")]
            first = msgspec.structs.replace(quotes[0], ts_ns=time.time_ns())
            venue_m.on_quote(first)
            venue_f.on_quote(first)

            def terminal(bridge: BridgeConnector, account: str, token: str,
                         venue: PaperVenue) -> PaperBridgeTerminal:  # fmt: skip
                if plaintext:
                    return PaperBridgeTerminal(bridge.endpoint, account, token, venue,
                                               plaintext=True)  # fmt: skip
                return PaperBridgeTerminal(bridge.endpoint, account, token, venue,
                                           server_key=bridge.public_key or "",
                                           public_key=keys[account][0],
                                           secret_key=keys[account][1])  # fmt: skip

            term_m = terminal(masters, "bm", TOKEN_M, venue_m)
            term_f = terminal(followers, "bf", TOKEN_F, venue_f)
            await term_m.start()
            await term_f.start()
            parts += [term_m, term_f]
            fills: Counter[str] = Counter()
            settled: set[str] = set()
            latencies: list[int] = []
            traces: list[Any] = []
            orders: set[str] = set()

            async def on_report(msg: Any) -> None:
                report = codec.execution_report_decoder.decode(msg.data)
                if not isinstance(report, OrderUnknown):
                    settled.add(report.order_id)
                if isinstance(report, OrderFilled):
                    fills[report.order_id] += 1
                    t = report.trace
                    if t.terminal_ns and t.follower_terminal_ns:
                        latencies.append(t.follower_terminal_ns - t.terminal_ns)
                        traces.append(t)

            async def on_order(msg: Any) -> None:
                orders.add(codec.follower_order_decoder.decode(msg.data).order_id)

            await js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                               cb=on_report, ordered_consumer=True)  # fmt: skip
            await js.subscribe(subjects.FOLLOWER_ORDERS, stream=FOLLOWER_ORDERS_STREAM,
                               cb=on_order, ordered_consumer=True)  # fmt: skip
            await stack.wait_for_replicator()
            for i in range(trades):
                quote = msgspec.structs.replace(quotes[(i + 1) % len(quotes)], ts_ns=time.time_ns())
                await term_m.on_quote(quote)
                await term_f.on_quote(quote)
                expected = len(settled) + 1
                if i % 2 == 0:
                    await term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.1))
                else:
                    await term_m.trade(
                        lambda v: v.close_position("bm", v.positions("bm")[0].position_id)
                    )
                # One copy at a time: this measures the path, not a queue behind it.
                await _until_async(lambda expected=expected: len(settled) >= expected, 10)
                await asyncio.sleep(gap_ms / 1000)
            await _until_async(lambda: len(orders) >= trades and settled >= orders, 30)
            p = percentiles(latencies) if latencies else None
            return {
                "curve": not plaintext,
                "orders": len(orders),
                "fills": sum(fills.values()),
                "lost": len(orders - settled),
                "duplicates": sum(n - 1 for n in fills.values() if n > 1),
                "p50_us": round(p.p50_us, 1) if p else None,
                "p99_us": round(p.p99_us, 1) if p else None,
                "hops_p50_us": {
                    label: round(percentiles([getattr(t, b) - getattr(t, a) for t in traces])
                                 .p50_us, 1)
                    for label, a, b in HOPS
                } if traces else {},
            }  # fmt: skip
        finally:
            for part in reversed(parts):
                await part.stop()
            await stack.stop()


async def _until_async(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    parser.add_argument("--plaintext", action="store_true", help="bridge links without CURVE")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    result = run_async(run(args.trades, args.gap_ms, args.plaintext))
    link = "plaintext" if args.plaintext else "CURVE"
    print(f"bridge ({link}): paper master terminal → bridge → NATS → replicator → bridge → "
          "paper follower")  # fmt: skip
    for key, value in result.items():
        print(f"  {key:<11} {value}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["lost"] == 0 and result["duplicates"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
