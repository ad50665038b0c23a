"""Trading from the web: manual orders on a follower account, risk templates a provider applies
to links, and order templates (a user's presets of manual orders).

A manual order is a follower order with ``manual`` set (``schemas.orders``), published on the
account's own orders subject (``tc.v1.follower.<account>.orders``), which the connector serving
the account consumes as it consumes copies. Its id comes from the account and the request's
``client_order_id``, and is the ``Nats-Msg-Id``: a retried request is stored once and executed
once (the connector remembers every order id it ran). The answer (202) says the order is on
its way; its outcome is the execution report (``GET /v1/stream``, ``event: report``).
"""

from __future__ import annotations

import enum
import math
import time
import uuid
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors

from engine.api import metrics
from engine.api.errors import Conflict, FieldProblem, NotFound, Unavailable, ValidationFailed
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
from engine.api.links import _kv, _link_in_scope, _put, _read, _view
from engine.api.models import Body, LinkView, Page, View
from engine.api.store import Scope
from engine.core.volume import STEP_EPSILON
from engine.runtime.links import validate_link, validate_link_fragment
from schemas import codec, subjects
from schemas.account import SymbolSpec
from schemas.common import OrderType, Side
from schemas.orders import (
    MANUAL_LINK_ID,
    FollowerClose,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingPlace,
    manual_order_id,
)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Lots = Annotated[float, msgspec.Meta(gt=0.0, le=100_000.0)]
Level = Annotated[float, msgspec.Meta(gt=0.0)]
Points = Annotated[int, msgspec.Meta(gt=0, le=10_000_000)]
ClientOrderId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
_POSITION_ID = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]

#: The fields of a link a risk template may set: its sizing and its protection.
TEMPLATE_FIELDS = frozenset({
    "sizing", "max_lot", "below_min", "max_open_positions", "max_signal_age_ms",
    "max_price_deviation", "deviation_policy", "deviation_wait_ms", "daily_trade_limit",
    "equity_stop", "max_drawdown_percent", "daily_loss_percent", "protection_action",
})  # fmt: skip


class ManualOrderType(enum.StrEnum):
    MARKET = "market"
    BUY_LIMIT = "buy_limit"
    SELL_LIMIT = "sell_limit"
    BUY_STOP = "buy_stop"
    SELL_STOP = "sell_stop"


class ManualOrderRequest(Body, kw_only=True):
    """Open a position at market, or place a pending order (``price`` required)."""

    symbol: Symbol
    side: Side
    volume: Lots
    """Lots, on the symbol's volume step, within its minimum and maximum."""
    order_type: ManualOrderType = ManualOrderType.MARKET
    price: Level | None = None
    """The pending order's price; none for a market order."""
    sl: Level | None = None
    tp: Level | None = None
    comment: Annotated[str, msgspec.Meta(max_length=64)] = ""
    client_order_id: ClientOrderId | None = None
    """Your idempotency key: every request with the same key on the account is one order."""


class PositionStops(Body, kw_only=True):
    """A position's new SL and TP; a level left out (or null) is removed."""

    sl: Level | None = None
    tp: Level | None = None
    client_order_id: ClientOrderId | None = None


class PositionClose(Body, kw_only=True):
    ratio: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    """The share of the position to close (1: all of it), rounded down to the volume step."""
    client_order_id: ClientOrderId | None = None


class ManualOrderAccepted(View, kw_only=True):
    order_id: str
    account_id: str
    type: str
    """The follower order's type: open, pending_place, modify or close."""
    duplicate: bool
    """True when this order id was sent before: nothing new was sent."""


class RiskTemplateRequest(Body, kw_only=True):
    name: Name
    settings: dict[str, Any]
    """Sizing and protection fields of a link (``LinkSettings``), each checked as a link's."""


class RiskTemplateView(View, kw_only=True):
    template_id: str
    name: str
    settings: dict[str, Any]
    created_at: str
    updated_at: str


class ApplyTemplate(Body, kw_only=True):
    template_id: uuid.UUID


class OrderTemplateRequest(Body, kw_only=True):
    name: Name
    symbol: Symbol
    side: Side
    volume: Lots
    sl_points: Points | None = None
    """The SL's distance from the entry, in points of the symbol."""
    tp_points: Points | None = None


class OrderTemplateView(View, kw_only=True):
    template_id: str
    name: str
    symbol: str
    side: Side
    volume: float
    sl_points: int | None
    tp_points: int | None
    created_at: str
    updated_at: str


