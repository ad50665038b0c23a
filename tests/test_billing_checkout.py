"""Checkout for plan purchase through the real ``stripe`` SDK against the local Stripe peer: a
recorded request becomes one Checkout Session (also when an answer is lost), and
``checkout.session.completed``, signed by Stripe's own helper and delivered twice, activates the
plan once; the card the session saved becomes the follower's off-session payment method."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
import stripe
from aiohttp import test_utils, web
from conftest import wait_until
from stripe_peer import StripePeer

from engine.billing import checkout, plans, store
from engine.billing.config import BillingConfig
from engine.billing.gateway import PaymentOutcome, StripeGateway
from engine.billing.jobs import JobContext, send_pending_charges
from engine.billing.ledgerfacts import LedgerViewFacts
from engine.billing.service import BillingService
from engine.billing.store import ChargeDraft
from engine.billing.webhooks import process_stored_events, webhook_routes

SECRET = "whsec_checkout_test"


@dataclass
class Shop:
    pool: asyncpg.Pool
    peer: StripePeer
    gateway: StripeGateway
    client: test_utils.TestClient
    database_url: str

    async def request(self, plan_id: str, key: str = "k1", follower: str = "f1") -> uuid.UUID:
        """What the API does for ``POST /v1/plans/{id}/checkout``: billing's function."""
        async with self.pool.acquire() as conn:
            found: uuid.UUID = await conn.fetchval(
                "SELECT billing_api_request_checkout($1, $2, 'alpha', $3, $4, $5, $6, $7)",
                uuid.uuid4(), follower, plan_id, key, f"{follower}@x.test",
                "https://app.test/ok", "https://app.test/no",
            )  # fmt: skip
        return found

    async def checkout(self, checkout_id: uuid.UUID) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM billing_checkouts WHERE checkout_id = $1", checkout_id
            )

    async def deliver(self, event: dict[str, Any]) -> int:
        payload = orjson.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET)
        resp = await self.client.post(
            "/stripe/webhook", data=payload, headers={"Stripe-Signature": header}
        )
        return resp.status

    async def subscription(self, follower: str, plan_id: str) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM billing_subscriptions WHERE follower = $1 AND plan_id = $2",
                follower,
                plan_id,
            )


@pytest.fixture
async def shop(database_url: str) -> AsyncIterator[Shop]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    account = await gateway.create_express_account(
        provider="alpha", email="alpha@x.test", country="DE"
    )
    async with pool.acquire() as conn:
        await plans.create_operator_plan(
            conn, plan_id="pro", name="Pro", currency="EUR", platform_fee_percent="12.5",
            account_pool_limit=10, modules=["subscription", "pay_per_trade", "performance"],
        )  # fmt: skip
        await plans.assign_operator_plan(conn, "alpha", "pro")
        await store.upsert_provider(
            conn, provider="alpha", operator_plan="pro", stripe_account=account
        )
        await plans.create_provider_plan(
            conn, plan_id="gold", provider="alpha", name="Gold", currency="EUR",
            modules=["subscription", "pay_per_trade"], subscription_price_minor=4900,
            subscription_period="monthly", ppt_trades=10, ppt_price_minor=999,
        )  # fmt: skip
        await plans.create_provider_plan(
            conn, plan_id="trades", provider="alpha", name="Ten trades", currency="EUR",
            modules=["pay_per_trade"], ppt_trades=10, ppt_price_minor=999,
        )  # fmt: skip
        await plans.create_provider_plan(
            conn, plan_id="weekly", provider="alpha", name="Weekly", currency="EUR",
            modules=["performance"], performance_rate="0.2",
        )  # fmt: skip
    app = web.Application()
    app.add_routes(webhook_routes(pool, SECRET))
    client = test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Shop(pool, peer, gateway, client, database_url)
    finally:
        await client.close()
        await gateway.close()
        await peer.stop()
        await pool.close()


async def test_the_same_client_key_is_one_checkout(shop: Shop) -> None:
    first = await shop.request("gold", "k1")
    assert await shop.request("gold", "k1") == first
    assert await shop.request("trades", "k1") != first  # another plan: its own Checkout
    assert await shop.request("gold", "k1", follower="f2") != first
    assert (await shop.checkout(first))["state"] == "pending"


