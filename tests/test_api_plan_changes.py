"""Plan changes over HTTP: a follower asks to move its subscription to another plan of its
provider (202, pending), billing's worker applies it at the Stripe peer and in billing, and the
API shows the prorated outcome; every refusal is a clear 4xx; nobody reaches another's
follower."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import stripe
from aiohttp import ClientSession
from conftest import wait_until
from stripe_peer import StripePeer
from test_api_support import Api, Person, running_api
from test_billing_plan_changes import ANCHOR_NS, CHANGE_NS, CHARGE, CREDIT, NET, PERIOD_END_NS

from engine.billing import plan_changes
from engine.billing import store as billing
from engine.billing.config import BillingConfig
from engine.billing.gateway import StripeGateway
from engine.billing.provisioning import Provisioner
from engine.billing.service import BillingService
from engine.runtime.jetstream import ensure_buckets
from schemas import subjects


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as api:
        await billing.migrate(database_url)
        yield api


OPERATOR_PLAN = {
    "name": "Pro", "currency": "EUR", "platform_fee_percent": "10", "account_pool_limit": 20,
    "modules": ["subscription", "pay_per_trade"],
}  # fmt: skip


def _plan(name: str, price: int | None, currency: str = "EUR", **extra: Any) -> dict[str, Any]:
    if price is None:
        return {"name": name, "currency": currency, "modules": ["pay_per_trade"],
                "ppt_trades": 10, "ppt_price_minor": 999, **extra}  # fmt: skip
    return {"name": name, "currency": currency, "modules": ["subscription"],
            "subscription_price_minor": price, "subscription_period": "monthly",
            **extra}  # fmt: skip


async def _provider(api: Api, tenant: str) -> Person:
    operator = await api.as_operator()
    provider = await api.provider(tenant)
    status, plan = await api.call("POST", "/v1/operator-plans", operator, json=OPERATOR_PLAN)
    assert status == 201, plan
    status, _ = await api.call(
        "PUT", f"/v1/tenants/{tenant}/operator-plan", operator, json={"plan_id": plan["plan_id"]}
    )
    assert status == 200
    return provider


async def _make_plan(api: Api, provider: Person, body: dict[str, Any]) -> str:
    status, plan = await api.call("POST", "/v1/plans", provider, json=body)
    assert status == 201, plan
    return str(plan["plan_id"])


async def _subscribed(api: Api, follower: Person, plan_id: str) -> None:
    """Billing's row, as a subscription billing charges itself starts it."""
    async with api.pool.acquire() as conn:
        await billing.subscribe(
            conn, follower=follower.user_id, plan_id=plan_id, started_ns=ANCHOR_NS
        )


def _path(follower: Person) -> str:
    return f"/v1/followers/{follower.user_id}/plan-changes"


