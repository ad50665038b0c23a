"""Configuration of one MetaTrader5-package connector: one terminal, one account, one role."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from schemas.common import AccountId

ConnectorId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")]


class Mt5Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach one MetaTrader 5 terminal and what the account is to tradecopy.

    Credentials do not belong in config files: leave ``password`` empty and provide it in the
    environment variable named by ``password_env`` or in a secret file (``password_file``, e.g.
    a Docker/systemd secret). ``password`` exists for tests and interactive use only, and the
    config's ``repr`` never shows it.
    """

    connector_id: ConnectorId
    """The connector process (its durable order consumer is ``connector-<id>``)."""
    account_id: AccountId
    """Our id of the account: the subject token of its events, orders and reports."""
    role: Literal["master", "follower"]
    terminal_path: str = ""
    """``terminal64.exe`` of the terminal to drive; empty: the package picks an installed one."""
    login: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The MT5 account number; 0 keeps whatever account the terminal is logged in to."""
    password: str = ""
    password_env: str = "TRADECOPY_MT5_PASSWORD"
    password_file: str = ""
    server: str = ""
    """The broker's trade server, e.g. ``"MetaQuotes-Demo"``."""
    poll_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 10
    """How often the terminal's positions, orders and deals are read and diffed."""
    deviation_points: Annotated[int, msgspec.Meta(ge=0)] = 20
    """Largest accepted slippage of a follower market order, in points (MqlTradeRequest)."""
    magic: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    """Magic number of the follower's trades when the link does not set one."""
    symbols: tuple[str, ...] = ()
    """Symbols whose specs are published; empty: every symbol in the Market Watch."""
    server_utc_offset_s: int = 0
    """How far the trade server's clock is ahead of UTC (MT5 stamps records in server time):
    only the first guess, until a fresh tick has been measured (``measure_server_offset``)."""
    measure_server_offset: bool = True
    """Measure the offset from a fresh tick's ``time_msc`` against UTC at start and every
    ``server_offset_check_s`` (DST moves it by an hour twice a year)."""
    server_offset_check_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    order_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """No answer from ``order_send`` within this: the outcome is reported unknown."""
    reconnect_backoff_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """First wait before re-attaching to a terminal that lost its IPC channel (restart,
    auto-update); doubled on every failure up to ``reconnect_backoff_max_s``."""
    reconnect_backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    specs_refresh_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """How often the symbol specs are re-read and republished: tick values of cross-currency
    symbols move with the exchange rate."""
    state_path: str = ""
    """Where the connector keeps its snapshot, outbox and reports; empty: in memory only."""

    def resolved_password(self) -> str:
        """The password from the secret file, the environment, or the config, in that order."""
        if self.password_file:
            return Path(self.password_file).read_text(encoding="utf-8").strip()
        return os.environ.get(self.password_env, "") or self.password

    def __repr__(self) -> str:
        return (
            f"Mt5Config(connector_id={self.connector_id!r}, account_id={self.account_id!r}, "
            f"role={self.role!r}, login={self.login}, server={self.server!r}, password=***)"
        )
