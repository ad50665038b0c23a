"""The ledger's read models for the caller's accounts: positions, history, decisions, statistics."""

from __future__ import annotations

import enum
import time
import weakref
from collections import OrderedDict
from typing import Any

import msgspec

from engine.api.errors import FieldProblem, NotFound, ValidationFailed
from engine.api.handling import (
    TENANT_USERS,
    Context,
    Route,
    next_cursor,
    page_params,
)
from engine.api.models import Page, View
from engine.api.store import Row, Scope
from engine.core.book import AccountBook, CopyRef, fold_account
from engine.core.performance import account_stats, link_stats
from engine.runtime.ledger_reads import decode_facts
from schemas import codec
from schemas.common import OrderType, Side
from schemas.decisions import DecisionOutcome, DecisionRule

SHARPE_BASIS = "daily returns, risk-free rate 0, annualised with sqrt(252)"


class BookEntryKind(enum.StrEnum):
    POSITION = "position"
    PENDING_ORDER = "pending_order"


class CopyOf(View):
    """What a follower's position or pending order copies: a master's, through a link."""

    link_id: str
    master: str
    master_position_id: str
    """The master's position (or, for a pending order, the master's order) it copies."""
    open_order_id: str | None = None
    """The follower order that opened the copy (positions only)."""


class BookEntry(View):
    """An open position or a pending order of the account, now."""

    kind: BookEntryKind
    id: str
    """The position id (the ticket now; MT4 re-keys a position on partial closes) or the
    pending order's id."""
    symbol: str
    volume: float
    price: float
    """Open price of a position, the order price of a pending order."""
    ts_ns: int
    """When it was opened or placed (UTC nanoseconds)."""
    side: Side | None = None
    order_type: OrderType | None = None
    origin_position_id: str | None = None
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: str = ""
    copy_of: CopyOf | None = None
    """None: not a copy (the account's own trade, or a master's)."""


class ClosedPosition(View):
    """One close: the whole position, or the part a partial close took. Money is integer
    minor units of ``currency``; null where the venue did not report it."""

    position_id: str
    origin_position_id: str
    symbol: str
    side: Side
    volume: float
    open_price: float
    open_ts_ns: int
    close_price: float | None
    close_ts_ns: int
    reason: str
    """sl, tp, stop_out, master_close, protection, close_by or manual."""
    currency: str | None
    profit: int | None = None
    commission: int | None = None
    swap: int | None = None
    net: int | None = None
    """profit + commission + swap."""
    remainder_id: str | None = None
    copy_of: CopyOf | None = None


class AccountStatistics(View):
    """PRODUCT.md's statistics of the account (or of its copies through ``link_id``). Money
    in integer minor units of ``currency``; ratios as fractions (0.25 is 25 %)."""

    account_id: str
    link_id: str | None
    currency: str | None
    trades: int
    wins: int
    losses: int
    gross_profit: int
    gross_loss: int
    net_profit: int
    largest_win: int | None
    largest_loss: int | None
    win_rate: float | None
    """Wins / trades; a trade with P&L ≤ 0 is not a win."""
    profit_factor: float | None
    """Σ wins / |Σ losses|; null without losses."""
    average_win: int | None
    average_loss: int | None
    expectancy: int | None
    gain: float | None
    """Time-weighted, deposit and withdrawal neutral: Π(1 + Pᵢ / Bᵢ) − 1."""
    gain_trades: int
    max_drawdown: int
    """Peak to trough on equity samples (none for a link: it has no equity of its own)."""
    max_drawdown_ratio: float | None
    monthly_pnl: dict[str, int]
    """Net P&L per UTC month (YYYY-MM), the 24 months ending now."""
    trades_per_day: float | None
    sharpe: float | None
    sharpe_basis: str = SHARPE_BASIS


class EquitySample(View):
    """Balance and equity at one account state, integer minor units of ``currency``."""

    ts_ns: int
    currency: str
    balance: int | None
    equity: int | None


class DecisionView(View):
    """A copy decision: a copy skipped, reduced, or a link paused, and why in words."""

    decision_id: str
    account_id: str
    """The follower account it concerns."""
    link_id: str
    master: str
    outcome: DecisionOutcome
    rule: DecisionRule
    message: str
    """The reason in words."""
    ts_ns: int
    master_event_id: str = ""
    numbers: dict[str, float | str | None] = {}
    """What the rule saw, e.g. ``{"volume": 0.004, "volume_min": 0.01}``."""


# ------------------------------------------------------------------------------ helpers


def _not_found(account_id: str) -> NotFound:
    return NotFound(f"no account {account_id!r}")


