"""Typed errors of the signal sources: each names what was wrong and why."""

from __future__ import annotations

from engine.core.errors import TradecopyError


class CandleError(TradecopyError, ValueError):
    """A quote or setting the candle builder cannot accept (another symbol, an unknown zone)."""


class StrategyVersionError(TradecopyError, ValueError):
    """A strategy upload that cannot become a version (bad source, unknown shipped strategy,
    parameters its strategy refuses), or a stored version whose hashes do not match."""
