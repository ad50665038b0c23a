"""Where the weekly fees read their facts: the ``FactsSource`` protocol and the ledger's views.

``LedgerViewFacts`` reads only the ledger's documented read views
(``engine/ledger/migrations/0002_read_views.sql``): closing equity from
``ledger_account_balances``, closed copy volume from ``ledger_account_facts`` (the follower's
close orders joined to their fill reports, by order id). Deposits and withdrawals are not in
the trading contract; they come from billing's own ``billing_cash_flows``.
"""

from __future__ import annotations

from typing import Any, Protocol

import asyncpg

from engine.billing import store
from engine.billing.facts import (
    CashFlow,
    CashFlowKind,
    ClosedVolume,
    CopiedTrade,
    EquitySample,
    lots_from_wire,
)
from engine.billing.windows import BillingWindow
from schemas.codec import execution_report_decoder, follower_order_decoder
from schemas.orders import FollowerClose, FollowerCloseAll, FollowerCloseBy, FollowerOpen
from schemas.reports import OrderFilled, OrderPartiallyFilled


class FactsSource(Protocol):
    async def closing_equity(self, follower: str, before_ns: int) -> EquitySample | None:
        """The follower's last equity sample strictly before ``before_ns``."""
        ...

    async def cash_flows(self, follower: str, after_ns: int, until_ns: int) -> list[CashFlow]:
        """Deposits and withdrawals in ``(after_ns, until_ns]``."""
        ...

    async def closed_volume(self, follower: str, window: BillingWindow) -> list[ClosedVolume]:
        """Copied volume closed on the follower during ``window``."""
        ...


_CLOSES = (FollowerClose, FollowerCloseBy, FollowerCloseAll)


class LedgerViewFacts:
    """``FactsSource`` over the ledger's read views and billing's cash-flow table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def closing_equity(self, follower: str, before_ns: int) -> EquitySample | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT equity_minor, ts_ns FROM ledger_account_balances"
                " WHERE account = $1 AND ts_ns < $2 AND equity_minor IS NOT NULL"
                " ORDER BY ts_ns DESC LIMIT 1",
                follower,
                before_ns,
            )
        if row is None:
            return None
        return EquitySample(follower=follower, equity_minor=row["equity_minor"], ts_ns=row["ts_ns"])

    async def cash_flows(self, follower: str, after_ns: int, until_ns: int) -> list[CashFlow]:
        async with self._pool.acquire() as conn:
            rows = await store.cash_flows(conn, follower, after_ns, until_ns)
        return [
            CashFlow(follower=follower, kind=CashFlowKind(kind), amount_minor=amount, ts_ns=ts)
            for kind, amount, ts in rows
        ]

    async def closed_volume(self, follower: str, window: BillingWindow) -> list[ClosedVolume]:
        # Close orders may be sent just before the window and filled inside it: read the
        # orders from a day earlier, count the fills whose own time is in the window.
        rows = await self._orders_and_reports(follower, window)
        closes: dict[str, bool] = {}
        fills: list[tuple[str, str, float, int]] = []
        for row in rows:
            if row["kind"] == "follower_order":
                order = follower_order_decoder.decode(row["payload"])
                if isinstance(order, _CLOSES):
                    closes[order.order_id] = order.manual
                continue
            report = execution_report_decoder.decode(row["payload"])
            if isinstance(report, OrderFilled):
                fills.append((report.order_id, report.link_id, report.volume, report.ts_ns))
            elif isinstance(report, OrderPartiallyFilled):
                fills.append((report.order_id, report.link_id, report.volume_filled, report.ts_ns))
        # A fill of a close order is volume closed; one placed by a person through the API
        # (``manual``) is passed on as such and never charged.
        return [
            ClosedVolume(
                order_id=order_id,
                follower=follower,
                link=link,
                lots=lots_from_wire(volume),
                closed_ns=ts,
                manual=closes[order_id],
            )
            for order_id, link, volume, ts in fills
            if order_id in closes
        ]

    async def copied_trades(self, follower: str, window: BillingWindow) -> list[CopiedTrade]:
        """Every open filled on ``follower`` inside ``window``, with its link and whether it
        was manual (pay-per-trade counts copies only, once per order id)."""
        rows = await self._orders_and_reports(follower, window)
        opens: dict[str, FollowerOpen] = {}
        trades: list[CopiedTrade] = []
        for row in rows:
            if row["kind"] == "follower_order":
                order = follower_order_decoder.decode(row["payload"])
                if isinstance(order, FollowerOpen):
                    opens[order.order_id] = order
                continue
            report = execution_report_decoder.decode(row["payload"])
            if not isinstance(report, OrderFilled | OrderPartiallyFilled):
                continue
            order = opens.get(report.order_id)
            if order is None or not window.contains(report.ts_ns):
                continue
            # Every fill of one order is one copy: count_copied_trades keeps one per order id.
            trades.append(
                CopiedTrade(
                    order_id=order.order_id,
                    follower=follower,
                    link=order.link_id,
                    opened_ns=report.ts_ns,
                    manual=order.manual,
                )
            )
        return trades

    async def _orders_and_reports(self, follower: str, window: BillingWindow) -> list[Any]:
        # Orders may be sent just before the window and filled inside it: read them from a
        # day earlier; callers count the fills whose own time is in the window.
        async with self._pool.acquire() as conn:
            return await conn.fetch(
                "SELECT kind, payload FROM ledger_account_facts WHERE account = $1"
                " AND kind IN ('follower_order', 'execution_report')"
                " AND ts_ns >= $2 AND ts_ns < $3 ORDER BY ts_ns, stream_seq",
                follower,
                window.start_ns - 86_400 * 10**9,
                window.end_ns,
            )
