"""Trading accounts: broker credentials sealed at rest, terminal tokens, connection status."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog

from engine.api import metrics
from engine.api.auth import Role, new_terminal_token, token_hash
from engine.api.crypto import seal_credentials
from engine.api.errors import Conflict, FieldProblem, NotFound, ValidationFailed
from engine.api.handling import (
    PROVIDERS,
    TENANT_USERS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import (
    AccountRole,
    AccountUpdate,
    AccountView,
    ConnectionState,
    ConnectionStatus,
    NewAccount,
    Page,
    Platform,
    TerminalToken,
)
from engine.api.store import Scope
from engine.runtime.operator import STALE_AFTER_S
from schemas import codec, subjects

log = structlog.get_logger("tradecopy.api")


def new_account_id() -> str:
    """Made here, never chosen by a client: an id taken by another tenant would otherwise
    answer "exists" and reveal it. Valid as a subject token (``schemas.common``)."""
    return "acc-" + secrets.token_hex(8)


def status_of(raw: bytes | None, now_ns: int) -> ConnectionStatus:
    """The account's connection state from its latest ``AccountState`` (``tc_accounts``)."""
    if raw is None:
        return ConnectionStatus(state=ConnectionState.UNKNOWN)
    try:
        state = codec.account_state_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ConnectionStatus(state=ConnectionState.UNKNOWN)
    if state.terminal is not None and not state.terminal.connected:
        verdict = ConnectionState.DISCONNECTED
    elif now_ns - state.ts_ns > STALE_AFTER_S * 1e9:
        verdict = ConnectionState.SILENT
    else:
        verdict = ConnectionState.CONNECTED
    return ConnectionStatus(
        state=verdict, ts_ns=state.ts_ns, currency=state.currency, balance=state.balance,
        equity=state.equity, terminal=state.terminal,
    )  # fmt: skip


async def _latest_state(ctx: Context, account_id: str) -> bytes | None:
    kv = await ctx.state.bucket(subjects.KV_ACCOUNTS)
    if kv is None:
        return None
    try:
        entry = await kv.get(account_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    except (nats.errors.Error, TimeoutError):
        return None  # NATS unreachable: say "unknown" rather than fail the read
    return entry.value


def account_view(row: Any, status: ConnectionStatus | None = None) -> AccountView:
    return AccountView(
        account_id=row["account_id"], name=row["name"], platform=Platform(row["platform"]),
        role=AccountRole(row["role"]),
        owner_user_id=None if row["owner_user_id"] is None else str(row["owner_user_id"]),
        key_id=row["key_id"], has_terminal_token=row["terminal_token_hash"] is not None,
        created_at=iso(row["created_at"]), updated_at=iso(row["updated_at"]), status=status,
    )  # fmt: skip


def _audited(row: Any) -> dict[str, Any]:
    """What the audit log keeps of an account: never its credentials."""
    return {
        "name": row["name"], "platform": row["platform"], "role": row["role"],
        "owner_user_id": None if row["owner_user_id"] is None else str(row["owner_user_id"]),
        "key_id": row["key_id"],
    }  # fmt: skip


async def create_account(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    body = await parse_body(ctx.request, NewAccount)
    scope = Scope.of(caller)
    store = ctx.state.store
    owner: uuid.UUID | None
    if caller.role is Role.FOLLOWER:
        if body.role is not AccountRole.FOLLOWER:
            raise _invalid("role", "a follower adds follower accounts only")
        if body.owner_user_id not in (None, str(caller.user_id)):
            raise _invalid("owner_user_id", "a follower's accounts are its own")
        owner = caller.user_id
    else:
        owner = None
    account_id = new_account_id()
    key = ctx.state.secrets.master_key
    sealed = seal_credentials(key, body.credentials, str(caller.tenant_id), account_id)
    async with store.tx(scope) as conn:
        if body.owner_user_id is not None and caller.role is Role.PROVIDER:
            owner = await _follower_of_tenant(ctx, conn, scope, body.owner_user_id)
        limit, used = await store.account_pool(conn, str(caller.tenant_id))
        if limit is not None and used >= limit:
            metrics.ACCOUNT_POOL_FULL.inc()
            log.info("api_account_pool_full", tenant=caller.tenant_id, limit=limit)
            raise Conflict(
                f"the operator plan's account pool is full: {used} of {limit} accounts"
                " (master and follower); delete one or move to a larger plan"
            )
        row = await store.create_account(
            conn, account_id=account_id, tenant_id=str(caller.tenant_id), owner_user_id=owner,
            name=body.name, platform=body.platform.value, role=body.role.value,
            credentials=sealed, key_id=key.key_id,
        )  # fmt: skip
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="account",
            entity_id=account_id, after=_audited(row),
        )  # fmt: skip
    return 201, account_view(row)


async def _follower_of_tenant(ctx: Context, conn: Any, scope: Scope, raw: str) -> uuid.UUID:
    try:
        user_id = uuid.UUID(raw)
    except ValueError:
        raise _invalid("owner_user_id", "not a user id") from None
    row = await ctx.state.store.get_user(conn, scope, user_id)
    if row is None or row["role"] != Role.FOLLOWER.value:
        raise _invalid("owner_user_id", "no follower user of this tenant has that id")
    return user_id


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, errors=[FieldProblem(field=field, message=message)])


