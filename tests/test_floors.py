"""The floors of PRODUCT.md hold: the import-linter contracts in pyproject.toml are all kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_floor_contract_is_kept_and_nothing_imports_in_a_circle() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Floors: apps > connectors and services > runtime > core > contract KEPT" in done.stdout
    assert "No circles, at any depth KEPT" in done.stdout
    assert "0 broken" in done.stdout
