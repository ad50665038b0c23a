"""The marketplace: providers' public profiles with statistics from the ledger, a
leaderboard, and "follow on paper first" (a paper follower account and its link in one call).

Other tenants' profiles are read only through the SECURITY DEFINER functions of
``migrations/0009_strategies_marketplace.sql``, which return published profiles' public fields
and their master's ledger facts; everything else stays behind row-level security."""

from __future__ import annotations

import enum
import secrets
import time
import weakref
from typing import Annotated, Any

import asyncpg
import msgspec
import nats.errors
import structlog

from engine.api import metrics
from engine.api.accounts import account_view, new_account_id
from engine.api.auth import Role
from engine.api.crypto import BrokerCredentials, seal_credentials
from engine.api.errors import (
    Conflict,
    FieldProblem,
    Forbidden,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from engine.api.handling import (
    ANY_USER,
    PROVIDERS,
    Context,
    Route,
    encode_cursor,
    iso,
    page_params,
    parse_body,
)
from engine.api.history import SHARPE_BASIS
from engine.api.links import new_link_id
from engine.api.models import AccountView, Body, LinkView, Name, Page, View
from engine.api.store import Row, Scope, Store
from engine.core.book import fold_account
from engine.core.performance import account_stats
from engine.runtime.ledger_reads import decode_facts
from engine.runtime.links import apply_links, validate_link
from schemas import subjects
from schemas.links import Sizing

log = structlog.get_logger("tradecopy.api")

Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
Description = Annotated[str, msgspec.Meta(max_length=2000)]
#: Equity chart points a profile page answers by default, and at most (``?points=``).
DEFAULT_POINTS = 200
MAX_POINTS = 1000
FOLLOWERS = frozenset({Role.FOLLOWER})


# ------------------------------------------------------------------------------ bodies


class ProfileRequest(Body, kw_only=True):
    slug: Slug
    """The profile's public name in URLs: unique on the platform."""
    description: Description = ""
    master_account_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    """The master account whose ledger facts make the statistics, and which followers copy."""
    strategy_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    """One of the provider's strategies, shown with its current version."""
    published: bool = False
    """Only a published profile is in the marketplace (and may be followed)."""


class ProfileView(View, kw_only=True):
    """The provider's own profile, as it set it."""

    slug: str
    description: str
    master_account_id: str
    strategy_id: str | None
    published: bool
    updated_at: str


class StrategyRef(View, kw_only=True):
    name: str
    version_id: str | None
    """The strategy's current version (the one uploaded last)."""


class MarketStatistics(View, kw_only=True):
    """PRODUCT.md's statistics of the provider's master account, from the ledger. Money in
    integer minor units of ``currency``; ratios as fractions (0.25 is 25 %)."""

    currency: str | None
    trades: int
    wins: int
    losses: int
    net_profit: int
    gain: float | None
    """Time-weighted, deposit and withdrawal neutral: Π(1 + Pᵢ / Bᵢ) − 1."""
    max_drawdown: int
    max_drawdown_ratio: float | None
    """Peak to trough on equity samples, as a fraction of the peak; 0 when equity never fell,
    null without equity samples."""
    profit_factor: float | None
    win_rate: float | None
    sharpe: float | None
    sharpe_basis: str = SHARPE_BASIS


class EquityPoint(View, kw_only=True):
    ts_ns: int
    balance: int | None
    equity: int | None


class ProviderProfile(View, kw_only=True):
    """A published provider: what anyone signed in may read."""

    slug: str
    description: str
    strategy: StrategyRef | None
    followers: int
    """Links into the provider's master (a paused link counts; a cancelled one is gone)."""
    statistics: MarketStatistics
    equity_currency: str | None
    equity: list[EquityPoint]
    """The master's equity series, oldest first, at most ``?points=`` evenly spaced samples
    (the first and the last always among them)."""


class LeaderboardEntry(View, kw_only=True):
    rank: int
    """1-based, in the order asked for."""
    slug: str
    description: str
    strategy: StrategyRef | None
    followers: int
    statistics: MarketStatistics


class LeaderboardSort(enum.StrEnum):
    GAIN = "gain"
    DRAWDOWN = "drawdown"
    """Smallest maximum drawdown (ratio) first."""
    WIN_RATE = "win_rate"
    FOLLOWERS = "followers"


class FollowOnPaper(Body, kw_only=True):
    sizing: Sizing | None = None
    """The link's sizing (as a link's ``sizing``); default: the master's lots (multiplier 1)."""
    name: Name | None = None
    """The paper account's name; default ``paper: <slug>``."""


class FollowedOnPaper(View, kw_only=True):
    account: AccountView
    link: LinkView


# ------------------------------------------------------------------------------- SQL


def _tenant(store: Store, scope: Scope) -> str | None:
    return scope.tenant if store.app_scoping else None


async def _own_profile(store: Store, conn: Any, scope: Scope) -> Row | None:
    return await conn.fetchrow(
        "SELECT * FROM api_marketplace_profiles WHERE tenant_id = $1", scope.tenant
    )


async def _upsert_profile(conn: Any, tenant_id: str, body: ProfileRequest) -> Row | None:
    """The profile as written, or None when another profile has the slug."""
    try:
        async with conn.transaction():  # a savepoint: the caller's transaction survives
            return await conn.fetchrow(
                "INSERT INTO api_marketplace_profiles (tenant_id, slug, description,"
                " master_account_id, strategy_id, published) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (tenant_id) DO UPDATE SET slug = excluded.slug,"
                " description = excluded.description,"
                " master_account_id = excluded.master_account_id,"
                " strategy_id = excluded.strategy_id, published = excluded.published,"
                " updated_at = now() RETURNING *",
                tenant_id, body.slug, body.description, body.master_account_id,
                body.strategy_id, body.published,
            )  # fmt: skip
    except asyncpg.UniqueViolationError:
        return None


async def _strategy_of_tenant(store: Store, conn: Any, scope: Scope, strategy_id: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT 1 FROM api_strategies WHERE strategy_id = $1"
        " AND ($2::text IS NULL OR tenant_id = $2)",
        strategy_id, _tenant(store, scope),
    ))  # fmt: skip