async def test_a_change_through_the_api_is_applied_at_stripe_and_provisions_the_new_template(
    api: Api, nats_server: Any, js: Any
) -> None:
    """End to end: a plan bought through Checkout (API, billing service, Stripe peer, signed
    webhook), then the change asked through the API, applied by billing's worker at the peer
    and in billing, with the README's amounts; B's risk template reaches the follower's link."""
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    provider = await _provider(api, "alpha")
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
    templates = {}
    for name, lot in (("careful", 0.5), ("bold", 2.0)):
        body = {"name": name, "settings": {"max_lot": lot}}
        status, template = await api.call("POST", "/v1/risk-templates", provider, json=body)
        assert status == 201, template
        templates[name] = template["template_id"]
    careful = _plan("Silver", 3000, risk_template_id=templates["careful"])
    silver = await _make_plan(api, provider, careful)
    gold = await _make_plan(api, provider, _plan("Gold", 6000, risk_template_id=templates["bold"]))
    fiona = await api.follower(provider, "fiona")
    master = (await api.account(provider, "master"))["account_id"]
    copy = (await api.account(provider, "follower", owner=fiona))["account_id"]
    link = (await api.link(provider, master, copy))["link_id"]
    config = BillingConfig(
        database_url=api.database_url, nats_url=nats_server.url, webhook_port=0,
        metrics_port=None, event_poll_s=0.05,
    )  # fmt: skip
    service = BillingService(config, api.database_url, gateway, "whsec_e2e")
    await service.start()
    try:
        status, accepted = await api.call(
            "POST", f"/v1/plans/{silver}/checkout", fiona, json={"client_key": "buy"}
        )
        assert status == 202, accepted

        async def checkout_state(wanted: str) -> bool:
            path = f"/v1/checkouts/{accepted['checkout_id']}"
            return (await api.call("GET", path, fiona))[1]["state"] == wanted

        await wait_until(lambda: checkout_state("ready"), "the Checkout Session")
        (session,) = peer.checkout_sessions.values()
        payload = orjson.dumps(peer.complete_checkout_session(session["id"]))
        header = stripe.WebhookSignature.generate_signature_header(payload.decode(), "whsec_e2e")
        async with ClientSession() as http:
            answer = await http.post(
                f"http://127.0.0.1:{service.webhook_port}/stripe/webhook",
                data=payload, headers={"Stripe-Signature": header},
            )  # fmt: skip
            assert answer.status == 200
        await wait_until(lambda: checkout_state("completed"), "Silver activated")
    finally:
        await service.stop()  # the change below is applied by a worker pass of this test's
    try:
        async with api.pool.acquire() as conn:  # the README's period: anchored on 1 March
            await conn.execute("UPDATE billing_subscriptions SET anchor_ns = $1", ANCHOR_NS)
        status, asked = await api.call(
            "POST", _path(fiona), fiona, json={"from_plan": silver, "to_plan": gold}
        )
        assert status == 202, asked
        assert asked["status"] == "pending" and asked["credit_minor"] is None
        assert (asked["from_plan"], asked["to_plan"], asked["currency"]) == (silver, gold, "EUR")
        async with api.pool.acquire() as conn:  # and its instant: 11 March
            await conn.execute("UPDATE billing_plan_changes SET requested_ns = $1", CHANGE_NS)
        links_kv = (await ensure_buckets(js))[subjects.KV_LINKS]
        provisioner = Provisioner(api.pool, js, links_kv)
        done = await plan_changes.apply_plan_changes(api.pool, gateway, provisioner=provisioner)
        assert done == [(asked["plan_change_id"], "applied")]
        status, shown = await api.call("GET", f"{_path(fiona)}/{asked['plan_change_id']}", fiona)
        assert status == 200, shown
        assert shown["status"] == "applied"
        assert (shown["credit_minor"], shown["charge_minor"], shown["net_minor"]) == (
            CREDIT, CHARGE, NET,
        )  # fmt: skip
        assert (shown["period_start_ns"], shown["period_end_ns"]) == (ANCHOR_NS, PERIOD_END_NS)
        ((subscription, params),) = peer.subscription_updates
        item = peer.subscriptions[subscription]["items"]["data"][0]
        assert params["items"][0]["id"] == item["id"]
        assert (item["price"]["unit_amount"], item["price"]["currency"]) == (6000, "eur")
        status, body = await api.call("GET", f"/v1/links/{link}", provider)
        assert status == 200 and body["link"]["max_lot"] == 2.0 and body["link"]["enabled"]
        status, page = await api.call("GET", _path(fiona), provider)
        assert status == 200 and [c["status"] for c in page["items"]] == ["applied"]
        # Now on Gold: Silver is no longer held, and Gold is.
        status, body = await api.call(
            "POST", _path(fiona), fiona, json={"from_plan": silver, "to_plan": gold}
        )
        assert status == 409, body
    finally:
        await gateway.close()
        await peer.stop()


