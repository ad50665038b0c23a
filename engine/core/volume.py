"""Volumes on a symbol's grid: rounding to the step, the smallest tradable lot, partial closes.

Shared by the replicator (sizing a copy) and every connector (executing a partial close), so a
follower position is cut the same way whichever side computes it.
"""

from __future__ import annotations

import math
from functools import lru_cache

from schemas.account import SymbolSpec

#: Tolerance for float noise when counting whole steps (0.07 / 0.01 = 7.000000000000001).
STEP_EPSILON = 1e-9
_EXACT_STEPS = 2.0**52


@lru_cache(maxsize=256)
def decimals(step: float) -> int:
    text = f"{step:.10f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def round_down_to_step(volume: float, step: float) -> float:
    """The largest multiple of ``step`` not above ``volume``, free of float noise."""
    if not (volume > 0 and step > 0) or not math.isfinite(volume):
        return 0.0
    steps_float = volume / step + STEP_EPSILON
    if steps_float >= _EXACT_STEPS:
        # So many steps that a float cannot hold a fraction of one: already on the grid.
        return volume
    steps = math.floor(steps_float)
    return round(steps * step, decimals(step))


def min_on_step(spec: SymbolSpec) -> float:
    """The smallest volume that is both ≥ min and on the step grid."""
    steps = math.ceil(spec.volume_min / spec.volume_step - STEP_EPSILON)
    return round(steps * spec.volume_step, decimals(spec.volume_step))


def close_ratio(volume_before: float, volume_after: float) -> float:
    """The share of the master position a partial close took, within [0, 1]."""
    if not (volume_before > 0 and math.isfinite(volume_before)):
        return 1.0
    if not math.isfinite(volume_after) or volume_after < 0:
        volume_after = 0.0  # an unreadable remainder: the position is gone
    ratio = (volume_before - volume_after) / volume_before
    return min(max(ratio, 0.0), 1.0)


def partial_close_volume(held: float, ratio: float, spec: SymbolSpec) -> float:
    """How much of a follower position of ``held`` lots to close for a master close ``ratio``.

    Rounded down to the step and never more than held. When the remainder would fall below
    the symbol's minimum, the whole position is closed instead (it could not stay open).
    """
    if not held > 0 or not ratio > 0:
        return 0.0
    if ratio >= 1.0:
        return held
    volume = round_down_to_step(held * ratio, spec.volume_step)
    remainder = held - volume
    if remainder < spec.volume_min - STEP_EPSILON:
        return held
    return min(volume, held)
