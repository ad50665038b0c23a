"""Plan changes through the real ``stripe`` SDK against the local Stripe peer: a requested
change moves a Checkout-made subscription to the new plan's terms at Stripe once (three workers
at once, a lost answer, a 5xx) and the billing row once, with the README's prorated amounts;
Stripe's definitive refusals fail it with Stripe's code; billing's function refuses what it
would not apply."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import stripe
from aiohttp import test_utils, web
from stripe_peer import StripePeer

from engine.billing import checkout, enforcement, plan_changes, plans, store
from engine.billing.fees import BillingPeriod, SubscriptionPlan, change_plan
from engine.billing.gateway import StripeGateway
from engine.billing.webhooks import process_stored_events, webhook_routes

SECRET = "whsec_plan_change_test"
README = Path(__file__).parents[1] / "engine" / "billing" / "README.md"

#: The README's worked example: Silver (30.00 EUR a month) to Gold (60.00 EUR a month), the
#: period anchored on 1 March 2026, the change asked for on 11 March 2026 at midnight UTC.
ANCHOR_NS = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp()) * 10**9
CHANGE_NS = int(datetime(2026, 3, 11, tzinfo=UTC).timestamp()) * 10**9
PERIOD_END_NS = int(datetime(2026, 4, 1, tzinfo=UTC).timestamp()) * 10**9
CREDIT, CHARGE, NET = 2032, 4065, 2033


@dataclass
class Shop:
    pool: asyncpg.Pool
    peer: StripePeer
    gateway: StripeGateway
    client: test_utils.TestClient

    async def request(
        self, from_plan: str = "silver", to_plan: str = "gold", follower: str = "f1",
        provider: str = "alpha",
    ) -> uuid.UUID:  # fmt: skip
        """What the API does for ``POST /v1/followers/{f}/plan-changes``: billing's function,
        then the example's instant (the function stamps the clock's)."""
        async with self.pool.acquire() as conn:
            found: uuid.UUID = await conn.fetchval(
                "SELECT billing_api_request_plan_change($1, $2, $3, $4, $5)",
                uuid.uuid4(), follower, provider, from_plan, to_plan,
            )  # fmt: skip
            await conn.execute(
                "UPDATE billing_plan_changes SET requested_ns = $2 WHERE plan_change_id = $1",
                found,
                CHANGE_NS,
            )
        return found

    async def change(self, plan_change_id: uuid.UUID) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM billing_plan_changes WHERE plan_change_id = $1", plan_change_id
            )

    async def subscriptions(self, follower: str = "f1") -> list[Any]:
        async with self.pool.acquire() as conn:
            return list(
                await conn.fetch(
                    "SELECT * FROM billing_subscriptions WHERE follower = $1", follower
                )
            )

    async def deliver(self, event: dict[str, Any]) -> None:
        payload = orjson.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET)
        resp = await self.client.post(
            "/stripe/webhook", data=payload, headers={"Stripe-Signature": header}
        )
        assert resp.status == 200

    async def subscribe_through_checkout(self, plan_id: str = "silver") -> str:
        """A Checkout of ``plan_id`` paid at the peer and applied: the Stripe subscription."""
        async with self.pool.acquire() as conn:
            checkout_id = await conn.fetchval(
                "SELECT billing_api_request_checkout($1, 'f1', 'alpha', $2, 'k', NULL, $3, $3)",
                uuid.uuid4(), plan_id, "https://app.test/ok",
            )  # fmt: skip
        await checkout.create_sessions(self.pool, self.gateway)
        async with self.pool.acquire() as conn:
            session = await conn.fetchval(
                "SELECT session_id FROM billing_checkouts WHERE checkout_id = $1", checkout_id
            )
        await self.deliver(self.peer.complete_checkout_session(session))
        await process_stored_events(self.pool)
        async with self.pool.acquire() as conn:
            # The example's period: anchored on 1 March, a mark and an allowance to carry.
            await conn.execute(
                "UPDATE billing_subscriptions SET anchor_ns = $1, started_ns = $1,"
                " hwm_mark_minor = 123456, hwm_settled_window = '2026-W09',"
                " hwm_settled_end_ns = $1, ppt_purchase_id = 'cs_x', ppt_trades_bought = 10,"
                " ppt_counted = '{o1,o2}' WHERE follower = 'f1'",
                ANCHOR_NS,
            )
        (row,) = await self.subscriptions()
        assert row["stripe_subscription"] is not None
        return str(row["stripe_subscription"])

    def updates_under(self, plan_change_id: uuid.UUID) -> int:
        """POSTs sent under the change's key (each try, replays included)."""
        key = plan_changes.idempotency_key(plan_change_id)
        return sum(1 for method, _, k in self.peer.requests if method == "POST" and k == key)