async def _listing(conn: Any, slug: str | None = None) -> list[Row]:
    """Published profiles' public fields (all, or the one of ``slug``), across tenants."""
    return await conn.fetch("SELECT * FROM api_marketplace_listing($1)", slug)


async def _followable(store: Store, conn: Any, scope: Scope, slug: str) -> Row | None:
    """The caller's own provider's published profile of ``slug``."""
    return await conn.fetchrow(
        "SELECT * FROM api_marketplace_profiles WHERE slug = $1 AND published"
        " AND ($2::text IS NULL OR tenant_id = $2)",
        slug, _tenant(store, scope),
    )  # fmt: skip


# ------------------------------------------------------------------------ statistics


class StatisticsCache:
    """Statistics per published profile with the version of the facts they came from (count,
    latest ``stored_at``, Σ stream sequence, and when the profile last changed). Folding a
    master's whole history costs milliseconds; the listing that the leaderboard reads anyway
    carries the version, so unchanged masters are not folded again. Per process, bounded."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._held: dict[str, tuple[tuple[Any, ...], MarketStatistics]] = {}

    def get(self, slug: str, version: tuple[Any, ...]) -> MarketStatistics | None:
        held = self._held.get(slug)
        return held[1] if held is not None and held[0] == version else None

    def put(self, slug: str, version: tuple[Any, ...], stats: MarketStatistics) -> None:
        self._held.pop(slug, None)
        self._held[slug] = (version, stats)
        while len(self._held) > self.capacity:
            self._held.pop(next(iter(self._held)))


_CACHES: weakref.WeakKeyDictionary[Any, StatisticsCache] = weakref.WeakKeyDictionary()


def _cache_of(store: Any) -> StatisticsCache:
    cache = _CACHES.get(store)
    if cache is None:
        cache = _CACHES[store] = StatisticsCache()
    return cache


def _version(profile_updated: Any, facts: int, latest: Any, seqs: int) -> tuple[Any, ...]:
    return (profile_updated, int(facts), latest, int(seqs))


async def _statistics(ctx: Context, conn: Any, listed: Row) -> MarketStatistics:
    slug = listed["slug"]
    cache = _cache_of(ctx.state.store)
    version = _version(listed["profile_updated"], listed["facts"], listed["latest"],
                       listed["seqs"])  # fmt: skip
    held = cache.get(slug, version)
    if held is not None:
        return held
    rows = await conn.fetch("SELECT * FROM api_marketplace_facts($1)", slug)
    master = rows[0]["account"] if rows else ""
    book = fold_account(master, decode_facts(rows))
    stats = account_stats(book, time.time_ns())
    drawdown_ratio = stats.max_drawdown_ratio
    if drawdown_ratio is None and any(r["kind"] == "account_state" for r in rows):
        drawdown_ratio = 0.0  # sampled equity that never fell: no drawdown, not an unknown one
    view = MarketStatistics(
        currency=book.currency, trades=stats.trades, wins=stats.wins, losses=stats.losses,
        net_profit=stats.net_profit, gain=stats.gain, max_drawdown=stats.max_drawdown,
        max_drawdown_ratio=drawdown_ratio, profit_factor=stats.profit_factor,
        win_rate=stats.win_rate, sharpe=stats.sharpe,
    )  # fmt: skip
    # keyed by exactly the facts folded (more may have landed since the listing)
    folded = _version(listed["profile_updated"], len(rows),
                      max((r["stored_at"] for r in rows), default=None),
                      sum(r["stream_seq"] for r in rows))  # fmt: skip
    cache.put(slug, folded, view)
    return view


def _strategy_ref(row: Row) -> StrategyRef | None:
    if row["strategy_name"] is None:
        return None
    return StrategyRef(name=row["strategy_name"], version_id=row["strategy_version_id"])


def downsample(items: list[Any], points: int) -> list[Any]:
    """At most ``points`` items evenly spaced by index, the first and the last among them."""
    if len(items) <= points:
        return items
    last = len(items) - 1
    picked = sorted({round(i * last / (points - 1)) for i in range(points)})
    return [items[i] for i in picked]


# -------------------------------------------------------------------------- helpers


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, errors=[FieldProblem(field=field, message=message)])


def _profile_view(row: Row) -> ProfileView:
    return ProfileView(
        slug=row["slug"], description=row["description"],
        master_account_id=row["master_account_id"], strategy_id=row["strategy_id"],
        published=row["published"], updated_at=iso(row["updated_at"]),
    )  # fmt: skip


def _int_query(ctx: Context, name: str, default: int, low: int, high: int) -> int:
    raw = ctx.request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(name, "must be an integer") from None
    if not low <= value <= high:
        raise _invalid(name, f"must be {low}-{high}")
    return value


# ------------------------------------------------------------------------- handlers


async def put_profile(ctx: Context) -> tuple[int, Any]:
    """Create or replace the provider's profile; publishing puts it in the marketplace."""
    caller = ctx.who
    body = await parse_body(ctx.request, ProfileRequest)
    store, scope = ctx.state.store, Scope.of(caller)
    async with store.tx(scope) as conn:
        problems = []
        master = await store.get_account(conn, scope, body.master_account_id)
        if master is None or master["role"] != "master":
            problems.append(FieldProblem(field="master_account_id",
                                         message="no master account of yours"))  # fmt: skip
        if body.strategy_id is not None and not await _strategy_of_tenant(
            store, conn, scope, body.strategy_id
        ):
            problems.append(FieldProblem(field="strategy_id", message="no strategy of yours"))
        if problems:
            raise ValidationFailed(f"{len(problems)} invalid field(s)", errors=problems)
        before = await _own_profile(store, conn, scope)
        row = await _upsert_profile(conn, str(caller.tenant_id), body)
        if row is None:
            raise Conflict(f"the slug {body.slug!r} is taken: choose another")
        view = _profile_view(row)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="update" if before else "create",
            entity="marketplace_profile", entity_id=body.slug,
            before=None if before is None else msgspec.to_builtins(_profile_view(before)),
            after=msgspec.to_builtins(view),
        )  # fmt: skip
    log.info("api_marketplace_profile_saved", slug=body.slug, published=body.published)
    return 200, view


