"""Plans as the API writes them: billing's SQL write interface, and the plan terms billing reads.

The API never writes billing's tables. ``migrations/0004_plans_api.sql`` publishes SECURITY
DEFINER functions (granted to ``tradecopy_billing_writer``) and ``billing_api_*`` views (granted
to ``tradecopy_billing_reader``); this module calls the same functions for billing's own callers
(the operator's tooling, tests) and reads a plan's full terms for Checkout and provisioning.
Billing's provider id is the API's tenant id and its follower id the API's user id.

A plan is never changed once someone subscribed (a trigger refuses new terms): a change is a new
plan, and followers move to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import asyncpg
import msgspec

from engine.core.errors import TradecopyError

MODULES = ("subscription", "pay_per_trade", "performance", "volume")


class PlanRefused(TradecopyError):
    """Billing refused a plan: ``field`` names the term (``modules``, ``provider``…)."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


class PlanTerms(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's plan for followers with what Checkout and provisioning need of it."""

    plan_id: str
    provider: str
    name: str | None
    currency: str
    modules: tuple[str, ...]
    subscription_price_minor: int | None
    subscription_period: str | None
    ppt_trades: int | None
    ppt_price_minor: int | None
    risk_template_id: str | None
    platform_fee_percent: Decimal
    destination: str | None
    """The provider's Stripe Connect account; None before onboarding."""


def _refused(exc: asyncpg.PostgresError) -> PlanRefused:
    return PlanRefused(str(getattr(exc, "message", exc)), getattr(exc, "column_name", None))


async def create_operator_plan(
    conn: asyncpg.Connection,
    *,
    plan_id: str,
    name: str,
    currency: str,
    platform_fee_percent: Decimal | str,
    account_pool_limit: int,
    modules: Sequence[str],
    recurring_minor: int = 0,
    setup_minor: int = 0,
    period: str = "monthly",
) -> bool:
    """Through ``billing_api_create_operator_plan``; False when the id exists (never changed)."""
    try:
        created: bool = await conn.fetchval(
            "SELECT billing_api_create_operator_plan($1, $2, $3, $4, $5, $6, $7::numeric, $8, $9)",
            plan_id, name, currency, recurring_minor, setup_minor, period,
            str(platform_fee_percent), account_pool_limit, list(modules),
        )  # fmt: skip
    except (asyncpg.CheckViolationError, asyncpg.NoDataFoundError) as exc:
        raise _refused(exc) from None
    return created


async def assign_operator_plan(conn: asyncpg.Connection, provider: str, plan_id: str) -> None:
    try:
        await conn.execute("SELECT billing_api_assign_operator_plan($1, $2)", provider, plan_id)
    except asyncpg.NoDataFoundError as exc:
        raise _refused(exc) from None


async def create_provider_plan(
    conn: asyncpg.Connection,
    *,
    plan_id: str,
    provider: str,
    name: str,
    currency: str,
    modules: Sequence[str],
    subscription_price_minor: int | None = None,
    subscription_period: str | None = None,
    ppt_trades: int | None = None,
    ppt_price_minor: int | None = None,
    performance_rate: Decimal | str | None = None,
    volume_rate_per_lot_minor: Decimal | str | None = None,
    risk_template_id: str | None = None,
) -> bool:
    """Through ``billing_api_create_provider_plan``: refused (``PlanRefused``, field
    ``modules``) when the provider's operator plan does not allow a module."""
    try:
        created: bool = await conn.fetchval(
            "SELECT billing_api_create_provider_plan($1, $2, $3, $4, $5, $6, $7, $8, $9,"
            " $10::numeric, $11::numeric, $12)",
            plan_id, provider, name, currency, list(modules), subscription_price_minor,
            subscription_period, ppt_trades, ppt_price_minor,
            None if performance_rate is None else str(performance_rate),
            None if volume_rate_per_lot_minor is None else str(volume_rate_per_lot_minor),
            risk_template_id,
        )  # fmt: skip
    except (asyncpg.CheckViolationError, asyncpg.NoDataFoundError) as exc:
        raise _refused(exc) from None
    return created


async def plan_terms(conn: asyncpg.Connection, plan_id: str) -> PlanTerms | None:
    row = await conn.fetchrow(
        "SELECT f.plan_id, f.provider, f.name, f.currency, f.modules,"
        " f.subscription_price_minor, f.subscription_period, f.ppt_trades, f.ppt_price_minor,"
        " f.risk_template_id, o.platform_fee_percent, v.stripe_account AS destination"
        " FROM billing_follower_plans f"
        " JOIN billing_providers v ON v.provider = f.provider"
        " JOIN billing_operator_plans o ON o.plan_id = v.operator_plan"
        " WHERE f.plan_id = $1",
        plan_id,
    )
    if row is None:
        return None
    values = dict(row)
    values["modules"] = tuple(values["modules"])
    return PlanTerms(**values)
