"""Plans through billing's write interface (the SQL functions the API calls): modules the operator
plan allows, plans fixed once subscribed, and the Checkout Session each kind of plan becomes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from engine.billing import plans, store
from engine.billing.checkout import session_params
from engine.billing.plans import PlanRefused, PlanTerms


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await store.migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await plans.create_operator_plan(
            conn, plan_id="basic", name="Basic", currency="EUR", platform_fee_percent="12.5",
            account_pool_limit=10, modules=["subscription", "pay_per_trade"],
        )  # fmt: skip
        await plans.assign_operator_plan(conn, "alpha", "basic")
        yield conn
    finally:
        await conn.close()


async def test_a_module_the_operator_plan_does_not_allow_is_refused_naming_modules(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(PlanRefused) as refused:
        await plans.create_provider_plan(
            conn, plan_id="p", provider="alpha", name="Perf", currency="EUR",
            modules=["performance"], performance_rate="0.2",
        )  # fmt: skip
    assert refused.value.field == "modules"
    assert "subscription, pay_per_trade" in str(refused.value)
    assert await conn.fetchval("SELECT count(*) FROM billing_follower_plans") == 0


async def test_a_provider_without_an_operator_plan_cannot_sell(conn: asyncpg.Connection) -> None:
    with pytest.raises(PlanRefused) as refused:
        await plans.create_provider_plan(
            conn, plan_id="p", provider="nobody", name="Sub", currency="EUR",
            modules=["subscription"], subscription_price_minor=900, subscription_period="monthly",
        )  # fmt: skip
    assert refused.value.field == "provider"


async def test_creating_an_existing_plan_id_changes_nothing(conn: asyncpg.Connection) -> None:
    terms = {"provider": "alpha", "name": "Sub", "currency": "EUR", "modules": ["subscription"],
             "subscription_period": "monthly"}  # fmt: skip
    assert await plans.create_provider_plan(
        conn, plan_id="s", subscription_price_minor=900, **terms
    )
    assert not await plans.create_provider_plan(
        conn, plan_id="s", subscription_price_minor=100, **terms
    )
    plan = await plans.plan_terms(conn, "s")
    assert plan is not None and plan.subscription_price_minor == 900


async def test_a_plan_is_fixed_once_someone_subscribed(conn: asyncpg.Connection) -> None:
    async def set_price(price: int) -> None:
        await store.upsert_follower_plan(
            conn, plan_id="s", provider="alpha", currency="EUR", modules=["subscription"],
            subscription_price_minor=price, subscription_period="monthly",
        )  # fmt: skip

    await set_price(900)
    await set_price(1000)  # nobody on it yet: still open to change
    await store.subscribe(conn, follower="f1", plan_id="s", started_ns=1)
    await set_price(1000)  # the same terms again are not a change
    with pytest.raises(asyncpg.CheckViolationError, match="make a new plan"):
        await set_price(1100)
    plan = await plans.plan_terms(conn, "s")
    assert plan is not None and plan.subscription_price_minor == 1000


def _plan(modules: tuple[str, ...], destination: str | None = "acct_1") -> PlanTerms:
    return PlanTerms(
        plan_id="p1", provider="alpha", name="Gold", currency="EUR", modules=modules,
        subscription_price_minor=4900, subscription_period="quarterly", ppt_trades=10,
        ppt_price_minor=999, risk_template_id=None, platform_fee_percent=Decimal("12.5"),
        destination=destination,
    )  # fmt: skip


def _params(plan: PlanTerms) -> dict[str, object]:
    return session_params(
        plan, checkout_id="c1", follower="f1", customer="cus_1",
        success_url="https://x.test/ok", cancel_url="https://x.test/no",
    )  # fmt: skip


def test_a_subscription_plan_is_a_destination_subscription_with_the_allowance_as_a_line() -> None:
    params = _params(_plan(("subscription", "pay_per_trade")))
    assert params["mode"] == "subscription"
    recurring, once = params["line_items"]  # type: ignore[misc]
    assert recurring["price_data"]["recurring"] == {"interval": "month", "interval_count": 3}
    assert recurring["price_data"]["unit_amount"] == 4900
    assert "recurring" not in once["price_data"] and once["price_data"]["unit_amount"] == 999
    assert params["subscription_data"] == {
        "application_fee_percent": "12.5",
        "transfer_data": {"destination": "acct_1"},
        "metadata": {"checkout_id": "c1", "follower": "f1", "plan_id": "p1"},
    }


def test_a_pay_per_trade_plan_is_a_payment_whose_platform_fee_rounds_down() -> None:
    params = _params(_plan(("pay_per_trade", "volume")))
    assert params["mode"] == "payment"
    intent = params["payment_intent_data"]
    # 12.5 % of 9.99 is 124.875 cents: 124, never more than the plan promises.
    assert intent["application_fee_amount"] == 124  # type: ignore[index]
    assert intent["setup_future_usage"] == "off_session"  # type: ignore[index]


def test_a_plan_of_weekly_fees_only_saves_a_card() -> None:
    params = _params(_plan(("performance",)))
    assert params["mode"] == "setup" and "line_items" not in params
    assert params["currency"] == "eur"


def test_a_provider_without_a_stripe_account_cannot_sell_through_checkout() -> None:
    with pytest.raises(ValueError, match="no Stripe account"):
        _params(_plan(("subscription",), destination=None))
