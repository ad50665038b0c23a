"""Uploaded candle strategies: immutable versions named by their content, and deployments
written to the signal workers' bucket (``tc_signal_deployments``), so a running worker picks
each one up live."""

from __future__ import annotations

import re
import secrets
import time
import uuid
import weakref
from typing import Annotated, Any

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
import structlog

from engine.api.errors import (
    Conflict,
    FieldProblem,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from engine.api.handling import (
    PROVIDERS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import Body, Name, Page, View
from engine.api.store import Row, Scope, Store
from engine.core import strategy_versions
from engine.core.errors import StrategyVersionError
from schemas import subjects
from schemas.common import Symbol
from schemas.signals import Parameters, StrategyDeployment, StrategyVersion, Timeframe, VersionId

log = structlog.get_logger("tradecopy.api")

#: The largest source the API takes: under the request body limit (``max_body_bytes``,
#: 64 KiB), so a source too large is named (422, ``source``) rather than cut off (413). The
#: core's own limit (``strategy_versions.MAX_SOURCE_BYTES``) is larger.
MAX_UPLOAD_SOURCE_BYTES = min(48 * 1024, strategy_versions.MAX_SOURCE_BYTES)

Description = Annotated[str, msgspec.Meta(max_length=2000)]
#: Text, bounded only by the upload limit above (checked with a field name, not by msgspec).
Source = Annotated[str, msgspec.Meta(min_length=1)]
_FIELD_OF_ERROR = re.compile(r"^(source|parameters(?:\.[A-Za-z_][A-Za-z0-9_]*)?): (.*)$", re.S)


# ------------------------------------------------------------------------------ bodies


class NewStrategy(Body, kw_only=True):
    name: Name
    description: Description = ""
    source: Source
    """The module's text: it defines ``strategy(candles, params)`` at module level."""
    parameters: Parameters = {}
    """JSON scalars by name, given to the strategy (and to its ``Params`` if it defines one)."""


class NewStrategyVersion(Body, kw_only=True):
    source: Source
    parameters: Parameters = {}


class NewDeployment(Body, kw_only=True):
    version_id: VersionId
    master_account_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    """A paper master account of the provider: the strategy's signals become its trades."""
    symbol: Symbol
    timeframe: Timeframe
    volume: Annotated[float, msgspec.Meta(gt=0.0, le=1_000.0)] = 0.1
    """The fixed lot the master trades on each signal."""


class StrategyVersionView(View, kw_only=True):
    """One immutable version: what runs (source and parameters), its hashes, who and when."""

    strategy_id: str
    version_id: str
    """``sv-`` and 24 hex digits of sha256(code hash, parameters): the same code with the
    same parameters is the same version."""
    code_sha256: str
    parameters: Parameters
    author: str
    """The user id of the uploader."""
    created_ns: int
    created_at: str
    source: str


class StrategyView(View, kw_only=True):
    strategy_id: str
    name: str
    description: str
    current_version_id: str | None
    """The version uploaded last."""
    created_at: str


class StrategyCreated(View, kw_only=True):
    strategy: StrategyView
    version: StrategyVersionView
    duplicate: bool = False
    """True: this exact strategy (name, source and parameters) existed; nothing was made."""


class VersionUploaded(View, kw_only=True):
    version: StrategyVersionView
    duplicate: bool = False
    """True: the version existed (same source and parameters); nothing was made."""


class DeploymentView(View, kw_only=True):
    deployment_id: str
    strategy_id: str
    version_id: str
    master_account_id: str
    symbol: str
    timeframe: Timeframe
    volume: float
    key: str
    """Its key in the ``tc_signal_deployments`` bucket, which the signal workers watch."""
    created_at: str


# ----------------------------------------------------------------------------- SQL
# Every statement filters by the scope's tenant itself; 0009_strategies_marketplace.sql's
# policies are the second wall (they hold alone with the application's scoping off).


def _tenant(store: Store, scope: Scope) -> str | None:
    return scope.tenant if store.app_scoping else None


async def _insert_strategy(
    conn: Any, *, tenant_id: str, name: str, description: str, created_by: uuid.UUID
) -> Row | None:
    """The new strategy, or None when the tenant has one of that name."""
    return await conn.fetchrow(
        "INSERT INTO api_strategies (strategy_id, tenant_id, name, description, created_by)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING *",
        "stg-" + secrets.token_hex(8), tenant_id, name, description, created_by,
    )  # fmt: skip


async def _strategy_named(store: Store, conn: Any, scope: Scope, name: str) -> Row | None:
    return await conn.fetchrow(
        "SELECT * FROM api_strategies WHERE name = $1 AND ($2::text IS NULL OR tenant_id = $2)",
        name, _tenant(store, scope),
    )  # fmt: skip


async def _get_strategy(store: Store, conn: Any, scope: Scope, strategy_id: str) -> Row | None:
    return await conn.fetchrow(
        "SELECT s.*, (SELECT v.version_id FROM api_strategy_versions v"
        " WHERE v.strategy_id = s.strategy_id ORDER BY v.created_ns DESC, v.version_id LIMIT 1)"
        " AS current_version_id FROM api_strategies s"
        " WHERE s.strategy_id = $1 AND ($2::text IS NULL OR s.tenant_id = $2)",
        strategy_id, _tenant(store, scope),
    )  # fmt: skip


async def _list_strategies(
    store: Store, conn: Any, scope: Scope, after: str | None, limit: int
) -> list[Row]:
    return await conn.fetch(
        "SELECT s.*, (SELECT v.version_id FROM api_strategy_versions v"
        " WHERE v.strategy_id = s.strategy_id ORDER BY v.created_ns DESC, v.version_id LIMIT 1)"
        " AS current_version_id FROM api_strategies s"
        " WHERE ($1::text IS NULL OR s.tenant_id = $1)"
        " AND ($2::text IS NULL OR s.strategy_id > $2) ORDER BY s.strategy_id LIMIT $3",
        _tenant(store, scope), after, limit,
    )  # fmt: skip


async def _insert_version(conn: Any, strategy: Row, version: StrategyVersion) -> Row | None:
    """The new version's row, or None when the strategy has it already."""
    return await conn.fetchrow(
        "INSERT INTO api_strategy_versions (strategy_id, version_id, tenant_id, code_sha256,"
        " parameters, author, created_ns, source) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)"
        " ON CONFLICT DO NOTHING RETURNING *",
        strategy["strategy_id"], version.version_id, strategy["tenant_id"], version.code_sha256,
        msgspec.json.encode(version.parameters).decode(), version.author, version.created_ns,
        version.source,
    )  # fmt: skip


async def _get_version(
    store: Store, conn: Any, scope: Scope, strategy_id: str, version_id: str
) -> Row | None:
    return await conn.fetchrow(
        "SELECT * FROM api_strategy_versions WHERE strategy_id = $1 AND version_id = $2"
        " AND ($3::text IS NULL OR tenant_id = $3)",
        strategy_id, version_id, _tenant(store, scope),
    )  # fmt: skip


async def _list_versions(
    store: Store, conn: Any, scope: Scope, strategy_id: str, after: str | None, limit: int
) -> list[Row]:
    """Oldest first; the cursor is ``<created_ns>:<version_id>``."""
    created, _, version = (after or "").partition(":")
    return await conn.fetch(
        "SELECT * FROM api_strategy_versions WHERE strategy_id = $1"
        " AND ($2::text IS NULL OR tenant_id = $2)"
        " AND ($3::bigint IS NULL OR (created_ns, version_id) > ($3, $4::text))"
        " ORDER BY created_ns, version_id LIMIT $5",
        strategy_id, _tenant(store, scope), int(created) if after else None, version, limit,
    )  # fmt: skip


async def _insert_deployment(conn: Any, fields: dict[str, Any]) -> Row | None:
    """The new deployment, or None when its key is taken (by any tenant: the bucket is one)."""
    try:
        async with conn.transaction():  # a savepoint: the caller's transaction survives
            return await conn.fetchrow(
                "INSERT INTO api_strategy_deployments (deployment_id, tenant_id, strategy_id,"
                " version_id, master_account_id, symbol, timeframe, volume, kv_key)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
                fields["deployment_id"], fields["tenant_id"], fields["strategy_id"],
                fields["version_id"], fields["master_account_id"], fields["symbol"],
                fields["timeframe"], fields["volume"], fields["kv_key"],
            )  # fmt: skip
    except asyncpg.UniqueViolationError:
        return None


async def _delete_deployment(
    store: Store, conn: Any, scope: Scope, strategy_id: str, deployment_id: str
) -> Row | None:
    """The deployment removed, or None when it is not in scope. One statement: of two
    concurrent deletions one finds the row (no UPDATE right is needed for a row lock)."""
    return await conn.fetchrow(
        "DELETE FROM api_strategy_deployments WHERE deployment_id = $1 AND strategy_id = $2"
        " AND ($3::text IS NULL OR tenant_id = $3) RETURNING *",
        deployment_id, strategy_id, _tenant(store, scope),
    )  # fmt: skip


async def _list_deployments(
    store: Store, conn: Any, scope: Scope, strategy_id: str, after: str | None, limit: int
) -> list[Row]:
    return await conn.fetch(
        "SELECT * FROM api_strategy_deployments WHERE strategy_id = $1"
        " AND ($2::text IS NULL OR tenant_id = $2) AND ($3::text IS NULL OR deployment_id > $3)"
        " ORDER BY deployment_id LIMIT $4",
        strategy_id, _tenant(store, scope), after, limit,
    )  # fmt: skip


# -------------------------------------------------------------------------- helpers


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, errors=[FieldProblem(field=field, message=message)])


def _version_of(body: NewStrategy | NewStrategyVersion, author: str) -> StrategyVersion:
    """The upload as a version (parsed, never run), or 422 naming the field at fault."""
    if len(body.source.encode()) > MAX_UPLOAD_SOURCE_BYTES:
        raise _invalid("source", f"larger than {MAX_UPLOAD_SOURCE_BYTES} bytes")
    try:
        return strategy_versions.uploaded_version(
            source=body.source, parameters=body.parameters, author=author,
            created_ns=time.time_ns(),
        )  # fmt: skip
    except StrategyVersionError as exc:
        match = _FIELD_OF_ERROR.match(str(exc))
        field, message = (match.group(1), match.group(2)) if match else ("$", str(exc))
        raise _invalid(field, message) from None


def _parameters(row: Row) -> Parameters:
    raw = row["parameters"]
    return msgspec.json.decode(raw) if isinstance(raw, str | bytes) else dict(raw)


def _version_view(row: Row) -> StrategyVersionView:
    return StrategyVersionView(
        strategy_id=row["strategy_id"], version_id=row["version_id"],
        code_sha256=row["code_sha256"], parameters=_parameters(row), author=row["author"],
        created_ns=row["created_ns"], created_at=iso(row["created_at"]), source=row["source"],
    )  # fmt: skip


def _strategy_view(row: Row, current_version_id: str | None = None) -> StrategyView:
    current = row.get("current_version_id", current_version_id)
    return StrategyView(
        strategy_id=row["strategy_id"], name=row["name"], description=row["description"],
        current_version_id=current, created_at=iso(row["created_at"]),
    )  # fmt: skip


def _stored_version(row: Row) -> StrategyVersion:
    """The version exactly as uploaded, checked against its hashes before it is deployed."""
    version = StrategyVersion(
        version_id=row["version_id"], code_sha256=row["code_sha256"],
        parameters=_parameters(row), author=row["author"], created_ns=row["created_ns"],
        source=row["source"],
    )  # fmt: skip
    try:
        return strategy_versions.verify_uploaded(version)
    except StrategyVersionError as exc:
        log.error("api_strategy_version_corrupt", version=row["version_id"], error=str(exc))
        raise Conflict(f"the stored version does not match its hashes: {exc}") from None


def _deployment_view(row: Row) -> DeploymentView:
    return DeploymentView(
        deployment_id=row["deployment_id"], strategy_id=row["strategy_id"],
        version_id=row["version_id"], master_account_id=row["master_account_id"],
        symbol=row["symbol"], timeframe=Timeframe(row["timeframe"]), volume=row["volume"],
        key=row["kv_key"], created_at=iso(row["created_at"]),
    )  # fmt: skip


async def _strategy_in_scope(ctx: Context, conn: Any) -> Row:
    strategy_id = ctx.request.match_info["strategy_id"]
    row = await _get_strategy(ctx.state.store, conn, Scope.of(ctx.who), strategy_id)
    if row is None:
        raise NotFound("no such strategy")
    return row


#: The deployments bucket per API state, once opened (the buckets the API opens at start-up
#: may not name it).
_DEPLOYMENTS_KV: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


async def _deployments_kv(ctx: Context) -> Any:
    """The deployments bucket, or 503 while NATS cannot be reached."""
    kv = await ctx.state.bucket(subjects.KV_SIGNAL_DEPLOYMENTS)
    if kv is None:
        kv = _DEPLOYMENTS_KV.get(ctx.state)
    # Opening the API's buckets (ensure_buckets) makes this one with the others, so it exists
    # wherever they do; while they cannot be opened, NATS is down.
    if await ctx.state.bucket(subjects.KV_LINKS) is None or ctx.state.js is None:
        raise Unavailable("NATS is not reachable")
    if kv is not None:
        return kv
    try:
        kv = await ctx.state.js.key_value(subjects.KV_SIGNAL_DEPLOYMENTS)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS: the deployments bucket is not available: {exc}") from None
    _DEPLOYMENTS_KV[ctx.state] = kv
    return kv


# ------------------------------------------------------------------------- handlers


async def create_strategy(ctx: Context) -> tuple[int, Any]:
    """A strategy and its first version; the same name, source and parameters again answer
    what the first call made (200, ``duplicate``)."""
    caller = ctx.who
    body = await parse_body(ctx.request, NewStrategy)
    version = _version_of(body, str(caller.user_id))
    store, scope = ctx.state.store, Scope.of(caller)
    async with store.tx(scope) as conn:
        strategy = await _insert_strategy(
            conn, tenant_id=str(caller.tenant_id), name=body.name, description=body.description,
            created_by=caller.user_id,
        )  # fmt: skip
        if strategy is None:
            existing = await _strategy_named(store, conn, scope, body.name)
            assert existing is not None  # the name conflicted within the tenant
            row = await _get_version(
                store, conn, scope, existing["strategy_id"], version.version_id
            )
            if row is None:
                raise Conflict(
                    f"a strategy named {body.name!r} exists ({existing['strategy_id']}): upload"
                    f" a new version with POST /v1/strategies/{existing['strategy_id']}/versions"
                )
            current = await _get_strategy(store, conn, scope, existing["strategy_id"])
            return 200, StrategyCreated(
                strategy=_strategy_view(current), version=_version_view(row), duplicate=True
            )
        row = await _insert_version(conn, strategy, version)
        assert row is not None  # a strategy made in this transaction has no versions yet
        view = _strategy_view(strategy, version.version_id)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="strategy",
            entity_id=strategy["strategy_id"],
            after={"name": body.name, "version_id": version.version_id,
                   "code_sha256": version.code_sha256},
        )  # fmt: skip
    log.info("api_strategy_created", strategy=view.strategy_id, version=version.version_id)
    return 201, StrategyCreated(strategy=view, version=_version_view(row))


