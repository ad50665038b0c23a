"""Billing over HTTP: charge history (a follower its own, a provider its tenant's, the operator
everything), revenue per month and currency on known charges, read through billing's scoped
views only; and Express onboarding requested through the API and served by the billing service
against the Stripe peer (one account per provider, a new link each time)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import wait_until
from stripe_peer import StripePeer
from test_api_support import Api, Person, running_api

from engine.billing import onboarding
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

_keys = itertools.count(1)


def _ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 10**9


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


async def _charge(
    api: Api, follower: Person, provider: str, *, amount: int, fee: int, state: str,
    at: str, currency: str = "EUR", module: str = "subscription",
) -> None:  # fmt: skip
    """A charge as billing's jobs leave it (the billing service's own writes, as the owner)."""
    key = f"test:{next(_keys)}"
    issued = _ns(at)
    async with api.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO billing_invoices (invoice_id, follower, provider, plan_id, window_id,"
            " currency, total_minor, platform_fee_minor, lines, issued_ns)"
            " VALUES ($1, $2, $3, 'plan-x', $4, $5, $6, $7, '[]'::jsonb, $8)",
            key, follower.user_id, provider, f"w-{key}", currency, amount, fee, issued,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO billing_charges (idempotency_key, invoice_id, module, follower, provider,"
            " plan_id, window_id, currency, amount_minor, platform_fee_minor, destination, state,"
            " issued_ns) VALUES ($1, $1, $2, $3, $4, 'plan-x', $5, $6, $7, $8, 'acct_x', $9, $10)",
            key, module, follower.user_id, provider, f"w-{key}", currency, amount, fee, state,
            issued,
        )  # fmt: skip


class World:
    def __init__(self, alpha: Person, beta: Person, fiona: Person, maria: Person, fred: Person):
        self.alpha, self.beta, self.fiona, self.maria, self.fred = alpha, beta, fiona, maria, fred


@pytest.fixture
async def world(api: Api) -> World:
    """Two tenants; fiona and maria follow alpha, fred follows beta; known charges."""
    alpha = await _provider_on_plan(api, "alpha")
    beta = await _provider_on_plan(api, "beta")
    fiona = await api.follower(alpha, "fiona")
    maria = await api.follower(alpha, "maria")
    fred = await api.follower(beta, "fred")
    # March, EUR (alpha): odd cents, paid, unpaid, refunded.
    await _charge(api, fiona, "alpha", amount=4999, fee=624, state="succeeded", at="2026-03-02")
    await _charge(api, maria, "alpha", amount=1001, fee=125, state="failed", at="2026-03-09")
    await _charge(api, fiona, "alpha", amount=333, fee=41, state="refunded", at="2026-03-31")
    # March, USD (alpha): never summed with EUR.
    await _charge(
        api, maria, "alpha", amount=777, fee=97, state="succeeded", at="2026-03-15",
        currency="USD", module="pay_per_trade",
    )  # fmt: skip
    # April, EUR (alpha), pending; and beta's own.
    await _charge(api, fiona, "alpha", amount=2500, fee=312, state="pending", at="2026-04-01")
    await _charge(api, fred, "beta", amount=1234, fee=154, state="succeeded", at="2026-03-20")
    return World(alpha, beta, fiona, maria, fred)


async def _all(api: Api, path: str, who: Person, limit: int = 50) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        sep = "&" if "?" in path else "?"
        status, page = await api.call("GET", f"{path}{sep}{query}", who)
        assert status == 200, page
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


# ------------------------------------------------------------------------ history


async def test_a_follower_sees_only_its_own_charges(api: Api, world: World) -> None:
    charges = await _all(api, "/v1/billing/charges", world.fiona)
    assert [c["amount_minor"] for c in charges] == [2500, 333, 4999]  # newest first
    assert {c["follower"] for c in charges} == {world.fiona.user_id}
    # Asking for another follower changes nothing: a follower is always itself.
    path = f"/v1/billing/charges?follower={world.maria.user_id}"
    assert {c["follower"] for c in await _all(api, path, world.fiona)} == {world.fiona.user_id}
    first = charges[-1]
    assert first["platform_fee_minor"] == 624 and first["provider_minor"] == 4999 - 624
    assert first["currency"] == "EUR" and first["state"] == "succeeded"
    assert first["module"] == "subscription" and first["window_id"].startswith("w-")


async def test_a_provider_sees_its_followers_charges_and_never_another_tenants(
    api: Api, world: World
) -> None:
    alpha = await _all(api, "/v1/billing/charges", world.alpha, limit=2)  # three pages
    assert len(alpha) == 5 and {c["tenant_id"] for c in alpha} == {"alpha"}
    assert [c["charge_id"] for c in alpha] == sorted((c["charge_id"] for c in alpha), reverse=True)
    maria = await _all(api, f"/v1/billing/charges?follower={world.maria.user_id}", world.alpha)
    assert sorted(c["amount_minor"] for c in maria) == [777, 1001]
    # beta's follower through alpha's filter: nothing, not beta's charges.
    assert await _all(api, f"/v1/billing/charges?follower={world.fred.user_id}", world.alpha) == []
    beta = await _all(api, "/v1/billing/charges", world.beta)
    assert [c["amount_minor"] for c in beta] == [1234]
    status, body = await api.call("GET", "/v1/billing/charges?follower=nobody", world.alpha)
    assert status == 422 and body["errors"][0]["field"] == "follower", body


async def test_the_operator_sees_every_tenants_charges(api: Api, world: World) -> None:
    operator = await api.as_operator()
    charges = await _all(api, "/v1/billing/charges", operator)
    assert {c["tenant_id"] for c in charges} == {"alpha", "beta"} and len(charges) == 6


async def test_billings_views_show_a_scope_its_own_rows_only(api: Api, world: World) -> None:
    """The second wall: the views filter by the transaction's scope settings themselves."""

    async def seen(tenant: str, follower: str, view: str) -> int:
        async with api.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('tradecopy.tenant', $1, true),"
                " set_config('tradecopy.follower', $2, true)",
                tenant,
                follower,
            )
            await conn.execute("SET LOCAL ROLE tradecopy_api")
            return int(await conn.fetchval(f"SELECT count(*) FROM {view}"))

    assert await seen("alpha", "", "billing_api_charges") == 5
    assert await seen("alpha", world.fiona.user_id, "billing_api_charges") == 3
    assert await seen("beta", "", "billing_api_charges") == 1
    assert await seen("*", "", "billing_api_charges") == 6
    assert await seen("", "", "billing_api_charges") == 0
    assert await seen("alpha", "", "billing_api_revenue") == 3  # (month, currency) groups
    assert await seen("alpha", world.fiona.user_id, "billing_api_revenue") == 0
    assert await seen("", "", "billing_api_revenue") == 0


