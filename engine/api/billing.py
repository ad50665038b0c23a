"""Billing over HTTP: charge history for followers and providers, revenue per month for the
operator (and a provider's own), and Express onboarding links for providers.

Billing owns charges, providers' Stripe accounts and onboarding requests. As for plans
(engine/api/plans.py), the API never imports billing and never writes its tables: it reads
billing's ``billing_api_charges``, ``billing_api_revenue`` and ``billing_api_onboardings``
views (as a member of ``tradecopy_billing_reader``) inside the caller's scoped transaction,
which the views honour themselves (a second wall beside the API's own filters), and records an
onboarding request through ``billing_api_request_onboarding`` (as a member of
``tradecopy_billing_writer``). The billing service creates the Express account (once per
provider) and the account link; ``GET /v1/billing/onboarding/{id}`` says pending, ready (URL and
expiry) or failed (reason). Money is integer minor units, never summed across currencies.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import asyncpg
import msgspec

from engine.api.auth import Role
from engine.api.errors import Conflict, FieldProblem, NotFound, ValidationFailed
from engine.api.handling import (
    PROVIDERS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import Body, Page, View
from engine.api.plans import Url, _return_url
from engine.api.store import Scope

Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]


class ChargeView(View, kw_only=True):
    """One charge of a follower on a provider's plan."""

    charge_id: int
    follower: str
    tenant_id: str
    module: str
    plan_id: str
    window_id: str
    """The billing window or period the charge is for."""
    currency: str
    amount_minor: int
    platform_fee_minor: int
    provider_minor: int
    state: str
    """pending, requires_action, failed, succeeded, disputed, dispute_won, dispute_lost,
    refunded."""
    issued_at_ns: int
    created_at: str
    updated_at: str


class RevenueView(View, kw_only=True):
    """One month (UTC, by issue instant) and currency."""

    month: str
    currency: str
    charges: int
    total_minor: int
    """Every charge issued."""
    platform_fee_minor: int
    """The platform's part of the paid charges."""
    paid_minor: int
    """Succeeded (or a dispute won)."""
    unpaid_minor: int
    """Pending, waiting for the customer, or failed."""
    reversed_minor: int
    """Refunded or disputed after payment."""


class OnboardingRequest(Body, kw_only=True):
    country: Country
    """The provider's country (ISO 3166-1 alpha-2), for the Express account when it is
    created; an existing account keeps its own."""
    refresh_url: Url | None = None
    """Where Stripe sends the browser when the link expired; an origin of the API's
    ``public_url`` or ``cors_origins``. Left out: the dashboard's onboarding page."""
    return_url: Url | None = None


class OnboardingAccepted(View, kw_only=True):
    onboarding_id: str
    state: str


class OnboardingView(View, kw_only=True):
    onboarding_id: str
    state: str
    """pending (being made), ready (``url`` until ``expires_at``), failed (``reason``)."""
    account: str | None
    url: str | None
    expires_at: str | None
    reason: str | None
    created_at: str
    updated_at: str
    charges_enabled: bool | None
    """What Stripe last said of the provider's account (``account.updated``): it may take
    charges. None until Stripe said anything."""
    payouts_enabled: bool | None
    details_submitted: bool | None
    """The provider finished Stripe's onboarding form."""
    onboarding_complete: bool
    """Charges and payouts are enabled and the details submitted: nothing left to do."""


# ------------------------------------------------------------------------ views


def _charge_view(row: Any) -> ChargeView:
    return ChargeView(
        charge_id=row["charge_id"], follower=row["follower"], tenant_id=row["tenant_id"],
        module=row["module"], plan_id=row["plan_id"], window_id=row["window_id"],
        currency=row["currency"], amount_minor=row["amount_minor"],
        platform_fee_minor=row["platform_fee_minor"], provider_minor=row["provider_minor"],
        state=row["state"], issued_at_ns=row["issued_ns"], created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
    )  # fmt: skip


def _revenue_view(row: Any) -> RevenueView:
    return RevenueView(
        month=row["month"], currency=row["currency"], charges=row["charges"],
        total_minor=row["total_minor"], platform_fee_minor=row["platform_fee_minor"],
        paid_minor=row["paid_minor"], unpaid_minor=row["unpaid_minor"],
        reversed_minor=row["reversed_minor"],
    )  # fmt: skip


def _onboarding_view(row: Any) -> OnboardingView:
    expires = row["expires_at"]
    return OnboardingView(
        onboarding_id=str(row["onboarding_id"]), state=row["state"], account=row["account"],
        url=row["url"], expires_at=None if expires is None else iso(expires),
        reason=row["reason"], created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]), charges_enabled=row["charges_enabled"],
        payouts_enabled=row["payouts_enabled"], details_submitted=row["details_submitted"],
        onboarding_complete=bool(
            row["charges_enabled"] and row["payouts_enabled"] and row["details_submitted"]
        ),
    )  # fmt: skip


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(
        f"{field}: {message}", errors=[FieldProblem(field=field, message=message)]
    )


# ------------------------------------------------------------------------ history