async def upload_version(ctx: Context) -> tuple[int, Any]:
    """A new immutable version; the same source and parameters again answer the existing one."""
    caller = ctx.who
    body = await parse_body(ctx.request, NewStrategyVersion)
    version = _version_of(body, str(caller.user_id))
    store, scope = ctx.state.store, Scope.of(caller)
    async with store.tx(scope) as conn:
        strategy = await _strategy_in_scope(ctx, conn)
        row = await _insert_version(conn, strategy, version)
        if row is None:
            existing = await _get_version(
                store, conn, scope, strategy["strategy_id"], version.version_id
            )
            assert existing is not None
            return 200, VersionUploaded(version=_version_view(existing), duplicate=True)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="strategy_version",
            entity_id=version.version_id,
            after={"strategy_id": strategy["strategy_id"], "code_sha256": version.code_sha256,
                   "parameters": version.parameters},
        )  # fmt: skip
    log.info("api_strategy_version_uploaded", strategy=strategy["strategy_id"],
             version=version.version_id)  # fmt: skip
    return 201, VersionUploaded(version=_version_view(row))


async def list_strategies(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, str)
    store, scope = ctx.state.store, Scope.of(ctx.who)
    async with store.read(scope) as conn:
        rows = await _list_strategies(store, conn, scope, after, limit + 1)
    items = [_strategy_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["strategy_id"]))


