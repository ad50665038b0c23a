"""Plans and Checkout over HTTP: the operator's plans for providers, providers' plans for
followers, and a follower's purchase of a plan through Stripe Checkout.

Billing owns plans, subscriptions and Checkout requests. The API never writes billing's tables:
it calls billing's SECURITY DEFINER functions (``billing_api_create_operator_plan``,
``billing_api_assign_operator_plan``, ``billing_api_create_provider_plan``,
``billing_api_request_checkout``, as a member of ``tradecopy_billing_writer``) and reads its
``billing_api_*`` views (as a member of ``tradecopy_billing_reader``), inside the caller's
scoped transaction. Billing's provider is the API's tenant id; billing's follower is the API's
user id. A Checkout is answered 202 with its id: the billing service creates the Stripe session
and ``GET /v1/checkouts/{id}`` says pending, ready (with the URL) or failed (with the reason).

Plans are never changed: a change is a new plan (billing refuses new terms for a plan anyone
subscribed to, and the API offers no update).
"""

from __future__ import annotations

import enum
import uuid
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import msgspec

from engine.api.auth import Role
from engine.api.errors import Conflict, FieldProblem, NotFound, ValidationFailed
from engine.api.handling import (
    OPERATORS,
    PROVIDERS,
    TENANT_USERS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import Body, Page, View
from engine.api.store import Scope

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
Minor = Annotated[int, msgspec.Meta(ge=0, le=10**13)]
"""Money: integer minor units of the plan's currency (a float is refused)."""
DecimalText = Annotated[str, msgspec.Meta(pattern=r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?$")]
"""An exact decimal written as a string (``"12.5"``), never a float."""
ClientKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048)]


class Period(enum.StrEnum):
    MONTHLY = "monthly"
    QUARTERLY = "quarterly"
    YEARLY = "yearly"


class Module(enum.StrEnum):
    SUBSCRIPTION = "subscription"
    PAY_PER_TRADE = "pay_per_trade"
    PERFORMANCE = "performance"
    VOLUME = "volume"


class OperatorPlanRequest(Body, kw_only=True):
    """What the operator sells to providers."""

    name: Name
    currency: Currency
    recurring_minor: Minor = 0
    setup_minor: Minor = 0
    period: Period = Period.MONTHLY
    platform_fee_percent: DecimalText
    """Of every provider charge, 0-100, rounded down per charge."""
    account_pool_limit: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    """Master + follower accounts the provider may hold."""
    modules: list[Module]
    """Which modules the provider's plans may use."""


class OperatorPlanView(View, kw_only=True):
    plan_id: str
    name: str | None
    currency: str
    recurring_minor: int
    setup_minor: int
    period: str
    platform_fee_percent: str
    account_pool_limit: int
    modules: list[str]
    created_at: str


class AssignOperatorPlan(Body, kw_only=True):
    plan_id: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class ProviderOperatorPlan(View, kw_only=True):
    tenant_id: str
    operator_plan: str


class PlanRequest(Body, kw_only=True):
    """A provider's plan for followers: any of the four modules, each with its terms."""

    name: Name
    currency: Currency
    modules: list[Module]
    subscription_price_minor: Minor | None = None
    subscription_period: Period | None = None
    ppt_trades: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)] | None = None
    ppt_price_minor: Minor | None = None
    performance_rate: DecimalText | None = None
    """The share of profit above the high-water mark, 0-1 (``"0.20"``)."""
    volume_rate_per_lot_minor: DecimalText | None = None
    """Minor units per lot of copied volume closed (``"250"``)."""
    risk_template_id: uuid.UUID | None = None
    """A risk template of the provider's, applied to a follower's links when the plan activates."""


class PlanView(View, kw_only=True):
    plan_id: str
    tenant_id: str
    name: str | None
    currency: str
    modules: list[str]
    subscription_price_minor: int | None
    subscription_period: str | None
    ppt_trades: int | None
    ppt_price_minor: int | None
    performance_rate: str | None
    volume_rate_per_lot_minor: str | None
    risk_template_id: str | None
    """Shown to the provider only."""
    has_subscribers: bool
    created_at: str


