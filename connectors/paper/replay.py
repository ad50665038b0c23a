"""Replay an MT4 statement on a paper master account, at the statement's prices and times.

A parsed statement (``engine.core.statements``) becomes the master's trading, in statement
time order: each position opens with its whole volume (the sum of its partial-close chain),
is reduced by each ``to #N`` part and closed by the last row, with the row's price, at the
row's time; cancelled pending orders are placed and cancelled. Before every deal the driver
quotes the symbol at exactly the statement price (bid = ask = price), so the market fill is
the statement's price and the master's events carry the statement's volumes and prices.
The market price when a pending order was placed is not in the statement: where the last quote
does not allow the order, the driver quotes the statement's price at its cancellation, or the
nearest price that allows it, whichever sets off none of the master's other waiting orders
(the statement cancelled them; it never filled them). Bid = ask can still set one off where
the real spread did not: the report lists it in ``unexpected``.

Money in another currency needs the conversion pair's quote at the deal (``fx``). Where the
symbol converts through itself (USDJPY on a USD account: the close price is the rate) the
statement determines the profit. Where it does not (GBPJPY, EURGBP, JP225 on a USD account;
EURUSD on a JPY account), the historical rate is not in the statement: the driver implies
it from the row's own profit (profit / price move x lots x contract size), so the replayed
profit matches the statement's by construction, not as a check; a row it cannot imply a rate
from (no profit, no price move) uses the pair's latest quote, and without one the venue
refuses the deal (10021) and the report says so.

Swap and commission are the statement's too. MT4's rollover rates and commission schedule
are not in the statement, only what each row booked: before every closing deal the driver sets
the position's accrued swap and entry commission so that the closed part carries exactly the
row's (the balance moves by the commission then, the swap with the deal, as the venue books
them). A venue that charges commission per lot of its own adds its exit commission on top:
replay on a venue configured without one.

HTML never reaches this module: it takes the parser's records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from connectors.paper import accounting as acc
from connectors.paper import fx
from connectors.paper.model import Result, SymbolConfig
from connectors.paper.prices import Quote
from connectors.paper.venue import PaperVenue
from engine.core.statements import StatementOrder, StatementTrade, server_time_ns
from schemas.common import OrderType
from schemas.master import MasterEvent

#: Order of actions in one second: a position opens before it is reduced or closed.
_OPEN, _REDUCE, _CLOSE, _PLACE, _CANCEL = 0, 1, 2, 0, 2


class ReplayMaster(Protocol):
    """What the driver trades through: a ``PaperTerminal`` (whose outbox then holds the
    master events for the connector to publish), or :class:`VenueMaster` for a bare venue."""

    venue: PaperVenue

    def on_quote(self, quote: Quote) -> list[MasterEvent]: ...

    def trade(self, action: Callable[[PaperVenue], Result]) -> Result: ...


class VenueMaster:
    """A bare venue as a :class:`ReplayMaster`: events come back, nothing is published."""

    def __init__(self, venue: PaperVenue) -> None:
        self.venue = venue

    def on_quote(self, quote: Quote) -> list[MasterEvent]:
        return self.venue.on_quote(quote)

    def trade(self, action: Callable[[PaperVenue], Result]) -> Result:
        return action(self.venue)


@dataclass(frozen=True, slots=True)
class ReplayAction:
    """One thing the statement says happened, at its time."""

    ts_ns: int
    step: int
    kind: str
    """``open``, ``reduce``, ``close``, ``place`` or ``cancel``."""
    ticket: int
    """The statement ticket of the row (open: the chain's first row)."""
    symbol: str
    volume: float
    price: float
    row: StatementTrade | StatementOrder
    chain_volume: float = 0.0


@dataclass(slots=True)
class ReplayReport:
    """What a replay did: the master's events in order, and what the venue refused."""

    events: list[MasterEvent] = field(default_factory=list)
    """Every master event, in order (the deals' and any the quotes set off)."""
    deals: list[tuple[ReplayAction, Result]] = field(default_factory=list)
    """Each action with the venue's answer."""
    refused: list[tuple[ReplayAction, str]] = field(default_factory=list)
    unexpected: list[MasterEvent] = field(default_factory=list)
    """Events the driver's quotes set off that the statement does not have (a trigger, a
    stop-out): a divergence from the statement."""
    positions: dict[int, str] = field(default_factory=dict)
    """Statement ticket (a chain's first row) → the venue's position id."""
    orders: dict[int, str] = field(default_factory=dict)
    implied_rates: dict[int, float] = field(default_factory=dict)
    """Statement ticket → the conversion rate implied from its profit (account money per
    unit of profit currency), where the statement does not determine it."""


def plan(
    chains: Iterable[Sequence[StatementTrade]],
    cancelled: Iterable[StatementOrder] = (),
    *,
    utc_offset: timedelta = timedelta(0),
) -> list[ReplayAction]:
    """The statement's positions (``Mt4Statement.chains()``) and cancelled pending orders as
    actions in time order. Statement times are server time; ``utc_offset`` is the server's."""

    def ns(moment: datetime) -> int:
        return server_time_ns(moment, utc_offset)

    actions: list[ReplayAction] = []
    for chain in chains:
        first = chain[0]
        total = round(sum(row.volume for row in chain), 8)
        actions.append(ReplayAction(ns(first.open_time), _OPEN, "open", first.ticket,
                                    first.symbol, total, first.open_price, first,
                                    total))  # fmt: skip
        for index, row in enumerate(chain):
            if row.close_time is None:
                break  # still open at statement time
            last = index == len(chain) - 1
            actions.append(ReplayAction(ns(row.close_time), _CLOSE if last else _REDUCE,
                                        "close" if last else "reduce", first.ticket,
                                        row.symbol, row.volume, row.close_price, row,
                                        total))  # fmt: skip
    for order in cancelled:
        actions.append(ReplayAction(ns(order.open_time), _PLACE, "place", order.ticket,
                                    order.symbol, order.volume, order.price, order))  # fmt: skip
        if order.close_time is not None:
            actions.append(ReplayAction(ns(order.close_time), _CANCEL, "cancel", order.ticket,
                                        order.symbol, order.volume, order.price,
                                        order))  # fmt: skip
    actions.sort(key=lambda a: (a.ts_ns, a.step, a.ticket))
    return actions


def replay(master: ReplayMaster, account: str, actions: Iterable[ReplayAction]) -> ReplayReport:
    """Run ``actions`` (from :func:`plan`) on ``account`` of ``master``'s venue."""
    return Replayer(master, account).run(actions)


class Replayer:
    """:func:`replay` in steps: ``run`` may be called again with the next actions (e.g. one at a
    time, publishing the master's events in between); ``report`` grows across the calls."""

    def __init__(self, master: ReplayMaster, account: str) -> None:
        self.master = master
        self.venue = master.venue
        self.account = account
        self.currency = self.venue.account_state(account).currency
        self.report = ReplayReport()

    def run(self, actions: Iterable[ReplayAction]) -> ReplayReport:
        for action in actions:
            cfg = self._symbol(action)
            if cfg is None:
                self.report.refused.append((action, f"the venue trades no {action.symbol!r}"))
                continue
            getattr(self, f"_{action.kind}")(action, cfg)
        return self.report

    # ------------------------------------------------------------------ actions

    def _open(self, action: ReplayAction, cfg: SymbolConfig) -> None:
        row = action.row
        assert isinstance(row, StatementTrade)
        self._quote(cfg.symbol, action.price, action.ts_ns)
        self._convert(action, cfg, row)
        self._margin_quote(action, cfg)
        result = self.master.trade(lambda v: v.market_order(
            self.account, cfg.symbol, row.side, action.volume, magic=row.magic,
            now_ns=action.ts_ns,
        ))  # fmt: skip
        if self._answer(action, result) and result.position_id:
            self.report.positions[action.ticket] = result.position_id

    def _reduce(self, action: ReplayAction, cfg: SymbolConfig) -> None:
        self._close_part(action, cfg, action.volume, "client")

    def _close(self, action: ReplayAction, cfg: SymbolConfig) -> None:
        row = action.row
        assert isinstance(row, StatementTrade)
        self._close_part(action, cfg, None, row.close_reason)

    def _close_part(
        self, action: ReplayAction, cfg: SymbolConfig, volume: float | None, reason: str
    ) -> None:
        row = action.row
        assert isinstance(row, StatementTrade)
        position_id = self.report.positions.get(action.ticket)
        if position_id is None:
            self.report.refused.append((action, "its position was never opened"))
            return
        self._quote(cfg.symbol, action.price, action.ts_ns)
        self._convert(action, cfg, row)

        def deal(venue: PaperVenue) -> Result:
            _book_statement_charges(venue, self.account, position_id, volume, row)
            return venue.close_position(
                self.account, position_id, volume, now_ns=action.ts_ns, reason=reason
            )

        self._answer(action, self.master.trade(deal))

    def _place(self, action: ReplayAction, cfg: SymbolConfig) -> None:
        order = action.row
        assert isinstance(order, StatementOrder)
        # The market price at placement is not in the statement; the one at cancellation
        # is, and the order was still waiting then.
        if not self._valid_for_pending(cfg, order):
            self._quote(cfg.symbol, self._placement_price(cfg, order), action.ts_ns)
        result = self.master.trade(lambda v: v.place_pending(
            self.account, cfg.symbol, order.order_type, order.volume, order.price,
            sl=order.sl, tp=order.tp, magic=order.magic, now_ns=action.ts_ns,
        ))  # fmt: skip
        if self._answer(action, result) and result.order_id:
            self.report.orders[action.ticket] = result.order_id

    def _cancel(self, action: ReplayAction, cfg: SymbolConfig) -> None:
        order_id = self.report.orders.get(action.ticket)
        if order_id is None:
            self.report.refused.append((action, "its pending order was never placed"))
            return
        result = self.master.trade(
            lambda v: v.cancel_pending(self.account, order_id, now_ns=action.ts_ns)
        )
        self._answer(action, result)

    # ------------------------------------------------------------------- quotes

    def _quote(self, symbol: str, price: float, ts_ns: int) -> None:
        """Quote ``symbol`` at exactly ``price``: a market deal fills there either way."""
        quote = Quote(symbol=symbol, bid=price, ask=price, ts_ns=ts_ns)
        events = self.master.on_quote(quote)
        self.report.events.extend(events)
        self.report.unexpected.extend(events)

    def _convert(self, action: ReplayAction, cfg: SymbolConfig, row: StatementTrade) -> None:
        """Quote the conversion pair at the rate the row's profit implies, where the
        statement does not determine it (see the module docstring)."""
        conversion = fx.find_conversion(self.venue.symbols, cfg.profit_currency, self.currency)
        if conversion is None or not conversion.legs:
            return
        if len(conversion.legs) == 1 and conversion.legs[0].pair == cfg.symbol:
            return  # the symbol converts itself at the deal's own price
        implied = _implied_rate(cfg, row)
        if implied is not None and self._quote_rate(conversion, implied, action.ts_ns, cfg.symbol):
            self.report.implied_rates[row.ticket] = implied

    def _margin_quote(self, action: ReplayAction, cfg: SymbolConfig) -> None:
        """A pair's margin is in its base currency: without a quote converting that to the
        account currency, derive one from the pair's own price and the profit conversion."""
        source = cfg.margin_ccy
        conversion = fx.find_conversion(self.venue.symbols, source, self.currency)
        if conversion is None or source != cfg.base_currency:
            return
        if len(self._quotes(conversion)) == len(conversion.legs):
            return
        profit = fx.find_conversion(self.venue.symbols, cfg.profit_currency, self.currency)
        if profit is None:
            return
        profit_rate = fx.rate(profit, self._quotes(profit), larger=False)
        if profit_rate is not None:
            self._quote_rate(conversion, action.price * profit_rate, action.ts_ns, cfg.symbol)

    def _quote_rate(self, conversion: fx.Conversion, rate: float, ts_ns: int, traded: str) -> bool:
        """Quote one pair of ``conversion`` (never the ``traded`` symbol, whose price is the
        deal's) so that it converts at ``rate``, the other legs at their latest quotes; False
        when one of those has no quote."""
        free = [leg for leg in conversion.legs if leg.pair != traded]
        if not free:
            return False
        leg = free[-1]
        rest = [other for other in conversion.legs if other is not leg]
        factor = 1.0
        for other in rest:
            quote = self.venue.quote(other.pair)
            if quote is None:
                return False
            factor *= quote.bid if other.multiply else 1 / quote.bid
        first_rate = rate / factor
        self._quote(leg.pair, first_rate if leg.multiply else 1 / first_rate, ts_ns)
        return True

    def _quotes(self, conversion: fx.Conversion) -> dict[str, Quote]:
        quotes = {}
        for leg in conversion.legs:
            quote = self.venue.quote(leg.pair)
            if quote is not None:
                quotes[leg.pair] = quote
        return quotes

    def _placement_price(self, cfg: SymbolConfig, order: StatementOrder) -> float:
        """A market price at which ``order`` may be placed: the statement's (at its
        cancellation), else the nearest valid one, whichever sets off none of the master's
        other waiting orders; the statement says those were cancelled, never filled, and
        the statement's price an hour later is no reason to fill them now."""
        gap = (max(cfg.stops_level_points, 0) + 1) * cfg.point
        market_above = order.order_type in (OrderType.BUY_LIMIT, OrderType.SELL_STOP)
        nearest = round(order.price + gap if market_above else order.price - gap, cfg.digits)
        for price in (order.market_price, nearest):
            quote = Quote(symbol=cfg.symbol, bid=price, ask=price, ts_ns=0)
            valid = acc.pending_price_error(cfg, order.order_type, order.price, quote) is None
            if valid and not self._sets_off_a_waiting_order(quote):
                return price
        return order.market_price

    def _sets_off_a_waiting_order(self, quote: Quote) -> bool:
        return any(
            waiting.symbol == quote.symbol
            and acc.pending_triggered(waiting.order_type, waiting.price, quote)
            for waiting in self.venue.pending_orders(self.account)
        )

    def _valid_for_pending(self, cfg: SymbolConfig, order: StatementOrder) -> bool:
        quote = self.venue.quote(cfg.symbol)
        if quote is None:
            return False
        return acc.pending_price_error(cfg, order.order_type, order.price, quote) is None

    # ------------------------------------------------------------------- answers

    def _answer(self, action: ReplayAction, result: Result) -> bool:
        self.report.deals.append((action, result))
        self.report.events.extend(result.transactions)
        if not result.ok:
            self.report.refused.append((action, f"{result.retcode}: {result.reason}"))
        return result.ok

    def _symbol(self, action: ReplayAction) -> SymbolConfig | None:
        name = self.venue.resolve(action.symbol)
        return None if name is None else self.venue.symbols[name]


def _book_statement_charges(
    venue: PaperVenue, account: str, position_id: str, volume: float | None, row: StatementTrade
) -> None:
    """Give the position the accrued swap and entry commission whose share for closing
    ``volume`` (None: all) is the row's, and move the balance by the commission (see the module
    docstring). The venue has no request for this: it is the statement's broker's doing."""
    position = venue.position(account, position_id)
    if position is None or position.volume <= 0:
        return  # the close is refused, and says why
    cfg = venue.symbols[position.symbol]
    closing = position.volume if volume is None else acc.normalize_volume(volume, cfg)
    share = closing / position.volume
    # The venue's close takes this share of both (``Ledger.book_close``): the row's amounts.
    venue.set_position_charges(
        account, position_id, swap=row.swap / share, commission=row.commission / share
    )


def _implied_rate(cfg: SymbolConfig, row: StatementTrade) -> float | None:
    """Account money per unit of profit currency that turns the row's price move into its
    booked profit; None when the row has no profit or no move to imply it from."""
    if row.close_time is None:
        return None
    moved = acc.deal_profit(cfg, row.side, row.volume, row.open_price, row.close_price)
    if not moved or not row.profit or (moved > 0) != (row.profit > 0):
        return None
    return row.profit / moved
