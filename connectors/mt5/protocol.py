"""The MetaTrader5 package as this connector uses it: its constants and its functions.

The values are MetaQuotes' (``ENUM_ORDER_TYPE``, ``ENUM_DEAL_ENTRY``, ``TRADE_RETCODE_*`` ...),
fixed by the terminal, so they are spelled out here instead of read from the module: the
connector then runs against anything shaped like the package (the paper api in ``paper.py``).
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.core import comments

# ENUM_ORDER_TYPE
ORDER_TYPE_BUY = 0
ORDER_TYPE_SELL = 1
ORDER_TYPE_BUY_LIMIT = 2
ORDER_TYPE_SELL_LIMIT = 3
ORDER_TYPE_BUY_STOP = 4
ORDER_TYPE_SELL_STOP = 5
ORDER_TYPE_BUY_STOP_LIMIT = 6
ORDER_TYPE_SELL_STOP_LIMIT = 7
ORDER_TYPE_CLOSE_BY = 8

# ENUM_ORDER_STATE
ORDER_STATE_PLACED = 1

# ENUM_POSITION_TYPE
POSITION_TYPE_BUY = 0
POSITION_TYPE_SELL = 1

# ENUM_DEAL_TYPE (the trading ones; balance, credit, commission ... are not trades)
DEAL_TYPE_BUY = 0
DEAL_TYPE_SELL = 1

# ENUM_DEAL_ENTRY
DEAL_ENTRY_IN = 0
DEAL_ENTRY_OUT = 1
DEAL_ENTRY_INOUT = 2
DEAL_ENTRY_OUT_BY = 3

# ENUM_DEAL_REASON
DEAL_REASON_CLIENT = 0
DEAL_REASON_MOBILE = 1
DEAL_REASON_WEB = 2
DEAL_REASON_EXPERT = 3
DEAL_REASON_SL = 4
DEAL_REASON_TP = 5
DEAL_REASON_SO = 6

# ENUM_TRADE_REQUEST_ACTIONS
TRADE_ACTION_DEAL = 1
TRADE_ACTION_PENDING = 5
TRADE_ACTION_SLTP = 6
TRADE_ACTION_MODIFY = 7
TRADE_ACTION_REMOVE = 8
TRADE_ACTION_CLOSE_BY = 10

# ENUM_ORDER_TYPE_FILLING (request) and SYMBOL_FILLING_* (the symbol's allowed-modes flags)
ORDER_FILLING_FOK = 0
ORDER_FILLING_IOC = 1
ORDER_FILLING_RETURN = 2
SYMBOL_FILLING_FOK = 1
SYMBOL_FILLING_IOC = 2

# ENUM_ORDER_TYPE_TIME
ORDER_TIME_GTC = 0
ORDER_TIME_DAY = 1
ORDER_TIME_SPECIFIED = 2
ORDER_TIME_SPECIFIED_DAY = 3

# ENUM_SYMBOL_TRADE_MODE
SYMBOL_TRADE_MODE_DISABLED = 0
SYMBOL_TRADE_MODE_LONGONLY = 1
SYMBOL_TRADE_MODE_SHORTONLY = 2
SYMBOL_TRADE_MODE_CLOSEONLY = 3
SYMBOL_TRADE_MODE_FULL = 4

# SYMBOL_ORDER_MODE flags: which order kinds the symbol allows
SYMBOL_ORDER_CLOSEBY = 64

# ENUM_SYMBOL_TRADE_EXECUTION
SYMBOL_TRADE_EXECUTION_REQUEST = 0
SYMBOL_TRADE_EXECUTION_INSTANT = 1
SYMBOL_TRADE_EXECUTION_MARKET = 2
SYMBOL_TRADE_EXECUTION_EXCHANGE = 3

# ENUM_ACCOUNT_MARGIN_MODE
ACCOUNT_MARGIN_MODE_RETAIL_NETTING = 0
ACCOUNT_MARGIN_MODE_EXCHANGE = 1
ACCOUNT_MARGIN_MODE_RETAIL_HEDGING = 2

# Trade server return codes
TRADE_RETCODE_REQUOTE = 10004
TRADE_RETCODE_PLACED = 10008
TRADE_RETCODE_DONE = 10009
TRADE_RETCODE_DONE_PARTIAL = 10010
TRADE_RETCODE_ERROR = 10011
TRADE_RETCODE_TIMEOUT = 10012
TRADE_RETCODE_INVALID = 10013
TRADE_RETCODE_INVALID_STOPS = 10016
TRADE_RETCODE_PRICE_CHANGED = 10020
TRADE_RETCODE_PRICE_OFF = 10021
TRADE_RETCODE_TOO_MANY_REQUESTS = 10024
TRADE_RETCODE_NO_CHANGES = 10025
TRADE_RETCODE_CLIENT_DISABLES_AT = 10027
TRADE_RETCODE_LOCKED = 10028
TRADE_RETCODE_INVALID_FILL = 10030
TRADE_RETCODE_CONNECTION = 10031

#: Answers that leave the outcome open: the request may or may not have been executed.
UNCERTAIN_RETCODES = frozenset(
    {TRADE_RETCODE_ERROR, TRADE_RETCODE_TIMEOUT, TRADE_RETCODE_LOCKED, TRADE_RETCODE_CONNECTION}
)
#: Answers after which a close may be sent again at the current price (nothing ran).
REPRICE_RETCODES = frozenset({TRADE_RETCODE_REQUOTE, TRADE_RETCODE_PRICE_CHANGED})
#: Answers of a request that did what it asked (a pending order answers PLACED).
SUCCESS_RETCODES = frozenset(
    {TRADE_RETCODE_PLACED, TRADE_RETCODE_DONE, TRADE_RETCODE_DONE_PARTIAL, TRADE_RETCODE_NO_CHANGES}
)

# last_error() codes of the package itself
RES_E_FAIL = -1
RES_E_INVALID_PARAMS = -2
RES_E_INTERNAL_FAIL = -10001
RES_E_NO_IPC = -10004
RES_E_INTERNAL_TIMEOUT = -10005

#: last_error() codes of a lost IPC channel (RES_E_INTERNAL_FAIL_SEND ... _TIMEOUT): the
#: request may have reached the terminal, so an order_send ``None`` with one of these is
#: *unknown*. Any other code (-2 invalid arguments, -1 generic fail ...) is the package
#: refusing the request before it left: a definite rejection.
IPC_ERROR_CODES = frozenset(range(-10005, -10000))

#: MetaTrader keeps 31 characters of an order comment; a longer one fails the request.
COMMENT_MAX = comments.COMMENT_MAX


class Mt5Api(Protocol):
    """The MetaTrader5 module functions the connector calls (records are namedtuples)."""

    def initialize(self, *args: Any, **kwargs: Any) -> bool: ...

    def login(self, login: int, **kwargs: Any) -> bool: ...

    def shutdown(self) -> None: ...

    def last_error(self) -> tuple[int, str]: ...

    def terminal_info(self) -> Any: ...

    def account_info(self) -> Any: ...

    def symbol_info(self, symbol: str) -> Any: ...

    def symbol_info_tick(self, symbol: str) -> Any: ...

    def symbol_select(self, symbol: str, enable: bool = True) -> bool: ...

    def symbols_get(self, *args: Any, **kwargs: Any) -> Any: ...

    def positions_get(self, **kwargs: Any) -> Any: ...

    def orders_get(self, **kwargs: Any) -> Any: ...

    def history_deals_get(self, *args: Any, **kwargs: Any) -> Any: ...

    def order_send(self, request: dict[str, Any]) -> Any: ...