async def get_own_profile(ctx: Context) -> tuple[int, Any]:
    store, scope = ctx.state.store, Scope.of(ctx.who)
    async with store.read(scope) as conn:
        row = await _own_profile(store, conn, scope)
    if row is None:
        raise NotFound("no profile yet: PUT /v1/marketplace/profile")
    return 200, _profile_view(row)


async def provider_profile(ctx: Context) -> tuple[int, Any]:
    """A published provider's page; an unpublished or unknown slug answers 404 to everyone."""
    slug = ctx.request.match_info["slug"]
    points = _int_query(ctx, "points", DEFAULT_POINTS, 2, MAX_POINTS)
    async with ctx.state.store.read(Scope.of(ctx.who)) as conn:
        listed = await _listing(conn, slug)
        if not listed:
            raise NotFound("no published provider of that name")
        stats = await _statistics(ctx, conn, listed[0])
        equity = await conn.fetch("SELECT * FROM api_marketplace_equity($1)", slug)
    samples = downsample(list(equity), points)
    return 200, ProviderProfile(
        slug=slug, description=listed[0]["description"], strategy=_strategy_ref(listed[0]),
        followers=listed[0]["followers"], statistics=stats,
        equity_currency=samples[-1]["currency"] if samples else None,
        equity=[EquityPoint(ts_ns=r["ts_ns"], balance=r["balance_minor"],
                            equity=r["equity_minor"]) for r in samples],
    )  # fmt: skip