class CheckoutRequest(Body, kw_only=True):
    client_key: ClientKey
    """Your idempotency key: the same follower, plan and key are one Checkout. While the
    follower has an open (pending or ready) Checkout of the plan, any key answers that one."""
    success_url: Url | None = None
    """Where Stripe sends the browser after paying; an origin of the API's ``public_url`` or
    ``cors_origins``. Left out: the dashboard's plan page."""
    cancel_url: Url | None = None


class CheckoutAccepted(View, kw_only=True):
    checkout_id: str
    state: str


class CheckoutView(View, kw_only=True):
    checkout_id: str
    plan_id: str
    state: str
    """pending (the session is being made), ready (``url``), failed (``reason``), completed."""
    url: str | None
    reason: str | None
    created_at: str
    updated_at: str


# ------------------------------------------------------------------------ validation


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(
        f"{field}: {message}", errors=[FieldProblem(field=field, message=message)]
    )


def _modules(modules: list[Module], *, empty_ok: bool) -> list[str]:
    if not modules and not empty_ok:
        raise _invalid("modules", "name at least one module")
    if len(set(modules)) != len(modules):
        raise _invalid("modules", "a module is named twice")
    return [m.value for m in modules]


def _checked_plan(body: PlanRequest) -> list[str]:
    modules = _modules(body.modules, empty_ok=False)
    terms: dict[Module, tuple[str, ...]] = {
        Module.SUBSCRIPTION: ("subscription_price_minor", "subscription_period"),
        Module.PAY_PER_TRADE: ("ppt_trades", "ppt_price_minor"),
        Module.PERFORMANCE: ("performance_rate",),
        Module.VOLUME: ("volume_rate_per_lot_minor",),
    }
    for module, fields in terms.items():
        for name in fields:
            given = getattr(body, name) is not None
            if module in body.modules and not given:
                raise _invalid(name, f"required by the {module.value} module")
            if module not in body.modules and given:
                raise _invalid(name, f"the plan has no {module.value} module")
    if body.performance_rate is not None and Decimal(body.performance_rate) > 1:
        raise _invalid("performance_rate", "a share between 0 and 1")
    return modules


def _refused(exc: asyncpg.PostgresError) -> Exception:
    """Billing's refusal as the API's answer: a term not allowed is 422 naming it; a provider
    on no operator plan is 409."""
    message = str(getattr(exc, "message", exc))
    if isinstance(exc, asyncpg.CheckViolationError):
        return _invalid(getattr(exc, "column_name", None) or "plan", message)
    return Conflict(message)


def _return_url(ctx: Context, given: str | None, field: str, default: str) -> str:
    if given is None:
        return default
    parts = urlsplit(given)
    origin = f"{parts.scheme}://{parts.netloc}"
    allowed = {ctx.state.config.link_base, *ctx.state.config.cors_origins}
    allowed_origins = {f"{urlsplit(a).scheme}://{urlsplit(a).netloc}" for a in allowed}
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise _invalid(field, "an absolute http(s) URL")
    if origin not in allowed_origins:
        raise _invalid(field, "not an origin of this platform (public_url or cors_origins)")
    return given


# ------------------------------------------------------------------------ views


def _operator_view(row: Any) -> OperatorPlanView:
    return OperatorPlanView(
        plan_id=row["plan_id"], name=row["name"], currency=row["currency"],
        recurring_minor=row["recurring_minor"], setup_minor=row["setup_minor"],
        period=row["period"], platform_fee_percent=_decimal(row["platform_fee_percent"]) or "0",
        account_pool_limit=row["account_pool_limit"], modules=list(row["modules"]),
        created_at=iso(row["created_at"]),
    )  # fmt: skip


