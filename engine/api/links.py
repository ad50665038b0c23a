"""Copy links and emergency stops: validated with the CLI's own checks and written to the same
NATS buckets (``tc_links``, ``tc_control``), so replicators pick every change up live."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from engine.api.errors import Conflict, FieldProblem, NotFound, Unavailable, ValidationFailed
from engine.api.handling import (
    OPERATORS,
    PROVIDERS,
    TENANT_USERS,
    Context,
    Route,
    encode_cursor,
    iso,
    next_cursor,
    page_params,
    parse_body,
    parse_object,
)
from engine.api.models import LinkView, Page, StopRequest
from engine.api.store import Scope
from engine.runtime.links import apply_links, validate_link
from engine.runtime.links import resume_link as lift_protection_pause
from engine.runtime.operator import UnknownStopTarget, check_stop_target, read_stops
from schemas import codec, subjects
from schemas.common import is_account_id
from schemas.control import EmergencyStop, StopScope
from schemas.links import CopyLink

#: The request body of a link: a ``CopyLink`` without ``link_id`` (the path or the server
#: names it). Documented under this name in the OpenAPI document.
LINK_SETTINGS = "LinkSettings"


def new_link_id() -> str:
    return "lnk-" + secrets.token_hex(8)


async def _kv(ctx: Context, bucket: str) -> Any:
    kv = await ctx.state.bucket(bucket)
    if kv is None:
        raise Unavailable("NATS is not reachable")
    return kv


def _validated(raw: dict[str, Any], link_id: str) -> CopyLink:
    """Every invalid field named, as ``tradecopy links validate`` names them."""
    if "link_id" in raw and raw["link_id"] != link_id:
        raise ValidationFailed(
            "link_id is given by the server (create) or the path (update)",
            errors=[FieldProblem(field="link_id", message="must be omitted or match the path")],
        )
    raw = {**raw, "link_id": link_id}
    link, errors = validate_link(raw)
    if link is None:
        label = f"links[0] ({link_id})."
        problems = [
            FieldProblem(field=e.where.removeprefix(label), message=e.message) for e in errors
        ]
        raise ValidationFailed(f"{len(problems)} invalid field(s)", errors=problems)
    return link


async def _check_accounts(ctx: Context, conn: Any, link: CopyLink) -> Any:
    """The link's accounts must be the caller's tenant's: a master and a follower. The answer
    is the same whether an id is another tenant's or nobody's."""
    store, scope = ctx.state.store, Scope.of(ctx.who)
    problems = []
    master = await store.get_account(conn, scope, link.master)
    if master is None or master["role"] != "master":
        problems.append(FieldProblem(field="master", message="no master account of yours"))
    follower = await store.get_account(conn, scope, link.follower)
    if follower is None or follower["role"] != "follower":
        problems.append(FieldProblem(field="follower", message="no follower account of yours"))
    if problems:
        raise ValidationFailed(f"{len(problems)} invalid field(s)", errors=problems)
    return follower["owner_user_id"]


async def _put(kv: Any, link: CopyLink) -> None:
    try:
        await apply_links(kv, [link])
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS refused the link: {exc}") from None


async def _read(kv: Any, link_id: str) -> CopyLink | None:
    try:
        entry = await kv.get(link_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS: {exc}") from None
    return None if entry.value is None else codec.copy_link_decoder.decode(entry.value)


def _view(row: Any, link: CopyLink) -> LinkView:
    return LinkView(link=link, created_at=iso(row["created_at"]))


def _builtins(link: CopyLink | None) -> Any:
    return None if link is None else msgspec.to_builtins(link)


async def create_link(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    link = _validated(await parse_object(ctx.request), new_link_id())
    kv = await _kv(ctx, subjects.KV_LINKS)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        owner = await _check_accounts(ctx, conn, link)
        row = await store.create_link(
            conn, link_id=link.link_id, tenant_id=str(caller.tenant_id), master=link.master,
            follower=link.follower, owner_user_id=owner,
        )  # fmt: skip
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="link",
            entity_id=link.link_id, after=_builtins(link),
        )  # fmt: skip
        # Written inside the transaction: a refused write leaves no row behind.
        await _put(kv, link)
    return 201, _view(row, link)


async def _link_in_scope(ctx: Context, conn: Any, *, lock: bool = False) -> Any:
    link_id = ctx.request.match_info["link_id"]
    row = await ctx.state.store.get_link(conn, Scope.of(ctx.who), link_id, lock=lock)
    if row is None:
        raise NotFound("no such link")
    return row


async def list_links(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    after, limit = page_params(ctx, str)
    kv = await _kv(ctx, subjects.KV_LINKS)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_links(conn, Scope.of(caller), after, limit + 1)
    items = []
    for row in rows[:limit]:
        link = await _read(kv, row["link_id"])
        if link is not None:
            items.append(_view(row, link))
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["link_id"]))


async def get_link(ctx: Context) -> tuple[int, Any]:
    store = ctx.state.store
    kv = await _kv(ctx, subjects.KV_LINKS)
    async with store.tx(Scope.of(ctx.who)) as conn:
        row = await _link_in_scope(ctx, conn)
    link = await _read(kv, row["link_id"])
    if link is None:
        raise NotFound("the link is no longer in NATS")
    return 200, _view(row, link)


async def update_link(ctx: Context) -> tuple[int, Any]:
    """Replace a link's settings (the whole link, as a link file would)."""
    caller = ctx.who
    raw = await parse_object(ctx.request)
    kv = await _kv(ctx, subjects.KV_LINKS)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await _link_in_scope(ctx, conn, lock=True)
        link = _validated(raw, row["link_id"])
        owner = await _check_accounts(ctx, conn, link)
        before = await _read(kv, row["link_id"])
        await store.update_link_accounts(conn, link.link_id, link.master, link.follower, owner)
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="update", entity="link",
            entity_id=link.link_id, before=_builtins(before), after=_builtins(link),
        )  # fmt: skip
        await _put(kv, link)
    return 200, _view(row, link)