async def test_concurrent_requests_with_other_keys_answer_the_one_open_checkout(
    shop: Shop,
) -> None:
    found = await asyncio.gather(*(shop.request("gold", f"k{n}") for n in range(5)))
    assert len(set(found)) == 1
    (open_id,) = set(found)
    await checkout.create_sessions(shop.pool, shop.gateway)
    assert (await shop.checkout(open_id))["state"] == "ready"
    # Ready (its URL handed out) is still open: another key gets the same session.
    assert await shop.request("gold", "k9") == open_id
    async with shop.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_checkouts") == 1
    assert len(shop.peer.checkout_sessions) == 1


async def test_requests_made_while_an_uncommitted_one_holds_the_plan_get_its_checkout(
    shop: Shop,
) -> None:
    async with shop.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        first = await conn.fetchval(
            "SELECT billing_api_request_checkout($1, 'f1', 'alpha', 'gold', 'k0', NULL, $2, $2)",
            uuid.uuid4(), "https://app.test/ok",
        )  # fmt: skip
        # The others wait for the first request's transaction instead of missing its row.
        others = [asyncio.ensure_future(shop.request("gold", f"k{n}")) for n in range(1, 5)]
        await asyncio.sleep(0.5)
        assert not any(task.done() for task in others)
        await tx.commit()
    assert await asyncio.gather(*others) == [first] * 4


async def test_after_the_open_checkout_expired_or_failed_a_new_one_is_made(shop: Shop) -> None:
    first = await shop.request("gold", "k1")
    await checkout.create_sessions(shop.pool, shop.gateway)
    await shop.deliver(
        shop.peer.expire_checkout_session((await shop.checkout(first))["session_id"])
    )
    await process_stored_events(shop.pool)
    assert (await shop.checkout(first))["state"] == "failed"
    assert await shop.request("gold", "k1") == first  # the same request again: its answer
    second = await shop.request("gold", "k2")
    assert second != first and (await shop.checkout(second))["state"] == "pending"
    async with shop.pool.acquire() as conn:
        await conn.execute("UPDATE billing_providers SET stripe_account = 'acct_gone'")
    assert await checkout.create_sessions(shop.pool, shop.gateway) == [(str(second), "failed")]
    third = await shop.request("gold", "k3")
    assert third not in (first, second)


async def test_a_second_open_checkout_of_one_plan_cannot_be_stored(shop: Shop) -> None:
    await shop.request("gold", "k1")
    async with shop.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError, match="billing_checkouts_one_open"):
            await conn.execute(
                "INSERT INTO billing_checkouts (checkout_id, follower, provider, plan_id,"
                " client_key, success_url, cancel_url)"
                " VALUES ($1, 'f1', 'alpha', 'gold', 'k2', 'https://a.test', 'https://a.test')",
                uuid.uuid4(),
            )


async def test_a_request_becomes_a_checkout_session_with_the_plans_terms(shop: Shop) -> None:
    checkout_id = await shop.request("gold")
    assert await checkout.create_sessions(shop.pool, shop.gateway) == [(str(checkout_id), "ready")]
    row = await shop.checkout(checkout_id)
    session = shop.peer.checkout_sessions[row["session_id"]]
    assert row["url"] == session["url"]
    assert session["mode"] == "subscription" and session["amount_total"] == 4900 + 999
    assert session["subscription_data"]["application_fee_percent"] == "12.5"
    assert session["metadata"]["checkout_id"] == str(checkout_id)
    # Another pass has nothing to do: the session is made once.
    assert await checkout.create_sessions(shop.pool, shop.gateway) == []
    assert len(shop.peer.checkout_sessions) == 1


async def test_a_lost_answer_is_sent_again_under_its_key_and_makes_one_session(
    shop: Shop,
) -> None:
    checkout_id = await shop.request("gold")
    async with shop.pool.acquire() as conn:  # the customer exists: the next POST is the session
        customer = await shop.gateway.create_customer(follower="f1", email="f1@x.test")
        await store.upsert_customer(
            conn, follower="f1", stripe_customer=customer, payment_method=None
        )
    shop.peer.lose_responses = 1
    assert await checkout.create_sessions(shop.pool, shop.gateway, retry_after_s=0) == [
        (str(checkout_id), "pending")
    ]
    assert (await shop.checkout(checkout_id))["state"] == "pending"
    assert await checkout.create_sessions(shop.pool, shop.gateway) == [(str(checkout_id), "ready")]
    assert len(shop.peer.checkout_sessions) == 1
    keys = [k for m, p, k in shop.peer.requests if p == "/v1/checkout/sessions"]
    assert keys == [f"checkout:{checkout_id}"] * 2


