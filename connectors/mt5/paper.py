"""A MetaTrader5-package-shaped terminal over the paper venue: the MT5 connector without Windows.

``PaperMt5Server`` is a trade server: a ``PaperVenue`` plus what MetaTrader adds around it —
integer tickets, the deal history, server time. ``PaperMt5Api`` is one terminal logged in to
one account of that server, with the MetaTrader5 module's functions and records (namedtuples
with the package's field names and order). ``order_send`` takes the package's request dicts,
runs them on the venue and answers ``OrderSendResult`` with the venue's real retcodes, so the
connector can be run, demonstrated and tested end to end on any machine.

Modes reproduce what a live terminal does to the connector: a package refusal (``-2``), an
IPC loss and a slow restart, a terminal off its server or with AutoTrading off, a ``None``
history read, a server clock ahead of UTC, a netting margin mode, refused filling modes, a
stops level, unpriced fills, throttling, trading between the package's reads, a rewritten
close-by comment and a symbol without close-by.

What it does not model: netting accounting (only the margin mode is reported), stop-limit
orders, partial fills, commissions and swaps.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from connectors.mt5 import protocol as mt5
from connectors.mt5.parsing import MARKET_TYPE_CODES, PENDING_TYPE_CODES, PENDING_TYPES
from connectors.paper import accounting
from connectors.paper.model import PendingOrder, Position, Result, Retcode
from connectors.paper.venue import PaperVenue
from schemas.account import TradeMode
from schemas.common import Side
from schemas.market import Quote
from schemas.master import (
    MasterEvent,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)

# The package's records, field for field (MetaTrader5 5.0.4x documentation).
TradePosition = collections.namedtuple(
    "TradePosition",
    "ticket time time_msc time_update time_update_msc type magic identifier reason volume "
    "price_open sl tp price_current swap profit symbol comment external_id",
)
TradeOrder = collections.namedtuple(
    "TradeOrder",
    "ticket time_setup time_setup_msc time_done time_done_msc time_expiration type type_time "
    "type_filling state magic position_id position_by_id reason volume_initial volume_current "
    "price_open sl tp price_current price_stoplimit symbol comment external_id",
)
TradeDeal = collections.namedtuple(
    "TradeDeal",
    "ticket order time time_msc type entry magic position_id reason volume price commission "
    "swap profit fee symbol comment external_id",
)
AccountInfo = collections.namedtuple(
    "AccountInfo",
    "login trade_mode leverage limit_orders margin_so_mode trade_allowed trade_expert "
    "margin_mode currency_digits fifo_close balance credit profit equity margin margin_free "
    "margin_level margin_so_call margin_so_so margin_initial margin_maintenance assets "
    "liabilities commission_blocked name server currency company",
)
SymbolInfo = collections.namedtuple(
    "SymbolInfo",
    "custom chart_mode select visible session_deals session_buy_orders session_sell_orders "
    "volume volumehigh volumelow time digits spread spread_float ticks_bookdepth "
    "trade_calc_mode trade_mode start_time expiration_time trade_stops_level "
    "trade_freeze_level trade_exemode swap_mode swap_rollover3days margin_hedged_use_leg "
    "expiration_mode filling_mode order_mode order_gtc_mode option_mode option_right bid "
    "bidhigh bidlow ask askhigh asklow last lasthigh lastlow volume_real volumehigh_real "
    "volumelow_real option_strike point trade_tick_value trade_tick_value_profit "
    "trade_tick_value_loss trade_tick_size trade_contract_size trade_accrued_interest "
    "trade_face_value trade_liquidity_rate volume_min volume_max volume_step volume_limit "
    "swap_long swap_short margin_initial margin_maintenance session_volume session_turnover "
    "session_interest session_buy_orders_volume session_sell_orders_volume session_open "
    "session_close session_aw session_price_settlement session_price_limit_min "
    "session_price_limit_max margin_hedged price_change price_volatility price_theoretical "
    "price_greeks_delta price_greeks_theta price_greeks_gamma price_greeks_vega "
    "price_greeks_rho price_greeks_omega price_sensitivity basis category currency_base "
    "currency_profit currency_margin bank description exchange formula isin name page path",
)
TerminalInfo = collections.namedtuple(
    "TerminalInfo",
    "community_account community_connection connected dlls_allowed trade_allowed "
    "tradeapi_disabled email_enabled ftp_enabled notifications_enabled mqid build maxbars "
    "codepage ping_last community_balance retransmission company name language path "
    "data_path commondata_path",
)
Tick = collections.namedtuple("Tick", "time bid ask last volume time_msc flags volume_real")
TradeRequest = collections.namedtuple(
    "TradeRequest",
    "action magic order symbol volume price stoplimit sl tp deviation type type_filling "
    "type_time expiration comment position position_by",
)
OrderSendResult = collections.namedtuple(
    "OrderSendResult",
    "retcode deal order volume price bid ask comment request_id retcode_external request",
)

_SYMBOL_TEXT_FIELDS = frozenset(
    [
        "basis",
        "category",
        "currency_base",
        "currency_profit",
        "currency_margin",
        "bank",
        "description",
        "exchange",
        "formula",
        "isin",
        "name",
        "page",
        "path",
    ]
)
_SYMBOL_FLAG_FIELDS = frozenset(
    ["custom", "select", "visible", "spread_float", "margin_hedged_use_leg"]
)
_TRADE_MODE_CODES = {
    TradeMode.DISABLED: mt5.SYMBOL_TRADE_MODE_DISABLED,
    TradeMode.LONG_ONLY: mt5.SYMBOL_TRADE_MODE_LONGONLY,
    TradeMode.SHORT_ONLY: mt5.SYMBOL_TRADE_MODE_SHORTONLY,
    TradeMode.CLOSE_ONLY: mt5.SYMBOL_TRADE_MODE_CLOSEONLY,
    TradeMode.FULL: mt5.SYMBOL_TRADE_MODE_FULL,
}
_CLOSE_DEAL_REASONS = {
    "sl": mt5.DEAL_REASON_SL,
    "tp": mt5.DEAL_REASON_TP,
    "stop_out": mt5.DEAL_REASON_SO,
    "expert": mt5.DEAL_REASON_EXPERT,
    "client": mt5.DEAL_REASON_CLIENT,
}
_CLOSE_DEAL_COMMENTS = {"sl": "[sl {}]", "tp": "[tp {}]", "stop_out": "[so {}]"}
_OK = (1, "Success")
_INVALID_PARAMS = (mt5.RES_E_INVALID_PARAMS, "Invalid arguments")
_NOT_FOUND = (-4, "Terminal: Not found")
_NO_IPC = (mt5.RES_E_NO_IPC, "No IPC connection")
_FIRST_DEAL = 70_000_001
_FIRST_ORDER = 50_000_001


class PaperMt5Server:
    """A paper trade server: the venue, tickets, deal history and a server clock."""

    def __init__(
        self,
        venue: PaperVenue,
        *,
        server_utc_offset_s: int = 0,
        filling_mode: int = mt5.SYMBOL_FILLING_FOK | mt5.SYMBOL_FILLING_IOC,
        execution_mode: int = mt5.SYMBOL_TRADE_EXECUTION_MARKET,
        name: str = "Paper-Server",
        refuse_requests: tuple[int, str] | None = None,
        margin_mode: int = mt5.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING,
        refused_fillings: frozenset[int] = frozenset(),
        stops_level_points: int | None = None,
        order_mode: int = 127,
        close_by_comment: str | None = None,
    ) -> None:
        self.venue = venue
        self.server_utc_offset_s = server_utc_offset_s
        self.filling_mode = filling_mode
        """SYMBOL_FILLING_* flags every symbol allows (RETURN only off market execution)."""
        self.execution_mode = execution_mode
        self.name = name
        self.refuse_requests = refuse_requests
        self.margin_mode = margin_mode
        self.refused_fillings = refused_fillings
        """Request fillings this server answers 10030 whatever the symbol's flags say (a
        broker refusing RETURN under instant execution, or FOK/IOC on pending orders)."""
        self.stops_level_points = stops_level_points
        self.order_mode = order_mode
        """SYMBOL_ORDER_MODE flags of every symbol; without 64 a close-by answers 10013."""
        self.close_by_comment = close_by_comment
        """The comment the server writes on close-by deals instead of the request's (e.g.
        ``"close by"``); ``None`` keeps the request's."""
        """Every symbol's SYMBOL_TRADE_STOPS_LEVEL instead of its config's; an open whose
        SL/TP is nearer than that answers 10016."""
        """What ``account_info().margin_mode`` says (the venue itself always hedges)."""
        """A ``last_error()`` the package refuses every ``order_send`` with before it leaves
        the terminal (``(-2, 'Invalid "comment" argument')``): ``None``, nothing runs."""
        self.lock = threading.RLock()
        self.deals: dict[str, list[Any]] = collections.defaultdict(list)
        self.updated_ms: dict[tuple[str, str], int] = {}
        self._next_deal = _FIRST_DEAL
        self._next_order = _FIRST_ORDER
        self.requests = 0

    def terminal(self, account: str, login: int) -> PaperMt5Api:
        """A terminal logged in to ``account`` (MT5 account number ``login``)."""
        return PaperMt5Api(self, account, login)

    def server_ms(self, ts_ns: int) -> int:
        return ts_ns // 1_000_000 + self.server_utc_offset_s * 1000

    def quote(self, symbol: str, bid: float, ask: float, ts_ns: int | None = None) -> None:
        """A new price: pendings trigger, stops hit, accounts stop out, deals are booked."""
        with self.lock:
            stamp = time.time_ns() if ts_ns is None else ts_ns
            quote = Quote(symbol=symbol, bid=bid, ask=ask, ts_ns=stamp)
            positions = {a: self._positions(a) for a in self.venue.accounts()}
            for event in self.venue.on_quote(quote):
                self.book(event, positions.get(event.master, {}), comment="", order=0)

    # ----------------------------------------------------------------- bookkeeping

    def stops_level(self, symbol: str) -> int:
        if self.stops_level_points is not None:
            return self.stops_level_points
        return self.venue.symbols[symbol].stops_level_points

    def order_ticket(self) -> int:
        ticket = self._next_order
        self._next_order += 1
        return ticket

    def book(
        self, event: MasterEvent, before: dict[str, Position], *, comment: str, order: int
    ) -> list[int]:
        """The deals one venue transaction makes on ``event.master``; their tickets."""
        account, ms = event.master, self.server_ms(event.ts_ns)
        if isinstance(event, PositionModified | PositionReduced):
            self.updated_ms[(account, event.position_id)] = ms
        if isinstance(event, PositionOpened):
            return [self._deal(event, event.position_id, int(event.position_id), event.side,
                               mt5.DEAL_ENTRY_IN, event.volume, event.price, comment)]  # fmt: skip
        if isinstance(event, PendingOrderTriggered):
            opened = self._positions(account).get(event.position_id)
            return [self._deal(event, event.position_id, int(event.order_id), event.side,
                               mt5.DEAL_ENTRY_IN, event.volume, event.price,
                               opened.comment if opened else "")]  # fmt: skip
        if isinstance(event, PositionReduced):
            volume = round(event.volume_before - event.volume_after, 8)
            return [self._deal(event, event.position_id, order, event.side.flipped(),
                               mt5.DEAL_ENTRY_OUT, volume, event.price, comment)]  # fmt: skip
        if isinstance(event, PositionClosed):
            reason = _CLOSE_DEAL_REASONS.get(event.reason, mt5.DEAL_REASON_CLIENT)
            if event.reason in _CLOSE_DEAL_COMMENTS:
                comment = _CLOSE_DEAL_COMMENTS[event.reason].format(event.price)
            elif event.reason == "client":
                reason = mt5.DEAL_REASON_EXPERT  # requests through the package are an expert's
            return [self._deal(event, event.position_id, order or self.order_ticket(),
                               event.side.flipped(), mt5.DEAL_ENTRY_OUT, event.volume,
                               event.price, comment, reason)]  # fmt: skip
        if isinstance(event, PositionClosedBy):
            first = before.get(event.position_id)
            second = before.get(event.opposite_position_id)
            if first is None or second is None:
                return []
            if self.close_by_comment is not None:
                comment = self.close_by_comment
            # MT5: the first leg closes at the opposite's open price, the opposite at its own.
            return [
                self._deal(event, first.position_id, order, first.side.flipped(),
                           mt5.DEAL_ENTRY_OUT_BY, event.volume, second.open_price, comment),
                self._deal(event, second.position_id, order, second.side.flipped(),
                           mt5.DEAL_ENTRY_OUT_BY, event.volume, second.open_price, comment),
            ]  # fmt: skip
        return []

    def _deal(
        self,
        event: MasterEvent,
        position_id: str,
        order: int,
        side: Side,
        entry: int,
        volume: float,
        price: float,
        comment: str,
        reason: int = mt5.DEAL_REASON_EXPERT,
    ) -> int:
        ticket = self._next_deal
        self._next_deal += 1
        ms = self.server_ms(event.ts_ns)
        self.deals[event.master].append(
            TradeDeal(
                ticket=ticket, order=order, time=ms // 1000, time_msc=ms,
                type=mt5.DEAL_TYPE_BUY if side is Side.BUY else mt5.DEAL_TYPE_SELL, entry=entry,
                magic=getattr(event, "magic", 0), position_id=int(position_id), reason=reason,
                volume=volume, price=price, commission=0.0, swap=0.0, profit=0.0, fee=0.0,
                symbol=event.symbol, comment=comment, external_id="",
            )
        )  # fmt: skip
        return ticket

    def _positions(self, account: str) -> dict[str, Position]:
        return {p.position_id: p for p in self.venue.positions(account)}


