"""What the ledger answers about one account: its book (positions, copies, cash) and its
statistics, folded from the facts stored for it."""

from __future__ import annotations

import time

from engine.core.book import AccountBook, fold_account
from engine.core.performance import AccountStats, account_stats, link_stats
from engine.ledger import store


class UnknownAccount(LookupError):
    """The ledger has stored nothing for this account."""


async def account_book(database_url: str, account: str) -> AccountBook:
    """Open and closed positions, pending orders, the copy map, per-link outcomes and the
    balance series of ``account``, from everything stored for it."""
    conn = await store.connect(database_url)
    try:
        facts = await store.account_facts(conn, account)
    finally:
        await conn.close()
    if not facts:
        raise UnknownAccount(f"the ledger holds nothing for account {account!r}")
    return fold_account(account, facts)


async def account_statistics(
    database_url: str, account: str, link_id: str | None = None, now_ns: int | None = None
) -> tuple[AccountBook, AccountStats]:
    """The account's statistics (or those of its copies through ``link_id``), as of
    ``now_ns`` (default: now; the monthly P&L window ends there)."""
    book = await account_book(database_url, account)
    now = time.time_ns() if now_ns is None else now_ns
    stats = account_stats(book, now) if link_id is None else link_stats(book, link_id, now)
    return book, stats