async def get_strategy(ctx: Context) -> tuple[int, Any]:
    async with ctx.state.store.read(Scope.of(ctx.who)) as conn:
        row = await _strategy_in_scope(ctx, conn)
    return 200, _strategy_view(row)


async def list_versions(ctx: Context) -> tuple[int, Any]:
    """Every version of the strategy, oldest first, with its source."""
    after, limit = page_params(ctx, str)
    if after is not None and not re.fullmatch(r"\d{1,19}:sv-[0-9a-f]{24}", after):
        raise _invalid("cursor", "invalid cursor")
    store, scope = ctx.state.store, Scope.of(ctx.who)
    async with store.read(scope) as conn:
        strategy = await _strategy_in_scope(ctx, conn)
        rows = await _list_versions(store, conn, scope, strategy["strategy_id"], after, limit + 1)
    items = [_version_view(r) for r in rows[:limit]]
    cursor = next_cursor(rows, limit, lambda r: f"{r['created_ns']}:{r['version_id']}")
    return 200, Page(items=items, next_cursor=cursor)


async def create_deployment(ctx: Context) -> tuple[int, Any]:
    """Run a version on a symbol and timeframe, trading a paper master: the deployment is
    written to ``tc_signal_deployments`` inside the transaction that records it, so a refused
    write leaves no row behind."""
    caller = ctx.who
    body = await parse_body(ctx.request, NewDeployment)
    kv = await _deployments_kv(ctx)
    store, scope = ctx.state.store, Scope.of(caller)
    async with store.tx(scope) as conn:
        strategy = await _strategy_in_scope(ctx, conn)
        problems = []
        version_row = await _get_version(
            store, conn, scope, strategy["strategy_id"], body.version_id
        )
        if version_row is None:
            problems.append(FieldProblem(field="version_id",
                                         message="no version of this strategy"))  # fmt: skip
        master = await store.get_account(conn, scope, body.master_account_id)
        if master is None or master["role"] != "master" or master["platform"] != "paper":
            problems.append(FieldProblem(field="master_account_id",
                                         message="no paper master account of yours"))  # fmt: skip
        if problems:
            raise ValidationFailed(f"{len(problems)} invalid field(s)", errors=problems)
        deployment = StrategyDeployment(
            version=_stored_version(version_row), symbol=body.symbol, timeframe=body.timeframe,
            volume=body.volume, master=body.master_account_id,
        )  # fmt: skip
        key = subjects.deployment_key(body.version_id, body.symbol, body.timeframe)
        row = await _insert_deployment(conn, {
            "deployment_id": "dep-" + secrets.token_hex(8), "tenant_id": str(caller.tenant_id),
            "strategy_id": strategy["strategy_id"], "version_id": body.version_id,
            "master_account_id": body.master_account_id, "symbol": body.symbol,
            "timeframe": body.timeframe.value, "volume": body.volume, "kv_key": key,
        })  # fmt: skip
        if row is None:
            raise Conflict(
                "this version already runs on this symbol and timeframe: delete that"
                " deployment first (one deployment per version, symbol and timeframe)"
            )
        view = _deployment_view(row)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create",
            entity="strategy_deployment", entity_id=view.deployment_id,
            after=msgspec.to_builtins(view),
        )  # fmt: skip
        try:
            await kv.put(key, msgspec.json.encode(deployment))
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS refused the deployment: {exc}") from None
    log.info("api_strategy_deployed", deployment=view.deployment_id, key=key,
             master=body.master_account_id)  # fmt: skip
    return 201, view