@pytest.fixture
async def shop(database_url: str) -> AsyncIterator[Shop]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=8)
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    account = await gateway.create_express_account(
        provider="alpha", email="alpha@x.test", country="DE"
    )
    async with pool.acquire() as conn:
        await plans.create_operator_plan(
            conn, plan_id="pro", name="Pro", currency="EUR", platform_fee_percent="10",
            account_pool_limit=10, modules=["subscription", "pay_per_trade", "performance"],
        )  # fmt: skip
        for provider in ("alpha", "beta"):
            await plans.assign_operator_plan(conn, provider, "pro")
        await store.upsert_provider(
            conn, provider="alpha", operator_plan="pro", stripe_account=account
        )
        terms: list[tuple[str, str, str, list[str], int | None]] = [
            ("silver", "alpha", "EUR", ["subscription", "pay_per_trade"], 3000),
            ("gold", "alpha", "EUR", ["subscription", "performance"], 6000),
            ("gold-ppt", "alpha", "EUR", ["subscription", "pay_per_trade"], 6000),
            ("dollar", "alpha", "USD", ["subscription"], 6000),
            ("trades", "alpha", "EUR", ["pay_per_trade"], None),
            ("other", "beta", "EUR", ["subscription"], 6000),
        ]
        for plan_id, provider, currency, modules, price in terms:
            ppt = "pay_per_trade" in modules
            await plans.create_provider_plan(
                conn, plan_id=plan_id, provider=provider, name=plan_id.title(),
                currency=currency, modules=modules, subscription_price_minor=price,
                subscription_period="monthly" if price is not None else None,
                ppt_trades=10 if ppt else None, ppt_price_minor=999 if ppt else None,
                performance_rate="0.2" if "performance" in modules else None,
            )  # fmt: skip
    app = web.Application()
    app.add_routes(webhook_routes(pool, SECRET))
    client = test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Shop(pool, peer, gateway, client)
    finally:
        await client.close()
        await gateway.close()
        await peer.stop()
        await pool.close()


def test_the_readme_example_is_what_the_fees_compute() -> None:
    silver = SubscriptionPlan(plan_id="silver", price_minor=3000, period=BillingPeriod.MONTHLY)
    gold = SubscriptionPlan(plan_id="gold", price_minor=6000, period=BillingPeriod.MONTHLY)
    change = change_plan(silver, gold, anchor_ns=ANCHOR_NS, at_ns=CHANGE_NS)
    assert (change.credit_minor, change.charge_minor, change.net_minor) == (CREDIT, CHARGE, NET)
    assert (change.period_start_ns, change.period_end_ns) == (ANCHOR_NS, PERIOD_END_NS)
    assert change.anchor_ns == ANCHOR_NS  # same period length: the anchor stays
    section = README.read_text().split("## Plan changes", 1)[1].split("\n## ", 1)[0]
    for figure in ("3000 × 1814400 / 2678400", "= 2032", "= 4065", "2033"):
        assert figure in section, figure
    back = change_plan(gold, silver, anchor_ns=ANCHOR_NS, at_ns=CHANGE_NS)
    assert back.net_minor == -NET  # a downgrade: the same two lines, the other way


async def test_a_checkout_subscription_moves_to_the_new_plan_at_stripe_and_in_billing(
    shop: Shop,
) -> None:
    subscription = await shop.subscribe_through_checkout()
    (item,) = shop.peer.subscriptions[subscription]["items"]["data"]
    product = item["price"]["product"]
    request = await shop.request()
    assert (await shop.change(request))["status"] == "pending"
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "applied")
    ]
    # Stripe: the item now carries Gold's terms, inline on the item's own product, prorated.
    ((updated, params),) = shop.peer.subscription_updates
    assert updated == subscription and params["proration_behavior"] == "create_prorations"
    assert params["items"] == [{"id": item["id"], "price_data": {
        "currency": "eur", "product": product, "unit_amount": "6000",
        "recurring": {"interval": "month", "interval_count": "1"}}}]  # fmt: skip
    price = shop.peer.subscriptions[subscription]["items"]["data"][0]["price"]
    assert (price["unit_amount"], price["product"]) == (6000, product)
    assert shop.updates_under(request) == 1
    # The request: the README's amounts and the period that runs.
    row = await shop.change(request)
    assert row["status"] == "applied"
    assert (row["credit_minor"], row["charge_minor"], row["net_minor"]) == (CREDIT, CHARGE, NET)
    assert (row["period_start_ns"], row["period_end_ns"]) == (ANCHOR_NS, PERIOD_END_NS)
    # Billing: one row, now Gold's; the mark kept; the allowance gone (Gold sells no trades).
    (sub,) = await shop.subscriptions()
    assert sub["plan_id"] == "gold" and sub["status"] == "active"
    assert (sub["anchor_ns"], sub["started_ns"]) == (ANCHOR_NS, ANCHOR_NS)
    assert (sub["hwm_mark_minor"], sub["hwm_settled_window"]) == (123456, "2026-W09")
    assert (sub["ppt_purchase_id"], sub["ppt_trades_bought"], list(sub["ppt_counted"])) == (
        None, 0, [],
    )  # fmt: skip
    assert sub["stripe_subscription"] == subscription
    assert sub["stripe_subscription_item"] == item["id"]
    async with shop.pool.acquire() as conn:
        due = await conn.fetch("SELECT follower, plan_id FROM billing_provisioning_due")
    assert ("f1", "gold") in {(r["follower"], r["plan_id"]) for r in due}
    # Another pass has nothing to do.
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == []
    assert len(shop.peer.subscription_updates) == 1