def _invalid(problems: list[FieldProblem]) -> ValidationFailed:
    return ValidationFailed(f"{len(problems)} invalid field(s)", errors=problems)


# ------------------------------------------------------------------------- manual orders


async def _follower_account(ctx: Context, conn: Any) -> str:
    account_id = ctx.request.match_info["account_id"]
    row = await ctx.state.store.get_account(conn, Scope.of(ctx.who), account_id)
    if row is None:
        raise NotFound("no such account")
    if row["role"] != "follower":
        raise _invalid([FieldProblem(field="account_id",
                                     message="manual orders go to follower accounts")])  # fmt: skip
    return str(row["account_id"])


async def _symbol_spec(ctx: Context, account: str, symbol: str) -> SymbolSpec | None:
    kv = await _kv(ctx, subjects.KV_SYMBOLS)
    try:
        entry = await kv.get(subjects.symbol_key(account, symbol))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS: {exc}") from None
    return None if not entry.value else codec.symbol_spec_decoder.decode(entry.value)


def _order_problems(body: ManualOrderRequest, spec: SymbolSpec | None) -> list[FieldProblem]:
    """What the connector would refuse for sure, named by field before anything is sent."""
    problems = []
    if spec is None:
        problems.append(FieldProblem(
            field="symbol", message=f"{body.symbol!r} is not traded on this account"))  # fmt: skip
    else:
        steps = body.volume / spec.volume_step
        if not (spec.volume_min - STEP_EPSILON <= body.volume <= spec.volume_max + STEP_EPSILON):
            problems.append(FieldProblem(
                field="volume",
                message=f"must be from {spec.volume_min} to {spec.volume_max} lots"))  # fmt: skip
        elif abs(steps - round(steps)) > 1e-6 or not math.isfinite(steps):
            problems.append(FieldProblem(
                field="volume", message=f"must be a multiple of {spec.volume_step}"))  # fmt: skip
    pending = body.order_type is not ManualOrderType.MARKET
    if pending and body.price is None:
        problems.append(FieldProblem(field="price", message="a pending order needs its price"))
    if not pending and body.price is not None:
        problems.append(FieldProblem(field="price", message="a market order takes no price"))
    if pending and OrderType(body.order_type.value).side is not body.side:
        side = OrderType(body.order_type.value).side.value
        problems.append(FieldProblem(
            field="side", message=f"a {body.order_type.value} order is a {side}"))  # fmt: skip
    return problems


def _order_id(account: str, client_order_id: str | None) -> str:
    # Without a key the request is its own: a retry of it is a new order.
    return manual_order_id(account, client_order_id or uuid.uuid4().hex)


def _base(account: str, order_id: str, symbol: str) -> dict[str, Any]:
    return {
        "order_id": order_id, "link_id": MANUAL_LINK_ID, "follower": account, "master": account,
        "master_event_id": order_id, "symbol": symbol, "ts_ns": time.time_ns(), "manual": True,
    }  # fmt: skip


async def _send(ctx: Context, conn: Any, order: FollowerOrder, action: str) -> ManualOrderAccepted:
    """Publish the order (its id as ``Nats-Msg-Id``), then audit it unless it is a repeat."""
    js = ctx.state.js
    if js is None:
        raise Unavailable("NATS is not reachable")
    try:
        ack = await js.publish(
            subjects.follower_orders(order.follower), codec.encode(order),
            headers={"Nats-Msg-Id": order.order_id},
        )  # fmt: skip
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable(f"NATS refused the order: {exc}") from None
    kind = type(order).__struct_config__.tag
    if not ack.duplicate:
        metrics.MANUAL_ORDERS.labels(kind).inc()
        await ctx.state.store.audit(
            conn, ctx.who, tenant_id=ctx.who.tenant_id, action=action, entity="manual_order",
            entity_id=order.order_id, after=msgspec.to_builtins(order),
        )  # fmt: skip
    return ManualOrderAccepted(order_id=order.order_id, account_id=order.follower, type=str(kind),
                               duplicate=bool(ack.duplicate))  # fmt: skip


