"""Bridge connector configuration: where it listens and which terminals may connect."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.common import AccountId


class BridgeTerminalConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    account: AccountId
    """Our account id; the EA's ZeroMQ identity and ``hello.account``."""
    token: Annotated[str, msgspec.Meta(min_length=16, max_length=256)]
    """Per-account secret the EA presents in ``hello`` (from the secret store, never a file
    in the repository)."""
    role: Annotated[str, msgspec.Meta(pattern=r"^(master|follower)$")]


class BridgeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    connector_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")]
    endpoint: str = "tcp://127.0.0.1:5555"
    terminals: list[BridgeTerminalConfig] = []
    command_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """A command with no result by then is reported *unknown* (never rejected)."""
    heartbeat_ms: Annotated[int, msgspec.Meta(ge=100)] = 1000
    terminal_silence_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """No frame for this long: the terminal counts as disconnected."""