async def test_a_provider_that_cannot_be_paid_fails_the_checkout_with_a_reason(
    shop: Shop,
) -> None:
    async with shop.pool.acquire() as conn:
        await conn.execute("UPDATE billing_providers SET stripe_account = 'acct_gone'")
    checkout_id = await shop.request("gold")
    assert await checkout.create_sessions(shop.pool, shop.gateway) == [(str(checkout_id), "failed")]
    row = await shop.checkout(checkout_id)
    assert "No such destination" in row["reason"] and row["url"] is None


async def test_a_completed_checkout_delivered_twice_activates_the_plan_once(shop: Shop) -> None:
    checkout_id = await shop.request("gold")
    await checkout.create_sessions(shop.pool, shop.gateway)
    row = await shop.checkout(checkout_id)
    event = shop.peer.complete_checkout_session(row["session_id"])
    assert [await shop.deliver(event), await shop.deliver(event)] == [200, 200]
    outcomes = await process_stored_events(shop.pool)
    assert [o.result for o in outcomes] == ["applied"]
    sub = await shop.subscription("f1", "gold")
    assert sub["status"] == "active" and sub["stripe_subscription"].startswith("sub_")
    assert sub["ppt_trades_bought"] == 10 and sub["ppt_purchase_id"] == row["session_id"]
    done = await shop.checkout(checkout_id)
    assert done["state"] == "completed" and done["completed_by"] == event["id"]
    # The same completion again, under another event id (a replay by recovery): unchanged.
    again = {**event, "id": "evt_replayed"}
    assert await shop.deliver(again) == 200
    assert [o.result for o in await process_stored_events(shop.pool)] == ["unchanged"]
    async with shop.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_subscriptions") == 1


async def test_buying_again_reactivates_a_cancelled_plan_and_renews_the_allowance(
    shop: Shop,
) -> None:
    from engine.billing import enforcement

    first = await shop.request("trades", "k1")
    await checkout.create_sessions(shop.pool, shop.gateway)
    session = shop.peer.checkout_sessions[(await shop.checkout(first))["session_id"]]
    assert session["mode"] == "payment"
    assert session["payment_intent_data"]["application_fee_amount"] == "124"
    await shop.deliver(shop.peer.complete_checkout_session(session["id"]))
    await process_stored_events(shop.pool)
    async with shop.pool.acquire() as conn:
        await enforcement.allowance_used_up(conn, "f1", "trades")
        await enforcement.cancel_subscription(conn, "f1", "trades")
    second = await shop.request("trades", "k2")
    await checkout.create_sessions(shop.pool, shop.gateway)
    again = (await shop.checkout(second))["session_id"]
    await shop.deliver(shop.peer.complete_checkout_session(again))
    await process_stored_events(shop.pool)
    sub = await shop.subscription("f1", "trades")
    assert sub["status"] == "active" and sub["ppt_purchase_id"] == again
    async with shop.pool.acquire() as conn:
        causes = await conn.fetch("SELECT cause, state FROM billing_enforcement ORDER BY cause")
    assert [(c["cause"], c["state"]) for c in causes] == [
        ("allowance:trades", "lifted"),
        ("subscription:trades", "lifted"),
    ]


async def test_an_expired_session_fails_the_checkout(shop: Shop) -> None:
    checkout_id = await shop.request("gold")
    await checkout.create_sessions(shop.pool, shop.gateway)
    row = await shop.checkout(checkout_id)
    await shop.deliver(shop.peer.expire_checkout_session(row["session_id"]))
    await process_stored_events(shop.pool)
    row = await shop.checkout(checkout_id)
    assert row["state"] == "failed" and "expired" in row["reason"]
    assert await shop.subscription("f1", "gold") is None