async def place_order(ctx: Context) -> tuple[int, Any]:
    """Open at market or place a pending order on a follower account, as a manual order."""
    body = await parse_body(ctx.request, ManualOrderRequest)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        account = await _follower_account(ctx, conn)
        problems = _order_problems(body, await _symbol_spec(ctx, account, body.symbol))
        if problems:
            raise _invalid(problems)
        order_id = _order_id(account, body.client_order_id)
        base = _base(account, order_id, body.symbol)
        order: FollowerOrder
        if body.order_type is ManualOrderType.MARKET:
            order = FollowerOpen(
                **base, master_position_id=order_id, side=body.side, volume=body.volume,
                sl=body.sl, tp=body.tp, comment=body.comment,
            )  # fmt: skip
        else:
            order = FollowerPendingPlace(
                **base, master_order_id=order_id, order_type=OrderType(body.order_type.value),
                volume=body.volume, price=body.price or 0.0, sl=body.sl, tp=body.tp,
                comment=body.comment,
            )  # fmt: skip
        accepted = await _send(ctx, conn, order, "place")
    return 202, accepted


def _position_id(ctx: Context) -> str:
    raw = ctx.request.match_info["position_id"]
    try:
        return msgspec.convert(raw, _POSITION_ID)
    except msgspec.ValidationError:
        problem = FieldProblem(field="position_id", message="letters, digits, _ . : - (1-64)")
        raise _invalid([problem]) from None


async def modify_position(ctx: Context) -> tuple[int, Any]:
    """Set a position's SL and TP (a manual modify)."""
    body = await parse_body(ctx.request, PositionStops)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        account = await _follower_account(ctx, conn)
        position_id = _position_id(ctx)
        order_id = _order_id(account, body.client_order_id)
        order = FollowerModify(
            **_base(account, order_id, ""), master_position_id=position_id, sl=body.sl,
            tp=body.tp,
        )  # fmt: skip
        accepted = await _send(ctx, conn, order, "modify")
    return 202, accepted


async def close_position(ctx: Context) -> tuple[int, Any]:
    """Close a position, or ``ratio`` of it (a manual close)."""
    body = await parse_body(ctx.request, PositionClose)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        account = await _follower_account(ctx, conn)
        position_id = _position_id(ctx)
        order_id = _order_id(account, body.client_order_id)
        order = FollowerClose(
            **_base(account, order_id, ""), master_position_id=position_id, ratio=body.ratio
        )
        accepted = await _send(ctx, conn, order, "close")
    return 202, accepted


# ------------------------------------------------------------------------ risk templates


def _checked_settings(settings: dict[str, Any]) -> dict[str, Any]:
    errors = validate_link_fragment(settings, TEMPLATE_FIELDS)
    if errors:
        raise _invalid([FieldProblem(field=f"settings.{e.where}", message=e.message)
                        for e in errors])  # fmt: skip
    return settings


def _risk_view(row: Any) -> RiskTemplateView:
    settings = row["settings"]
    return RiskTemplateView(
        template_id=str(row["template_id"]), name=row["name"],
        settings=msgspec.json.decode(settings) if isinstance(settings, str) else settings,
        created_at=iso(row["created_at"]), updated_at=iso(row["updated_at"]),
    )  # fmt: skip


def _template_id(ctx: Context, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(ctx.request.match_info[name])
    except ValueError:
        raise NotFound("no such template") from None


async def create_risk_template(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, RiskTemplateRequest)
    settings = _checked_settings(body.settings)
    caller, store = ctx.who, ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.create_risk_template(
            conn, tenant_id=str(caller.tenant_id), name=body.name, settings=settings
        )
        if row is None:
            raise Conflict(f"a risk template named {body.name!r} exists")
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="risk_template",
            entity_id=str(row["template_id"]), after={"name": body.name, "settings": settings},
        )  # fmt: skip
    return 201, _risk_view(row)


async def list_risk_templates(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, uuid.UUID)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        rows = await store.list_risk_templates(conn, Scope.of(ctx.who), after, limit + 1)
    items = [_risk_view(r) for r in rows[:limit]]
    cursor = next_cursor(rows, limit, lambda r: str(r["template_id"]))
    return 200, Page(items=items, next_cursor=cursor)


async def _risk_template(ctx: Context, conn: Any, *, lock: bool = False) -> Any:
    template_id = _template_id(ctx, "risk_template_id")
    row = await ctx.state.store.get_risk_template(conn, Scope.of(ctx.who), template_id, lock=lock)
    if row is None:
        raise NotFound("no such template")
    return row


async def get_risk_template(ctx: Context) -> tuple[int, Any]:
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        row = await _risk_template(ctx, conn)
    return 200, _risk_view(row)


