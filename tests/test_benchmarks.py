"""Every benchmark runs end to end at tiny sizes and reports what it promises (so none can rot).

Nothing here judges speed: the numbers are measured by ``tradecopy bench``, not by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from benchmarks.fanout_profile import STAGES


def bench(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", *args, "--json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["per-order", "batch"])
def test_fanout_measures_each_size_against_the_raw_nats_floor(mode: str) -> None:
    result = bench("fanout", "--events", "3", "--followers", "1,5", "--modes", mode)
    cases = result["cases"]
    assert [(c["mode"], c["followers"], c["events"]) for c in cases] == [
        (mode, 1, 3),
        (mode, 5, 3),
    ]
    for case in cases:
        assert case["sync"] == "default"
        assert 0 < case["p50_us"] <= case["p99_us"] <= case["max_us"]
        assert 0 < case["floor_p50_us"] <= case["floor_p99_us"]
        assert case["ratio_p50"] == pytest.approx(case["p50_us"] / case["floor_p50_us"], rel=0.01)
    assert cases[1]["messages_per_event"] == (5 if mode == "per-order" else 1)


def test_fanout_measures_sync_always_next_to_the_default() -> None:
    result = bench("fanout", "--events", "3", "--followers", "2", "--modes", "per-order",
                   "--sync", "default,always")  # fmt: skip
    cases = result["cases"]
    assert [(c["sync"], c["followers"], c["events"]) for c in cases] == [
        ("default", 2, 3),
        ("always", 2, 3),
    ]
    for case in cases:
        assert 0 < case["p50_us"] <= case["p99_us"] and case["floor_p50_us"] > 0


def test_e2e_fills_every_trade_and_times_every_hop() -> None:
    result = bench("e2e", "--trades", "6", "--gaps-ms", "0", "--sync", "default,always")
    assert [c["sync"] for c in result["cases"]] == ["default", "always"]
    for case in result["cases"]:
        assert case["fills"] == 6
        whole = case["hops"]["master fill → follower fill"]
        assert 0 < whole["p50_us"] <= whole["p99_us"]
        assert len(case["hops"]) == 6
        assert (case["p50_us"], case["p99_us"]) == (whole["p50_us"], whole["p99_us"])
        assert 0 < case["floor_p50_us"] <= case["floor_p99_us"]


def test_e2e_measures_sparse_trades_next_to_a_relay_woken_the_same_way() -> None:
    result = bench("e2e", "--trades", "4", "--gap-ms", "30")
    [case] = result["cases"]
    assert (case["gap_ms"], case["fills"]) == (30.0, 4)
    # The last line leads with the case's numbers and the floor beside them.
    assert list(result)[:5] == ["p50_us", "p99_us", "floor_p50_us", "floor_p99_us", "ratio_p50"]
    assert 0 < result["floor_p50_us"] <= result["floor_p99_us"]
    assert result["p50_us"] == case["hops"]["master fill → follower fill"]["p50_us"]
    assert result["ratio_p50"] == pytest.approx(result["p50_us"] / result["floor_p50_us"], 0.01)


def test_fanout_over_two_link_shards_measures_every_batch() -> None:
    result = bench("fanout", "--events", "3", "--followers", "150", "--modes", "batch",
                   "--instances", "2")  # fmt: skip
    [case] = result["cases"]
    assert (case["instances"], case["followers"], case["events"]) == (2, 150, 3)
    # Two connectors (100 followers each), each with links in both shards: 4 batches.
    assert case["messages_per_event"] == 4
    assert 0 < case["p50_us"] <= case["p99_us"] and case["floor_p50_us"] > 0
    assert case["per_link_us"] == pytest.approx(case["p50_us"] / 150, abs=0.001)
    # The processes' CPU per event (clock ticks: may round to 0 on a tiny case).
    assert case["cpu_us_per_event"] >= 0 and case["floor_cpu_us_per_event"] >= 0


def test_a_bad_sync_setting_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "e2e", "--sync", "sometimes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "sometimes" in done.stderr


@pytest.mark.parametrize("link", ["curve", "plaintext"])
def test_bridge_loses_and_repeats_nothing(link: str) -> None:
    result = bench("bridge", "--trades", "6", *(["--plaintext"] if link == "plaintext" else []))
    assert result["curve"] is (link == "curve")
    assert (result["orders"], result["fills"], result["lost"], result["duplicates"]) == (6, 6, 0, 0)
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert len(result["hops_p50_us"]) == 5


@pytest.mark.parametrize("stage", STAGES)
def test_every_profiled_stage_runs(stage: str) -> None:
    # What callgrind counts (`python -m benchmarks.fanout_profile --callgrind`), without it.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fanout_profile", "--stage", stage,
         "--followers", "150", "--repeat", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.startswith(f"{stage}: ")


def test_scrape_measures_the_per_link_series_next_to_the_registry_alone() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scrape", "--links", "1,30", "--scrapes", "4",
         "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(c["links"], c["series"]) for c in result["cases"]] == [(1, 4), (30, 120)]
    small, large = result["cases"]
    # Each link's four series are in the body: the 29 more links' lines make it longer.
    assert large["body_bytes"] - small["body_bytes"] > 29 * 4 * 60
    for case in result["cases"]:
        assert 0 < case["p50_ms"] <= case["p99_ms"]
        assert 0 < case["floor_p50_ms"] <= case["floor_p99_ms"]
        assert case["children_scrape_p50_ms"] > 0


def test_api_measures_the_read_next_to_a_bare_handler_and_sse() -> None:
    result = bench("api", "--seconds", "1", "--rps", "50", "--sse-samples", "5")
    assert list(result) == ["rps", "p50_ms", "p99_ms", "floor_p50_ms", "floor_p99_ms",
                            "sse_p50_ms"]  # fmt: skip
    assert result["rps"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert 0 < result["floor_p50_ms"] <= result["floor_p99_ms"]
    assert result["sse_p50_ms"] > 0
