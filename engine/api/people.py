"""Tenants, users, logins, refresh tokens, API keys and the audit log."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import msgspec
import structlog

from engine.api import metrics, secondfactor
from engine.api.auth import (
    Caller,
    Role,
    hash_password,
    issue_access_token,
    new_api_key,
    new_refresh_token,
    password_needs_rehash,
    token_hash,
    verify_password,
)
from engine.api.errors import Conflict, NotFound, Unauthorized
from engine.api.handling import (
    ANY_USER,
    OPERATORS,
    PROVIDERS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import (
    ApiKeyCreated,
    ApiKeyView,
    AuditEntry,
    LoginRequest,
    NewApiKey,
    NewFollower,
    NewTenant,
    Page,
    PasswordChange,
    RefreshRequest,
    TenantView,
    TokenPair,
    UserView,
)
from engine.api.store import PLATFORM, Scope

log = structlog.get_logger("tradecopy.api")

_BAD_LOGIN = "wrong email, username or password"


def user_view(row: Any) -> UserView:
    return UserView(
        user_id=str(row["user_id"]),
        role=Role(row["role"]),
        tenant_id=row["tenant_id"],
        email=row["email"],
        username=row["username"],
        created_at=iso(row["created_at"]),
        email_verified=row["email_verified_at"] is not None,
    )


async def _issue_tokens(ctx: Context, conn: Any, caller: Caller, family_id: uuid.UUID) -> TokenPair:
    """A new token pair; ``conn`` is in platform scope (the TOTP policy is platform-wide)."""
    cfg = ctx.state.config
    pending = await ctx.state.store.totp_enrolment_pending(conn, caller.user_id, caller.role)
    caller = dataclasses.replace(caller, totp_enrolment_pending=pending)
    refresh = new_refresh_token()
    await ctx.state.store.add_refresh_token(
        conn, user_id=caller.user_id, tenant_id=caller.tenant_id, family_id=family_id,
        token_hash=token_hash(refresh), ttl_s=cfg.refresh_ttl_s,
    )  # fmt: skip
    access = issue_access_token(
        caller, secret=ctx.state.secrets.jwt_secret, issuer=cfg.issuer,
        audience=cfg.audience, ttl_s=cfg.access_ttl_s,
    )  # fmt: skip
    return TokenPair(access_token=access, refresh_token=refresh, expires_in=cfg.access_ttl_s)


async def login(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, LoginRequest)
    ctx.state.limit(ctx.request, "login:" + body.identifier.lower())
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        row = await store.user_by_login(conn, body.identifier)
        ok = verify_password(None if row is None else row["password_hash"], body.password)
        if row is None or not ok or row["disabled"]:
            metrics.AUTH_FAILURES.labels("login").inc()
            raise Unauthorized(_BAD_LOGIN)
        await secondfactor.check_login(
            ctx, conn, row, body.totp_code, body.recovery_code, "login:" + body.identifier.lower()
        )
        if password_needs_rehash(row["password_hash"]):
            await store.set_password_hash(conn, row["user_id"], hash_password(body.password))
        caller = Caller(user_id=row["user_id"], role=Role(row["role"]), tenant_id=row["tenant_id"])
        pair = await _issue_tokens(ctx, conn, caller, uuid.uuid4())
    log.info("api_login", user_id=str(caller.user_id), role=caller.role.value)
    return 200, pair


async def refresh(ctx: Context) -> tuple[int, Any]:
    """Rotate: the presented token is spent and a new one of the same family returned. A
    spent or revoked token presented again means it leaked: the whole family is revoked."""
    body = await parse_body(ctx.request, RefreshRequest)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        row = await store.refresh_token_for_update(conn, token_hash(body.refresh_token))
        if row is None:
            metrics.AUTH_FAILURES.labels("refresh_unknown").inc()
            raise Unauthorized("unknown refresh token")
        if row["used_at"] is not None or row["revoked_at"] is not None:
            revoked = await store.revoke_refresh_family(conn, row["family_id"])
            await store.audit(
                conn, None, tenant_id=row["tenant_id"], action="revoke_family",
                entity="refresh_token_family", entity_id=str(row["family_id"]),
                after={"reason": "reuse", "user_id": str(row["user_id"]), "revoked": revoked},
            )  # fmt: skip
            metrics.REFRESH_REUSE.inc()
            log.warning("api_refresh_reuse", user_id=str(row["user_id"]))
            refused: Unauthorized | None = Unauthorized("refresh token already used: signed out")
        elif row["expired"] or row["disabled"]:
            refused = Unauthorized("refresh token expired")
        else:
            refused = None
            await store.mark_refresh_token_used(conn, row["token_id"])
            caller = Caller(
                user_id=row["user_id"], role=Role(row["role"]), tenant_id=row["tenant_id"]
            )
            pair = await _issue_tokens(ctx, conn, caller, row["family_id"])
    if refused is not None:  # after the commit: the family stays revoked
        metrics.AUTH_FAILURES.labels("refresh").inc()
        raise refused
    return 200, pair


async def logout(ctx: Context) -> tuple[int, Any]:
    """Revoke the refresh token's family (every token rotated from one login)."""
    body = await parse_body(ctx.request, RefreshRequest)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        row = await store.refresh_token_for_update(conn, token_hash(body.refresh_token))
        if row is not None:
            await store.revoke_refresh_family(conn, row["family_id"])
    return 204, None


