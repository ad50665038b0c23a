"""An account's book as a pure fold over its facts: positions, copies, outcomes, cash.

``fold_account(account, facts)`` takes what the ledger stored for one account — master events,
follower orders, execution reports, copy decisions and account states, in time order — and
returns an ``AccountBook``. ``AccountFold`` is the same fold one fact at a time.

How facts become positions:

- The account's own master events (``event.master == account``) are authoritative: opens,
  reductions (MT4 re-keys the remainder to ``new_position_id``), closes, close-by, pending orders
  placed / modified / cancelled / triggered.
- Fills of its follower orders (``report.follower == account``) open copies and close them; a
  fill of an open is the copy map's entry: follower position ↔ master position ↔ link.
  ``OrderDone`` of a close-all or close-by closes the positions it names (price unknown).
- A position seen by both (a follower account whose terminal also publishes its own events)
  is counted once: a close of volume already closed is ignored.

Close reasons: ``sl``, ``tp`` and ``stop_out`` as the terminal says; a copy closed because its
master closed is ``master_close``, by a link's protection (close-all) ``protection``, by an
opposite position ``close_by``; anything else the account did itself is ``manual``.

Money (profit, commission, swap, balances) is integer minor units of the account currency,
rounded half-even; ``None`` where the venue did not report it. Deposits and withdrawals are the
balance changes between two account states that the closes reported in between do not explain
(tolerance: one minor unit per close, the rounding of each reported amount); an interval with a
close of unknown profit explains nothing and flags nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from decimal import Decimal

import msgspec

from engine.core.comments import is_copy
from engine.core.money import to_minor
from schemas.account import AccountState
from schemas.common import OrderType, Side
from schemas.decisions import CopyDecision, DecisionOutcome
from schemas.master import (
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingPlace,
)
from schemas.reports import (
    OrderDone,
    OrderFilled,
    OrderPartiallyFilled,
    OrderRejected,
    OrderUnknown,
)

_FOLLOWER_ORDERS = (
    FollowerOpen, FollowerClose, FollowerCloseAll, FollowerCloseBy, FollowerPendingPlace,
    FollowerPendingCancel,
)  # fmt: skip
#: Volumes equal within this are equal (lots are multiples of 0.01 or coarser).
VOLUME_EPSILON = 1e-9


class CloseReason(enum.StrEnum):
    SL = "sl"
    TP = "tp"
    STOP_OUT = "stop_out"
    MASTER_CLOSE = "master_close"
    PROTECTION = "protection"
    CLOSE_BY = "close_by"
    MANUAL = "manual"


_TERMINAL_REASONS = {"sl": CloseReason.SL, "tp": CloseReason.TP, "stop_out": CloseReason.STOP_OUT}


class CopyRef(msgspec.Struct, frozen=True, kw_only=True):
    """Which master position (through which link) a follower position copies."""

    link_id: str
    master: str
    master_position_id: str


class OpenPosition(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    position_id: str
    origin_position_id: str
    """The first ticket of the position (MT4 re-keys it on every partial close)."""
    symbol: str
    side: Side
    volume: float
    open_price: float
    open_ts_ns: int
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: str = ""
    balance_at_open: int | None = None
    """The account balance (minor units) at the last account state before the open."""
    copy: CopyRef | None = None

    @property
    def is_copy(self) -> bool:
        return self.copy is not None or is_copy(self.comment)


class PendingOrder(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    order_id: str
    symbol: str
    order_type: OrderType
    volume: float
    price: float
    placed_ts_ns: int
    sl: float | None = None
    tp: float | None = None
    expiration_ns: int = 0
    magic: int = 0
    comment: str = ""
    copy: CopyRef | None = None


class ClosedPosition(msgspec.Struct, frozen=True, kw_only=True):
    """One close: the whole position, or the part a partial close took."""

    account: str
    position_id: str
    origin_position_id: str
    symbol: str
    side: Side
    volume: float
    open_price: float
    open_ts_ns: int
    close_price: float | None
    """``None`` when the close is known only from an order's done report."""
    close_ts_ns: int
    reason: CloseReason
    profit: int | None = None
    commission: int | None = None
    swap: int | None = None
    remainder_id: str | None = None
    """Set on a partial close: the id the rest of the position now has."""
    balance_at_open: int | None = None
    copy: CopyRef | None = None
    comment: str = ""

    @property
    def is_copy(self) -> bool:
        return self.copy is not None or is_copy(self.comment)

    @property
    def net(self) -> int | None:
        """Profit + commission + swap (minor units); ``None`` when the profit is unknown."""
        if self.profit is None:
            return None
        return self.profit + (self.commission or 0) + (self.swap or 0)


