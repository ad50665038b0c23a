"""What a strategy worker publishes: a candle's signal, or the failure of its run.

The messages themselves are part of the wire contract (``schemas.signals``); this module
keeps their old import path and adds the run id.
"""

from __future__ import annotations

from schemas import subjects
from schemas.signals import (
    StrategyRunFailed,
    StrategySignal,
    Timeframe,
    encoder,
    failure_decoder,
    signal_decoder,
)

__all__ = [
    "StrategyRunFailed",
    "StrategySignal",
    "encoder",
    "failure_decoder",
    "run_id",
    "signal_decoder",
]


def run_id(version_id: str, symbol: str, timeframe: Timeframe, candle_close_ns: int) -> str:
    """One strategy run: its claim key and the ``Nats-Msg-Id`` of its signal."""
    return f"{version_id}.{subjects.encode_key_token(symbol)}.{timeframe}.{candle_close_ns}"