def _decimal(text: str | None) -> str | None:
    """``12.500000`` as ``12.5``: the exact value, without numeric's scale padding."""
    if text is None:
        return None
    value = Decimal(text).normalize()
    return format(value, "f")


def _plan_view(row: Any, *, provider: bool) -> PlanView:
    return PlanView(
        plan_id=row["plan_id"], tenant_id=row["tenant_id"], name=row["name"],
        currency=row["currency"], modules=list(row["modules"]),
        subscription_price_minor=row["subscription_price_minor"],
        subscription_period=row["subscription_period"], ppt_trades=row["ppt_trades"],
        ppt_price_minor=row["ppt_price_minor"],
        performance_rate=_decimal(row["performance_rate"]),
        volume_rate_per_lot_minor=_decimal(row["volume_rate_per_lot_minor"]),
        risk_template_id=row["risk_template_id"] if provider else None,
        has_subscribers=row["has_subscribers"], created_at=iso(row["created_at"]),
    )  # fmt: skip


def _checkout_view(row: Any) -> CheckoutView:
    return CheckoutView(
        checkout_id=str(row["checkout_id"]), plan_id=row["plan_id"], state=row["state"],
        url=row["url"], reason=row["reason"], created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
    )  # fmt: skip


# ------------------------------------------------------------------------ operator plans


async def create_operator_plan(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, OperatorPlanRequest)
    modules = _modules(body.modules, empty_ok=True)
    if Decimal(body.platform_fee_percent) > 100:
        raise _invalid("platform_fee_percent", "a percentage between 0 and 100")
    plan_id = str(uuid.uuid4())
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        try:
            await conn.fetchval(
                "SELECT billing_api_create_operator_plan($1, $2, $3, $4, $5, $6, $7::numeric,"
                " $8, $9)",
                plan_id, body.name, body.currency, body.recurring_minor, body.setup_minor,
                body.period.value, body.platform_fee_percent, body.account_pool_limit, modules,
            )  # fmt: skip
        except (asyncpg.CheckViolationError, asyncpg.NoDataFoundError) as exc:
            raise _refused(exc) from None
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_operator_plans WHERE plan_id = $1", plan_id
        )
        await store.audit(
            conn, ctx.who, tenant_id=None, action="create", entity="operator_plan",
            entity_id=plan_id, after=msgspec.to_builtins(body),
        )  # fmt: skip
    return 201, _operator_view(row)


async def list_operator_plans(ctx: Context) -> tuple[int, Any]:
    after, limit = page_params(ctx, str)
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        rows = await conn.fetch(
            "SELECT * FROM billing_api_operator_plans WHERE ($1::text IS NULL OR plan_id > $1)"
            " ORDER BY plan_id LIMIT $2",
            after,
            limit + 1,
        )
    items = [_operator_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["plan_id"]))


async def get_operator_plan(ctx: Context) -> tuple[int, Any]:
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_operator_plans WHERE plan_id = $1",
            ctx.request.match_info["operator_plan_id"],
        )
    if row is None:
        raise NotFound("no such operator plan")
    return 200, _operator_view(row)


async def assign_operator_plan(ctx: Context) -> tuple[int, Any]:
    """Put a provider (a tenant) on an operator plan: what its plans may use, its pool."""
    body = await parse_body(ctx.request, AssignOperatorPlan)
    tenant_id = ctx.request.match_info["tenant_id"]
    store = ctx.state.store
    async with store.tx(Scope.of(ctx.who)) as conn:
        if await conn.fetchval("SELECT 1 FROM api_tenants WHERE tenant_id = $1", tenant_id) is None:
            raise NotFound("no such tenant")
        try:
            await conn.execute(
                "SELECT billing_api_assign_operator_plan($1, $2)", tenant_id, body.plan_id
            )
        except asyncpg.NoDataFoundError as exc:
            raise _invalid("plan_id", str(exc.message)) from None
        await store.audit(
            conn, ctx.who, tenant_id=tenant_id, action="assign", entity="operator_plan",
            entity_id=body.plan_id, after={"tenant_id": tenant_id, "plan_id": body.plan_id},
        )  # fmt: skip
    return 200, ProviderOperatorPlan(tenant_id=tenant_id, operator_plan=body.plan_id)