async def update_risk_template(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, RiskTemplateRequest)
    settings = _checked_settings(body.settings)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        before = await _risk_template(ctx, conn, lock=True)
        row = await store.update_risk_template(
            conn, before["template_id"], name=body.name, settings=settings
        )
        if row is None:
            raise Conflict(f"a risk template named {body.name!r} exists")
        old = _risk_view(before)
        await store.audit(
            conn, ctx.who, tenant_id=before["tenant_id"], action="update",
            entity="risk_template", entity_id=str(before["template_id"]),
            before={"name": old.name, "settings": old.settings},
            after={"name": body.name, "settings": settings},
        )  # fmt: skip
    return 200, _risk_view(row)


async def delete_risk_template(ctx: Context) -> tuple[int, Any]:
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        row = await _risk_template(ctx, conn, lock=True)
        await store.delete_risk_template(conn, row["template_id"])
        old = _risk_view(row)
        await store.audit(
            conn, ctx.who, tenant_id=row["tenant_id"], action="delete", entity="risk_template",
            entity_id=old.template_id, before={"name": old.name, "settings": old.settings},
        )  # fmt: skip
    return 204, None


async def apply_template(ctx: Context) -> tuple[int, Any]:
    """Merge a risk template's settings into a link (written to NATS like any link change)."""
    body = await parse_body(ctx.request, ApplyTemplate)
    kv = await _kv(ctx, subjects.KV_LINKS)
    caller, store = ctx.who, ctx.state.store
    scope = Scope.of(caller)
    async with store.tx(scope) as conn:
        row = await _link_in_scope(ctx, conn, lock=True)
        template = await store.get_risk_template(conn, scope, body.template_id)
        if template is None:
            raise _invalid([FieldProblem(field="template_id", message="no template of yours")])
        before = await _read(kv, row["link_id"])
        if before is None:
            raise NotFound("the link is no longer in NATS")
        settings = _risk_view(template).settings
        link, errors = validate_link({**msgspec.to_builtins(before), **settings})
        if link is None:
            label = f"links[0] ({before.link_id})."
            raise _invalid([FieldProblem(field=e.where.removeprefix(label), message=e.message)
                            for e in errors])  # fmt: skip
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="apply_template", entity="link",
            entity_id=link.link_id, before=msgspec.to_builtins(before),
            after={**msgspec.to_builtins(link), "template_id": str(body.template_id)},
        )  # fmt: skip
        await _put(kv, link)
    return 200, _view(row, link)


# ----------------------------------------------------------------------- order templates


def _order_view(row: Any) -> OrderTemplateView:
    return OrderTemplateView(
        template_id=str(row["template_id"]), name=row["name"], symbol=row["symbol"],
        side=Side(row["side"]), volume=row["volume"], sl_points=row["sl_points"],
        tp_points=row["tp_points"], created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
    )  # fmt: skip


def _order_fields(body: OrderTemplateRequest) -> dict[str, Any]:
    return {"symbol": body.symbol, "side": body.side.value, "volume": body.volume,
            "sl_points": body.sl_points, "tp_points": body.tp_points}  # fmt: skip


async def create_order_template(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, OrderTemplateRequest)
    caller, store = ctx.who, ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.create_order_template(
            conn, caller, name=body.name, fields=_order_fields(body)
        )
        if row is None:
            raise Conflict(f"an order template named {body.name!r} exists")
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="create", entity="order_template",
            entity_id=str(row["template_id"]), after={"name": body.name, **_order_fields(body)},
        )  # fmt: skip
    return 201, _order_view(row)


async def list_order_templates(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, uuid.UUID)
    caller, store = ctx.who, ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_order_templates(conn, Scope.of(caller), caller, after, limit + 1)
    items = [_order_view(r) for r in rows[:limit]]
    cursor = next_cursor(rows, limit, lambda r: str(r["template_id"]))
    return 200, Page(items=items, next_cursor=cursor)


async def _order_template(ctx: Context, conn: Any, *, lock: bool = False) -> Any:
    template_id = _template_id(ctx, "order_template_id")
    row = await ctx.state.store.get_order_template(
        conn, Scope.of(ctx.who), ctx.who, template_id, lock=lock
    )
    if row is None:
        raise NotFound("no such template")
    return row


async def get_order_template(ctx: Context) -> tuple[int, Any]:
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        row = await _order_template(ctx, conn)
    return 200, _order_view(row)


