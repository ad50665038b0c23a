"""The connector-state benchmark (benchmarks/connector_state.py) runs at a tiny size and
reports what it promises; like every benchmark test, it judges no speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent


def bench(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.connector_state", *args, "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "last / first" in done.stdout  # the table comes before the JSON line
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@pytest.mark.parametrize("fsync", ["--fsync", "--no-fsync"])
def test_connector_state_reports_first_and_last_tenth_floor_and_state_on_disk(
    fsync: str,
) -> None:
    result = bench("--orders", "200", "--batch", "7", fsync)
    assert (result["orders"], result["batch"], result["fsync"]) == (200, 7, fsync == "--fsync")
    for tenth in (result["first"], result["last"], *result["floor"].values()):
        if isinstance(tenth, dict):
            assert tenth["orders"] == 20
            assert 0 < tenth["p50_us"] <= tenth["p99_us"] and tenth["mean_us"] > 0
    assert result["ratio_mean"] == pytest.approx(
        result["last"]["mean_us"] / result["first"]["mean_us"], rel=0.01
    )
    assert result["ratio_p50"] == pytest.approx(
        result["last"]["p50_us"] / result["first"]["p50_us"], rel=0.01
    )
    assert result["budget_ratio"] == 1.2
    assert result["within_budget"] == (result["ratio_mean"] <= 1.2)
    assert result["floor"]["ratio_mean"] > 0
    # Every order is remembered, in the journal next to the state file.
    assert result["remembered_orders"] == 200
    assert "follower.state.journal" in result["state_files"]
    assert result["state_bytes"] == sum(result["state_files"].values()) > 0


def test_the_benchmark_refuses_sizes_it_cannot_split_into_tenths() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.connector_state", "--orders", "5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--orders" in done.stderr