# ------------------------------------------------------------------------ provider plans


async def create_plan(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, PlanRequest)
    modules = _checked_plan(body)
    caller, store = ctx.who, ctx.state.store
    tenant_id = str(caller.tenant_id)
    plan_id = str(uuid.uuid4())
    template = None if body.risk_template_id is None else str(body.risk_template_id)
    async with store.tx(Scope.of(caller)) as conn:
        if template is not None and not await conn.fetchval(
            # Scoped here and by row-level security: each wall holds on its own.
            "SELECT count(*) > 0 FROM api_risk_templates WHERE template_id = $1 AND tenant_id = $2",
            body.risk_template_id,
            tenant_id,
        ):
            raise _invalid("risk_template_id", "no risk template of yours")
        try:
            await conn.fetchval(
                "SELECT billing_api_create_provider_plan($1, $2, $3, $4, $5, $6, $7, $8, $9,"
                " $10::numeric, $11::numeric, $12)",
                plan_id, tenant_id, body.name, body.currency, modules,
                body.subscription_price_minor,
                None if body.subscription_period is None else body.subscription_period.value,
                body.ppt_trades, body.ppt_price_minor, body.performance_rate,
                body.volume_rate_per_lot_minor, template,
            )  # fmt: skip
        except (asyncpg.CheckViolationError, asyncpg.NoDataFoundError) as exc:
            raise _refused(exc) from None
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_provider_plans WHERE plan_id = $1", plan_id
        )
        await store.audit(
            conn, caller, tenant_id=tenant_id, action="create", entity="plan", entity_id=plan_id,
            after=msgspec.to_builtins(body),
        )  # fmt: skip
    return 201, _plan_view(row, provider=True)


async def list_plans(ctx: Context) -> tuple[int, Any]:
    """The tenant's plans: the provider's own, or, for a follower, its provider's."""
    after, limit = page_params(ctx, str)
    caller = ctx.who
    async with ctx.state.store.tx(Scope.of(caller)) as conn:
        rows = await conn.fetch(
            "SELECT * FROM billing_api_provider_plans WHERE tenant_id = $1"
            " AND ($2::text IS NULL OR plan_id > $2) ORDER BY plan_id LIMIT $3",
            caller.tenant_id,
            after,
            limit + 1,
        )
    provider = ctx.who.role is Role.PROVIDER
    items = [_plan_view(r, provider=provider) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["plan_id"]))


async def _plan_row(ctx: Context, conn: Any) -> Any:
    row = await conn.fetchrow(
        "SELECT * FROM billing_api_provider_plans WHERE plan_id = $1 AND tenant_id = $2",
        ctx.request.match_info["plan_id"],
        ctx.who.tenant_id,
    )
    if row is None:
        raise NotFound("no such plan")
    return row


async def get_plan(ctx: Context) -> tuple[int, Any]:
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        row = await _plan_row(ctx, conn)
    return 200, _plan_view(row, provider=ctx.who.role is Role.PROVIDER)


# ------------------------------------------------------------------------ Checkout