async def update_order_template(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, OrderTemplateRequest)
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        before = await _order_template(ctx, conn, lock=True)
        row = await store.update_order_template(
            conn, before["template_id"], name=body.name, fields=_order_fields(body)
        )
        if row is None:
            raise Conflict(f"an order template named {body.name!r} exists")
        await store.audit(
            conn, ctx.who, tenant_id=before["tenant_id"], action="update",
            entity="order_template", entity_id=str(before["template_id"]),
            before=msgspec.to_builtins(_order_view(before)),
            after={"name": body.name, **_order_fields(body)},
        )  # fmt: skip
    return 200, _order_view(row)


async def delete_order_template(ctx: Context) -> tuple[int, Any]:
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        row = await _order_template(ctx, conn, lock=True)
        await store.delete_order_template(conn, row["template_id"])
        await store.audit(
            conn, ctx.who, tenant_id=row["tenant_id"], action="delete", entity="order_template",
            entity_id=str(row["template_id"]), before=msgspec.to_builtins(_order_view(row)),
        )  # fmt: skip
    return 204, None


_ORDER = "/v1/accounts/{account_id}"
_RISK = "/v1/risk-templates"
_PRESETS = "/v1/order-templates"

ROUTES = [
    Route("POST", f"{_ORDER}/orders", place_order, "Place a manual order (market or pending)",
          "trading", roles=TENANT_USERS, request=ManualOrderRequest,
          response=ManualOrderAccepted, status=202, errors=(404, 422, 503)),
    Route("PATCH", f"{_ORDER}/positions/{{position_id}}", modify_position,
          "Set a position's SL/TP (manual)", "trading", roles=TENANT_USERS,
          request=PositionStops, response=ManualOrderAccepted, status=202,
          errors=(404, 422, 503)),
    Route("POST", f"{_ORDER}/positions/{{position_id}}/close", close_position,
          "Close a position or part of it (manual)", "trading", roles=TENANT_USERS,
          request=PositionClose, response=ManualOrderAccepted, status=202,
          errors=(404, 422, 503)),
    Route("POST", _RISK, create_risk_template, "Create a risk template", "templates",
          roles=PROVIDERS, request=RiskTemplateRequest, response=RiskTemplateView, status=201,
          errors=(409, 422)),
    Route("GET", _RISK, list_risk_templates, "The tenant's risk templates", "templates",
          roles=PROVIDERS, response=Page[RiskTemplateView], query=("cursor", "limit")),
    Route("GET", f"{_RISK}/{{risk_template_id}}", get_risk_template, "One risk template",
          "templates", roles=PROVIDERS, response=RiskTemplateView, errors=(404,)),
    Route("PUT", f"{_RISK}/{{risk_template_id}}", update_risk_template,
          "Replace a risk template", "templates", roles=PROVIDERS, request=RiskTemplateRequest,
          response=RiskTemplateView, errors=(404, 409, 422)),
    Route("DELETE", f"{_RISK}/{{risk_template_id}}", delete_risk_template,
          "Delete a risk template", "templates", roles=PROVIDERS, status=204, errors=(404,)),
    Route("POST", "/v1/links/{link_id}/apply-template", apply_template,
          "Apply a risk template to a link", "links", roles=PROVIDERS, request=ApplyTemplate,
          response=LinkView, errors=(404, 422, 503)),
    Route("POST", _PRESETS, create_order_template, "Create an order template", "templates",
          roles=TENANT_USERS, request=OrderTemplateRequest, response=OrderTemplateView,
          status=201, errors=(409,)),
    Route("GET", _PRESETS, list_order_templates, "The caller's order templates", "templates",
          roles=TENANT_USERS, response=Page[OrderTemplateView], query=("cursor", "limit")),
    Route("GET", f"{_PRESETS}/{{order_template_id}}", get_order_template,
          "One order template", "templates", roles=TENANT_USERS, response=OrderTemplateView,
          errors=(404,)),
    Route("PUT", f"{_PRESETS}/{{order_template_id}}", update_order_template,
          "Replace an order template", "templates", roles=TENANT_USERS,
          request=OrderTemplateRequest, response=OrderTemplateView, errors=(404, 409)),
    Route("DELETE", f"{_PRESETS}/{{order_template_id}}", delete_order_template,
          "Delete an order template", "templates", roles=TENANT_USERS, status=204,
          errors=(404,)),
]  # fmt: skip