def _sort_value(sort: LeaderboardSort, entry: LeaderboardEntry) -> float | None:
    stats = entry.statistics
    if sort is LeaderboardSort.GAIN:
        return stats.gain
    if sort is LeaderboardSort.DRAWDOWN:
        return stats.max_drawdown_ratio
    if sort is LeaderboardSort.WIN_RATE:
        return stats.win_rate
    return float(entry.followers)


def _order_key(sort: LeaderboardSort, entry: LeaderboardEntry) -> tuple[bool, float, str]:
    """Best first (drawdown: smallest first; the others largest first), profiles without the
    figure last, ties by slug."""
    value = _sort_value(sort, entry)
    if value is None:
        return (True, 0.0, entry.slug)
    return (False, value if sort is LeaderboardSort.DRAWDOWN else -value, entry.slug)


async def leaderboard(ctx: Context) -> tuple[int, Any]:
    """Published providers ranked by ``?sort=`` (gain, drawdown, win_rate, followers)."""
    raw_sort = ctx.request.query.get("sort", LeaderboardSort.GAIN.value)
    try:
        sort = LeaderboardSort(raw_sort)
    except ValueError:
        known = ", ".join(s.value for s in LeaderboardSort)
        raise _invalid("sort", f"one of {known}") from None
    after, limit = page_params(ctx, str)
    start: tuple[bool, float, str] | None = None
    if after is not None:
        try:
            name, missing, value, slug = msgspec.json.decode(
                after, type=tuple[str, bool, float, str]
            )
        except msgspec.DecodeError:
            raise _invalid("cursor", "invalid cursor") from None
        if name != sort.value:
            raise _invalid("cursor", "a cursor of another sort order")
        start = (missing, value, slug)
    async with ctx.state.store.read(Scope.of(ctx.who)) as conn:
        listed = await _listing(conn)
        entries = []
        for row in listed:
            stats = await _statistics(ctx, conn, row)
            entries.append(LeaderboardEntry(
                rank=0, slug=row["slug"], description=row["description"],
                strategy=_strategy_ref(row), followers=row["followers"], statistics=stats,
            ))  # fmt: skip
    keyed = sorted(((_order_key(sort, e), e) for e in entries), key=lambda pair: pair[0])
    ranked = [(key, msgspec.structs.replace(e, rank=i)) for i, (key, e) in enumerate(keyed, 1)]
    if start is not None:
        ranked = [pair for pair in ranked if pair[0] > start]
    page = ranked[:limit]
    cursor = None
    if len(ranked) > limit:
        missing, value, slug = page[-1][0]
        cursor = encode_cursor(msgspec.json.encode([sort.value, missing, value, slug]).decode())
    return 200, Page(items=[e for _, e in page], next_cursor=cursor)