async def list_charges(ctx: Context) -> tuple[int, Any]:
    """Newest first. A follower: its own; a provider: its followers' (``?follower=`` one of
    them); the operator: every tenant's."""
    after, limit = page_params(ctx, int)
    caller = ctx.who
    follower: str | None = None
    if caller.role is Role.FOLLOWER:
        follower = str(caller.user_id)
    elif (given := ctx.request.query.get("follower")) is not None:
        try:
            follower = str(uuid.UUID(given))
        except ValueError:
            raise _invalid("follower", "a user id") from None
    tenant = None if caller.role is Role.OPERATOR else caller.tenant_id
    async with ctx.state.store.tx(Scope.of(caller)) as conn:
        rows = await conn.fetch(
            "SELECT * FROM billing_api_charges WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::text IS NULL OR follower = $2) AND ($3::bigint IS NULL OR charge_id < $3)"
            " ORDER BY charge_id DESC LIMIT $4",
            tenant,
            follower,
            after,
            limit + 1,
        )
    items = [_charge_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["charge_id"]))


async def list_revenue(ctx: Context) -> tuple[int, Any]:
    """Per month and currency, oldest first: the operator's over every provider, a provider's
    over its own followers."""
    after, limit = page_params(ctx, str)
    caller = ctx.who
    tenant = None if caller.role is Role.OPERATOR else caller.tenant_id
    async with ctx.state.store.tx(Scope.of(caller)) as conn:
        rows = await conn.fetch(
            "SELECT month, currency, month || ':' || currency AS key,"
            " sum(charges)::bigint AS charges, sum(total_minor)::bigint AS total_minor,"
            " sum(platform_fee_minor)::bigint AS platform_fee_minor,"
            " sum(paid_minor)::bigint AS paid_minor, sum(unpaid_minor)::bigint AS unpaid_minor,"
            " sum(reversed_minor)::bigint AS reversed_minor"
            " FROM billing_api_revenue WHERE ($1::text IS NULL OR tenant_id = $1)"
            " GROUP BY month, currency"
            # 'YYYY-MM:CUR' is fixed-width: its text order is (month, currency) order.
            " HAVING ($2::text IS NULL OR month || ':' || currency > $2)"
            " ORDER BY month, currency LIMIT $3",
            tenant,
            after,
            limit + 1,
        )
    items = [_revenue_view(r) for r in rows[:limit]]
    return 200, Page(items=items, next_cursor=next_cursor(rows, limit, lambda r: r["key"]))


# ------------------------------------------------------------------------ onboarding


async def start_onboarding(ctx: Context) -> tuple[int, Any]:
    """Ask for an Express onboarding link: recorded in billing, answered at once."""
    body = await parse_body(ctx.request, OnboardingRequest)
    caller, store = ctx.who, ctx.state.store
    page = f"{ctx.state.config.link_base}/billing/onboarding"
    refresh = _return_url(ctx, body.refresh_url, "refresh_url", f"{page}?onboarding=refresh")
    back = _return_url(ctx, body.return_url, "return_url", f"{page}?onboarding=return")
    async with store.tx(Scope.of(caller)) as conn:
        email = await conn.fetchval(
            "SELECT email FROM api_users WHERE user_id = $1", caller.user_id
        )
        try:
            onboarding_id = await conn.fetchval(
                "SELECT billing_api_request_onboarding($1, $2, $3, $4, $5, $6)",
                uuid.uuid4(), caller.tenant_id, email or "", body.country, refresh, back,
            )  # fmt: skip
        except asyncpg.NoDataFoundError as exc:
            raise Conflict(str(exc.message)) from None
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="onboard", entity="billing_account",
            entity_id=str(onboarding_id), after={"country": body.country},
        )  # fmt: skip
    return 202, OnboardingAccepted(onboarding_id=str(onboarding_id), state="pending")


async def get_onboarding(ctx: Context) -> tuple[int, Any]:
    try:
        onboarding_id = uuid.UUID(ctx.request.match_info["onboarding_id"])
    except ValueError:
        raise NotFound("no such onboarding") from None
    caller = ctx.who
    async with ctx.state.store.tx(Scope.of(caller)) as conn:
        row = await conn.fetchrow(
            "SELECT * FROM billing_api_onboardings WHERE onboarding_id = $1 AND tenant_id = $2",
            onboarding_id,
            caller.tenant_id,
        )
    if row is None:
        raise NotFound("no such onboarding")
    return 200, _onboarding_view(row)


_ANYONE_BILLED = frozenset({Role.OPERATOR, Role.PROVIDER, Role.FOLLOWER})
_REVENUE = frozenset({Role.OPERATOR, Role.PROVIDER})

ROUTES = [
    Route("GET", "/v1/billing/charges", list_charges,
          "Charges: a follower's own, a provider's followers' (?follower=), or every tenant's",
          "billing", roles=_ANYONE_BILLED, response=Page[ChargeView],
          query=("follower", "cursor", "limit")),
    Route("GET", "/v1/billing/revenue", list_revenue,
          "Revenue per month and currency: the operator's, or a provider's own", "billing",
          roles=_REVENUE, response=Page[RevenueView], query=("cursor", "limit")),
    Route("POST", "/v1/billing/onboarding", start_onboarding,
          "Ask for a Stripe Express onboarding link", "billing", roles=PROVIDERS,
          request=OnboardingRequest, response=OnboardingAccepted, status=202,
          errors=(409, 422, 503)),
    Route("GET", "/v1/billing/onboarding/{onboarding_id}", get_onboarding,
          "An onboarding request's state and link", "billing", roles=PROVIDERS,
          response=OnboardingView, errors=(404,)),
]  # fmt: skip
