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


class AccountNotHedging(TradecopyError):
    """The account nets positions: copies of several masters would merge into one position,
    and reversals or volume increases could not be told or copied, so the connector refuses
    to start."""

    def __init__(self, login: int, margin_mode: int) -> None:
        self.login = login
        self.margin_mode = margin_mode
        super().__init__(
            f"account {login} has margin mode {margin_mode} (netting or exchange); tradecopy "
            "needs a hedging account (ACCOUNT_MARGIN_MODE_RETAIL_HEDGING): ask the broker "
            "for one"
        )
