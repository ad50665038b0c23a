"""Reading one account's facts from the ledger's documented view and folding its book.

The ledger's read contract is the view ``ledger_account_facts`` (``engine/ledger/migrations/
0002_read_views.sql``): every fact of an account in time order, payloads in the contract's
msgpack. Every reader that needs an account's open positions (the API's TradingView path, the
strategy drive) decodes the rows the same way and folds them with ``fold_account``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from engine.core.book import OpenPosition, fold_account
from schemas import codec
from schemas.orders import FollowerOrder
from schemas.reports import ExecutionReport

#: How each ``kind`` of a ``ledger_account_facts`` row is decoded (the ledger's read contract).
FACT_DECODERS: dict[str, Any] = {
    "master_event": codec.master_event_decoder,
    "follower_order": codec.follower_order_decoder,
    "execution_report": codec.execution_report_decoder,
    "decision": codec.decision_decoder,
    "account_state": codec.account_state_decoder,
}

#: One account's facts in time order, straight from the view (no scope: callers that serve
#: tenants check the account's scope themselves, as the API does in its own statement).
ACCOUNT_FACTS_SQL = (
    "SELECT kind, payload FROM ledger_account_facts WHERE account = $1 ORDER BY ts_ns, stream_seq"
)


def decode_facts(rows: Iterable[Mapping[str, Any]]) -> list[object]:
    """The contract messages of ``ledger_account_facts`` rows (``kind``, ``payload``)."""
    return [FACT_DECODERS[row["kind"]].decode(row["payload"]) for row in rows]


async def account_facts(conn: Any, account: str) -> list[object]:
    """Every fact the ledger stored for ``account``, decoded, in time order."""
    return decode_facts(await conn.fetch(ACCOUNT_FACTS_SQL, account))


def open_positions(account: str, facts: Iterable[object]) -> list[OpenPosition]:
    """The account's open positions as the ledger's facts say."""
    return list(fold_account(account, facts).open_positions)


def unreported_orders(account: str, facts: Iterable[object], since_ns: int = 0) -> set[str]:
    """Ids of the orders of ``account`` (sent at or after ``since_ns``) whose outcome the fold
    cannot show yet: an order without its execution report, or a report whose order the
    ledger has not stored (each comes from its own stream)."""
    sent: dict[str, int] = {}
    reported: dict[str, int] = {}
    for fact in facts:
        if isinstance(fact, ExecutionReport) and fact.follower == account:
            reported[fact.order_id] = fact.ts_ns
        elif isinstance(fact, FollowerOrder) and fact.follower == account:
            sent[fact.order_id] = fact.ts_ns
    waiting = {order_id for order_id, ts in sent.items() if ts >= since_ns} - reported.keys()
    return waiting | {order_id for order_id, ts in reported.items() if ts >= since_ns} - sent.keys()


def reported_orders(facts: Iterable[object]) -> set[str]:
    """Ids of the orders with an execution report among the facts."""
    return {fact.order_id for fact in facts if isinstance(fact, ExecutionReport)}


def settled_orders(account: str, facts: Iterable[object]) -> set[str]:
    """Ids of the orders sent to ``account`` whose order and execution report the ledger has
    both stored: only then does the fold show what they did (a report stored before its order,
    each from its own stream, is not folded yet)."""
    stored = {f.order_id for f in facts if isinstance(f, FollowerOrder) and f.follower == account}
    return stored & reported_orders(facts)
