"""Follower orders on a MetaTrader 5 terminal: requests, outcomes, and the evidence that settles.

Synchronous: the connector runs it on its one terminal thread. Every order first looks for
what the terminal already holds (a copy with the order's comment, a deal with its marker), so
an order that ran before — before a restart, or before a lost answer — is never run twice.
Outcome policy: *rejected* only on the terminal's definitive retcode; no answer (``None``, a
timeout or connection retcode) is settled from that evidence, or else reported *unknown*.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from connectors.mt5 import protocol as mt5
from connectors.mt5.config import Mt5Config
from connectors.mt5.errors import TerminalNotReady
from connectors.mt5.parsing import (
    MARKET_TYPE_CODES,
    PENDING_TYPE_CODES,
    POSITION_SIDES,
    Deal,
    filling_types,
    level,
    parse_deal,
    server_seconds,
    stops_too_close,
)
from connectors.reports import (
    NO_PENDING_COPY,
    NO_POSITION_COPY,
    NO_SUCH_POSITION,
    NOT_BOTH_COPIES,
    RETCODE_NO_SUCH_POSITION,
    RETCODE_PRICE_DEVIATION,
    OrderReports,
)
from engine.core.comments import copy_comment, is_copy, master_prefixes, order_marker
from engine.core.prices import within_deviation
from engine.core.volume import partial_close_volume
from schemas.account import SymbolSpec
from schemas.common import Side
from schemas.orders import (
    DeviationPolicy,
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)
from schemas.reports import ExecutionReport, OrderFilled, OrderRejected

log = structlog.get_logger("tradecopy.mt5")

MARKER_HISTORY_S = 7 * 86_400
"""How far back the deal history is searched for the markers of orders that ran."""
_DEVIATION_POLL_S = 0.01
#: Waits between attempts of a request the server throttled (10024) or re-priced (10020).
_RETRY_WAITS_S = (0.05, 0.2)

Evidence = Callable[[], ExecutionReport | None]


class CopyMemory:
    """What the terminal's own comments say about this connector's copies.

    Rebuilt from ``positions_get``/``orders_get`` and the deal history on every start, so a
    restart needs no state file to know which follower position copies which master trade.
    """

    def __init__(self) -> None:
        self.positions: dict[str, str] = {}
        """Copy comment → follower position ticket."""
        self.pendings: dict[str, str] = {}
        """Copy comment → follower pending order ticket."""
        self.aliases: dict[str, str] = {}
        """Copy comment of a renewed master ticket (MT4 partial close) → the position's own."""
        self.markers: dict[str, list[Deal]] = {}
        """Comment → the deals that carried it: closing markers, and the opening deals of
        copies (a copy's comment stays on its opening deal after the position is gone)."""

    def rebuild(self, positions: Iterable[Any], orders: Iterable[Any]) -> None:
        # Whole-dict assignment: the poll thread and the order thread never see half a map.
        self.positions = {p.comment: str(p.ticket) for p in positions if is_copy(p.comment)}
        self.pendings = {o.comment: str(o.ticket) for o in orders if is_copy(o.comment)}

    def remember_deals(self, deals: Iterable[Deal]) -> None:
        for deal in deals:
            known = self.markers.setdefault(deal.comment, [])
            if all(d.ticket != deal.ticket for d in known):
                known.append(deal)

    def comment_for(self, master: str, ref: str) -> str:
        comment = copy_comment(master, ref)
        return self.aliases.get(comment, comment)