async def me(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.get_user(conn, Scope.of(caller), caller.user_id)
        totp = await store.get_totp(conn, Scope.of(caller), caller.user_id)
    if row is None:
        raise Unauthorized("the user of this token no longer exists")
    enabled = totp is not None and totp["confirmed_at"] is not None
    return 200, msgspec.structs.replace(user_view(row), totp_enabled=enabled)


async def change_password(ctx: Context) -> tuple[int, Any]:
    """Change the caller's own password; every refresh token of the user is revoked, so
    other sessions end when their access token expires."""
    caller = ctx.who
    ctx.state.limit(ctx.request, f"password:{caller.user_id}")
    body = await parse_body(ctx.request, PasswordChange)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.get_user(conn, Scope.of(caller), caller.user_id)
        if row is None or not verify_password(row["password_hash"], body.current_password):
            metrics.AUTH_FAILURES.labels("password_change").inc()
            raise Unauthorized("the current password is wrong")
        await store.set_password_hash(conn, caller.user_id, hash_password(body.new_password))
        revoked = await store.revoke_user_refresh_tokens(conn, caller.user_id)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="change_password", entity="user",
            entity_id=str(caller.user_id), after={"refresh_tokens_revoked": revoked},
        )  # fmt: skip
    return 204, None


# --------------------------------------------------------------------------- tenants


async def create_tenant(ctx: Context) -> tuple[int, Any]:
    """A provider (tenant) and its first provider user, in one transaction."""
    body = await parse_body(ctx.request, NewTenant)
    password_hash = hash_password(body.provider_password)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        row = await store.create_tenant(conn, body.tenant_id, body.name)
        if row is None:
            raise Conflict(f"tenant {body.tenant_id!r} exists")
        user = await store.create_user(
            conn, role=Role.PROVIDER, tenant_id=body.tenant_id, email=body.provider_email,
            username=body.provider_username, password_hash=password_hash,
        )  # fmt: skip
        if user is None:
            raise Conflict("a user with that email or username exists")
        view = TenantView(
            tenant_id=row["tenant_id"], name=row["name"], created_at=iso(row["created_at"])
        )
        await store.audit(
            conn, ctx.who, tenant_id=body.tenant_id, action="create", entity="tenant",
            entity_id=body.tenant_id,
            after={"name": body.name, "provider_user_id": str(user["user_id"])},
        )  # fmt: skip
    return 201, view


async def list_tenants(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, str)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        rows = await store.list_tenants(conn, after, limit + 1)
    items = [
        TenantView(tenant_id=r["tenant_id"], name=r["name"], created_at=iso(r["created_at"]))
        for r in rows[:limit]
    ]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["tenant_id"]))


# ----------------------------------------------------------------------------- users


async def create_follower(ctx: Context) -> tuple[int, Any]:
    """A follower user of the caller's tenant."""
    caller = ctx.who
    body = await parse_body(ctx.request, NewFollower)
    password_hash = hash_password(body.password)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.create_user(
            conn, role=Role.FOLLOWER, tenant_id=caller.tenant_id, email=body.email,
            username=body.username, password_hash=password_hash,
        )  # fmt: skip
        if row is None:
            raise Conflict("a user with that email or username exists")
        view = user_view(row)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="user",
            entity_id=view.user_id, after={"role": "follower", "email": view.email},
        )  # fmt: skip
    return 201, view


async def list_users(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    after, limit = page_params(ctx, uuid.UUID)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_users(conn, Scope.of(caller), after, limit + 1)
    items = [user_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: str(r["user_id"])))


