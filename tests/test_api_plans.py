"""Plans and Checkout over HTTP: the operator's plans, providers' plans for followers (modules
their operator plan allows, integer money, their own risk templates), followers reading their
provider's plans and starting a Checkout, all written through billing's functions only; and a
plan bought end to end (API, billing service, Stripe peer, signed webhook, provisioning)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
import stripe
from aiohttp import ClientSession
from conftest import wait_until
from stripe_peer import StripePeer
from test_api_support import Api, Person, running_api

from engine.billing import store as billing
from engine.billing.config import BillingConfig
from engine.billing.gateway import StripeGateway
from engine.billing.service import BillingService


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as api:
        await billing.migrate(database_url)
        yield api


OPERATOR_PLAN = {
    "name": "Pro", "currency": "EUR", "recurring_minor": 9900, "setup_minor": 0,
    "period": "monthly", "platform_fee_percent": "12.5", "account_pool_limit": 20,
    "modules": ["subscription", "pay_per_trade"],
}  # fmt: skip
SUB_PLAN = {
    "name": "Gold", "currency": "EUR", "modules": ["subscription"],
    "subscription_price_minor": 4900, "subscription_period": "monthly",
}  # fmt: skip


async def _provider_on_plan(api: Api, tenant: str) -> Person:
    operator = await api.as_operator()
    provider = await api.provider(tenant)
    status, plan = await api.call("POST", "/v1/operator-plans", operator, json=OPERATOR_PLAN)
    assert status == 201, plan
    status, body = await api.call(
        "PUT", f"/v1/tenants/{tenant}/operator-plan", operator, json={"plan_id": plan["plan_id"]}
    )
    assert status == 200, body
    return provider


async def test_the_operator_creates_lists_and_reads_operator_plans(api: Api) -> None:
    operator = await api.as_operator()
    status, plan = await api.call("POST", "/v1/operator-plans", operator, json=OPERATOR_PLAN)
    assert status == 201, plan
    assert plan["platform_fee_percent"] == "12.5" and plan["recurring_minor"] == 9900
    status, page = await api.call("GET", "/v1/operator-plans", operator)
    assert status == 200 and [p["plan_id"] for p in page["items"]] == [plan["plan_id"]]
    status, one = await api.call("GET", f"/v1/operator-plans/{plan['plan_id']}", operator)
    assert status == 200 and one == plan
    provider = await api.provider("alpha")
    status, _ = await api.call("POST", "/v1/operator-plans", provider, json=OPERATOR_PLAN)
    assert status == 403


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recurring_minor", 99.5),
        ("setup_minor", 10.0),
        ("platform_fee_percent", 12.5),
        ("platform_fee_percent", "101"),
        ("currency", "eur"),
        ("modules", ["subscription", "subscription"]),
    ],
)
async def test_an_invalid_operator_plan_is_422_naming_the_field(
    api: Api, field: str, value: Any
) -> None:
    operator = await api.as_operator()
    status, body = await api.call(
        "POST", "/v1/operator-plans", operator, json={**OPERATOR_PLAN, field: value}
    )
    assert status == 422, body
    assert [e["field"] for e in body["errors"]] == [field]


async def test_a_provider_sells_only_modules_its_operator_plan_allows(api: Api) -> None:
    provider = await _provider_on_plan(api, "alpha")
    status, plan = await api.call("POST", "/v1/plans", provider, json=SUB_PLAN)
    assert status == 201, plan
    assert plan["tenant_id"] == "alpha" and plan["has_subscribers"] is False
    perf = {"name": "Perf", "currency": "EUR", "modules": ["performance"],
            "performance_rate": "0.2"}  # fmt: skip
    status, body = await api.call("POST", "/v1/plans", provider, json=perf)
    assert status == 422, body
    assert [e["field"] for e in body["errors"]] == ["modules"]
    # A provider on no operator plan sells nothing.
    other = await api.provider("beta")
    status, body = await api.call("POST", "/v1/plans", other, json=SUB_PLAN)
    assert status == 409, body


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subscription_price_minor": 49.0}, "subscription_price_minor"),
        ({"subscription_price_minor": None}, "subscription_price_minor"),
        ({"ppt_trades": 10}, "ppt_trades"),
        ({"modules": []}, "modules"),
        ({"risk_template_id": "not-a-uuid"}, "risk_template_id"),
    ],
)
async def test_an_invalid_plan_is_422_naming_the_field(
    api: Api, change: dict[str, Any], field: str
) -> None:
    provider = await _provider_on_plan(api, "alpha")
    status, body = await api.call("POST", "/v1/plans", provider, json={**SUB_PLAN, **change})
    assert status == 422, body
    assert [e["field"] for e in body["errors"]] == [field]


async def test_a_plan_names_only_a_risk_template_of_its_provider(api: Api) -> None:
    provider = await _provider_on_plan(api, "alpha")
    other = await _provider_on_plan(api, "beta")
    template = {"name": "careful", "settings": {"max_lot": 0.5}}
    status, theirs = await api.call("POST", "/v1/risk-templates", other, json=template)
    assert status == 201, theirs
    status, body = await api.call(
        "POST", "/v1/plans", provider,
        json={**SUB_PLAN, "risk_template_id": theirs["template_id"]},
    )  # fmt: skip
    assert status == 422 and body["errors"][0]["field"] == "risk_template_id", body
    status, mine = await api.call("POST", "/v1/risk-templates", provider, json=template)
    status, plan = await api.call(
        "POST", "/v1/plans", provider, json={**SUB_PLAN, "risk_template_id": mine["template_id"]}
    )
    assert status == 201 and plan["risk_template_id"] == mine["template_id"], plan


async def test_followers_read_their_providers_plans_and_no_one_elses(api: Api) -> None:
    provider = await _provider_on_plan(api, "alpha")
    other = await _provider_on_plan(api, "beta")
    status, plan = await api.call("POST", "/v1/plans", provider, json=SUB_PLAN)
    await api.call("POST", "/v1/plans", other, json=SUB_PLAN)
    fiona = await api.follower(provider, "fiona")
    status, page = await api.call("GET", "/v1/plans", fiona)
    assert status == 200 and [p["plan_id"] for p in page["items"]] == [plan["plan_id"]]
    assert page["items"][0]["risk_template_id"] is None
    status, one = await api.call("GET", f"/v1/plans/{plan['plan_id']}", fiona)
    assert status == 200 and one["name"] == "Gold"
    bob = await api.follower(other, "bob")
    status, _ = await api.call("GET", f"/v1/plans/{plan['plan_id']}", bob)
    assert status == 404
    status, _ = await api.call("GET", f"/v1/plans/{plan['plan_id']}", other)
    assert status == 404


async def test_a_checkout_is_accepted_once_per_client_key_and_read_by_its_follower(
    api: Api,
) -> None:
    provider = await _provider_on_plan(api, "alpha")
    status, plan = await api.call("POST", "/v1/plans", provider, json=SUB_PLAN)
    fiona = await api.follower(provider, "fiona")
    path = f"/v1/plans/{plan['plan_id']}/checkout"
    status, first = await api.call("POST", path, fiona, json={"client_key": "buy-1"})
    assert status == 202 and first["state"] == "pending", first
    status, again = await api.call("POST", path, fiona, json={"client_key": "buy-1"})
    assert status == 202 and again["checkout_id"] == first["checkout_id"]
    # Another key while this one is open: the open Checkout, never a second paid session.
    status, other = await api.call("POST", path, fiona, json={"client_key": "buy-2"})
    assert status == 202 and other["checkout_id"] == first["checkout_id"], other
    status, view = await api.call("GET", f"/v1/checkouts/{first['checkout_id']}", fiona)
    assert status == 200 and view["state"] == "pending" and view["url"] is None, view
    async with api.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT follower, provider, success_url FROM billing_checkouts"
            " WHERE checkout_id = $1::uuid",
            first["checkout_id"],
        )
    # Billing's follower is the API's user id, billing's provider the API's tenant.
    assert (row["follower"], row["provider"]) == (fiona.user_id, "alpha")
    assert row["success_url"].endswith(f"/billing/plans/{plan['plan_id']}?checkout=success")
    maria = await api.follower(provider, "maria")
    status, _ = await api.call("GET", f"/v1/checkouts/{first['checkout_id']}", maria)
    assert status == 404
    status, _ = await api.call("POST", path, provider, json={"client_key": "buy-1"})
    assert status == 403


async def test_a_checkout_refuses_a_return_url_outside_the_platform(api: Api) -> None:
    provider = await _provider_on_plan(api, "alpha")
    status, plan = await api.call("POST", "/v1/plans", provider, json=SUB_PLAN)
    fiona = await api.follower(provider, "fiona")
    status, body = await api.call(
        "POST", f"/v1/plans/{plan['plan_id']}/checkout", fiona,
        json={"client_key": "k", "success_url": "https://evil.example/steal"},
    )  # fmt: skip
    assert status == 422 and body["errors"][0]["field"] == "success_url", body
    status, body = await api.call(
        "POST", "/v1/plans/no-such-plan/checkout", fiona, json={"client_key": "k"}
    )
    assert status == 404


async def test_the_api_role_calls_billings_functions_but_cannot_write_its_tables(
    api: Api,
) -> None:
    await _provider_on_plan(api, "alpha")
    async with api.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE tradecopy_api")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO billing_follower_plans (plan_id, provider, currency, modules)"
                " VALUES ('x', 'alpha', 'EUR', '{subscription}')"
            )
    async with api.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE tradecopy_api")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE billing_checkouts SET state = 'completed'")


async def test_billings_views_are_a_second_wall_scoped_by_the_api_transaction(api: Api) -> None:
    """Without the API's own filters, the views still show only the transaction's tenant (and
    follower): as the API's row-level security does for its tables."""
    provider = await _provider_on_plan(api, "alpha")
    other = await _provider_on_plan(api, "beta")
    _, mine = await api.call("POST", "/v1/plans", provider, json=SUB_PLAN)
    _, theirs = await api.call("POST", "/v1/plans", other, json=SUB_PLAN)
    fiona = await api.follower(provider, "fiona")
    maria = await api.follower(provider, "maria")
    path = f"/v1/plans/{mine['plan_id']}/checkout"
    _, hers = await api.call("POST", path, fiona, json={"client_key": "k"})
    await api.call("POST", path, maria, json={"client_key": "k"})

    async def seen(tenant: str, follower: str, view: str, column: str) -> set[str]:
        async with api.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('tradecopy.tenant', $1, true),"
                " set_config('tradecopy.follower', $2, true)",
                tenant,
                follower,
            )
            await conn.execute("SET LOCAL ROLE tradecopy_api")
            return {str(r[0]) for r in await conn.fetch(f"SELECT {column} FROM {view}")}

    plans_view = "billing_api_provider_plans"
    assert await seen("alpha", "", plans_view, "plan_id") == {mine["plan_id"]}
    assert await seen("*", "", plans_view, "plan_id") == {mine["plan_id"], theirs["plan_id"]}
    assert await seen("", "", plans_view, "plan_id") == set()
    checkouts = "billing_api_checkouts"
    assert await seen("alpha", fiona.user_id, checkouts, "checkout_id") == {hers["checkout_id"]}
    assert len(await seen("alpha", "", checkouts, "checkout_id")) == 2
    assert await seen("beta", "", checkouts, "checkout_id") == set()


