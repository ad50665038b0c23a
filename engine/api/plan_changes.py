"""Plan changes over HTTP: a follower moves its subscription from one plan of its provider to
another, prorated, and reads how it went.

As for Checkout (engine/api/plans.py), the API never writes billing's tables: it records the
request through ``billing_api_request_plan_change`` (as a member of
``tradecopy_billing_writer``), which refuses what billing would not apply, and reads
``billing_api_plan_changes`` (as a member of ``tradecopy_billing_reader``) inside the caller's
scoped transaction. The answer is 202 with the request (``pending``); the billing service
applies it (Stripe first, then the subscription) and ``GET`` shows ``applied`` with the credit,
the charge, the net and the new period, or ``failed`` with the reason.

Who: a follower asks for itself; a follower reads its own changes, a provider its followers',
the operator everyone's. Any other follower is 404, as if it did not exist.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import asyncpg
import msgspec

from engine.api.auth import Role
from engine.api.errors import Conflict, FieldProblem, NotFound, ValidationFailed
from engine.api.handling import Context, Route, iso, next_cursor, page_params, parse_body
from engine.api.models import Body, Page, View
from engine.api.store import Scope

PlanId = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


class PlanChangeRequest(Body, kw_only=True):
    from_plan: PlanId
    """The plan of the follower's active subscription."""
    to_plan: PlanId
    """A plan of the same provider and currency, with the subscription module."""


class PlanChangeView(View, kw_only=True):
    plan_change_id: str
    follower: str
    tenant_id: str
    from_plan: str
    to_plan: str
    currency: str
    status: str
    """pending (being applied), applied (the amounts and the new period), failed (``reason``)."""
    requested_at_ns: int
    """When the follower asked: the instant the change is prorated at."""
    credit_minor: int | None
    """The unused part of ``from_plan``'s period, credited (minor units of ``currency``)."""
    charge_minor: int | None
    """``to_plan`` for the period that now runs."""
    net_minor: int | None
    """charge − credit: negative on a downgrade (carried to the next invoice)."""
    period_start_ns: int | None
    period_end_ns: int | None
    reason: str | None
    failure_code: str | None
    """Stripe's code when Stripe refused the change."""
    created_at: str
    updated_at: str


def _view(row: Any) -> PlanChangeView:
    return PlanChangeView(
        plan_change_id=str(row["plan_change_id"]), follower=row["follower"],
        tenant_id=row["tenant_id"], from_plan=row["from_plan"], to_plan=row["to_plan"],
        currency=row["currency"], status=row["status"], requested_at_ns=row["requested_ns"],
        credit_minor=row["credit_minor"], charge_minor=row["charge_minor"],
        net_minor=row["net_minor"], period_start_ns=row["period_start_ns"],
        period_end_ns=row["period_end_ns"], reason=row["reason"],
        failure_code=row["failure_code"], created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
    )  # fmt: skip


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(
        f"{field}: {message}", errors=[FieldProblem(field=field, message=message)]
    )


async def _follower(ctx: Context, conn: Any) -> str:
    """The path's follower, when the caller may see it: itself, a follower of the provider's
    tenant, or any follower for the operator. Otherwise 404."""
    caller = ctx.who
    missing = NotFound("no such follower")
    try:
        follower = uuid.UUID(ctx.request.match_info["follower"])
    except ValueError:
        raise missing from None
    # Scoped here (the application's wall) and by row-level security on ``api_users`` (the
    # database's): each holds on its own.
    scoped = ctx.state.store.app_scoping
    if scoped and caller.role is Role.FOLLOWER and follower != caller.user_id:
        raise missing
    tenant = caller.tenant_id if scoped and caller.role is not Role.OPERATOR else None
    found = await conn.fetchval(
        "SELECT count(*) > 0 FROM api_users WHERE user_id = $1 AND role = 'follower'"
        " AND ($2::text IS NULL OR tenant_id = $2)",
        follower,
        tenant,
    )
    if not found:
        raise missing
    return str(follower)


async def request_plan_change(ctx: Context) -> tuple[int, Any]:
    """Ask to move the follower's subscription to another plan: recorded, answered at once."""
    body = await parse_body(ctx.request, PlanChangeRequest)
    caller, store = ctx.who, ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        follower = await _follower(ctx, conn)
        try:
            plan_change_id = await conn.fetchval(
                "SELECT billing_api_request_plan_change($1, $2, $3, $4, $5)",
                uuid.uuid4(), follower, caller.tenant_id, body.from_plan, body.to_plan,
            )  # fmt: skip
        except asyncpg.NoDataFoundError as exc:
            raise _invalid(exc.column_name or "to_plan", "no such plan") from None
        except asyncpg.CheckViolationError as exc:
            raise _invalid(exc.column_name or "to_plan", str(exc.message)) from None
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(str(exc.message)) from None
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_plan_changes WHERE plan_change_id = $1", plan_change_id
        )
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="request", entity="plan_change",
            entity_id=str(plan_change_id),
            after={"from_plan": body.from_plan, "to_plan": body.to_plan},
        )  # fmt: skip
    return 202, _view(row)


async def list_plan_changes(ctx: Context) -> tuple[int, Any]:
    """The follower's plan changes, newest first."""
    after, limit = page_params(ctx, int)
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        follower = await _follower(ctx, conn)
        rows = await conn.fetch(
            "SELECT * FROM billing_api_plan_changes WHERE follower = $1"
            " AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3",
            follower,
            after,
            limit + 1,
        )
    items = [_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["seq"]))


async def get_plan_change(ctx: Context) -> tuple[int, Any]:
    try:
        plan_change_id = uuid.UUID(ctx.request.match_info["plan_change_id"])
    except ValueError:
        raise NotFound("no such plan change") from None
    async with ctx.state.store.tx(Scope.of(ctx.who)) as conn:
        follower = await _follower(ctx, conn)
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_plan_changes WHERE plan_change_id = $1 AND follower = $2",
            plan_change_id,
            follower,
        )
    if row is None:
        raise NotFound("no such plan change")
    return 200, _view(row)


_FOLLOWERS = frozenset({Role.FOLLOWER})
_READERS = frozenset({Role.OPERATOR, Role.PROVIDER, Role.FOLLOWER})
_PATH = "/v1/followers/{follower}/plan-changes"

ROUTES = [
    Route("POST", _PATH, request_plan_change,
          "Change the follower's plan (prorated): from one plan of its provider to another",
          "plans", roles=_FOLLOWERS, request=PlanChangeRequest, response=PlanChangeView,
          status=202, errors=(404, 409, 422, 503)),
    Route("GET", _PATH, list_plan_changes,
          "A follower's plan changes: its own, a provider's follower's, or any (operator)",
          "plans", roles=_READERS, response=Page[PlanChangeView], query=("cursor", "limit"),
          errors=(404,)),
    Route("GET", f"{_PATH}/{{plan_change_id}}", get_plan_change,
          "One plan change with its outcome", "plans", roles=_READERS,
          response=PlanChangeView, errors=(404,)),
]  # fmt: skip