async def test_the_service_makes_the_session_when_the_request_is_recorded(shop: Shop) -> None:
    config = BillingConfig(
        database_url=shop.database_url, webhook_port=0, metrics_port=None, event_poll_s=30.0
    )
    service = BillingService(config, shop.database_url, shop.gateway, SECRET)
    await service.start()
    try:
        # The poll is 30 s: only the NOTIFY of billing_api_request_checkout wakes it in time.
        checkout_id = await shop.request("gold")

        async def ready() -> bool:
            return (await shop.checkout(checkout_id))["state"] == "ready"

        await wait_until(ready, "the session made after the NOTIFY", timeout=20)
    finally:
        await service.stop()


# --------------------------------------------------------------- the saved payment method


async def buy(shop: Shop, plan_id: str, key: str = "k1") -> tuple[uuid.UUID, dict[str, Any]]:
    """A follower's whole Checkout: the request, the session, the browser, the webhook."""
    checkout_id = await shop.request(plan_id, key)
    assert await checkout.create_sessions(shop.pool, shop.gateway) == [(str(checkout_id), "ready")]
    row = await shop.checkout(checkout_id)
    event = shop.peer.complete_checkout_session(row["session_id"])
    assert await shop.deliver(event) == 200
    return checkout_id, event


async def saved_card(shop: Shop, follower: str = "f1") -> tuple[str, str | None] | None:
    async with shop.pool.acquire() as conn:
        return await store.customer(conn, follower)


def weekly_fee(shop: Shop, plan_id: str, follower: str = "f1") -> ChargeDraft:
    return ChargeDraft(
        idempotency_key=f"performance:{follower}:{plan_id}:2026-W48",
        module="performance", follower=follower, provider="alpha", plan_id=plan_id,
        window_id="2026-W48", currency="EUR", amount_minor=1234, platform_fee_minor=154,
        destination=next(iter(shop.peer.accounts)),
        lines=({"module": "performance", "amount_minor": 1234},),
        issued_ns=1_796_000_000_000_000_000,
    )  # fmt: skip


async def charge_weekly_fee(shop: Shop, plan_id: str) -> dict[str, int]:
    async with shop.pool.acquire() as conn:
        assert await store.insert_charge(conn, weekly_fee(shop, plan_id))
    ctx = JobContext(pool=shop.pool, gateway=shop.gateway, facts=LedgerViewFacts(shop.pool))
    return await send_pending_charges(ctx)


@pytest.mark.parametrize(
    ("plan_id", "mode"), [("weekly", "setup"), ("trades", "payment"), ("gold", "subscription")]
)
async def test_the_card_a_checkout_saved_pays_the_weekly_fee_off_session(
    shop: Shop, plan_id: str, mode: str
) -> None:
    checkout_id, _ = await buy(shop, plan_id)
    assert [o.result for o in await process_stored_events(shop.pool)] == ["applied"]
    # Applying the event calls no one: the read is recorded for the worker.
    assert await saved_card(shop) == (shop.peer.checkout_sessions[
        (await shop.checkout(checkout_id))["session_id"]]["customer"], None)  # fmt: skip
    assert await checkout.save_payment_methods(shop.pool, shop.gateway) == [
        (str(checkout_id), "saved")
    ]
    session = shop.peer.checkout_sessions[(await shop.checkout(checkout_id))["session_id"]]
    assert session["mode"] == mode
    customer, method = await saved_card(shop) or ("", None)
    assert customer == session["customer"] and method is not None
    assert shop.peer.payment_methods[method]["customer"] == customer
    assert await charge_weekly_fee(shop, plan_id) == {"succeeded": 1}
    sent = [pi for pi in shop.peer.payment_intents.values() if pi.get("off_session")]
    assert [(pi["payment_method"], pi["customer"], pi["status"]) for pi in sent] == [
        (method, customer, "succeeded")
    ]


async def test_a_payment_session_always_saves_the_card_for_the_next_allowance(
    shop: Shop,
) -> None:
    checkout_id = await shop.request("trades")
    await checkout.create_sessions(shop.pool, shop.gateway)
    session = shop.peer.checkout_sessions[(await shop.checkout(checkout_id))["session_id"]]
    # ``trades`` has no weekly module, yet its renewals are charged off-session too.
    assert session["payment_intent_data"]["setup_future_usage"] == "off_session"


