"""Errors of the MetaTrader5-package connector."""

from __future__ import annotations

from engine.core.errors import TradecopyError

#: What to install for a live terminal; the MetaTrader5 package ships Windows wheels only.
INSTALL_HINT = (
    "pip install 'tradecopy[mt5]' on Windows, next to an installed MetaTrader 5 terminal "
    "(the MetaTrader5 package exists only for Windows)"
)


class TerminalUnavailable(TradecopyError):
    """The MetaTrader5 package cannot be imported on this machine."""


class TerminalConnectError(TradecopyError):
    """The terminal did not start, or did not log in to the configured account."""

    def __init__(self, what: str, error: object) -> None:
        self.error = error
        super().__init__(f"{what} failed: last_error={error!r}")


class TerminalNotReady(TradecopyError):
    """The terminal did not answer a query (disconnected, starting): retry later, nothing ran."""
