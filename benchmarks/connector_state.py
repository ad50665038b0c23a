"""Connector state over a long run: time per follower order from the first to the last.

A paper follower terminal executes open/close pairs on real XAUUSD prices, straight through
``Terminal.execute`` and ``Terminal.commit`` in batches as the connector runtime drives it (no
NATS): the cost of remembering every order (the idempotency memory) and persisting it must
not grow with history. It prints the time per order over the first and the last 10 % of the
orders (mean, p50, p99, from each batch's time), their ratio (budget: 1.2×), the same for the
floor measured in the same run (the terminal without a state file), and the state on disk:

    python -m benchmarks.connector_state [--orders 100000] [--batch 10] [--no-fsync] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from connectors.contract import reports_at_receipt
from connectors.paper.connector import PaperTerminal
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from schemas.common import Side
from schemas.orders import FollowerClose, FollowerOpen, FollowerOrder

SYMBOL = "XAUUSD"
ACCOUNT = "bench-f"
MASTER = "bench-m"
#: The last 10 % may take at most this much longer per order than the first 10 %.
BUDGET_RATIO = 1.2


def quotes() -> Iterator[Quote]:
    """The shipped real bars as quotes, over and over."""
    bars = load_bars()
    while True:
        for bar in bars:
            yield from bar_to_ticks(bar, SYMBOL)


def pair(i: int, quote: Quote) -> tuple[FollowerOpen, FollowerClose]:
    """The copy of a master position opened and closed: two follower orders."""
    common = {"link_id": "bench", "follower": ACCOUNT, "master": MASTER, "symbol": SYMBOL,
              "ts_ns": time.time_ns(), "master_position_id": str(i)}  # fmt: skip
    side = Side.BUY if i % 2 == 0 else Side.SELL
    opened = FollowerOpen(**common, order_id=f"{MASTER}-{i}-opened:bench",
                          master_event_id=f"{MASTER}-{i}-opened", side=side, volume=0.01,
                          master_price=quote.ask if side is Side.BUY else quote.bid)  # fmt: skip
    closed = FollowerClose(**common, order_id=f"{MASTER}-{i}-closed:bench",
                           master_event_id=f"{MASTER}-{i}-closed")  # fmt: skip
    return opened, closed


def orders(count: int) -> Iterator[tuple[Quote, FollowerOrder]]:
    """``count`` orders, each open with the quote it meets (a new one every pair)."""
    feed = quotes()
    for i in range((count + 1) // 2):
        quote = next(feed)
        for order in pair(i, quote):
            if count <= 0:
                return
            count -= 1
            yield quote, order


async def drive(terminal: PaperTerminal, count: int, batch: int) -> list[float]:
    """Execute ``count`` orders in batches, commit after each; seconds per order, per order."""
    per_order: list[float] = []
    pending: list[tuple[Quote, FollowerOrder]] = []

    async def run_batch() -> None:
        started = time.perf_counter()
        for quote, order in pending:
            if terminal.venue.quote(SYMBOL) != quote:
                terminal.on_quote(quote)
            await terminal.execute(order, reports_at_receipt(order, time.time_ns()))
        terminal.commit()
        elapsed = time.perf_counter() - started
        per_order.extend([elapsed / len(pending)] * len(pending))
        pending.clear()

    for item in orders(count):
        pending.append(item)
        if len(pending) == batch:
            await run_batch()
    if pending:
        await run_batch()
    return per_order


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return {"orders": len(seconds), "mean_us": round(sum(seconds) / len(seconds) * 1e6, 2),
            "p50_us": round(at(0.50), 2), "p99_us": round(at(0.99), 2)}  # fmt: skip


def tenths(seconds: list[float]) -> tuple[dict[str, float], dict[str, float]]:
    tenth = max(1, len(seconds) // 10)
    return summary(seconds[:tenth]), summary(seconds[-tenth:])


def ratio(first: dict[str, float], last: dict[str, float], key: str) -> float:
    return round(last[key] / first[key], 3) if first[key] > 0 else 0.0


def open_terminal(path: Path, account: tuple[str, str, float, int, str], fsync: bool) -> Any:
    try:
        from connectors.journal import OrderMemoryConfig
    except ImportError:  # the code from before the order journal (it never fsynced)
        return PaperTerminal.open(path, [account])
    return PaperTerminal.open(path, [account], order_memory=OrderMemoryConfig(durable=fsync))


async def run(count: int, batch: int, directory: Path, fsync: bool = True) -> dict[str, Any]:
    account = (ACCOUNT, "USD", 1_000_000.0, 100, "follower")
    # The floor first: the same orders on a terminal that writes nothing.
    try:
        venue = PaperVenue(remember_client_orders=False)  # as PaperTerminal.open makes it
    except TypeError:  # the code from before the order journal, measured for comparison
        venue = PaperVenue()
    venue.open_account(*account[:4])
    floor_first, floor_last = tenths(await drive(PaperTerminal(venue, [], [ACCOUNT]), count, batch))
    del venue
    gc.collect()  # its garbage must not be collected on the measured run's time

    terminal = open_terminal(directory / "follower.state", account, fsync)
    started = time.perf_counter()
    measured = await drive(terminal, count, batch)
    elapsed = time.perf_counter() - started
    first, last = tenths(measured)
    remembered = len(terminal.reports)
    if hasattr(terminal, "close"):
        terminal.close()  # a compaction in flight finishes: the sizes are final
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    return {
        "orders": count, "batch": batch, "fsync": fsync, "elapsed_s": round(elapsed, 2),
        "first": first, "last": last,
        "ratio_mean": ratio(first, last, "mean_us"), "ratio_p50": ratio(first, last, "p50_us"),
        "budget_ratio": BUDGET_RATIO,
        "within_budget": ratio(first, last, "mean_us") <= BUDGET_RATIO,
        "floor": {"first": floor_first, "last": floor_last,
                  "ratio_mean": ratio(floor_first, floor_last, "mean_us")},
        "state_files": files, "state_bytes": sum(files.values()),
        "remembered_orders": remembered,
    }  # fmt: skip


def report(result: dict[str, Any]) -> str:
    lines = [f"connector state: {result['orders']:,} orders on a paper follower, "
             f"commit every {result['batch']} ({'fsync' if result['fsync'] else 'no fsync'}), "
             f"{result['elapsed_s']} s"]  # fmt: skip
    lines.append(f"{'':<22}{'mean µs':>10}{'p50 µs':>10}{'p99 µs':>10}")
    for label, row in (("first 10 %", result["first"]), ("last 10 %", result["last"]),
                       ("floor first 10 %", result["floor"]["first"]),
                       ("floor last 10 %", result["floor"]["last"])):  # fmt: skip
        lines.append(f"{label:<22}{row['mean_us']:>10.1f}{row['p50_us']:>10.1f}"
                     f"{row['p99_us']:>10.1f}")  # fmt: skip
    verdict = "within" if result["within_budget"] else "OVER"
    lines.append(f"last / first: mean {result['ratio_mean']}×, p50 {result['ratio_p50']}× "
                 f"({verdict} the {result['budget_ratio']}× budget)")  # fmt: skip
    files = ", ".join(f"{name} {size:,} B" for name, size in result["state_files"].items())
    lines.append(f"state on disk: {result['state_bytes']:,} B ({files}); "
                 f"{result['remembered_orders']:,} orders remembered")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100_000, help="follower orders to run")
    parser.add_argument("--batch", type=int, default=10, help="orders per commit")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True,
                        help="fsync every commit (the connectors' default)")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=None, help="keep the state here")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.orders < 10 or args.batch < 1:
        parser.error("need --orders >= 10 and --batch >= 1")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args.orders, args.batch, args.dir, args.fsync))
    else:
        with tempfile.TemporaryDirectory(prefix="tc-state-") as tmp:
            result = asyncio.run(run(args.orders, args.batch, Path(tmp), args.fsync))
    print(report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
