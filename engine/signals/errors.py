"""Typed errors of the signal sources: each names what was wrong and why."""

from __future__ import annotations

from engine.core.errors import TradecopyError


class AlertError(TradecopyError, ValueError):
    """A TradingView alert that cannot be traded: ``field`` says where, ``reason`` says why.

    ``field`` is the JSON key as the alert message spells it (``"$"`` for the body as a whole),
    so the message an endpoint returns points the author at the line of the alert to fix.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class CandleError(TradecopyError, ValueError):
    """A quote or setting the candle builder cannot accept (another symbol, an unknown zone)."""


class StrategyVersionError(TradecopyError, ValueError):
    """A strategy upload that cannot become a version (bad source, unknown shipped strategy,
    parameters its strategy refuses), or a stored version whose hashes do not match."""