async def _set_enabled(ctx: Context, enabled: bool) -> tuple[int, Any]:
    caller = ctx.who
    kv = await _kv(ctx, subjects.KV_LINKS)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await _link_in_scope(ctx, conn, lock=True)
        before = await _read(kv, row["link_id"])
        if before is None:
            raise NotFound("the link is no longer in NATS")
        link = msgspec.structs.replace(before, enabled=enabled)
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="resume" if enabled else "pause",
            entity="link", entity_id=link.link_id, before={"enabled": before.enabled},
            after={"enabled": enabled},
        )  # fmt: skip
        await _put(kv, link)
        if enabled:
            await _lift_protection_pause(ctx, conn, row)
    return 200, _view(row, link)


async def _lift_protection_pause(ctx: Context, conn: Any, row: Any) -> None:
    """Lift a replicator protection's pause (``tc_link_state``) of the link, audited."""
    state_kv = await _kv(ctx, subjects.KV_LINK_STATE)
    try:
        lifted = await lift_protection_pause(state_kv, row["link_id"])
    except nats.js.errors.KeyWrongLastSequenceError:
        raise Conflict("the replicator changed the link's state meanwhile; resume again") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS: {exc}") from None
    if lifted:
        await ctx.state.store.audit(
            conn, ctx.who, tenant_id=row["tenant_id"], action="resume_protection",
            entity="link", entity_id=row["link_id"], before={"protection_paused": True},
            after={"protection_paused": False},
        )  # fmt: skip


async def pause_link(ctx: Context) -> tuple[int, Any]:
    """Stop opening new copies (``enabled = false``); existing copies still close."""
    return await _set_enabled(ctx, False)


async def resume_link(ctx: Context) -> tuple[int, Any]:
    """Copy again (``enabled = true``), and lift a protection's pause (``tc_link_state``,
    as ``tradecopy links resume`` does) if one holds the link."""
    return await _set_enabled(ctx, True)