class BookCache:
    """The books last folded, per account, with the version of the facts they were folded
    from (``Store.ledger_facts_version_now``). Folding an account's whole history costs
    milliseconds; checking that nothing changed since costs one small statement. Per process
    and bounded (least recently used out); it is only ever consulted after the caller's scope
    check, so it holds no authority of its own."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._books: OrderedDict[str, tuple[tuple[int, Any, int], AccountBook]] = OrderedDict()

    def get(self, account_id: str, version: tuple[int, Any, int]) -> AccountBook | None:
        held = self._books.get(account_id)
        if held is None or held[0] != version:
            return None
        self._books.move_to_end(account_id)
        return held[1]

    def put(self, account_id: str, version: tuple[int, Any, int], book: AccountBook) -> None:
        self._books[account_id] = (version, book)
        self._books.move_to_end(account_id)
        while len(self._books) > self.capacity:
            self._books.popitem(last=False)


_CACHES: weakref.WeakKeyDictionary[Any, BookCache] = weakref.WeakKeyDictionary()


def _cache_of(store: Any) -> BookCache:
    cache = _CACHES.get(store)
    if cache is None:
        cache = _CACHES[store] = BookCache()
    return cache


async def _book(ctx: Context, account_id: str) -> AccountBook:
    """The account's book folded from its ledger facts, or 404 when it is not the caller's."""
    store = ctx.state.store
    scope = Scope.of(ctx.who)
    cache = _cache_of(store)
    # one round trip when nothing changed (the common read): the scope check and the version
    version = await store.ledger_facts_version_now(scope, account_id)
    if version is None:
        raise _not_found(account_id)
    book = cache.get(account_id, version)
    if book is not None:
        return book
    async with store.read(scope) as conn:
        rows = await store.ledger_account_facts(conn, scope, account_id)
    if rows is None:
        raise _not_found(account_id)
    book = fold_account(account_id, decode_facts(rows))
    # the version of exactly the facts folded (more may have landed since the check)
    folded = (len(rows), max((row["stored_at"] for row in rows), default=None),
              sum(row["stream_seq"] for row in rows))  # fmt: skip
    cache.put(account_id, folded, book)
    return book


def _copy_of(ref: CopyRef | None, open_order_id: str | None = None) -> CopyOf | None:
    if ref is None:
        return None
    return CopyOf(
        link_id=ref.link_id,
        master=ref.master,
        master_position_id=ref.master_position_id,
        open_order_id=open_order_id,
    )


def _after(ctx: Context) -> tuple[str | None, int]:
    return page_params(ctx, str)


def _page(items: list[tuple[str, Any]], after: str | None, limit: int, newest_first: bool) -> Page:
    """One page of ``(key, item)`` pairs sorted by key (descending when ``newest_first``)."""
    items.sort(key=lambda pair: pair[0], reverse=newest_first)
    if after is not None:
        items = [p for p in items if (p[0] < after if newest_first else p[0] > after)]
    chosen = items[: limit + 1]
    return Page(
        items=[item for _, item in chosen[:limit]],
        next_cursor=next_cursor(chosen, limit, lambda pair: pair[0]),
    )


def _key(ts_ns: int, ident: str) -> str:
    # zero-padded so string order is time order; cursors are opaque to clients anyway
    return f"{ts_ns:020d}:{ident}"


# ----------------------------------------------------------------------------- handlers


async def list_positions(ctx: Context) -> tuple[int, Any]:
    """Open positions first (by open time), then pending orders (by placing time)."""
    account_id = ctx.request.match_info["account_id"]
    after, limit = _after(ctx)
    book = await _book(ctx, account_id)
    opened_by = {e.follower_position_id: e.open_order_id for e in book.copy_map}
    items: list[tuple[str, Any]] = []
    for p in book.open_positions:
        entry = BookEntry(
            kind=BookEntryKind.POSITION, id=p.position_id, symbol=p.symbol, volume=p.volume,
            price=p.open_price, ts_ns=p.open_ts_ns, side=p.side,
            origin_position_id=p.origin_position_id, sl=p.sl, tp=p.tp, magic=p.magic,
            comment=p.comment, copy_of=_copy_of(p.copy, opened_by.get(p.position_id)),
        )  # fmt: skip
        items.append(("0:" + _key(p.open_ts_ns, p.position_id), entry))
    for o in book.pending_orders:
        entry = BookEntry(
            kind=BookEntryKind.PENDING_ORDER, id=o.order_id, symbol=o.symbol, volume=o.volume,
            price=o.price, ts_ns=o.placed_ts_ns, order_type=o.order_type, sl=o.sl, tp=o.tp,
            magic=o.magic, comment=o.comment, copy_of=_copy_of(o.copy),
        )  # fmt: skip
        items.append(("1:" + _key(o.placed_ts_ns, o.order_id), entry))
    return 200, _page(items, after, limit, newest_first=False)


async def list_history(ctx: Context) -> tuple[int, Any]:
    """Closed positions, the latest close first."""
    account_id = ctx.request.match_info["account_id"]
    after, limit = _after(ctx)
    book = await _book(ctx, account_id)
    items: list[tuple[str, Any]] = []
    for i, c in enumerate(book.closed_positions):
        trade = ClosedPosition(
            position_id=c.position_id, origin_position_id=c.origin_position_id, symbol=c.symbol,
            side=c.side, volume=c.volume, open_price=c.open_price, open_ts_ns=c.open_ts_ns,
            close_price=c.close_price, close_ts_ns=c.close_ts_ns, reason=str(c.reason),
            currency=book.currency, profit=c.profit, commission=c.commission, swap=c.swap,
            net=c.net, remainder_id=c.remainder_id, copy_of=_copy_of(c.copy),
        )  # fmt: skip
        # the fold's order breaks ties of one close time (the parts of one partial close)
        items.append((_key(c.close_ts_ns, f"{i:09d}"), trade))
    return 200, _page(items, after, limit, newest_first=True)


async def account_statistics(ctx: Context) -> tuple[int, Any]:
    account_id = ctx.request.match_info["account_id"]
    link_id = ctx.request.query.get("link_id") or None
    if link_id is not None and len(link_id) > 128:
        raise ValidationFailed(
            "link_id is too long", errors=[FieldProblem(field="link_id", message="too long")]
        )
    book = await _book(ctx, account_id)
    now = time.time_ns()
    stats = account_stats(book, now) if link_id is None else link_stats(book, link_id, now)
    return 200, AccountStatistics(
        account_id=account_id, link_id=link_id, currency=book.currency,
        **msgspec.structs.asdict(stats),
    )  # fmt: skip


async def list_equity(ctx: Context) -> tuple[int, Any]:
    """Balance and equity at every stored account state, oldest first."""
    account_id = ctx.request.match_info["account_id"]
    after, limit = page_params(ctx, int)
    scope = Scope.of(ctx.who)
    async with ctx.state.store.read(scope) as conn:
        rows = await ctx.state.store.ledger_account_balances(
            conn, scope, account_id, after, limit + 1
        )
    if not rows:
        raise _not_found(account_id)
    rows = [row for row in rows if row["ts_ns"] is not None]
    items = [
        EquitySample(
            ts_ns=row["ts_ns"],
            currency=row["currency"],
            balance=row["balance_minor"],
            equity=row["equity_minor"],
        )
        for row in rows[:limit]
    ]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda row: row["ts_ns"]))


def _decision_cursor(row: Row) -> str:
    return _key(row["ts_ns"], row["decision_id"])


async def list_decisions(ctx: Context) -> tuple[int, Any]:
    """The copy decisions about the caller's accounts, newest first; ``?account_id=`` and
    ``?link_id=`` narrow them."""
    after, limit = _after(ctx)
    before: tuple[int, str] | None = None
    if after is not None:
        ts, _, ident = after.partition(":")
        if not ts.isdigit() or not ident:
            raise ValidationFailed(
                "cursor is not one this API gave out",
                errors=[FieldProblem(field="cursor", message="invalid cursor")],
            )
        before = (int(ts), ident)
    query = ctx.request.query
    account_id, link_id = query.get("account_id") or None, query.get("link_id") or None
    for name, value in (("account_id", account_id), ("link_id", link_id)):
        if value is not None and len(value) > 128:
            raise ValidationFailed(
                f"{name} is too long", errors=[FieldProblem(field=name, message="too long")]
            )
    scope = Scope.of(ctx.who)
    async with ctx.state.store.read(scope) as conn:
        rows = await ctx.state.store.ledger_decisions(
            conn, scope, account_id=account_id, link_id=link_id, before=before, limit=limit + 1
        )
    items = []
    for row in rows[:limit]:
        d = codec.decision_decoder.decode(row["payload"])
        items.append(DecisionView(
            decision_id=d.decision_id, account_id=row["account"], link_id=d.link_id,
            master=d.master, outcome=d.outcome, rule=d.rule, message=d.message, ts_ns=d.ts_ns,
            master_event_id=d.master_event_id, numbers=dict(d.numbers),
        ))  # fmt: skip
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, _decision_cursor))


_PAGED = ("cursor", "limit")
_ACCOUNT_ERRORS = (401, 403, 404, 422, 503)

ROUTES: list[Route] = [
    Route("GET", "/v1/accounts/{account_id}/positions", list_positions,
          "Open positions and pending orders now, with what each copies", "history",
          roles=TENANT_USERS, response=Page[BookEntry], query=_PAGED, errors=_ACCOUNT_ERRORS),
    Route("GET", "/v1/accounts/{account_id}/history", list_history,
          "Closed positions with their P&L, the latest first", "history",
          roles=TENANT_USERS, response=Page[ClosedPosition], query=_PAGED, errors=_ACCOUNT_ERRORS),
    Route("GET", "/v1/accounts/{account_id}/statistics", account_statistics,
          "Gain, drawdown, profit factor, win rate, monthly P&L and Sharpe (?link_id= for one"
          " link's copies)", "history",
          roles=TENANT_USERS, response=AccountStatistics, query=("link_id",),
          errors=_ACCOUNT_ERRORS),
    Route("GET", "/v1/accounts/{account_id}/equity", list_equity,
          "Balance and equity over time, oldest first", "history",
          roles=TENANT_USERS, response=Page[EquitySample], query=_PAGED, errors=_ACCOUNT_ERRORS),
    Route("GET", "/v1/decisions", list_decisions,
          "Copy decisions with their rule and the reason in words, newest first"
          " (?account_id=, ?link_id= narrow them)", "history",
          roles=TENANT_USERS, response=Page[DecisionView],
          query=(*_PAGED, "account_id", "link_id"),
          errors=(401, 403, 422, 503)),
]  # fmt: skip