async def follow_on_paper(ctx: Context) -> tuple[int, Any]:
    """A paper follower account of the caller and a link into the provider's master, in one
    transaction with the link's write to ``tc_links`` (a refused write leaves neither)."""
    caller = ctx.who
    slug = ctx.request.match_info["slug"]
    body = await parse_body(ctx.request, FollowOnPaper)
    kv = await ctx.state.bucket(subjects.KV_LINKS)
    if kv is None:
        raise Unavailable("NATS is not reachable")
    store, scope = ctx.state.store, Scope.of(caller)
    key = ctx.state.secrets.master_key
    async with store.tx(scope) as conn:
        profile = await _followable(store, conn, scope, slug)
        if profile is None:
            if await _listing(conn, slug):
                # Published, but another provider's: a follower is its own provider's customer
                # (its accounts, links, plans and the account pool are that tenant's).
                raise Forbidden(
                    "a follower follows its own provider's strategies only: sign up with this"
                    " provider to follow it"
                )
            raise NotFound("no published provider of that name")
        tenant_id = str(caller.tenant_id)
        limit, used = await store.account_pool(conn, tenant_id)
        if limit is not None and used >= limit:
            metrics.ACCOUNT_POOL_FULL.inc()
            log.info("api_account_pool_full", tenant=tenant_id, limit=limit)
            raise Conflict(f"the provider's account pool is full: {used} of {limit} accounts")
        account_id = new_account_id()
        # A paper account logs in nowhere: the credentials only name it for its connector.
        paper = BrokerCredentials(login=account_id, password=secrets.token_urlsafe(24),
                                  server="paper")  # fmt: skip
        account = await store.create_account(
            conn, account_id=account_id, tenant_id=tenant_id, owner_user_id=caller.user_id,
            name=body.name or f"paper: {slug}", platform="paper", role="follower",
            credentials=seal_credentials(key, paper, tenant_id, account_id), key_id=key.key_id,
        )  # fmt: skip
        await store.audit(
            conn, caller, tenant_id=tenant_id, action="create", entity="account",
            entity_id=account_id,
            after={"name": account["name"], "platform": "paper", "role": "follower",
                   "owner_user_id": str(caller.user_id), "follow_on_paper": slug},
        )  # fmt: skip
        raw: dict[str, Any] = {"link_id": new_link_id(), "master": profile["master_account_id"],
                               "follower": account_id}  # fmt: skip
        if body.sizing is not None:
            raw["sizing"] = msgspec.to_builtins(body.sizing)
        link, errors = validate_link(raw)
        if link is None:
            problems = [FieldProblem(field=e.where.rpartition(").")[2], message=e.message)
                        for e in errors]  # fmt: skip
            raise ValidationFailed(f"{len(problems)} invalid field(s)", errors=problems)
        link_row = await store.create_link(
            conn, link_id=link.link_id, tenant_id=tenant_id, master=link.master,
            follower=link.follower, owner_user_id=caller.user_id,
        )  # fmt: skip
        await store.audit(
            conn, caller, tenant_id=tenant_id, action="create", entity="link",
            entity_id=link.link_id, after=msgspec.to_builtins(link),
        )  # fmt: skip
        try:
            await apply_links(kv, [link])
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS refused the link: {exc}") from None
    log.info("api_follow_on_paper", slug=slug, account=account_id, link=link.link_id)
    return 201, FollowedOnPaper(
        account=account_view(account),
        link=LinkView(link=link, created_at=iso(link_row["created_at"])),
    )


_PROVIDER = "/v1/marketplace/providers/{slug}"

ROUTES = [
    Route("PUT", "/v1/marketplace/profile", put_profile,
          "Create or replace the provider's marketplace profile", "marketplace",
          roles=PROVIDERS, request=ProfileRequest, response=ProfileView, errors=(409, 422)),
    Route("GET", "/v1/marketplace/profile", get_own_profile,
          "The provider's own marketplace profile", "marketplace", roles=PROVIDERS,
          response=ProfileView, errors=(404,)),
    Route("GET", _PROVIDER, provider_profile,
          "A published provider: strategy, statistics, equity chart (?points=, 2-1000,"
          " default 200), followers", "marketplace", roles=ANY_USER, response=ProviderProfile,
          query=("points",), errors=(404, 422, 503)),
    Route("GET", "/v1/marketplace/leaderboard", leaderboard,
          "Published providers ranked by ?sort= gain (default), drawdown (smallest first),"
          " win_rate or followers", "marketplace", roles=ANY_USER,
          response=Page[LeaderboardEntry], query=("sort", "cursor", "limit"), errors=(422, 503)),
    Route("POST", f"{_PROVIDER}/follow-on-paper", follow_on_paper,
          "Follow a provider with a new paper account (the account and its link)",
          "marketplace", roles=FOLLOWERS, request=FollowOnPaper, response=FollowedOnPaper,
          status=201, errors=(403, 404, 409, 422, 503)),
]  # fmt: skip