class Mt5Execution:
    """Runs follower orders through ``order_send`` (see the module docstring)."""

    def __init__(self, api: Any, config: Mt5Config, memory: CopyMemory) -> None:
        self.api = api
        self.config = config
        self.memory = memory
        self.offset_s = config.server_utc_offset_s
        self.send_error: tuple[int, str] = (1, "Success")
        """``last_error()`` read right after the last ``order_send``: any later call
        (the evidence search reads positions and deals) overwrites the package's own."""

    def run(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        if isinstance(order, FollowerOpen):
            return self._open(order, reports)
        if isinstance(order, FollowerClose):
            return self._close(order, reports)
        if isinstance(order, FollowerModify):
            return self._modify(order, reports)
        if isinstance(order, FollowerCloseBy):
            return self._close_by(order, reports)
        if isinstance(order, FollowerCloseAll):
            return self._close_all(order, reports)
        if isinstance(order, FollowerPendingPlace):
            return self._pending_place(order, reports)
        if isinstance(order, FollowerPendingModify):
            return self._pending_modify(order, reports)
        if isinstance(order, FollowerPendingCancel):
            return self._pending_cancel(order, reports)
        raise TypeError(f"unhandled follower order {type(order).__name__}")  # pragma: no cover

    def evidence(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport | None:
        """The outcome of an order whose answer was lost, from what the terminal holds now."""
        if isinstance(order, FollowerOpen):
            comment = self.memory.comment_for(order.master, order.master_position_id)
            found = self._find(self._positions(), comment)
            if found is not None:
                return _filled_from(reports, found)
            opened = [d for d in self._marker_deals(comment) if d.entry == mt5.DEAL_ENTRY_IN]
            return _filled_from_deals(reports, opened) if opened else None
        if isinstance(order, FollowerCloseBy):
            deals = self._marker_deals(order_marker(order.order_id))
            if deals:
                ids = sorted({d.position_id for d in deals})
                return reports.done("closed by the opposite copy", ids)
            return self._close_by_deals(order, reports)
        if isinstance(order, FollowerClose):
            deals = self._marker_deals(order_marker(order.order_id))
            return _filled_from_deals(reports, deals) if deals else None
        if isinstance(order, FollowerPendingPlace):
            comment = self.memory.comment_for(order.master, order.master_order_id)
            found = self._find(self._orders(), comment) or self._find(self._positions(), comment)
            return None if found is None else reports.done(
                "pending order placed", [str(found.ticket)])  # fmt: skip
        if isinstance(order, FollowerModify):
            found = self._position_of(order, self._positions())
            if found is not None and (level(found.sl), level(found.tp)) == (order.sl, order.tp):
                return reports.done("SL/TP modified", [str(found.ticket)])
            return None
        if isinstance(order, FollowerPendingModify | FollowerPendingCancel):
            comment = self.memory.comment_for(order.master, order.master_order_id)
            found = self._find(self._orders(), comment)
            if isinstance(order, FollowerPendingCancel):
                return None if found else reports.done("pending order cancelled", [])
            if found is not None and _pending_matches(found, order, self.offset_s):
                return reports.done("pending order modified", [])
            return None
        return None  # a close-all is settled by running it again: it closes what is left

    # ------------------------------------------------------------------ positions

    def _open(self, order: FollowerOpen, reports: OrderReports) -> ExecutionReport:
        memory = self.memory
        comment = memory.comment_for(order.master, order.master_position_id)
        positions = self._positions()
        existing = self._find(positions, comment)
        if order.master_order_id is not None and existing is None:
            # The master's pending order triggered: our copy may have triggered already (it
            # carries the order's comment), or still wait; either way one position results.
            order_comment = memory.comment_for(order.master, order.master_order_id)
            existing = self._find(positions, order_comment)
            pending = self._find(self._orders(), order_comment) if existing is None else None
            if pending is not None:
                removed = self._send(
                    {"action": mt5.TRADE_ACTION_REMOVE, "order": int(pending.ticket)}
                )
                if removed is None or removed.retcode not in mt5.SUCCESS_RETCODES:
                    existing = self._find(self._positions(), order_comment)
        if existing is not None:
            return _filled_from(reports, existing)
        comments = [comment]
        if order.master_order_id is not None:
            comments.append(memory.comment_for(order.master, order.master_order_id))
        opened_before = self._opening_deals(*comments)
        if opened_before:  # the copy ran and is closed already (its SL, a manual close)
            return _filled_from_deals(reports, opened_before)
        # Only now: an open that ran before its signal expired reports that fill above.
        if reports.signal_expired:
            return reports.expired()
        info = self._symbol(order.symbol)
        if info is None:
            return self._symbol_missing(reports, order.symbol)
        tick = self._tick_within_deviation(order)
        if tick is None:
            return reports.rejected(
                RETCODE_PRICE_DEVIATION,
                f"price moved more than {order.max_price_deviation} from the master's "
                f"fill {order.master_price}",
            )
        sl, tp = self._levels_outside_stops(order, info, tick)
        deviation = self.config.deviation_points
        if order.max_price_deviation is not None and info.point:
            deviation = max(0, round(order.max_price_deviation / info.point))
        request = {
            "action": mt5.TRADE_ACTION_DEAL, "symbol": order.symbol,
            "volume": float(order.volume), "type": MARKET_TYPE_CODES[order.side],
            "price": float(tick.ask if order.side is Side.BUY else tick.bid),
            "sl": float(sl or 0.0), "tp": float(tp or 0.0),
            "deviation": int(deviation), "magic": int(order.magic or self.config.magic),
            "comment": comment, "type_time": mt5.ORDER_TIME_GTC,
        }  # fmt: skip
        result = self._send(request, filling_types(info))

        def filled(result: Any) -> ExecutionReport:
            ticket = str(int(result.order))
            memory.positions[comment] = ticket
            price = self._fill_price(result)
            memory.remember_deals([Deal(
                ticket=int(result.deal), order=ticket, position_id=ticket, symbol=order.symbol,
                side=order.side, entry=mt5.DEAL_ENTRY_IN, reason=mt5.DEAL_REASON_EXPERT,
                volume=float(result.volume or order.volume), price=price,
                magic=int(request["magic"]), comment=comment, time_ns=time.time_ns(),
            )])  # fmt: skip
            now = time.time_ns()
            if result.retcode == mt5.TRADE_RETCODE_DONE_PARTIAL:
                return reports.partially_filled(order.symbol, ticket, order.side, order.volume,
                                                float(result.volume), price,
                                                terminal_ns=now)  # fmt: skip
            return reports.filled(order.symbol, ticket, order.side,
                                  float(result.volume or order.volume), price,
                                  terminal_ns=now)  # fmt: skip

        return self._decide(reports, result, filled, lambda: self.evidence(order, reports))

    def _close(self, order: FollowerClose, reports: OrderReports) -> ExecutionReport:
        marker = order_marker(order.order_id)
        done_before = self.memory.markers.get(marker)
        if done_before:
            return _filled_from_deals(reports, done_before)
        position = self._position_of(order, self._positions())
        if position is None and order.manual:
            # Closed by this very order before its answer was lost? Its marker says so.
            deals = self._marker_deals(marker)
            if deals:
                return _filled_from_deals(reports, deals)
            return reports.rejected(RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
        if position is None:
            return reports.done(NO_POSITION_COPY)
        info = self._symbol(position.symbol)
        if info is None:
            return self._symbol_missing(reports, position.symbol)
        held = float(position.volume)
        volume = partial_close_volume(held, order.ratio, _volume_spec(info))
        if volume <= 0:
            return reports.done("the ratio rounds to nothing on this position")
        side = POSITION_SIDES[int(position.type)]
        result = self._send(
            self._closing_request(position, info, volume, marker), filling_types(info)
        )

        def filled(result: Any) -> ExecutionReport:
            price = self._fill_price(result)
            self.memory.remember_deals([self._own_deal(result, position, side, volume, price,
                                                       marker)])  # fmt: skip
            if order.new_master_position_id and volume < held and not order.manual:
                renewed = copy_comment(order.master, order.new_master_position_id)
                self.memory.aliases[renewed] = position.comment
            return reports.filled(position.symbol, str(position.ticket), side.flipped(),
                                  float(result.volume or volume), price,
                                  terminal_ns=time.time_ns())  # fmt: skip

        return self._decide(reports, result, filled, lambda: self.evidence(order, reports))

    def _modify(self, order: FollowerModify, reports: OrderReports) -> ExecutionReport:
        position = self._position_of(order, self._positions())
        if position is None and order.manual:
            return reports.rejected(RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
        if position is None:
            return reports.done(NO_POSITION_COPY)
        ticket = str(position.ticket)
        result = self._send({
            "action": mt5.TRADE_ACTION_SLTP, "position": int(position.ticket),
            "symbol": position.symbol, "sl": float(order.sl or 0.0),
            "tp": float(order.tp or 0.0), "magic": int(position.magic),
        })  # fmt: skip
        return self._decide(
            reports, result,
            lambda _: reports.done("SL/TP modified", [ticket]),
            lambda: self.evidence(order, reports),
        )  # fmt: skip

    def _close_by(self, order: FollowerCloseBy, reports: OrderReports) -> ExecutionReport:
        marker = order_marker(order.order_id)
        done_before = self.memory.markers.get(marker)
        if done_before:
            ids = sorted({d.position_id for d in done_before})
            return reports.done("closed by the opposite copy", ids)
        positions = self._positions()
        first = self._find(
            positions, self.memory.comment_for(order.master, order.master_position_id)
        )
        second = self._find(positions, self.memory.comment_for(
            order.master, order.master_opposite_position_id))  # fmt: skip
        if first is None or second is None:
            return reports.done(NOT_BOTH_COPIES)
        ids = [str(first.ticket), str(second.ticket)]
        info = self._symbol(first.symbol)
        if info is None:
            return self._symbol_missing(reports, first.symbol)
        if not int(info.order_mode) & mt5.SYMBOL_ORDER_CLOSEBY:
            return self._close_both(order, reports, first, second, info)
        result = self._send({
            "action": mt5.TRADE_ACTION_CLOSE_BY, "symbol": first.symbol,
            "position": int(first.ticket), "position_by": int(second.ticket),
            "magic": int(first.magic), "comment": marker,
        })  # fmt: skip
        return self._decide(
            reports, result,
            lambda _: reports.done("closed by the opposite copy", ids),
            lambda: self.evidence(order, reports),
        )  # fmt: skip

    def _close_both(
        self, order: FollowerCloseBy, reports: OrderReports, first: Any, second: Any, info: Any
    ) -> ExecutionReport:
        """A close-by on a symbol that does not allow it (SYMBOL_ORDER_CLOSEBY unset): the
        same volume closed from each copy with two market closes — the same positions
        remain, at one spread more."""
        volume = min(float(first.volume), float(second.volume))
        closed: list[str] = []
        for position in (first, second):
            marker = order_marker(f"{order.order_id}:{position.ticket}")
            if self.memory.markers.get(marker):
                closed.append(str(position.ticket))  # ran before a restart
                continue
            result = self._send(
                self._closing_request(position, info, volume, marker), filling_types(info)
            )
            if result is None or result.retcode not in mt5.SUCCESS_RETCODES:
                return self._decide(reports, result, lambda _: reports.done(""),
                                    lambda: None)  # fmt: skip
            side = POSITION_SIDES[int(position.type)]
            price = self._fill_price(result)
            self.memory.remember_deals(
                [self._own_deal(result, position, side, volume, price, marker)]
            )
            closed.append(str(position.ticket))
        log.info("mt5_close_by_as_two_closes", order=order.order_id, symbol=first.symbol)
        return reports.done("closed against the opposite copy (two closes)", closed)

    def _close_by_deals(
        self, order: FollowerCloseBy, reports: OrderReports
    ) -> ExecutionReport | None:
        """Evidence of a close-by without our comment (the server writes its own on close-by
        deals): the two copies' ``DEAL_ENTRY_OUT_BY`` deals sharing one close-by order."""
        tickets = [self._copy_ticket(order.master, ref) for ref in
                   (order.master_position_id, order.master_opposite_position_id)]  # fmt: skip
        if None in tickets:
            return None
        orders: list[set[str]] = []
        for ticket in tickets:
            deals = self.api.history_deals_get(position=int(ticket)) or ()
            orders.append({str(d.order) for d in deals if d.entry == mt5.DEAL_ENTRY_OUT_BY})
        if orders[0] & orders[1]:
            return reports.done("closed by the opposite copy", sorted(str(t) for t in tickets))
        return None

    def _copy_ticket(self, master: str, ref: str) -> str | None:
        """The follower position copying ``ref``: open now, or from its opening deal."""
        comment = self.memory.comment_for(master, ref)
        found = self.memory.positions.get(comment)
        if found is not None:
            return found
        opened = self._opening_deals(comment)
        return opened[0].position_id if opened else None

    def _close_all(self, order: FollowerCloseAll, reports: OrderReports) -> ExecutionReport:
        prefixes = master_prefixes(order.master)
        closed: list[str] = []
        unanswered: list[str] = []
        for position in self._positions():
            if not position.comment.startswith(prefixes):
                continue
            ticket = str(position.ticket)
            marker = order_marker(f"{order.order_id}:{ticket}")
            info = self._symbol(position.symbol)
            if info is None:
                continue
            result = self._send(
                self._closing_request(position, info, float(position.volume), marker),
                filling_types(info),
            )
            if result is not None and result.retcode in mt5.SUCCESS_RETCODES:
                closed.append(ticket)
            elif self._transport_lost(result):
                unanswered.append(ticket)
        for pending in self._orders():
            if pending.comment.startswith(prefixes):
                self._send({"action": mt5.TRADE_ACTION_REMOVE, "order": int(pending.ticket)})
        if unanswered:
            return reports.unknown(
                f"no answer closing position(s) {', '.join(unanswered)}; "
                f"closed {len(closed)}: {order.reason}"
            )
        return reports.done(f"closed {len(closed)} position(s): {order.reason}", closed)

    # ---------------------------------------------------------------- pending orders

    def _pending_place(self, order: FollowerPendingPlace, reports: OrderReports) -> ExecutionReport:
        comment = self.memory.comment_for(order.master, order.master_order_id)
        existing = self._find(self._orders(), comment) or self._find(self._positions(), comment)
        if existing is not None:
            return reports.done("pending order placed", [str(existing.ticket)])
        triggered = self._opening_deals(comment)
        if triggered:  # placed, triggered and closed already
            return reports.done("pending order placed", [triggered[0].position_id])
        info = self._symbol(order.symbol)
        if info is None:
            return self._symbol_missing(reports, order.symbol)
        request = {
            "action": mt5.TRADE_ACTION_PENDING, "symbol": order.symbol,
            "volume": float(order.volume), "type": PENDING_TYPE_CODES[order.order_type],
            "price": float(order.price), "sl": float(order.sl or 0.0),
            "tp": float(order.tp or 0.0), "magic": int(order.magic or self.config.magic),
            "comment": comment, **self._expiration(order.expiration_ns),
        }  # fmt: skip
        result = self._send(request, filling_types(info, pending=True))

        def placed(result: Any) -> ExecutionReport:
            ticket = str(int(result.order))
            self.memory.pendings[comment] = ticket
            return reports.done("pending order placed", [ticket])

        return self._decide(reports, result, placed, lambda: self.evidence(order, reports))

    def _pending_modify(
        self, order: FollowerPendingModify, reports: OrderReports
    ) -> ExecutionReport:
        comment = self.memory.comment_for(order.master, order.master_order_id)
        pending = self._find(self._orders(), comment)
        if pending is None:
            return reports.done(NO_PENDING_COPY)
        result = self._send({
            "action": mt5.TRADE_ACTION_MODIFY, "order": int(pending.ticket),
            "symbol": pending.symbol, "price": float(order.price),
            "sl": float(order.sl or 0.0), "tp": float(order.tp or 0.0),
            **self._expiration(order.expiration_ns),
        })  # fmt: skip
        return self._decide(
            reports, result,
            lambda _: reports.done("pending order modified", []),
            lambda: self.evidence(order, reports),
        )  # fmt: skip

    def _pending_cancel(
        self, order: FollowerPendingCancel, reports: OrderReports
    ) -> ExecutionReport:
        comment = self.memory.comment_for(order.master, order.master_order_id)
        pending = self._find(self._orders(), comment)
        if pending is None:
            return reports.done(NO_PENDING_COPY)
        result = self._send({"action": mt5.TRADE_ACTION_REMOVE, "order": int(pending.ticket)})
        return self._decide(
            reports, result,
            lambda _: reports.done("pending order cancelled", []),
            lambda: self.evidence(order, reports),
        )  # fmt: skip

    # ------------------------------------------------------------------- terminal

    def _send(self, request: dict[str, Any], fillings: Sequence[int] = ()) -> Any:
        """``order_send``; with ``fillings``, each filling mode in turn while the server
        answers 10030 (unsupported filling: nothing ran, so the next mode is safe to try)."""
        for filling in fillings[:-1]:
            result = self._send_once({**request, "type_filling": filling})
            if result is None or result.retcode != mt5.TRADE_RETCODE_INVALID_FILL:
                return result
            log.info("mt5_filling_refused", symbol=request.get("symbol"), filling=filling)
        if fillings:
            request = {**request, "type_filling": fillings[-1]}
        return self._send_once(request)

    def _levels_outside_stops(
        self, order: FollowerOpen, info: Any, tick: Any
    ) -> tuple[float | None, float | None]:
        """The order's SL/TP, without a level nearer the price than the symbol's stops level:
        the server would refuse the whole open with 10016. The position is worth more than a
        level; the master's next SL/TP change is copied as usual."""
        distance = int(info.trade_stops_level or 0) * float(info.point or 0.0)
        sl_close, tp_close = stops_too_close(
            order.side, float(tick.bid), float(tick.ask), order.sl, order.tp, distance
        )
        if sl_close or tp_close:
            log.warning("mt5_open_level_within_stops_level", order=order.order_id,
                        symbol=order.symbol, sl=order.sl if sl_close else None,
                        tp=order.tp if tp_close else None, stops_level=distance)  # fmt: skip
        return (None if sl_close else order.sl), (None if tp_close else order.tp)

    def _send_once(self, request: dict[str, Any]) -> Any:
        """One request, again after a throttle (10024) and, for a close, re-priced after a
        price change or requote (10020/10004): nothing ran on those answers. An open is not
        re-priced: its price was checked against the master's fill."""
        for wait_s in _RETRY_WAITS_S:
            result = self._send_raw(request)
            if result is None:
                return result
            if result.retcode == mt5.TRADE_RETCODE_TOO_MANY_REQUESTS:
                log.info("mt5_order_send_throttled", wait_s=wait_s)
                time.sleep(wait_s)
                continue
            closing = request.get("action") == mt5.TRADE_ACTION_DEAL and request.get("position")
            if closing and result.retcode in mt5.REPRICE_RETCODES:
                tick = self.api.symbol_info_tick(request["symbol"])
                if tick is None:
                    return result
                buy = request["type"] == mt5.ORDER_TYPE_BUY
                request = {**request, "price": float(tick.ask if buy else tick.bid)}
                log.info("mt5_close_repriced", retcode=int(result.retcode),
                         price=request["price"])  # fmt: skip
                continue
            return result
        return self._send_raw(request)

    def _send_raw(self, request: dict[str, Any]) -> Any:
        result = self.api.order_send(request)
        if result is None:
            code, message = self.api.last_error()
            self.send_error = (int(code), str(message))
            log.warning(
                "mt5_order_send_no_answer",
                error=self.send_error,
                refused=not self._transport_lost(result),
                action=request.get("action"),
                comment=request.get("comment", ""),
            )
        return result

    def _transport_lost(self, result: Any) -> bool:
        """Whether an ``order_send`` answer leaves the outcome open: ``None`` with an IPC
        error, or an uncertain retcode. ``None`` with any other error is a refusal."""
        if result is None:
            return self.send_error[0] in mt5.IPC_ERROR_CODES
        return result.retcode in mt5.UNCERTAIN_RETCODES

    def _decide(
        self, reports: OrderReports, result: Any, success: Callable[[Any], ExecutionReport],
        evidence: Evidence,
    ) -> ExecutionReport:  # fmt: skip
        """The outcome policy: rejected only on a definitive retcode, else look, else unknown."""
        if result is not None and result.retcode in mt5.SUCCESS_RETCODES:
            return success(result)
        if result is None and not self._transport_lost(result):
            code, message = self.send_error
            return reports.rejected(code, f"refused by the terminal: {message}")
        if result is not None and not self._transport_lost(result):
            return reports.rejected(int(result.retcode),
                                    result.comment or f"retcode {result.retcode}")  # fmt: skip
        found = evidence()
        if found is not None:
            return found
        why = (
            f"order_send returned nothing (last_error {self.send_error})"
            if result is None
            else f"retcode {result.retcode} {result.comment}"
        )
        return reports.unknown(f"no definitive answer from the terminal: {why}")

    def _positions(self) -> Sequence[Any]:
        positions = self.api.positions_get()
        if positions is None:
            raise TerminalNotReady(f"positions_get failed: {self.api.last_error()}")
        return positions

    def _orders(self) -> Sequence[Any]:
        orders = self.api.orders_get()
        if orders is None:
            raise TerminalNotReady(f"orders_get failed: {self.api.last_error()}")
        return orders

    def _position_of(self, order: FollowerClose | FollowerModify, positions: Sequence[Any]) -> Any:
        """The follower position an order acts on: a copy by its comment, a manual order's
        by the account's own position ticket (``schemas.orders``, ``manual``)."""
        if order.manual:
            ticket = order.master_position_id
            return next((p for p in positions if str(p.ticket) == ticket), None)
        return self._find(
            positions, self.memory.comment_for(order.master, order.master_position_id)
        )

    @staticmethod
    def _find(records: Iterable[Any], comment: str) -> Any:
        return next((r for r in records if r.comment == comment), None)

    def _symbol(self, symbol: str) -> Any:
        info = self.api.symbol_info(symbol)
        if info is not None and not info.visible:
            self.api.symbol_select(symbol, True)  # ticks come only for Market Watch symbols
        return info

    def _tick_within_deviation(self, order: FollowerOpen) -> Any:
        """The current tick if it is close enough to the master's fill (waiting if asked)."""
        wait = order.deviation_policy is DeviationPolicy.WAIT
        deadline = time.monotonic() + (order.deviation_wait_ms / 1000 if wait else 0)
        while True:
            tick = self.api.symbol_info_tick(order.symbol)
            if tick is None:
                raise TerminalNotReady(f"no price for {order.symbol}: {self.api.last_error()}")
            if order.max_price_deviation is None or within_deviation(
                order.side, order.master_price, tick.bid, tick.ask, order.max_price_deviation
            ):
                return tick
            if time.monotonic() >= deadline:
                return None
            time.sleep(_DEVIATION_POLL_S)

    def _closing_request(
        self, position: Any, info: Any, volume: float, marker: str
    ) -> dict[str, Any]:
        side = POSITION_SIDES[int(position.type)]
        tick = self.api.symbol_info_tick(position.symbol)
        if tick is None:
            raise TerminalNotReady(f"no price for {position.symbol}: {self.api.last_error()}")
        return {
            "action": mt5.TRADE_ACTION_DEAL, "symbol": position.symbol,
            "position": int(position.ticket), "volume": float(volume),
            "type": MARKET_TYPE_CODES[side.flipped()],
            "price": float(tick.bid if side is Side.BUY else tick.ask),
            "deviation": int(self.config.deviation_points), "magic": int(position.magic),
            "comment": marker, "type_time": mt5.ORDER_TIME_GTC,
        }  # fmt: skip

    def _expiration(self, expiration_ns: int) -> dict[str, int]:
        if not expiration_ns:
            return {"type_time": mt5.ORDER_TIME_GTC}
        return {"type_time": mt5.ORDER_TIME_SPECIFIED,
                "expiration": server_seconds(expiration_ns, self.offset_s)}  # fmt: skip

    def _fill_price(self, result: Any) -> float:
        """The fill price; some brokers answer 0 under market execution: read the deal."""
        if result.price:
            return float(result.price)
        deals = self.api.history_deals_get(ticket=int(result.order)) or ()
        if deals:
            return float(deals[-1].price)
        # The deal is not in the history yet: the requested price is within the request's
        # deviation of the fill, where 0.0 would make the slippage nonsense.
        requested = float(getattr(result.request, "price", 0.0) or 0.0)
        log.info("mt5_fill_price_from_request", order=int(result.order), price=requested)
        return requested

    def _marker_deals(self, marker: str) -> list[Deal]:
        known = self.memory.markers.get(marker)
        if known:
            return known
        now = server_seconds(time.time_ns(), self.offset_s)
        records = self.api.history_deals_get(now - MARKER_HISTORY_S, now + 86_400) or ()
        parsed = [parse_deal(r, self.offset_s) for r in records if r.comment == marker]
        deals = [d for d in parsed if d is not None]
        self.memory.remember_deals(deals)
        return deals

    def _opening_deals(self, *comments: str) -> list[Deal]:
        """Opening deals of copies this connector made (from memory and the history read at
        start): a copy's comment stays on its opening deal after the position is gone."""
        known = self.memory.markers
        return [d for c in comments for d in known.get(c, ()) if d.entry == mt5.DEAL_ENTRY_IN]

    def _own_deal(
        self, result: Any, position: Any, side: Side, volume: float, price: float, marker: str
    ) -> Deal:
        return Deal(
            ticket=int(result.deal), order=str(int(result.order)),
            position_id=str(position.ticket), symbol=position.symbol, side=side.flipped(),
            entry=mt5.DEAL_ENTRY_OUT, reason=mt5.DEAL_REASON_EXPERT,
            volume=float(result.volume or volume), price=price, magic=int(position.magic),
            comment=marker, time_ns=time.time_ns(),
        )  # fmt: skip

    def _symbol_missing(self, reports: OrderReports, symbol: str) -> OrderRejected:
        code, message = self.api.last_error()
        return reports.rejected(int(code), f"symbol {symbol} is not available: {message}")


def _filled_from(reports: OrderReports, position: Any) -> OrderFilled:
    """The fill an open made before, from the position it left."""
    return reports.filled(position.symbol, str(position.ticket),
                          POSITION_SIDES[int(position.type)], float(position.volume),
                          float(position.price_open))  # fmt: skip


def _filled_from_deals(reports: OrderReports, deals: list[Deal]) -> OrderFilled:
    """The fill the deals of an order that ran before add up to (volume-weighted price)."""
    volume = sum(d.volume for d in deals)
    price = sum(d.price * d.volume for d in deals) / volume if volume else deals[-1].price
    last = deals[-1]
    return reports.filled(last.symbol, last.position_id, last.side, volume, price)


def _volume_spec(info: Any) -> SymbolSpec:
    """Enough of a spec to size a close: only the volume limits matter there."""
    return SymbolSpec(
        account="-", symbol=info.name, contract_size=float(info.trade_contract_size or 1.0),
        tick_size=float(info.trade_tick_size or 1.0), tick_value=1.0, digits=int(info.digits),
        volume_min=float(info.volume_min), volume_max=float(info.volume_max),
        volume_step=float(info.volume_step),
    )  # fmt: skip


def _pending_matches(record: Any, order: FollowerPendingModify, offset_s: int) -> bool:
    expiration = server_seconds(order.expiration_ns, offset_s) if order.expiration_ns else 0
    return (float(record.price_open), level(record.sl), level(record.tp)) == (
        order.price,
        order.sl,
        order.tp,
    ) and int(record.time_expiration or 0) == expiration