async def delete_link(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    kv = await _kv(ctx, subjects.KV_LINKS)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await _link_in_scope(ctx, conn, lock=True)
        before = await _read(kv, row["link_id"])
        await store.delete_link(conn, row["link_id"])
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="delete", entity="link",
            entity_id=row["link_id"], before=_builtins(before),
        )  # fmt: skip
        try:
            await kv.delete(row["link_id"])
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS: {exc}") from None
    return 204, None


# ----------------------------------------------------------------------------- stops


async def list_stops(ctx: Context) -> tuple[int, Any]:
    """Emergency stops, active and cleared, by key."""
    after, limit = page_params(ctx, str)
    try:
        stops = await read_stops(ctx.state.js, active_only=False)
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS: {exc}") from None
    stops = [s for s in stops if after is None or s.key > after]
    page = stops[:limit]
    cursor = encode_cursor(page[-1].key) if len(stops) > limit else None
    return 200, Page(items=page, next_cursor=cursor)


async def set_stop(ctx: Context) -> tuple[int, Any]:
    """Set or clear an emergency stop, checked as ``tradecopy stop`` checks it."""
    body = await parse_body(ctx.request, StopRequest)
    if body.scope is not StopScope.GLOBAL and not body.target:
        raise _invalid("target", f"a {body.scope.value} stop needs its id")
    if body.scope is StopScope.GLOBAL and body.target:
        raise _invalid("target", "the global stop takes no id")
    if body.target and not is_account_id(body.target):
        raise _invalid("target", "letters, digits, _ and - only")
    stop = EmergencyStop(
        scope=body.scope, target=body.target, active=body.active, reason=body.reason,
        ts_ns=time.time_ns(),
    )  # fmt: skip
    kv = await _kv(ctx, subjects.KV_CONTROL)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        if stop.active and not body.force:
            try:
                await check_stop_target(ctx.state.js, stop.scope, stop.target)
            except UnknownStopTarget as exc:
                raise _invalid("target", str(exc).replace("--force", "force")) from None
        await store.audit(
            conn, ctx.who, tenant_id=None, action="set" if stop.active else "clear",
            entity="emergency_stop", entity_id=stop.key, after=msgspec.to_builtins(stop),
        )  # fmt: skip
        try:
            await kv.put(stop.key, codec.encode(stop))
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS refused the stop: {exc}") from None
    return 200, stop


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, errors=[FieldProblem(field=field, message=message)])


ROUTES = [
    Route("POST", "/v1/links", create_link, "Create a copy link (written to NATS)", "links",
          roles=PROVIDERS, request=LINK_SETTINGS, response=LinkView, status=201,
          errors=(422, 503)),
    Route("GET", "/v1/links", list_links, "The caller's links", "links", roles=TENANT_USERS,
          response=Page[LinkView], query=("cursor", "limit")),
    Route("GET", "/v1/links/{link_id}", get_link, "One link", "links", roles=TENANT_USERS,
          response=LinkView, errors=(404,)),
    Route("PUT", "/v1/links/{link_id}", update_link, "Replace a link's settings", "links",
          roles=PROVIDERS, request=LINK_SETTINGS, response=LinkView, errors=(404, 422, 503)),
    Route("POST", "/v1/links/{link_id}/pause", pause_link, "Pause a link (no new copies)",
          "links", roles=TENANT_USERS, response=LinkView, errors=(404, 503)),
    Route("POST", "/v1/links/{link_id}/resume", resume_link, "Resume a paused link", "links",
          roles=TENANT_USERS, response=LinkView, errors=(404, 409, 503)),
    Route("DELETE", "/v1/links/{link_id}", delete_link,
          "Delete a link (a follower cancels its own subscription)", "links",
          roles=TENANT_USERS, status=204, errors=(404, 503)),
    Route("GET", "/v1/stops", list_stops, "Emergency stops", "stops", roles=OPERATORS,
          response=Page[EmergencyStop], query=("cursor", "limit")),
    Route("POST", "/v1/stops", set_stop, "Set or clear an emergency stop", "stops",
          roles=OPERATORS, request=StopRequest, response=EmergencyStop, errors=(422, 503)),
]  # fmt: skip