async def list_deployments(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, str)
    store, scope = ctx.state.store, Scope.of(ctx.who)
    async with store.read(scope) as conn:
        strategy = await _strategy_in_scope(ctx, conn)
        rows = await _list_deployments(
            store, conn, scope, strategy["strategy_id"], after, limit + 1
        )
    items = [_deployment_view(r) for r in rows[:limit]]
    cursor = next_cursor(rows, limit, lambda r: r["deployment_id"])
    return 200, Page(items=items, next_cursor=cursor)


async def delete_deployment(ctx: Context) -> tuple[int, Any]:
    """Stop a deployment: its key leaves the bucket (the workers stop running it; a run in
    flight may finish) in the transaction that removes its row."""
    caller = ctx.who
    kv = await _deployments_kv(ctx)
    store, scope = ctx.state.store, Scope.of(caller)
    async with store.tx(scope) as conn:
        strategy = await _strategy_in_scope(ctx, conn)
        row = await _delete_deployment(
            store, conn, scope, strategy["strategy_id"], ctx.request.match_info["deployment_id"]
        )
        if row is None:
            raise NotFound("no such deployment")
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="delete",
            entity="strategy_deployment", entity_id=row["deployment_id"],
            before=msgspec.to_builtins(_deployment_view(row)),
        )  # fmt: skip
        try:
            await kv.delete(row["kv_key"])
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS: {exc}") from None
    log.info("api_strategy_undeployed", deployment=row["deployment_id"], key=row["kv_key"])
    return 204, None