class CopyMapEntry(msgspec.Struct, frozen=True, kw_only=True):
    link_id: str
    follower: str
    follower_position_id: str
    master: str
    master_position_id: str
    open_order_id: str


class OrderOutcome(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    order_type: str
    master_event_id: str
    status: str
    """``sent`` (no report yet), ``filled``, ``partially_filled``, ``done``, ``rejected``,
    ``unknown``."""
    reason: str = ""
    slippage: float | None = None
    latency_ns: int | None = None
    """Master terminal time → follower fill time (the trace's stamps; the report's time when
    the venue did not stamp the fill); ``None`` without a master stamp or a fill."""


class LinkOutcome(msgspec.Struct, kw_only=True):
    link_id: str
    master: str
    copied: int = 0
    """Opens filled (wholly or partly)."""
    skipped: int = 0
    skipped_by_rule: dict[str, int] = {}
    rejected: int = 0
    unknown: int = 0
    orders: list[OrderOutcome] = []


class BalanceSample(msgspec.Struct, frozen=True, kw_only=True):
    ts_ns: int
    balance: int
    equity: int
    cash_flow: int = 0
    """The deposit (+) or withdrawal (−) this sample is the first to hold, if any."""


class CashFlow(msgspec.Struct, frozen=True, kw_only=True):
    ts_ns: int
    amount: int
    """Minor units: positive a deposit, negative a withdrawal."""
    kind: str
    """``deposit`` or ``withdrawal``."""


class AccountBook(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    currency: str | None
    open_positions: list[OpenPosition]
    pending_orders: list[PendingOrder]
    closed_positions: list[ClosedPosition]
    copy_map: list[CopyMapEntry]
    links: dict[str, LinkOutcome]
    balance_series: list[BalanceSample]
    cash_flows: list[CashFlow]


def fold_account(account: str, facts: Iterable[object], currency: str | None = None) -> AccountBook:
    """The account's read models from its facts in time order (see the module docstring).

    ``currency`` defaults to the first account state's; without either, money stays ``None``.
    """
    facts = list(facts)
    if currency is None:
        currency = next(
            (f.currency for f in facts if isinstance(f, AccountState) and f.account == account),
            None,
        )
    fold = AccountFold(account, currency)
    for fact in facts:
        fold.apply(fact)
    return fold.book()


class AccountFold:
    """The fold of ``fold_account``, one fact at a time."""

    def __init__(self, account: str, currency: str | None = None) -> None:
        self.account = account
        self.currency = currency
        self._open: dict[str, OpenPosition] = {}
        self._pending: dict[str, PendingOrder] = {}
        self._closed: list[ClosedPosition] = []
        self._closed_ids: set[str] = set()
        self._copy_map: dict[str, CopyMapEntry] = {}
        self._copy_of: dict[tuple[str, str], str] = {}
        self._orders: dict[str, FollowerOrder] = {}
        self._outcomes: dict[str, OrderOutcome] = {}
        self._links: dict[str, LinkOutcome] = {}
        self._expected_reason: dict[str, CloseReason] = {}
        self._series: list[BalanceSample] = []
        self._flows: list[CashFlow] = []
        self._explained = 0
        self._closes_since_sample = 0
        self._unexplainable = False

    # -- entry point -------------------------------------------------------------------------

    def apply(self, fact: object) -> None:
        if isinstance(fact, AccountState):
            if fact.account == self.account:
                self._account_state(fact)
        elif isinstance(fact, CopyDecision):
            if fact.follower == self.account:
                self._decision(fact)
        elif isinstance(fact, OrderFilled | OrderPartiallyFilled | OrderDone):
            if fact.follower == self.account:
                self._report(fact)
        elif isinstance(fact, OrderRejected | OrderUnknown):
            if fact.follower == self.account:
                self._failed(fact)
        elif isinstance(fact, _FOLLOWER_ORDERS):
            if fact.follower == self.account:
                self._order(fact)
        elif getattr(fact, "master", None) == self.account:
            self._master_event(fact)

    def book(self) -> AccountBook:
        return AccountBook(
            account=self.account,
            currency=self.currency,
            open_positions=list(self._open.values()),
            pending_orders=list(self._pending.values()),
            closed_positions=list(self._closed),
            copy_map=list(self._copy_map.values()),
            links={k: _frozen_link(v, self._outcomes) for k, v in self._links.items()},
            balance_series=list(self._series),
            cash_flows=list(self._flows),
        )

    # -- money ---------------------------------------------------------------------------------

    def _minor(self, amount: float | None) -> int | None:
        if amount is None or self.currency is None:
            return None
        return to_minor(Decimal(repr(float(amount))), self.currency)

    def _balance_now(self) -> int | None:
        return self._series[-1].balance if self._series else None

    # -- the account's own events ------------------------------------------------------------

    def _master_event(self, event: object) -> None:
        if isinstance(event, PositionOpened):
            self._opened(event.position_id, event.symbol, event.side, event.volume, event.price,
                         event.ts_ns, event.sl, event.tp, event.magic, event.comment)  # fmt: skip
        elif isinstance(event, PendingOrderTriggered):
            self._pending.pop(event.order_id, None)
            self._opened(event.position_id, event.symbol, event.side, event.volume, event.price,
                         event.ts_ns, event.sl, event.tp, event.magic, "")  # fmt: skip
        elif isinstance(event, PositionModified):
            held = self._open.get(event.position_id)
            if held is not None:
                self._open[event.position_id] = msgspec.structs.replace(
                    held, sl=event.sl, tp=event.tp
                )
        elif isinstance(event, PositionReduced):
            closed = _lots(event.volume_before - event.volume_after)
            self._close(event.position_id, closed, event.price, event.ts_ns, CloseReason.MANUAL,
                        event.profit, event.commission, event.swap,
                        new_id=event.new_position_id)  # fmt: skip
        elif isinstance(event, PositionClosed):
            reason = _TERMINAL_REASONS.get(event.reason, CloseReason.MANUAL)
            self._close(event.position_id, event.volume, event.price, event.ts_ns, reason,
                        event.profit, event.commission, event.swap)  # fmt: skip
        elif isinstance(event, PositionClosedBy):
            self._closed_by(event.position_id, event.opposite_position_id, event.volume,
                            event.ts_ns, event.profit, event.commission, event.swap)  # fmt: skip
        elif isinstance(event, PendingOrderPlaced):
            self._pending[event.order_id] = PendingOrder(
                account=self.account, order_id=event.order_id, symbol=event.symbol,
                order_type=event.order_type, volume=event.volume, price=event.price,
                placed_ts_ns=event.ts_ns, sl=event.sl, tp=event.tp,
                expiration_ns=event.expiration_ns, magic=event.magic, comment=event.comment,
            )  # fmt: skip
        elif isinstance(event, PendingOrderModified):
            held_order = self._pending.get(event.order_id)
            if held_order is not None:
                self._pending[event.order_id] = msgspec.structs.replace(
                    held_order, price=event.price, sl=event.sl, tp=event.tp,
                    expiration_ns=event.expiration_ns,
                )  # fmt: skip
        elif isinstance(event, PendingOrderCancelled):
            self._pending.pop(event.order_id, None)

    def _opened(
        self, position_id: str, symbol: str, side: Side, volume: float, price: float, ts_ns: int,
        sl: float | None, tp: float | None, magic: int, comment: str,
        copy: CopyRef | None = None,
    ) -> None:  # fmt: skip
        held = self._open.get(position_id)
        if held is not None:  # seen already from the other side (event vs report)
            if copy is not None and held.copy is None:
                self._open[position_id] = msgspec.structs.replace(held, copy=copy)
            return
        if position_id in self._closed_ids:
            return  # a late duplicate of a position already closed
        self._open[position_id] = OpenPosition(
            account=self.account, position_id=position_id, origin_position_id=position_id,
            symbol=symbol, side=side, volume=volume, open_price=price, open_ts_ns=ts_ns, sl=sl,
            tp=tp, magic=magic, comment=comment, balance_at_open=self._balance_now(), copy=copy,
        )  # fmt: skip

    def _close(
        self, position_id: str, volume: float, price: float | None, ts_ns: int,
        reason: CloseReason, profit: float | None, commission: float | None,
        swap: float | None, *, new_id: str | None = None,
    ) -> None:  # fmt: skip
        held = self._open.get(position_id)
        if held is None or volume <= VOLUME_EPSILON:
            return  # unknown position, or a close already counted from the other side
        if reason is CloseReason.MANUAL:
            reason = self._expected_reason.get(position_id, reason)
        volume = _lots(min(volume, held.volume))
        rest = _lots(held.volume - volume)
        remainder = rest > VOLUME_EPSILON
        remainder_id = (new_id or position_id) if remainder else None
        self._closed.append(ClosedPosition(
            account=self.account, position_id=position_id,
            origin_position_id=held.origin_position_id, symbol=held.symbol, side=held.side,
            volume=volume, open_price=held.open_price, open_ts_ns=held.open_ts_ns,
            close_price=price, close_ts_ns=ts_ns, reason=reason, profit=self._minor(profit),
            commission=self._minor(commission), swap=self._minor(swap),
            remainder_id=remainder_id, balance_at_open=held.balance_at_open, copy=held.copy,
            comment=held.comment,
        ))  # fmt: skip
        self._closes_since_sample += 1
        if profit is None or self.currency is None:
            self._unexplainable = True
        else:
            self._explained += self._closed[-1].net or 0
        del self._open[position_id]
        if not remainder or remainder_id != position_id:
            self._closed_ids.add(position_id)
        self._expected_reason.pop(position_id, None)
        if remainder and remainder_id is not None:
            self._open[remainder_id] = msgspec.structs.replace(
                held, position_id=remainder_id, volume=rest
            )
            if held.copy is not None:
                self._rekey_copy(position_id, remainder_id)

    def _closed_by(
        self, position_id: str, opposite_id: str, volume: float, ts_ns: int,
        profit: float | None, commission: float | None, swap: float | None,
    ) -> None:  # fmt: skip
        first, second = self._open.get(position_id), self._open.get(opposite_id)
        if first is None or second is None:
            return
        # MetaTrader closes the position at the opposite's open price; the opposite closes at
        # its own open price and carries no profit of its own.
        self._close(position_id, volume, second.open_price, ts_ns, CloseReason.CLOSE_BY,
                    profit, commission, swap)  # fmt: skip
        self._close(opposite_id, volume, second.open_price, ts_ns, CloseReason.CLOSE_BY,
                    0.0 if profit is not None else None, None, None)  # fmt: skip

    def _rekey_copy(self, old: str, new: str) -> None:
        entry = self._copy_map.pop(old, None)
        if entry is not None:
            self._copy_map[new] = msgspec.structs.replace(entry, follower_position_id=new)
            self._copy_of[(entry.link_id, entry.master_position_id)] = new

    # -- follower orders and their reports ---------------------------------------------------

    def _link(self, link_id: str, master: str) -> LinkOutcome:
        link = self._links.get(link_id)
        if link is None:
            link = self._links[link_id] = LinkOutcome(
                link_id=link_id, master=master, skipped_by_rule={}, orders=[]
            )
        return link

    def _order(self, order: FollowerOrder) -> None:
        if order.order_id in self._orders:
            return  # redelivered
        self._orders[order.order_id] = order
        link = self._link(order.link_id, order.master)
        link.orders.append(
            OrderOutcome(
                order_id=order.order_id,
                order_type=_kind(order),
                master_event_id=order.master_event_id,
                status="sent",
            )
        )
        # A terminal's own event of this close may come before the order's report: it is then
        # the master's close (or protection), not the follower's own.
        if isinstance(order, FollowerClose):
            held = self._copy_of.get((order.link_id, order.master_position_id))
            if held is not None:
                self._expected_reason[held] = CloseReason.MASTER_CLOSE
        elif isinstance(order, FollowerCloseAll):
            for entry in self._copy_map.values():
                if entry.link_id == order.link_id:
                    self._expected_reason[entry.follower_position_id] = CloseReason.PROTECTION

    def _report(self, report: OrderFilled | OrderPartiallyFilled | OrderDone) -> None:
        order = self._orders.get(report.order_id)
        if order is None or self._settled(report.order_id):
            # an order this account never stored, or a redelivered report: nothing to add
            return
        self._record(report, order)
        if isinstance(report, OrderDone):
            self._done(report, order)
            return
        volume = report.volume if isinstance(report, OrderFilled) else report.volume_filled
        if isinstance(order, FollowerOpen):
            if volume <= VOLUME_EPSILON:
                return
            copy = CopyRef(link_id=order.link_id, master=order.master,
                           master_position_id=order.master_position_id)  # fmt: skip
            self._opened(report.position_id, report.symbol, report.side, volume, report.price,
                         report.ts_ns, order.sl, order.tp, order.magic, order.comment,
                         copy=copy)  # fmt: skip
            self._copy_map[report.position_id] = CopyMapEntry(
                link_id=order.link_id, follower=self.account,
                follower_position_id=report.position_id, master=order.master,
                master_position_id=order.master_position_id, open_order_id=order.order_id,
            )  # fmt: skip
            self._copy_of[(order.link_id, order.master_position_id)] = report.position_id
            if order.master_order_id is not None:
                self._pending.pop(f"{order.link_id}:{order.master_order_id}", None)
        elif isinstance(order, FollowerClose):
            key = (order.link_id, order.master_position_id)
            position_id = report.position_id or self._copy_of.get(key, "")
            self._close(position_id, volume, report.price, report.ts_ns,
                        CloseReason.MASTER_CLOSE, report.profit, report.commission,
                        report.swap)  # fmt: skip
            remaining = self._open.get(position_id)
            if remaining is None:
                self._copy_of.pop(key, None)
            elif order.new_master_position_id:  # the master's remainder has a new ticket
                self._copy_of.pop(key, None)
                self._copy_of[(order.link_id, order.new_master_position_id)] = position_id
                entry = self._copy_map.get(position_id)
                if entry is not None:
                    self._copy_map[position_id] = msgspec.structs.replace(
                        entry, master_position_id=order.new_master_position_id
                    )
                self._open[position_id] = msgspec.structs.replace(
                    remaining, copy=CopyRef(link_id=order.link_id, master=order.master,
                                            master_position_id=order.new_master_position_id),
                )  # fmt: skip

    def _done(self, report: OrderDone, order: FollowerOrder) -> None:
        if isinstance(order, FollowerCloseAll):
            for position_id in report.position_ids:
                held = self._open.get(position_id)
                if held is not None:
                    self._close(position_id, held.volume, None, report.ts_ns,
                                CloseReason.PROTECTION, None, None, None)  # fmt: skip
        elif isinstance(order, FollowerCloseBy) and len(report.position_ids) == 2:
            first, second = (self._open.get(p) for p in report.position_ids)
            if first is not None and second is not None:
                volume = min(first.volume, second.volume)
                for held in (first, second):
                    self._close(held.position_id, volume, None, report.ts_ns,
                                CloseReason.CLOSE_BY, None, None, None)  # fmt: skip
        elif isinstance(order, FollowerPendingPlace):
            key = f"{order.link_id}:{order.master_order_id}"
            self._pending[key] = PendingOrder(
                account=self.account, order_id=report.position_ids[0] if report.position_ids
                else key, symbol=order.symbol, order_type=order.order_type,
                volume=order.volume, price=order.price, placed_ts_ns=report.ts_ns, sl=order.sl,
                tp=order.tp, expiration_ns=order.expiration_ns, magic=order.magic,
                comment=order.comment,
                copy=CopyRef(link_id=order.link_id, master=order.master,
                             master_position_id=order.master_order_id),
            )  # fmt: skip
        elif isinstance(order, FollowerPendingCancel):
            self._pending.pop(f"{order.link_id}:{order.master_order_id}", None)

    def _failed(self, report: OrderRejected | OrderUnknown) -> None:
        order = self._orders.get(report.order_id)
        if order is None or self._settled(report.order_id):
            return
        self._record(report, order)

    def _settled(self, order_id: str) -> bool:
        """The order has its definitive report already (``unknown`` is not definitive:
        reconciliation settles it with a later report)."""
        outcome = self._outcomes.get(order_id)
        return outcome is not None and outcome.status != "unknown"

    def _record(self, report: object, order: FollowerOrder) -> None:
        link = self._link(order.link_id, order.master)
        previous = self._outcomes.get(order.order_id)
        was_unknown = previous is not None and previous.status == "unknown"
        link.unknown += int(isinstance(report, OrderUnknown)) - int(was_unknown)
        status = _status(report)
        reason = getattr(report, "reason", "") or getattr(report, "detail", "")
        slippage = getattr(report, "slippage", None)
        trace = report.trace  # type: ignore[attr-defined]
        latency = None
        if trace.terminal_ns and isinstance(report, OrderFilled | OrderPartiallyFilled):
            # the venue's fill stamp; a fill found from before has none: the report's time
            filled_at = trace.follower_terminal_ns or report.ts_ns
            latency = filled_at - trace.terminal_ns
        self._outcomes[order.order_id] = OrderOutcome(
            order_id=order.order_id, order_type=_kind(order),
            master_event_id=order.master_event_id, status=status, reason=reason,
            slippage=slippage if isinstance(report, OrderFilled | OrderPartiallyFilled) else None,
            latency_ns=latency,
        )  # fmt: skip
        if isinstance(order, FollowerOpen) and isinstance(
            report, OrderFilled | OrderPartiallyFilled
        ):
            link.copied += 1
        elif isinstance(report, OrderRejected):
            link.rejected += 1

    def _decision(self, decision: CopyDecision) -> None:
        if decision.outcome is not DecisionOutcome.SKIPPED:
            return
        link = self._link(decision.link_id, decision.master)
        link.skipped += 1
        rule = str(decision.rule)
        link.skipped_by_rule[rule] = link.skipped_by_rule.get(rule, 0) + 1

    # -- balance and equity ------------------------------------------------------------------

    def _account_state(self, state: AccountState) -> None:
        if self.currency is None:
            self.currency = state.currency
        balance = self._minor(state.balance)
        equity = self._minor(state.equity)
        if balance is None or equity is None:
            return
        previous = self._balance_now()
        flow = 0
        if previous is not None and not self._unexplainable:
            unexplained = balance - previous - self._explained
            if abs(unexplained) > self._closes_since_sample:
                flow = unexplained
                kind = "deposit" if unexplained > 0 else "withdrawal"
                self._flows.append(CashFlow(ts_ns=state.ts_ns, amount=unexplained, kind=kind))
        self._series.append(
            BalanceSample(ts_ns=state.ts_ns, balance=balance, equity=equity, cash_flow=flow)
        )
        self._explained = 0
        self._closes_since_sample = 0
        self._unexplainable = False


def _lots(volume: float) -> float:
    """A volume free of float noise (0.3 − 0.2 is 0.09999999999999998): lots have at most 8
    decimals on every venue."""
    return round(volume, 8)


def _kind(order: FollowerOrder) -> str:
    return type(order).__struct_config__.tag  # type: ignore[return-value]


def _status(report: object) -> str:
    return str(type(report).__struct_config__.tag)  # type: ignore[attr-defined]


def _frozen_link(link: LinkOutcome, outcomes: dict[str, OrderOutcome]) -> LinkOutcome:
    return LinkOutcome(
        link_id=link.link_id, master=link.master, copied=link.copied, skipped=link.skipped,
        skipped_by_rule=dict(link.skipped_by_rule), rejected=link.rejected,
        unknown=link.unknown, orders=[outcomes.get(o.order_id, o) for o in link.orders],
    )  # fmt: skip