async def get_user(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    user_id = path_uuid(ctx, "user_id")
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.get_user(conn, Scope.of(caller), user_id)
    if row is None:
        raise NotFound("no such user")
    return 200, user_view(row)


def path_uuid(ctx: Context, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(ctx.request.match_info[name])
    except ValueError:
        raise NotFound(f"no such {name.removesuffix('_id')}") from None


# -------------------------------------------------------------------------- API keys


def key_view(row: Any) -> ApiKeyView:
    return ApiKeyView(
        key_id=str(row["key_id"]), name=row["name"], prefix=row["prefix"],
        created_at=iso(row["created_at"]), revoked=row["revoked_at"] is not None,
    )  # fmt: skip


async def create_api_key(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    body = await parse_body(ctx.request, NewApiKey)
    key, prefix = new_api_key()
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.create_api_key(
            conn, caller, name=body.name, prefix=prefix, key_hash=token_hash(key)
        )
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="api_key",
            entity_id=str(row["key_id"]), after={"name": body.name, "prefix": prefix},
        )  # fmt: skip
    return 201, ApiKeyCreated(key_id=str(row["key_id"]), name=body.name, prefix=prefix, key=key)


async def list_api_keys(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    after, limit = page_params(ctx, uuid.UUID)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_api_keys(conn, Scope.of(caller), caller, after, limit + 1)
    items = [key_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: str(r["key_id"])))


async def revoke_api_key(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    key_id = path_uuid(ctx, "key_id")
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.revoke_api_key(conn, Scope.of(caller), caller, key_id)
        if row is None:
            raise NotFound("no such API key")
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="revoke", entity="api_key",
            entity_id=str(key_id), after={"revoked": True},
        )  # fmt: skip
    return 204, None


# ----------------------------------------------------------------------------- audit


async def list_audit(ctx: Context) -> tuple[int, Any]:
    """Newest first: who changed what, with the state before and after."""
    caller = ctx.who
    after, limit = page_params(ctx, int)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_audit(conn, Scope.of(caller), after, limit + 1)
    items = [
        AuditEntry(
            audit_id=r["audit_id"],
            tenant_id=r["tenant_id"],
            actor_user_id=None if r["actor_user_id"] is None else str(r["actor_user_id"]),
            actor_key_id=None if r["actor_key_id"] is None else str(r["actor_key_id"]),
            action=r["action"],
            entity=r["entity"],
            entity_id=r["entity_id"],
            before=_decoded(r["before"]),
            after=_decoded(r["after"]),
            at=iso(r["at"]),
        )
        for r in rows[:limit]
    ]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["audit_id"]))


def _decoded(value: str | None) -> dict[str, Any] | None:
    return None if value is None else msgspec.json.decode(value)


ROUTES = [
    Route("POST", "/v1/auth/login", login, "Log in with email or username and password", "auth",
          request=LoginRequest, response=TokenPair, rate_limited=True, errors=(401, 422, 429)),
    Route("POST", "/v1/auth/refresh", refresh, "Rotate a refresh token for a new token pair",
          "auth", request=RefreshRequest, response=TokenPair, rate_limited=True,
          errors=(401, 422, 429)),
    Route("POST", "/v1/auth/logout", logout, "Revoke a refresh token and its family", "auth",
          request=RefreshRequest, status=204, rate_limited=True, errors=(422, 429)),
    Route("GET", "/v1/me", me, "The calling user", "users", roles=ANY_USER, response=UserView,
          before_totp=True),
    Route("PUT", "/v1/me/password", change_password, "Change one's own password", "users",
          roles=ANY_USER, request=PasswordChange, status=204, rate_limited=True,
          errors=(422, 429)),
    Route("POST", "/v1/tenants", create_tenant, "Add a provider (tenant) and its provider user",
          "tenants", roles=OPERATORS, request=NewTenant, response=TenantView, status=201,
          errors=(409, 422)),
    Route("GET", "/v1/tenants", list_tenants, "Every tenant", "tenants", roles=OPERATORS,
          response=Page[TenantView], query=("cursor", "limit")),
    Route("POST", "/v1/users", create_follower, "Add a follower user to the caller's tenant",
          "users", roles=PROVIDERS, request=NewFollower, response=UserView, status=201,
          errors=(409, 422)),
    Route("GET", "/v1/users", list_users, "Users of the caller's tenant (a follower: itself)",
          "users", roles=ANY_USER, response=Page[UserView], query=("cursor", "limit")),
    Route("GET", "/v1/users/{user_id}", get_user, "One user of the caller's tenant", "users",
          roles=ANY_USER, response=UserView, errors=(404,)),
    Route("POST", "/v1/api-keys", create_api_key, "Create an API key (shown once)", "api-keys",
          roles=frozenset({Role.OPERATOR, Role.PROVIDER}), request=NewApiKey,
          response=ApiKeyCreated, status=201, errors=(422,)),
    Route("GET", "/v1/api-keys", list_api_keys, "The caller's API keys", "api-keys",
          roles=frozenset({Role.OPERATOR, Role.PROVIDER}), response=Page[ApiKeyView],
          query=("cursor", "limit")),
    Route("DELETE", "/v1/api-keys/{key_id}", revoke_api_key, "Revoke one of the caller's keys",
          "api-keys", roles=frozenset({Role.OPERATOR, Role.PROVIDER}), status=204,
          errors=(404,)),
    Route("GET", "/v1/audit", list_audit, "The audit log of the caller's tenant, newest first",
          "audit", roles=frozenset({Role.OPERATOR, Role.PROVIDER}),
          response=Page[AuditEntry], query=("cursor", "limit")),
]  # fmt: skip
