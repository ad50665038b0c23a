"""Typed errors of the signal sources: each names what was wrong and why."""

from __future__ import annotations

from engine.core.errors import StrategyVersionError as StrategyVersionError  # the API's too
from engine.core.errors import TradecopyError


class CandleError(TradecopyError, ValueError):
    """A quote or setting the candle builder cannot accept (another symbol, an unknown zone)."""
