"""MetaTrader5-package connector: a Windows MT5 terminal, polled and traded through the package.

Importable on every OS: the MetaTrader5 module is imported only when a terminal is opened
(``Mt5Terminal.open``), and its absence raises ``TerminalUnavailable``.
"""

from connectors.mt5.config import Mt5Config
from connectors.mt5.errors import TerminalConnectError, TerminalNotReady, TerminalUnavailable

__all__ = ["Mt5Config", "TerminalConnectError", "TerminalNotReady", "TerminalUnavailable"]