async def test_the_allowance_carries_over_to_a_plan_that_sells_trades(shop: Shop) -> None:
    await shop.subscribe_through_checkout()
    request = await shop.request(to_plan="gold-ppt")
    await plan_changes.apply_plan_changes(shop.pool, shop.gateway)
    assert (await shop.change(request))["status"] == "applied"
    (sub,) = await shop.subscriptions()
    assert (sub["plan_id"], sub["ppt_purchase_id"], sub["ppt_trades_bought"]) == (
        "gold-ppt", "cs_x", 10,
    )  # fmt: skip
    assert list(sub["ppt_counted"]) == ["o1", "o2"]


@pytest.mark.parametrize(("to_plan", "stopped_after"), [("gold-ppt", True), ("gold", False)])
async def test_a_used_up_allowance_stop_follows_the_allowance(
    shop: Shop, to_plan: str, stopped_after: bool
) -> None:
    """A's allowance was used up, so the follower's links stopped under A's name: moving to a
    plan that sells trades keeps the stop (under B's name), to one that does not lifts it."""
    async with shop.pool.acquire() as conn:
        await store.subscribe(conn, follower="f1", plan_id="silver", started_ns=ANCHOR_NS)
        assert await enforcement.allowance_used_up(conn, "f1", "silver")
    request = await shop.request(to_plan=to_plan)
    await plan_changes.apply_plan_changes(shop.pool, shop.gateway)
    assert (await shop.change(request))["status"] == "applied"
    async with shop.pool.acquire() as conn:
        active = await store.enforcement_rows(conn, state="active")
    assert [(r.subject, r.cause) for r in active] == (
        [("f1", f"allowance:{to_plan}")] if stopped_after else []
    )


async def test_three_workers_at_once_change_stripe_once_and_the_row_once(shop: Shop) -> None:
    subscription = await shop.subscribe_through_checkout()
    request = await shop.request()
    for _ in range(20):  # leases of no length: each worker may claim what another holds
        await asyncio.gather(*(
            plan_changes.apply_plan_changes(shop.pool, shop.gateway, lease_s=0,
                                            retry_after_s=0)
            for _ in range(3)
        ))  # fmt: skip
        if (await shop.change(request))["status"] != "pending":
            break
    row = await shop.change(request)
    assert row["status"] == "applied" and row["net_minor"] == NET
    assert [u[0] for u in shop.peer.subscription_updates] == [subscription]
    (sub,) = await shop.subscriptions()
    assert sub["plan_id"] == "gold"


async def test_a_lost_answer_and_a_5xx_leave_it_pending_and_the_retry_changes_once(
    shop: Shop,
) -> None:
    await shop.subscribe_through_checkout()
    request = await shop.request()
    shop.peer.lose_responses = 1  # the update runs at the peer; its answer never arrives
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "pending")
    ]
    assert len(shop.peer.subscription_updates) == 1
    assert (await shop.subscriptions())[0]["plan_id"] == "silver"
    shop.peer.fail_posts = 1  # the next try: a 500 before anything runs
    async with shop.pool.acquire() as conn:
        await conn.execute("UPDATE billing_plan_changes SET lease_until = NULL")
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "pending")
    ]
    async with shop.pool.acquire() as conn:
        await conn.execute("UPDATE billing_plan_changes SET lease_until = NULL")
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "applied")
    ]
    # Three tries under one key; the peer ran the update once (the last try was a replay).
    assert shop.updates_under(request) == 3
    assert len(shop.peer.subscription_updates) == 1
    assert (await shop.change(request))["attempts"] == 3
    assert (await shop.subscriptions())[0]["plan_id"] == "gold"