# ------------------------------------------------------------------------ revenue


async def test_revenue_sums_known_charges_per_month_and_currency(api: Api, world: World) -> None:
    operator = await api.as_operator()
    revenue = await _all(api, "/v1/billing/revenue", operator, limit=1)  # one row a page
    assert [(r["month"], r["currency"]) for r in revenue] == [
        ("2026-03", "EUR"), ("2026-03", "USD"), ("2026-04", "EUR"),
    ]  # fmt: skip
    march_eur, march_usd, april_eur = revenue
    # alpha's 4999 paid + 1001 failed + 333 refunded, and beta's 1234 paid.
    assert march_eur == {
        "month": "2026-03", "currency": "EUR", "charges": 4,
        "total_minor": 4999 + 1001 + 333 + 1234, "platform_fee_minor": 624 + 154,
        "paid_minor": 4999 + 1234, "unpaid_minor": 1001, "reversed_minor": 333,
    }  # fmt: skip
    assert march_usd["total_minor"] == 777 and march_usd["paid_minor"] == 777
    assert march_usd["platform_fee_minor"] == 97
    assert april_eur["unpaid_minor"] == 2500 and april_eur["paid_minor"] == 0
    assert april_eur["platform_fee_minor"] == 0
    # A provider reads its own revenue only; a follower none.
    mine = await _all(api, "/v1/billing/revenue", world.beta)
    assert [(r["month"], r["currency"], r["total_minor"]) for r in mine] == [
        ("2026-03", "EUR", 1234)
    ]
    alpha = {
        (r["month"], r["currency"]): r for r in await _all(api, "/v1/billing/revenue", world.alpha)
    }
    assert alpha["2026-03", "EUR"]["total_minor"] == 4999 + 1001 + 333
    status, _ = await api.call("GET", "/v1/billing/revenue", world.fiona)
    assert status == 403


# ------------------------------------------------------------------------ onboarding


@pytest.fixture
async def peer() -> AsyncIterator[StripePeer]:
    peer = StripePeer()
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@pytest.fixture
async def service(api: Api, peer: StripePeer) -> AsyncIterator[BillingService]:
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    config = BillingConfig(
        database_url=api.database_url, nats_url=None, webhook_port=0, metrics_port=None,
        event_poll_s=0.05,
    )  # fmt: skip
    service = BillingService(config, api.database_url, gateway, "whsec_onboarding")
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await gateway.close()