class PaperMt5Api:
    """One terminal on a ``PaperMt5Server``, with the MetaTrader5 module's functions."""

    def __init__(self, server: PaperMt5Server, account: str, login: int) -> None:
        self.server = server
        self.venue = server.venue
        self.account = account
        self.login_number = login
        self.initialized = False
        self._error: tuple[int, str] = _OK
        self.ipc_lost = False
        """True: the terminal restarted (auto-update, crash) under the package: every call
        answers ``None`` with -10004 "No IPC connection" until ``shutdown()`` and
        ``initialize()`` attach to the new terminal process."""
        self.initialize_failures = 0
        """How many ``initialize()`` calls fail before the restarted terminal is up again."""
        self.connected = True
        """``terminal_info().connected``: False, the terminal lost its trade server."""
        self.trade_allowed = True
        """``terminal_info().trade_allowed``: False, AutoTrading is off and every request
        answers 10027."""
        self.unpriced_fills = False
        """True: a market fill answers price 0 and its deal is not in the history yet (some
        brokers under market execution)."""
        self.busy_answers: list[int] = []
        """Retcodes answered, one per request and before running it (10024 throttled, 10020
        price changed): the request did not run."""
        self.between_reads: Callable[[], None] | None = None
        """Run once, right after the next ``positions_get`` answers: trading that happens
        between the package's reads (a stop hit, a pending order triggering)."""
        self.history_none = False
        """True: ``history_deals_get`` by time window answers ``None`` (what users report for
        an empty window, and what a failed read looks like)."""

    # ------------------------------------------------------------------- connection

    def initialize(self, path: str | None = None, **kwargs: Any) -> bool:
        if self.ipc_lost and self.initialized:
            self._error = _NO_IPC  # still attached to the old terminal process
            return False
        if self.initialize_failures > 0:
            self.initialize_failures -= 1
            self._error = (mt5.RES_E_INTERNAL_FAIL, "IPC initialize failed, terminal starting")
            return False
        self.ipc_lost = False
        self.initialized = True
        login = kwargs.get("login")
        return True if not login else self.login(login)

    def login(self, login: int, password: str = "", server: str = "", timeout: int = 0) -> bool:
        if login != self.login_number:
            self._error = (-6, "Terminal: Authorization failed")
            return False
        return True

    def shutdown(self) -> None:
        self.initialized = False

    def last_error(self) -> tuple[int, str]:
        return self._error

    def _lost(self) -> bool:
        if self.ipc_lost:
            self._error = _NO_IPC
        return self.ipc_lost

    def terminal_info(self) -> Any:
        if self._lost():
            return None
        return TerminalInfo(
            community_account=False, community_connection=False, connected=self.connected,
            dlls_allowed=False, trade_allowed=self.trade_allowed, tradeapi_disabled=False,
            email_enabled=False, ftp_enabled=False, notifications_enabled=False, mqid=False,
            build=4755, maxbars=100_000, codepage=0, ping_last=30_000, community_balance=0.0,
            retransmission=0.0, company="tradecopy paper", name="Paper MetaTrader 5",
            language="English", path="", data_path="", commondata_path="",
        )  # fmt: skip

    # ----------------------------------------------------------------------- records

    def account_info(self) -> Any:
        if self._lost():
            return None
        with self.server.lock:
            state = self.venue.account_state(self.account)
            level = state.equity / state.margin * 100 if state.margin else 0.0
            return AccountInfo(
                login=self.login_number, trade_mode=0, leverage=state.leverage,
                limit_orders=200, margin_so_mode=0, trade_allowed=True, trade_expert=True,
                margin_mode=self.server.margin_mode, currency_digits=2,
                fifo_close=False, balance=state.balance, credit=0.0,
                profit=round(state.equity - state.balance, 2), equity=state.equity,
                margin=state.margin, margin_free=state.free_margin, margin_level=level,
                margin_so_call=100.0, margin_so_so=self.venue.stop_out_level,
                margin_initial=0.0, margin_maintenance=0.0, assets=0.0, liabilities=0.0,
                commission_blocked=0.0, name=self.account, server=self.server.name,
                currency=state.currency, company="tradecopy paper",
            )  # fmt: skip

    def symbol_info(self, symbol: str) -> Any:
        if self._lost():
            return None
        with self.server.lock:
            cfg = self.venue.symbols.get(symbol)
            if cfg is None:
                self._error = _NOT_FOUND
                return None
            quote = self.venue.quote(symbol)
            values: dict[str, Any] = {
                f: "" if f in _SYMBOL_TEXT_FIELDS else False if f in _SYMBOL_FLAG_FIELDS else 0
                for f in SymbolInfo._fields
            }
            values.update(
                select=True, visible=True, digits=cfg.digits, spread_float=True,
                trade_mode=_TRADE_MODE_CODES[cfg.trade_mode],
                trade_stops_level=self.server.stops_level(symbol),
                trade_exemode=self.server.execution_mode, filling_mode=self.server.filling_mode,
                expiration_mode=15, order_mode=self.server.order_mode, point=cfg.point,
                trade_tick_value=cfg.tick_value, trade_tick_value_profit=cfg.tick_value,
                trade_tick_value_loss=cfg.tick_value, trade_tick_size=cfg.tick_size,
                trade_contract_size=cfg.contract_size, volume_min=cfg.volume_min,
                volume_max=cfg.volume_max, volume_step=cfg.volume_step,
                currency_profit=cfg.profit_currency, currency_margin=cfg.profit_currency,
                name=symbol, path=f"Paper\\{symbol}", description=symbol,
            )  # fmt: skip
            if quote is not None:
                values.update(
                    time=quote.ts_ns // 1_000_000_000, bid=quote.bid, ask=quote.ask,
                    spread=round((quote.ask - quote.bid) / cfg.point),
                )  # fmt: skip
            return SymbolInfo(**values)

    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        return symbol in self.venue.symbols

    def symbols_get(self, group: str | None = None) -> Any:
        if self._lost():
            return None
        return tuple(self.symbol_info(s) for s in self.venue.symbols)

    def symbol_info_tick(self, symbol: str) -> Any:
        if self._lost():
            return None
        with self.server.lock:
            quote = self.venue.quote(symbol)
            if quote is None:
                self._error = _NOT_FOUND
                return None
            ms = self.server.server_ms(quote.ts_ns)
            return Tick(time=ms // 1000, bid=quote.bid, ask=quote.ask, last=0.0, volume=0,
                        time_msc=ms, flags=6, volume_real=0.0)  # fmt: skip

    def positions_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> Any:
        if self._lost():
            return None
        with self.server.lock:
            records = tuple(
                self._position_record(p)
                for p in self.venue.positions(self.account)
                if (symbol is None or p.symbol == symbol)
                and (ticket is None or int(p.position_id) == ticket)
            )
        hook, self.between_reads = self.between_reads, None
        if hook is not None:
            hook()
        return records

    def orders_get(
        self, symbol: str | None = None, group: str | None = None, ticket: int | None = None
    ) -> Any:
        if self._lost():
            return None
        with self.server.lock:
            return tuple(
                self._order_record(o)
                for o in self.venue.pending_orders(self.account)
                if (symbol is None or o.symbol == symbol)
                and (ticket is None or int(o.order_id) == ticket)
            )

    def history_deals_get(
        self,
        date_from: datetime | int | None = None,
        date_to: datetime | int | None = None,
        group: str | None = None,
        *,
        ticket: int | None = None,
        position: int | None = None,
    ) -> Any:
        """Deals by time window (server seconds), by order ticket, or by position."""
        if self._lost():
            return None
        with self.server.lock:
            deals: Iterable[Any] = self.server.deals.get(self.account, ())
            if ticket is not None:
                if self.unpriced_fills:
                    return ()
                return tuple(d for d in deals if d.order == ticket)
            if position is not None:
                return tuple(d for d in deals if d.position_id == position)
            if date_from is None or date_to is None:
                self._error = _INVALID_PARAMS
                return None
            if self.history_none:
                return None
            low, high = _seconds(date_from), _seconds(date_to)
            return tuple(d for d in deals if low <= d.time <= high)

    # ---------------------------------------------------------------------- trading

    def order_send(self, request: dict[str, Any]) -> Any:
        if self._lost():
            return None
        with self.server.lock:
            unknown = set(request) - set(TradeRequest._fields)
            comment = request.get("comment", "")
            if unknown or not isinstance(comment, str):
                self._error = _INVALID_PARAMS
                return None
            if len(comment) > mt5.COMMENT_MAX:
                self._error = (mt5.RES_E_INVALID_PARAMS, 'Invalid "comment" argument')
                return None
            if self.server.refuse_requests is not None:
                self._error = self.server.refuse_requests
                return None
            self._error = _OK
            if not self.trade_allowed:
                return OrderSendResult(
                    retcode=mt5.TRADE_RETCODE_CLIENT_DISABLES_AT, deal=0, order=0, volume=0.0,
                    price=0.0, bid=0.0, ask=0.0, comment="AutoTrading disabled by client",
                    request_id=0, retcode_external=0, request=None,
                )  # fmt: skip
            if self.busy_answers:
                return OrderSendResult(
                    retcode=self.busy_answers.pop(0), deal=0, order=0, volume=0.0, price=0.0,
                    bid=0.0, ask=0.0, comment="busy", request_id=0, retcode_external=0,
                    request=None,
                )  # fmt: skip
            self.server.requests += 1
            fields = {f: "" if f in ("symbol", "comment") else 0 for f in TradeRequest._fields}
            req = TradeRequest(**{**fields, **request})
            before = self.server._positions(self.account)
            result, order = self._run(req, before)
            deals = [
                deal
                for event in result.transactions
                for deal in self.server.book(event, before, comment=req.comment, order=order)
            ]
            quote = self.venue.quote(req.symbol) if req.symbol else None
            return OrderSendResult(
                retcode=int(result.retcode), deal=deals[0] if deals else 0,
                order=order if result.ok else 0, volume=result.volume if result.ok else 0.0,
                price=result.price if result.ok and not self.unpriced_fills else 0.0,
                bid=quote.bid if quote else 0.0,
                ask=quote.ask if quote else 0.0,
                comment=result.reason or "Request executed", request_id=self.server.requests,
                retcode_external=0, request=req,
            )  # fmt: skip

    def _run(self, req: Any, before: dict[str, Position]) -> tuple[Result, int]:
        """The request on the venue, and the ticket of the order it made."""
        venue, account = self.venue, self.account
        if req.action == mt5.TRADE_ACTION_DEAL:
            refused = self._filling_refused(req)
            if refused is not None:
                return refused, 0
            if req.position:
                return self._close(req, before)
            side = {code: side for side, code in MARKET_TYPE_CODES.items()}.get(req.type)
            if side is None:
                return _reject(Retcode.INVALID, "invalid order type for a deal"), 0
            if self._stops_too_close(req, side):
                return _reject(mt5.TRADE_RETCODE_INVALID_STOPS, "Invalid stops"), 0
            point = venue.symbols[req.symbol].point if req.symbol in venue.symbols else 0.0
            deviation = self.server.execution_mode != mt5.SYMBOL_TRADE_EXECUTION_MARKET
            result = venue.market_order(
                account, req.symbol, side, req.volume, sl=req.sl or None, tp=req.tp or None,
                magic=req.magic, comment=req.comment,
                expected_price=req.price if deviation and req.price else None,
                max_deviation=req.deviation * point if deviation and req.price else None,
            )  # fmt: skip
            return result, int(result.position_id) if result.ok and result.position_id else 0
        if req.action == mt5.TRADE_ACTION_SLTP:
            result = venue.modify_position(
                account, str(req.position), req.sl or None, req.tp or None
            )
            return result, self.server.order_ticket() if result.ok else 0
        if req.action == mt5.TRADE_ACTION_PENDING:
            refused = self._filling_refused(req)
            if refused is not None:
                return refused, 0
            order_type = PENDING_TYPES.get(req.type)
            if order_type is None:
                return _reject(Retcode.INVALID, "invalid order type for a pending order"), 0
            result = venue.place_pending(
                account, req.symbol, order_type, req.volume, req.price, sl=req.sl or None,
                tp=req.tp or None, expiration_ns=self._expiration_ns(req), magic=req.magic,
                comment=req.comment,
            )  # fmt: skip
            return result, int(result.order_id) if result.ok and result.order_id else 0
        if req.action == mt5.TRADE_ACTION_MODIFY:
            result = venue.modify_pending(
                account, str(req.order), req.price, sl=req.sl or None, tp=req.tp or None,
                expiration_ns=self._expiration_ns(req),
            )  # fmt: skip
            return result, req.order if result.ok else 0
        if req.action == mt5.TRADE_ACTION_REMOVE:
            result = venue.cancel_pending(account, str(req.order))
            return result, req.order if result.ok else 0
        if req.action == mt5.TRADE_ACTION_CLOSE_BY:
            if not self.server.order_mode & mt5.SYMBOL_ORDER_CLOSEBY:
                return _reject(Retcode.INVALID, "close-by is not allowed on this symbol"), 0
            result = venue.close_by(account, str(req.position), str(req.position_by))
            return result, self.server.order_ticket() if result.ok else 0
        return _reject(Retcode.INVALID, f"unknown trade action {req.action}"), 0

    def _close(self, req: Any, before: dict[str, Position]) -> tuple[Result, int]:
        position = before.get(str(req.position))
        if position is None:
            return _reject(Retcode.POSITION_CLOSED, f"no open position {req.position}"), 0
        if req.type != MARKET_TYPE_CODES[position.side.flipped()]:
            return _reject(Retcode.INVALID, "a close must trade against the position"), 0
        volume = None if req.volume >= position.volume else req.volume
        order = self.server.order_ticket()
        result = self.venue.close_position(self.account, position.position_id, volume)
        return result, order if result.ok else 0

    def _stops_too_close(self, req: Any, side: Side) -> bool:
        quote = self.venue.quote(req.symbol)
        cfg = self.venue.symbols.get(req.symbol)
        if quote is None or cfg is None:
            return False
        distance = self.server.stops_level(req.symbol) * cfg.point
        if not distance:
            return False
        if side is Side.BUY:
            return bool((req.sl and req.sl > quote.bid - distance)
                        or (req.tp and req.tp < quote.bid + distance))  # fmt: skip
        return bool((req.sl and req.sl < quote.ask + distance)
                    or (req.tp and req.tp > quote.ask - distance))  # fmt: skip

    def _filling_refused(self, req: Any) -> Result | None:
        flags = self.server.filling_mode
        allowed = {
            # Instant and request execution always fill a market order all-or-nothing.
            mt5.ORDER_FILLING_FOK: bool(flags & mt5.SYMBOL_FILLING_FOK)
            or self.server.execution_mode
            in (mt5.SYMBOL_TRADE_EXECUTION_INSTANT, mt5.SYMBOL_TRADE_EXECUTION_REQUEST),
            mt5.ORDER_FILLING_IOC: bool(flags & mt5.SYMBOL_FILLING_IOC),
            # Pending orders rest in the book: RETURN is theirs under any execution.
            mt5.ORDER_FILLING_RETURN: req.action == mt5.TRADE_ACTION_PENDING
            or self.server.execution_mode != mt5.SYMBOL_TRADE_EXECUTION_MARKET,
        }
        if req.type_filling in self.server.refused_fillings:
            allowed[req.type_filling] = False
        if allowed.get(req.type_filling, False):
            return None
        return Result(ok=False, retcode=mt5.TRADE_RETCODE_INVALID_FILL,
                      reason="Unsupported filling mode")  # fmt: skip

    def _expiration_ns(self, req: Any) -> int:
        if req.type_time not in (mt5.ORDER_TIME_SPECIFIED, mt5.ORDER_TIME_SPECIFIED_DAY):
            return 0
        return max(0, (int(req.expiration) - self.server.server_utc_offset_s) * 1_000_000_000)

    # ------------------------------------------------------------------- records

    def _position_record(self, position: Position) -> Any:
        server = self.server
        cfg = self.venue.symbols[position.symbol]
        quote = self.venue.quote(position.symbol)
        opened = server.server_ms(position.open_ts_ns)
        updated = server.updated_ms.get((self.account, position.position_id), opened)
        current = accounting.exit_price(position.side, quote) if quote else position.open_price
        ticket = int(position.position_id)
        return TradePosition(
            ticket=ticket, time=opened // 1000, time_msc=opened, time_update=updated // 1000,
            time_update_msc=updated, type=MARKET_TYPE_CODES[position.side],
            magic=position.magic, identifier=ticket, reason=mt5.DEAL_REASON_EXPERT,
            volume=position.volume, price_open=position.open_price, sl=position.sl or 0.0,
            tp=position.tp or 0.0, price_current=current, swap=0.0,
            profit=round(accounting.floating_profit(cfg, position, quote), 2),
            symbol=position.symbol, comment=position.comment, external_id="",
        )  # fmt: skip

    def _order_record(self, order: PendingOrder) -> Any:
        setup = self.server.server_ms(order.placed_ts_ns)
        quote = self.venue.quote(order.symbol)
        expires = order.expiration_ns
        return TradeOrder(
            ticket=int(order.order_id), time_setup=setup // 1000, time_setup_msc=setup,
            time_done=0, time_done_msc=0,
            time_expiration=self.server.server_ms(expires) // 1000 if expires else 0,
            type=PENDING_TYPE_CODES[order.order_type],
            type_time=mt5.ORDER_TIME_SPECIFIED if expires else mt5.ORDER_TIME_GTC,
            type_filling=mt5.ORDER_FILLING_RETURN, state=mt5.ORDER_STATE_PLACED,
            magic=order.magic, position_id=0, position_by_id=0, reason=mt5.DEAL_REASON_EXPERT,
            volume_initial=order.volume, volume_current=order.volume, price_open=order.price,
            sl=order.sl or 0.0, tp=order.tp or 0.0,
            price_current=(quote.ask if order.order_type.side is Side.BUY else quote.bid)
            if quote else 0.0,
            price_stoplimit=0.0, symbol=order.symbol, comment=order.comment, external_id="",
        )  # fmt: skip


def _reject(retcode: int, reason: str) -> Result:
    return Result(ok=False, retcode=retcode, reason=reason)


def _seconds(moment: datetime | int) -> int:
    return int(moment.timestamp()) if isinstance(moment, datetime) else int(moment)