async def test_a_plan_bought_through_the_api_is_activated_and_provisions_its_template(
    api: Api, nats_server: Any
) -> None:
    """End to end: the API records the Checkout, the billing service makes the session at the
    Stripe peer, the browser pays, Stripe's signed webhook reaches the service, the plan
    activates and its risk template lands on the follower's link (which stays enabled)."""
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    provider = await _provider_on_plan(api, "alpha")
    account = await gateway.create_express_account(
        provider="alpha", email="alpha@x.test", country="DE"
    )
    async with api.pool.acquire() as conn:  # the platform backend, after Express onboarding
        operator_plan = await conn.fetchval(
            "SELECT operator_plan FROM billing_providers WHERE provider = 'alpha'"
        )
        await billing.upsert_provider(
            conn, provider="alpha", operator_plan=operator_plan, stripe_account=account
        )
    careful = {"name": "careful", "settings": {"max_lot": 0.5}}
    status, template = await api.call("POST", "/v1/risk-templates", provider, json=careful)
    status, plan = await api.call(
        "POST", "/v1/plans", provider,
        json={**SUB_PLAN, "risk_template_id": template["template_id"]},
    )  # fmt: skip
    assert status == 201, plan
    fiona = await api.follower(provider, "fiona")
    master = (await api.account(provider, "master"))["account_id"]
    copy = (await api.account(provider, "follower", owner=fiona))["account_id"]
    link = await api.link(provider, master, copy)
    config = BillingConfig(
        database_url=api.database_url, nats_url=nats_server.url, webhook_port=0,
        metrics_port=None, event_poll_s=0.05,
    )  # fmt: skip
    service = BillingService(config, api.database_url, gateway, "whsec_e2e")
    await service.start()
    try:
        status, accepted = await api.call(
            "POST", f"/v1/plans/{plan['plan_id']}/checkout", fiona, json={"client_key": "buy"}
        )
        assert status == 202, accepted
        path = f"/v1/checkouts/{accepted['checkout_id']}"

        async def state(wanted: str) -> bool:
            return (await api.call("GET", path, fiona))[1]["state"] == wanted

        await wait_until(lambda: state("ready"), "the Checkout Session's URL")
        view = (await api.call("GET", path, fiona))[1]
        (session,) = peer.checkout_sessions.values()
        assert view["url"] == session["url"]
        payload = orjson.dumps(peer.complete_checkout_session(session["id"]))
        header = stripe.WebhookSignature.generate_signature_header(payload.decode(), "whsec_e2e")
        async with ClientSession() as http:
            answer = await http.post(
                f"http://127.0.0.1:{service.webhook_port}/stripe/webhook",
                data=payload, headers={"Stripe-Signature": header},
            )  # fmt: skip
            assert answer.status == 200
        await wait_until(lambda: state("completed"), "the plan activated")

        async def provisioned() -> bool:
            status, body = await api.call("GET", f"/v1/links/{link['link_id']}", provider)
            return status == 200 and body["link"]["max_lot"] == 0.5

        await wait_until(provisioned, "the template on the follower's link")
        status, body = await api.call("GET", f"/v1/links/{link['link_id']}", provider)
        assert body["link"]["enabled"] is True
        status, one = await api.call("GET", f"/v1/plans/{plan['plan_id']}", provider)
        assert one["has_subscribers"] is True
        # Subscribed: the same request answers as before, a new one would be a second
        # subscription charging the same follower.
        checkout = f"/v1/plans/{plan['plan_id']}/checkout"
        status, again = await api.call("POST", checkout, fiona, json={"client_key": "buy"})
        assert status == 202 and again["checkout_id"] == accepted["checkout_id"]
        status, body = await api.call("POST", checkout, fiona, json={"client_key": "buy-2"})
        assert status == 409, body
    finally:
        await service.stop()
        await gateway.close()
        await peer.stop()