async def list_accounts(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    after, limit = page_params(ctx, str)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_accounts(conn, Scope.of(caller), after, limit + 1)
    rows_here = rows[:limit]
    raw = await asyncio.gather(*(_latest_state(ctx, r["account_id"]) for r in rows_here))
    now = time.time_ns()
    items = [account_view(r, status_of(s, now)) for r, s in zip(rows_here, raw, strict=True)]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["account_id"]))


async def _account_in_scope(ctx: Context, conn: Any, *, lock: bool = False) -> Any:
    account_id = ctx.request.match_info["account_id"]
    row = await ctx.state.store.get_account(conn, Scope.of(ctx.who), account_id, lock=lock)
    if row is None:
        raise NotFound("no such account")
    return row


async def get_account(ctx: Context) -> tuple[int, Any]:
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        row = await _account_in_scope(ctx, conn)
    raw = await _latest_state(ctx, row["account_id"])
    return 200, account_view(row, status_of(raw, time.time_ns()))


async def update_account(ctx: Context) -> tuple[int, Any]:
    """Rename, or replace the broker credentials (sealed with the current key)."""
    caller = ctx.who
    body = await parse_body(ctx.request, AccountUpdate)
    store = ctx.state.store
    key = ctx.state.secrets.master_key
    async with store.tx(Scope.of(caller)) as conn:
        before = await _account_in_scope(ctx, conn, lock=True)
        sealed, key_id = before["credentials"], before["key_id"]
        if body.credentials is not None:
            sealed = seal_credentials(
                key, body.credentials, before["tenant_id"], before["account_id"]
            )
            key_id = key.key_id
        row = await store.update_account(
            conn, before["account_id"], name=body.name or before["name"], credentials=sealed,
            key_id=key_id,
        )  # fmt: skip
        after = _audited(row) | ({"credentials": "replaced"} if body.credentials else {})
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="update", entity="account",
            entity_id=row["account_id"], before=_audited(before), after=after,
        )  # fmt: skip
    return 200, account_view(row)


async def issue_terminal_token(ctx: Context) -> tuple[int, Any]:
    """A new token for the account's terminal, shown once; the previous one stops working."""
    caller = ctx.who
    store = ctx.state.store
    token = new_terminal_token()
    async with store.tx(Scope.of(caller)) as conn:
        row = await _account_in_scope(ctx, conn, lock=True)
        await store.set_terminal_token(conn, row["account_id"], token_hash(token))
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="issue", entity="terminal_token",
            entity_id=row["account_id"],
            before={"had_token": row["terminal_token_hash"] is not None}, after={"had_token": True},
        )  # fmt: skip
    return 201, TerminalToken(account_id=row["account_id"], token=token)


async def delete_account(ctx: Context) -> tuple[int, Any]:
    """Remove an account and its sealed credentials; refused while a link names it."""
    caller = ctx.who
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await _account_in_scope(ctx, conn, lock=True)
        if not await store.delete_account(conn, row["account_id"]):
            raise Conflict("links still name this account: delete them first")
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="delete", entity="account",
            entity_id=row["account_id"], before=_audited(row),
        )  # fmt: skip
    return 204, None


ROUTES = [
    Route("POST", "/v1/accounts", create_account, "Add a trading account", "accounts",
          roles=TENANT_USERS, request=NewAccount, response=AccountView, status=201,
          errors=(409, 422)),
    Route("GET", "/v1/accounts", list_accounts, "The caller's accounts, with connection status",
          "accounts", roles=TENANT_USERS, response=Page[AccountView], query=("cursor", "limit")),
    Route("GET", "/v1/accounts/{account_id}", get_account, "One account and its connection",
          "accounts", roles=TENANT_USERS, response=AccountView, errors=(404,)),
    Route("PATCH", "/v1/accounts/{account_id}", update_account,
          "Rename an account or replace its broker credentials", "accounts", roles=TENANT_USERS,
          request=AccountUpdate, response=AccountView, errors=(404, 422)),
    Route("DELETE", "/v1/accounts/{account_id}", delete_account, "Delete an account",
          "accounts", roles=PROVIDERS, status=204, errors=(404, 409)),
    Route("POST", "/v1/accounts/{account_id}/terminal-token", issue_terminal_token,
          "Issue the account's terminal token (shown once)", "accounts", roles=PROVIDERS,
          response=TerminalToken, status=201, errors=(404,)),
]  # fmt: skip