async def test_every_refusal_is_a_clear_4xx(api: Api) -> None:
    provider = await _provider(api, "alpha")
    other = await _provider(api, "beta")
    silver = await _make_plan(api, provider, _plan("Silver", 3000))
    gold = await _make_plan(api, provider, _plan("Gold", 6000))
    dollar = await _make_plan(api, provider, _plan("Dollar", 6000, currency="USD"))
    trades = await _make_plan(api, provider, _plan("Trades", None))
    theirs = await _make_plan(api, other, _plan("Theirs", 6000))
    fiona = await api.follower(provider, "fiona")
    await _subscribed(api, fiona, silver)

    async def ask(from_plan: str, to_plan: str) -> tuple[int, Any]:
        body = {"from_plan": from_plan, "to_plan": to_plan}
        return await api.call("POST", _path(fiona), fiona, json=body)

    cases = [
        ((silver, "no-such-plan"), 422, "to_plan", "no such plan"),
        (("no-such-plan", gold), 422, "from_plan", "no such plan"),
        ((theirs, gold), 422, "from_plan", "no such plan"),  # not of the follower's provider
        ((silver, theirs), 422, "to_plan", "another provider"),
        ((silver, dollar), 422, "to_plan", "currency"),
        ((silver, trades), 422, "to_plan", "subscription module"),
        ((silver, silver), 422, "to_plan", "already held"),
        ((gold, silver), 409, None, "no active subscription"),
    ]
    for (from_plan, to_plan), wanted, field, words in cases:
        status, body = await ask(from_plan, to_plan)
        assert status == wanted, (from_plan, to_plan, body)
        assert body["type"] and words in body["detail"], body
        if field is not None:
            assert [e["field"] for e in body["errors"]] == [field], body
    status, first = await ask(silver, gold)
    assert status == 202, first
    status, body = await ask(silver, gold)
    assert status == 409 and "pending" in body["detail"], body
    status, body = await api.call("POST", _path(fiona), fiona, json={"from_plan": silver})
    assert status == 422, body
    status, body = await api.call(
        "POST", _path(fiona), fiona, json={"from_plan": silver, "to_plan": gold, "x": 1}
    )
    assert status == 422, body
    # Only the follower asks; a provider reads.
    status, body = await api.call(
        "POST", _path(fiona), provider, json={"from_plan": silver, "to_plan": gold}
    )
    assert status == 403, body
    async with api.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_plan_changes") == 1


async def test_nobody_reaches_another_tenants_or_another_followers_changes(api: Api) -> None:
    provider = await _provider(api, "alpha")
    other = await _provider(api, "beta")
    silver = await _make_plan(api, provider, _plan("Silver", 3000))
    gold = await _make_plan(api, provider, _plan("Gold", 6000))
    fiona = await api.follower(provider, "fiona")
    maria = await api.follower(provider, "maria")
    bert = await api.follower(other, "bert")
    await _subscribed(api, fiona, silver)
    status, asked = await api.call(
        "POST", _path(fiona), fiona, json={"from_plan": silver, "to_plan": gold}
    )
    assert status == 202, asked
    one = f"{_path(fiona)}/{asked['plan_change_id']}"
    operator = await api.as_operator()
    # Who may read: fiona herself, her provider, the operator.
    for who in (fiona, provider, operator):
        status, body = await api.call("GET", one, who)
        assert status == 200 and body["plan_change_id"] == asked["plan_change_id"], body
        status, page = await api.call("GET", _path(fiona), who)
        assert status == 200 and len(page["items"]) == 1, page
    # Another follower of the same provider, another tenant's provider and follower: 404.
    for who in (maria, other, bert):
        for method, path, body in (
            ("GET", one, None), ("GET", _path(fiona), None),
            ("POST", _path(fiona), {"from_plan": silver, "to_plan": gold}),
        ):  # fmt: skip
            status, answer = await api.call(method, path, who, json=body)
            assert status in (403, 404), (who.email, method, path, answer)
            assert "credit_minor" not in str(answer)
    status, _ = await api.call("GET", _path(bert), provider)  # a follower of another tenant
    assert status == 404
    status, _ = await api.call("GET", _path(provider), provider)  # a user, but no follower
    assert status == 404
    status, _ = await api.call("GET", "/v1/followers/not-a-uuid/plan-changes", operator)
    assert status == 404
    status, _ = await api.call("GET", f"{_path(fiona)}/not-a-uuid", fiona)
    assert status == 404
    # maria's own list is hers: empty, not fiona's.
    status, page = await api.call("GET", _path(maria), maria)
    assert status == 200 and page["items"] == []