async def start_checkout(ctx: Context) -> tuple[int, Any]:
    """Buy a plan: recorded in billing, answered at once; the session's URL comes later."""
    body = await parse_body(ctx.request, CheckoutRequest)
    caller, store = ctx.who, ctx.state.store
    plan_id = ctx.request.match_info["plan_id"]
    page = f"{ctx.state.config.link_base}/billing/plans/{plan_id}"
    success = _return_url(ctx, body.success_url, "success_url", f"{page}?checkout=success")
    cancel = _return_url(ctx, body.cancel_url, "cancel_url", f"{page}?checkout=cancelled")
    async with store.tx(Scope.of(caller)) as conn:
        await _plan_row(ctx, conn)
        email = await conn.fetchval(
            "SELECT email FROM api_users WHERE user_id = $1", caller.user_id
        )
        try:
            checkout_id = await conn.fetchval(
                "SELECT billing_api_request_checkout($1, $2, $3, $4, $5, $6, $7, $8)",
                uuid.uuid4(), str(caller.user_id), caller.tenant_id, plan_id, body.client_key,
                email, success, cancel,
            )  # fmt: skip
        except asyncpg.NoDataFoundError:
            raise NotFound("no such plan") from None
        except asyncpg.UniqueViolationError:
            raise Conflict("you are subscribed to this plan already") from None
        state = await conn.fetchval(
            "SELECT state FROM billing_api_checkouts WHERE checkout_id = $1", checkout_id
        )
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="checkout", entity="plan",
            entity_id=plan_id,
            after={"checkout_id": str(checkout_id), "client_key": body.client_key},
        )  # fmt: skip
    return 202, CheckoutAccepted(checkout_id=str(checkout_id), state=state)


async def get_checkout(ctx: Context) -> tuple[int, Any]:
    try:
        checkout_id = uuid.UUID(ctx.request.match_info["checkout_id"])
    except ValueError:
        raise NotFound("no such checkout") from None
    caller = ctx.who
    async with ctx.state.store.tx(Scope.of(caller)) as conn:
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_checkouts WHERE checkout_id = $1 AND follower = $2"
            " AND tenant_id = $3",
            checkout_id,
            str(caller.user_id),
            caller.tenant_id,
        )
    if row is None:
        raise NotFound("no such checkout")
    return 200, _checkout_view(row)


FOLLOWERS = frozenset({Role.FOLLOWER})
_OPS = "/v1/operator-plans"

ROUTES = [
    Route("POST", _OPS, create_operator_plan, "Create an operator plan (sold to providers)",
          "plans", roles=OPERATORS, request=OperatorPlanRequest, response=OperatorPlanView,
          status=201, errors=(422, 503)),
    Route("GET", _OPS, list_operator_plans, "The operator's plans", "plans", roles=OPERATORS,
          response=Page[OperatorPlanView], query=("cursor", "limit")),
    Route("GET", f"{_OPS}/{{operator_plan_id}}", get_operator_plan, "One operator plan",
          "plans", roles=OPERATORS, response=OperatorPlanView, errors=(404,)),
    Route("PUT", "/v1/tenants/{tenant_id}/operator-plan", assign_operator_plan,
          "Put a provider on an operator plan", "plans", roles=OPERATORS,
          request=AssignOperatorPlan, response=ProviderOperatorPlan, errors=(404, 422)),
    Route("POST", "/v1/plans", create_plan, "Create a plan for followers", "plans",
          roles=PROVIDERS, request=PlanRequest, response=PlanView, status=201,
          errors=(409, 422, 503)),
    Route("GET", "/v1/plans", list_plans, "The tenant's plans for followers", "plans",
          roles=TENANT_USERS, response=Page[PlanView], query=("cursor", "limit")),
    Route("GET", "/v1/plans/{plan_id}", get_plan, "One plan for followers", "plans",
          roles=TENANT_USERS, response=PlanView, errors=(404,)),
    Route("POST", "/v1/plans/{plan_id}/checkout", start_checkout,
          "Buy a plan through Stripe Checkout", "plans", roles=FOLLOWERS,
          request=CheckoutRequest, response=CheckoutAccepted, status=202,
          errors=(404, 409, 422, 503)),
    Route("GET", "/v1/checkouts/{checkout_id}", get_checkout, "A Checkout's state and URL",
          "plans", roles=FOLLOWERS, response=CheckoutView, errors=(404,)),
]  # fmt: skip