async def test_stripes_definitive_refusal_fails_the_change_with_its_code(shop: Shop) -> None:
    subscription = await shop.subscribe_through_checkout()
    (item,) = shop.peer.subscriptions[subscription]["items"]["data"]
    del shop.peer.products[item["price"]["product"]]  # archived at Stripe meanwhile
    request = await shop.request()
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "failed")
    ]
    row = await shop.change(request)
    assert row["failure_code"] == "resource_missing" and "product" in row["reason"]
    assert row["credit_minor"] is None
    assert shop.peer.subscription_updates == []
    assert (await shop.subscriptions())[0]["plan_id"] == "silver"
    # Failed is settled: a new request may be made.
    assert (await shop.change(await shop.request()))["status"] == "pending"


async def test_a_subscription_billing_charges_itself_moves_without_stripe(shop: Shop) -> None:
    async with shop.pool.acquire() as conn:
        await store.subscribe(conn, follower="f1", plan_id="silver", started_ns=ANCHOR_NS)
    request = await shop.request()
    sent = len(shop.peer.requests)
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "applied")
    ]
    assert len(shop.peer.requests) == sent
    row = await shop.change(request)
    assert (row["credit_minor"], row["charge_minor"], row["net_minor"]) == (CREDIT, CHARGE, NET)


async def test_a_change_whose_subscription_ended_meanwhile_fails(shop: Shop) -> None:
    async with shop.pool.acquire() as conn:
        await store.subscribe(conn, follower="f1", plan_id="silver", started_ns=ANCHOR_NS)
    request = await shop.request()
    async with shop.pool.acquire() as conn:
        await conn.execute("UPDATE billing_subscriptions SET status = 'cancelled'")
    assert await plan_changes.apply_plan_changes(shop.pool, shop.gateway) == [
        (str(request), "failed")
    ]
    assert "no active subscription" in (await shop.change(request))["reason"]


@pytest.mark.parametrize(
    ("from_plan", "to_plan", "error", "column", "message"),
    [
        ("nope", "gold", asyncpg.NoDataFoundError, "from_plan", "no plan nope"),
        ("silver", "nope", asyncpg.NoDataFoundError, "to_plan", "no plan nope"),
        ("silver", "silver", asyncpg.CheckViolationError, "to_plan", "already held"),
        ("silver", "other", asyncpg.CheckViolationError, "to_plan", "another provider"),
        ("silver", "dollar", asyncpg.CheckViolationError, "to_plan", "keeps the currency"),
        ("silver", "trades", asyncpg.CheckViolationError, "to_plan", "no subscription module"),
        ("trades", "gold", asyncpg.CheckViolationError, "from_plan", "no subscription module"),
        ("gold", "silver", asyncpg.UniqueViolationError, "from_plan", "no active subscription"),
    ],
)
async def test_billing_refuses_a_change_it_would_not_apply(
    shop: Shop, from_plan: str, to_plan: str, error: type[Exception], column: str, message: str
) -> None:
    async with shop.pool.acquire() as conn:
        await store.subscribe(conn, follower="f1", plan_id="silver", started_ns=ANCHOR_NS)
    with pytest.raises(error, match=re.escape(message)) as refused:
        await shop.request(from_plan, to_plan)
    assert getattr(refused.value, "column_name", None) == column


async def test_one_pending_change_per_subscription_and_none_to_a_plan_held(shop: Shop) -> None:
    async with shop.pool.acquire() as conn:
        await store.subscribe(conn, follower="f1", plan_id="silver", started_ns=ANCHOR_NS)
        await store.subscribe(conn, follower="f1", plan_id="gold-ppt", started_ns=ANCHOR_NS)
    with pytest.raises(asyncpg.UniqueViolationError, match="already subscribed"):
        await shop.request(to_plan="gold-ppt")
    await shop.request()
    with pytest.raises(asyncpg.UniqueViolationError, match="pending"):
        await shop.request()
    # The index holds for any other writer too.
    async with shop.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError, match="one_pending"):
            await conn.execute(
                "INSERT INTO billing_plan_changes (plan_change_id, follower, provider, from_plan,"
                " to_plan, currency, requested_ns) VALUES ($1, 'f1', 'alpha', 'silver', 'gold',"
                " 'EUR', 0)",
                uuid.uuid4(),
            )