_STRATEGY = "/v1/strategies/{strategy_id}"
_PAGED = ("cursor", "limit")

ROUTES = [
    Route("POST", "/v1/strategies", create_strategy,
          "Upload a strategy: its first immutable version", "strategies", roles=PROVIDERS,
          request=NewStrategy, response=StrategyCreated, status=201, errors=(409, 413, 422)),
    Route("GET", "/v1/strategies", list_strategies, "The provider's strategies", "strategies",
          roles=PROVIDERS, response=Page[StrategyView], query=_PAGED),
    Route("GET", _STRATEGY, get_strategy, "One strategy and its current version", "strategies",
          roles=PROVIDERS, response=StrategyView, errors=(404,)),
    Route("POST", f"{_STRATEGY}/versions", upload_version,
          "Upload a new version (the same source and parameters answer the existing one)",
          "strategies", roles=PROVIDERS, request=NewStrategyVersion, response=VersionUploaded,
          status=201, errors=(404, 413, 422)),
    Route("GET", f"{_STRATEGY}/versions", list_versions,
          "The strategy's versions, oldest first, with their source", "strategies",
          roles=PROVIDERS, response=Page[StrategyVersionView], query=_PAGED, errors=(404, 422)),
    Route("POST", f"{_STRATEGY}/deployments", create_deployment,
          "Run a version on a symbol and timeframe, trading a paper master", "strategies",
          roles=PROVIDERS, request=NewDeployment, response=DeploymentView, status=201,
          errors=(404, 409, 422, 503)),
    Route("GET", f"{_STRATEGY}/deployments", list_deployments, "The strategy's deployments",
          "strategies", roles=PROVIDERS, response=Page[DeploymentView], query=_PAGED,
          errors=(404,)),
    Route("DELETE", f"{_STRATEGY}/deployments/{{deployment_id}}", delete_deployment,
          "Stop a deployment (removed from the workers' bucket)", "strategies",
          roles=PROVIDERS, status=204, errors=(404, 503)),
]  # fmt: skip
