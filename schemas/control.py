"""Operator controls: emergency stops per link, per follower account and global."""

from __future__ import annotations

import enum

import msgspec


class StopScope(enum.StrEnum):
    GLOBAL = "global"
    ACCOUNT = "account"
    LINK = "link"


class EmergencyStop(msgspec.Struct, frozen=True, kw_only=True):
    """While ``active``, nothing is copied in the scope: no opens, modifies or closes."""

    scope: StopScope
    target: str = ""
    """Follower account id or link id; empty for the global stop."""
    active: bool = True
    reason: str = ""
    ts_ns: int = 0

    @property
    def key(self) -> str:
        return stop_key(self.scope, self.target)


def stop_key(scope: StopScope, target: str = "") -> str:
    return "global" if scope is StopScope.GLOBAL else f"{scope.value}.{target}"