async def test_a_card_used_once_is_not_stored_and_stripe_refuses_it_off_session(
    shop: Shop,
) -> None:
    customer = await shop.gateway.create_customer(follower="f2", email="f2@x.test")
    async with shop.pool.acquire() as conn:
        terms = await plans.plan_terms(conn, "trades")
    assert terms is not None
    params = checkout.session_params(
        terms, checkout_id=str(uuid.uuid4()), follower="f2", customer=customer,
        success_url="https://app.test/ok", cancel_url="https://app.test/no",
    )  # fmt: skip
    params["payment_intent_data"].pop("setup_future_usage", None)
    made = await shop.gateway.create_checkout_session(params, idempotency_key="once")
    assert made.session_id is not None
    shop.peer.complete_checkout_session(made.session_id)
    saved = await shop.gateway.saved_payment_method(made.session_id)
    assert saved.outcome is PaymentOutcome.SUCCEEDED and saved.payment_method is None
    used_once = shop.peer.payment_intents[
        shop.peer.checkout_sessions[made.session_id]["payment_intent"]
    ]["payment_method"]
    async with shop.pool.acquire() as conn:
        await store.upsert_customer(
            conn, follower="f2", stripe_customer=customer, payment_method=used_once
        )
        assert await store.insert_charge(conn, weekly_fee(shop, "trades", follower="f2"))
    ctx = JobContext(pool=shop.pool, gateway=shop.gateway, facts=LedgerViewFacts(shop.pool))
    assert await send_pending_charges(ctx) == {"failed": 1}
    async with shop.pool.acquire() as conn:
        code = await conn.fetchval("SELECT failure_code FROM billing_charges")
    assert code == "resource_missing"


async def test_a_completion_delivered_twice_stores_the_card_once(shop: Shop) -> None:
    checkout_id, event = await buy(shop, "weekly")
    assert await shop.deliver(event) == 200
    assert await shop.deliver({**event, "id": "evt_replayed"}) == 200
    results = [o.result for o in await process_stored_events(shop.pool)]
    assert results == ["applied", "unchanged"]
    assert await checkout.save_payment_methods(shop.pool, shop.gateway) == [
        (str(checkout_id), "saved")
    ]
    assert await checkout.save_payment_methods(shop.pool, shop.gateway) == []
    reads = [p for m, p, _ in shop.peer.requests if m == "GET" and "/checkout/sessions/" in p]
    assert len(reads) == 1
    async with shop.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM billing_customers") == 1


async def test_stripe_failing_the_read_keeps_it_owed_until_a_later_pass(shop: Shop) -> None:
    checkout_id, _ = await buy(shop, "weekly")
    await process_stored_events(shop.pool)
    shop.peer.fail_retrievals = 1
    assert await checkout.save_payment_methods(shop.pool, shop.gateway, retry_after_s=0) == [
        (str(checkout_id), "retry")
    ]
    assert (await saved_card(shop) or ("", "?"))[1] is None
    assert (await shop.checkout(checkout_id))["lease_until"] is not None
    assert await checkout.save_payment_methods(shop.pool, shop.gateway) == [
        (str(checkout_id), "saved")
    ]
    assert (await saved_card(shop) or ("", None))[1] is not None
    assert (await shop.checkout(checkout_id))["lease_until"] is None


async def test_the_service_stores_the_card_after_the_completion(shop: Shop) -> None:
    config = BillingConfig(
        database_url=shop.database_url, webhook_port=0, metrics_port=None, event_poll_s=0.2
    )
    service = BillingService(config, shop.database_url, shop.gateway, SECRET)
    await service.start()
    try:
        checkout_id = await shop.request("weekly")

        async def ready() -> bool:
            return (await shop.checkout(checkout_id))["state"] == "ready"

        await wait_until(ready, "the session made", timeout=20)
        event = shop.peer.complete_checkout_session(
            (await shop.checkout(checkout_id))["session_id"]
        )
        assert await shop.deliver(event) == 200

        async def stored() -> bool:
            return (await saved_card(shop) or ("", None))[1] is not None

        await wait_until(stored, "the saved card stored by the service", timeout=20)
    finally:
        await service.stop()
