"""What a ``/metrics`` scrape of a replicator with N links costs the event loop that fans out.

The replicator's per-link decision series (4 per link) are kept as exposition text
(``engine.replicator.metrics.LinkDecisionCounters``). A scrape renders the registry and
appends that text; here it is timed with one link's count moved before each scrape (the
joined text is rebuilt then), next to the floor: the same registry rendered without any
per-link series, in the same run. For comparison, the same series as prometheus_client
children in a registry of their own (how the replicator kept them before), rendered a few
times:

    python -m benchmarks.scrape [--links 1,1000,10000] [--scrapes 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import prometheus_client

import engine.replicator.metrics as replicator_metrics
from engine.runtime.memory import keep_heap
from schemas.decisions import DecisionOutcome


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3, 3)


def _children_scrape_ms(links: list[tuple[str, str]], repeat: int) -> tuple[float, float]:
    """Making the series as prometheus_client children, and rendering them (the median)."""
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "tradecopy_replicator_link_decisions", "per link", ["link", "follower", "outcome"],
        registry=registry,
    )  # fmt: skip
    t0 = time.perf_counter()
    for link_id, follower in links:
        for outcome in DecisionOutcome:
            counter.labels(link_id, follower, outcome.value)
    made = time.perf_counter() - t0
    renders = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        prometheus_client.generate_latest(registry)
        renders.append(time.perf_counter() - t0)
    return round(made * 1e3, 1), _ms(renders, 0.5)


def run(link_counts: list[int], scrapes: int) -> dict[str, Any]:
    keep_heap()  # as the replicator does
    cases = []
    for n in link_counts:
        links = [(f"bench-link-{i:06d}", f"bench-f-{i:06d}") for i in range(n)]
        counters = replicator_metrics.LinkDecisionCounters()
        t0 = time.perf_counter()
        counters.sync(links)
        sync_ms = (time.perf_counter() - t0) * 1e3
        ours: list[float] = []
        bare: list[float] = []
        outcomes = tuple(DecisionOutcome)
        for i in range(scrapes):
            link_id, follower = links[(i * 7919) % n]
            counters.count(link_id, follower, outcomes[i % len(outcomes)])
            t0 = time.perf_counter()
            body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
            body += counters.exposition()
            t1 = time.perf_counter()
            prometheus_client.generate_latest(prometheus_client.REGISTRY)
            t2 = time.perf_counter()
            ours.append(t1 - t0)
            bare.append(t2 - t1)
        made_ms, children_ms = _children_scrape_ms(links, 3)
        p50, floor_p50 = _ms(ours, 0.5), _ms(bare, 0.5)
        cases.append(
            {
                "links": n,
                "series": 4 * n,
                "body_bytes": len(body),
                "p50_ms": p50,
                "p99_ms": _ms(ours, 0.99),
                "floor_p50_ms": floor_p50,
                "floor_p99_ms": _ms(bare, 0.99),
                "ratio_p50": round(p50 / floor_p50, 2),
                "first_sync_ms": round(sync_ms, 1),
                "children_made_ms": made_ms,
                "children_scrape_p50_ms": children_ms,
            }
        )
    return {"scrapes": scrapes, "cases": cases}


_COLUMNS = (
    ("links", "links", "{:>7}"),
    ("series", "series", "{:>7}"),
    ("body_bytes", "bytes", "{:>9}"),
    ("p50_ms", "p50 ms", "{:>8}"),
    ("p99_ms", "p99 ms", "{:>8}"),
    ("floor_p50_ms", "floor p50", "{:>10}"),
    ("floor_p99_ms", "floor p99", "{:>10}"),
    ("ratio_p50", "ratio", "{:>6}"),
    ("first_sync_ms", "sync ms", "{:>8}"),
    ("children_made_ms", "children made ms", "{:>17}"),
    ("children_scrape_p50_ms", "children scrape ms", "{:>19}"),
)


def render(result: dict[str, Any]) -> str:
    head = " ".join(fmt.format(title) for _, title, fmt in _COLUMNS)
    lines = [
        "scrape: registry + per-link series (one link's count moved before each), "
        "floor: the registry alone",
        head,
        "-" * len(head),
    ]
    for case in result["cases"]:
        lines.append(" ".join(fmt.format(case[key]) for key, _, fmt in _COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="1,1000,10000", help="comma-separated link counts")
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.links.split(",") if x.strip()]
    if not counts or min(counts) < 1 or args.scrapes < 1:
        parser.error("--links needs counts ≥ 1 and --scrapes ≥ 1")
    result = run(counts, args.scrapes)
    print(render(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