async def _onboarded(api: Api, provider: Person, **body: Any) -> dict[str, Any]:
    status, accepted = await api.call(
        "POST", "/v1/billing/onboarding", provider, json={"country": "DE", **body}
    )
    assert status == 202, accepted
    assert accepted["state"] == "pending"
    path = f"/v1/billing/onboarding/{accepted['onboarding_id']}"

    async def settled() -> bool:
        return (await api.call("GET", path, provider))[1]["state"] != "pending"

    await wait_until(settled, "the onboarding link")
    status, view = await api.call("GET", path, provider)
    assert status == 200, view
    return dict(view)


async def test_onboarding_twice_makes_one_express_account_and_two_links(
    api: Api, peer: StripePeer, service: BillingService
) -> None:
    alpha = await _provider_on_plan(api, "alpha")
    first = await _onboarded(api, alpha)
    assert first["state"] == "ready", first
    assert first["url"] == f"{peer.url}/express/onboarding/{first['account']}"
    assert datetime.fromisoformat(first["expires_at"]) > datetime.now(UTC)
    second = await _onboarded(api, alpha, country="FR")  # the account keeps its country
    assert second["state"] == "ready" and second["account"] == first["account"]
    assert second["onboarding_id"] != first["onboarding_id"]
    assert list(peer.accounts) == [first["account"]]
    links = [r for r in peer.requests if r[1] == "/v1/account_links"]
    assert len(links) == 2
    async with api.pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT stripe_account FROM billing_providers WHERE provider = 'alpha'"
        )
    assert stored == first["account"]
    # Stripe has said nothing of the account yet; account.updated makes onboarding complete.
    assert first["charges_enabled"] is None and first["onboarding_complete"] is False
    async with api.pool.acquire() as conn:
        applied = await onboarding.apply_account_event(
            conn, "evt_done", 2_000_000_000,
            {"id": first["account"], "charges_enabled": True, "payouts_enabled": True,
             "details_submitted": True},
        )  # fmt: skip
    assert applied == "applied"
    path = f"/v1/billing/onboarding/{first['onboarding_id']}"
    status, done = await api.call("GET", path, alpha)
    assert status == 200 and done["onboarding_complete"] is True, done
    assert (done["charges_enabled"], done["payouts_enabled"]) == (True, True)
    # Another tenant never reads alpha's onboarding.
    beta = await _provider_on_plan(api, "beta")
    status, _ = await api.call("GET", f"/v1/billing/onboarding/{first['onboarding_id']}", beta)
    assert status == 404
    status, _ = await api.call("GET", "/v1/billing/onboarding/not-a-uuid", alpha)
    assert status == 404


async def test_onboarding_refuses_foreign_return_urls_and_providers_on_no_plan(api: Api) -> None:
    alpha = await _provider_on_plan(api, "alpha")
    for field in ("refresh_url", "return_url"):
        status, body = await api.call(
            "POST", "/v1/billing/onboarding", alpha,
            json={"country": "DE", field: "https://evil.example.net/x"},
        )  # fmt: skip
        assert status == 422 and body["errors"][0]["field"] == field, body
    status, body = await api.call("POST", "/v1/billing/onboarding", alpha, json={"country": "de"})
    assert status == 422 and body["errors"][0]["field"] == "country", body
    nobody = await api.provider("gamma")  # on no operator plan: billing knows no such provider
    status, body = await api.call("POST", "/v1/billing/onboarding", nobody, json={"country": "DE"})
    assert status == 409, body
    fiona = await api.follower(alpha, "fiona")
    status, _ = await api.call("POST", "/v1/billing/onboarding", fiona, json={"country": "DE"})
    assert status == 403


async def test_an_onboarding_stripe_refuses_fails_with_its_reason(
    api: Api, peer: StripePeer, service: BillingService
) -> None:
    alpha = await _provider_on_plan(api, "alpha")
    async with api.pool.acquire() as conn:  # an account Stripe does not know (deleted there)
        await conn.execute(
            "UPDATE billing_providers SET stripe_account = 'acct_gone' WHERE provider = 'alpha'"
        )
    view = await _onboarded(api, alpha)
    assert view["state"] == "failed" and "acct_gone" in view["reason"], view
    assert view["url"] is None and peer.accounts == {}
