"""Execution reports of one follower order, built the same way by every connector."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from schemas.common import Side, Trace
from schemas.orders import FollowerClose, FollowerOpen, FollowerOrder
from schemas.reports import (
    OrderDone,
    OrderFilled,
    OrderPartiallyFilled,
    OrderRejected,
    OrderUnknown,
)

#: Rejections tradecopy decides itself, not the venue, carry codes of their own, above every
#: MetaTrader retcode (10004–10068), so a report never claims the venue said what it did not.
#: The signal was older than the link's max signal age when it reached the connector.
RETCODE_EXPIRED = 90001
#: The follower's price was further from the master's fill than the link's max deviation
#: (after waiting for a better one, when the link says so).
RETCODE_PRICE_DEVIATION = 90002
EXPIRED_REASON = "signal expired before execution (max signal age)"
#: A manual modify or close named a position id the account does not hold: a person chose the
#: id (``schemas.orders``, ``manual``), so unlike a copy's missing target it is an error to show.
RETCODE_NO_SUCH_POSITION = 90003
NO_SUCH_POSITION = "this account holds no open position with that id"
#: A partial close on a symbol whose volume step the terminal never said: unsized, it would
#: close the whole position.
RETCODE_NO_SYMBOL_SPEC = 90004
#: ``done`` details of an order whose target this follower never copied: nothing to do.
NO_POSITION_COPY = "no copy of that master position on this account"
NO_PENDING_COPY = "no copy of that pending order on this account"
NOT_BOTH_COPIES = "this account does not hold both copies"


def slippage(side: Side, price: float, master_price: float) -> float:
    """How much worse than the master's fill the follower filled, in price units: positive
    is worse for the follower. 0 when either price is unknown."""
    if master_price <= 0 or price <= 0:
        return 0.0
    return round(price - master_price if side is Side.BUY else master_price - price, 10)


@dataclass(frozen=True, slots=True)
class OrderReports:
    """The reports one follower order can end in, each carrying the order's ids and trace.

    The connector runtime creates it when the order arrives (``connectors.contract``); a
    terminal builds its outcome with exactly one of these methods.
    """

    order: FollowerOrder
    trace: Trace
    signal_expired: bool = False
    """An open that arrived after its ``expires_ns``: decided once, at receipt. The terminal
    still first looks whether the order ran before (then it reports that), else it reports
    ``expired()`` without trading."""

    @property
    def master_price(self) -> float:
        order = self.order
        return order.master_price if isinstance(order, FollowerOpen | FollowerClose) else 0.0

    def done(self, detail: str, position_ids: Iterable[str] = ()) -> OrderDone:
        order = self.order
        return OrderDone(order_id=order.order_id, link_id=order.link_id, follower=order.follower,
                         ts_ns=time.time_ns(), trace=self.trace, detail=detail,
                         position_ids=list(position_ids))  # fmt: skip

    def rejected(self, code: int, reason: str) -> OrderRejected:
        """Only on the venue's definitive answer (or a rule the order itself carries)."""
        order = self.order
        return OrderRejected(order_id=order.order_id, link_id=order.link_id,
                             follower=order.follower, ts_ns=time.time_ns(), trace=self.trace,
                             code=int(code), reason=reason)  # fmt: skip

    def unknown(self, reason: str) -> OrderUnknown:
        order = self.order
        return OrderUnknown(order_id=order.order_id, link_id=order.link_id,
                            follower=order.follower, ts_ns=time.time_ns(), trace=self.trace,
                            reason=reason)  # fmt: skip

    def expired(self) -> OrderRejected:
        return self.rejected(RETCODE_EXPIRED, EXPIRED_REASON)

    def filled(
        self, symbol: str, position_id: str, side: Side, volume: float, price: float,
        *, terminal_ns: int | None = None,
    ) -> OrderFilled:  # fmt: skip
        """A fill; ``terminal_ns`` is when the venue filled it now (not for a fill found
        from before), stamped as the trace's ``follower_terminal_ns``."""
        order, master_price = self.order, self.master_price
        return OrderFilled(
            order_id=order.order_id, link_id=order.link_id, follower=order.follower,
            ts_ns=time.time_ns(), trace=self._stamped(terminal_ns), symbol=symbol,
            position_id=position_id, side=side, volume=volume, price=price,
            master_price=master_price, slippage=slippage(side, price, master_price),
        )  # fmt: skip

    def partially_filled(
        self, symbol: str, position_id: str, side: Side, volume_requested: float,
        volume_filled: float, price: float, *, terminal_ns: int | None = None,
    ) -> OrderPartiallyFilled:  # fmt: skip
        order, master_price = self.order, self.master_price
        return OrderPartiallyFilled(
            order_id=order.order_id, link_id=order.link_id, follower=order.follower,
            ts_ns=time.time_ns(), trace=self._stamped(terminal_ns), symbol=symbol,
            position_id=position_id, side=side, volume_requested=volume_requested,
            volume_filled=volume_filled, price=price, master_price=master_price,
            slippage=slippage(side, price, master_price),
        )  # fmt: skip

    def _stamped(self, terminal_ns: int | None) -> Trace:
        if terminal_ns is None:
            return self.trace
        return msgspec.structs.replace(self.trace, follower_terminal_ns=terminal_ns)
