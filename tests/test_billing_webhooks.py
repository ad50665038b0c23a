"""Stripe webhooks: signed with the SDK's own helper, delivered twice and out of order over HTTP,
applied from the table, and recovered by listing when never delivered."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import stripe
import stripe_peer
from aiohttp import ClientSession, test_utils, web
from conftest import wait_until
from test_billing_jobs import W13, World, close_world, make_world

from engine.billing import store
from engine.billing.config import BillingConfig
from engine.billing.jobs import run_job
from engine.billing.service import BillingService
from engine.billing.store import ChargeState
from engine.billing.webhooks import (
    SignatureError,
    process_stored_events,
    verify_signature,
    webhook_routes,
)

SECRET = "whsec_test_endpoint_secret"
BODY = b'{"id": "evt_1", "type": "payment_intent.succeeded", "created": 1}'


def sign(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> str:
    """Stripe's own header, made by the SDK's helper for signing test payloads."""
    return stripe.WebhookSignature.generate_signature_header(payload.decode(), secret, at)


# --------------------------------------------------------------------------- the signature


def test_a_header_signed_by_stripe_is_accepted() -> None:
    now = int(time.time())
    verify_signature(BODY, sign(BODY, at=now), SECRET, now_s=now)


def test_any_v1_may_match_while_a_secret_rolls() -> None:
    now = int(time.time())
    header = sign(BODY, at=now)
    t, v1 = header.split(",")
    verify_signature(BODY, f"{t},v1={'0' * 64},{v1}", SECRET, now_s=now)


@pytest.mark.parametrize(
    "case",
    ["other secret", "changed body", "too old", "too far ahead", "no v1", "no t", "two t"],
)
def test_a_header_that_proves_nothing_is_refused(case: str) -> None:
    now = int(time.time())
    header = {
        "other secret": sign(BODY, secret="whsec_other", at=now),
        "changed body": sign(BODY.replace(b"evt_1", b"evt_2"), at=now),
        "too old": sign(BODY, at=now - 301),
        "too far ahead": sign(BODY, at=now + 301),
        "no v1": f"t={now},v0=abc",
        "no t": sign(BODY, at=now).split(",", 1)[1],
        "two t": f"t={now}," + sign(BODY, at=now),
    }[case]
    with pytest.raises(SignatureError):
        verify_signature(BODY, header, SECRET, now_s=now)


def test_the_tolerance_edge_is_inclusive() -> None:
    now = int(time.time())
    verify_signature(BODY, sign(BODY, at=now - 300), SECRET, now_s=now)


# --------------------------------------------------------------------------- delivery


@pytest.fixture
async def endpoint(database_url: str) -> AsyncIterator[tuple[World, test_utils.TestClient]]:
    world = await make_world(database_url)
    app = web.Application()
    app.add_routes(webhook_routes(world.pool, SECRET))
    client = test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield world, client
    finally:
        await client.close()
        await close_world(world)


async def deliver(client: test_utils.TestClient, event: dict[str, object]) -> int:
    payload = orjson.dumps(event)
    resp = await client.post(
        "/stripe/webhook",
        data=payload,
        headers={"Stripe-Signature": sign(payload), "Content-Type": "application/json"},
    )
    return resp.status


async def states(world: World) -> dict[str, ChargeState]:
    return {c.follower: c.state for c in await world.charges()}


async def test_a_forged_delivery_is_refused_and_not_stored(
    endpoint: tuple[World, test_utils.TestClient],
) -> None:
    world, client = endpoint
    payload = orjson.dumps({"id": "evt_forged", "type": "charge.refunded", "created": 1})
    resp = await client.post(
        "/stripe/webhook",
        data=payload,
        headers={"Stripe-Signature": sign(payload, secret="whsec_x")},
    )
    assert resp.status == 400
    async with world.pool.acquire() as conn:
        assert await store.unprocessed_event_count(conn) == 0


async def test_every_event_twice_and_out_of_order_ends_in_one_state(
    endpoint: tuple[World, test_utils.TestClient],
) -> None:
    world, client = endpoint
    cards = {
        "paid": stripe_peer.SUCCEEDS,
        "disputed": stripe_peer.DISPUTED,
        "refunded": stripe_peer.SUCCEEDS,
        "declined": stripe_peer.DECLINED,
        "sca": stripe_peer.AUTHENTICATION_REQUIRED,
    }
    for name, card in cards.items():
        await world.follower(name, card)
        await world.equity(name, 1_050_000, W13.end_ns - 10**9)
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    refunded = next(c for c in await world.charges() if c.follower == "refunded")
    await world.gateway.refund(refunded.stripe_payment_intent or "", idempotency_key="refund:1")
    events = list(world.peer.events)
    deliveries = events + events
    random.Random(13).shuffle(deliveries)
    deliveries.reverse()
    assert [await deliver(client, e) for e in deliveries] == [200] * len(deliveries)
    outcomes = await process_stored_events(world.pool)
    assert len(outcomes) == len(events)  # stored once each, applied once each
    assert await states(world) == {
        "paid": ChargeState.SUCCEEDED,
        "disputed": ChargeState.DISPUTED,
        "refunded": ChargeState.REFUNDED,
        "declined": ChargeState.FAILED,
        "sca": ChargeState.REQUIRES_ACTION,
    }
    assert len(world.peer.payment_intents) == len(cards)
    async with world.pool.acquire() as conn:
        assert await store.unprocessed_event_count(conn) == 0
        assert len(await store.charges(conn)) == len(cards)


async def test_events_before_the_charge_knows_its_payment_intent_wait(
    endpoint: tuple[World, test_utils.TestClient],
) -> None:
    """The PaymentIntent's answer is lost on its way back: the dispute (which names only the
    PaymentIntent) waits in the table until an event carrying the charge key names it."""
    world, client = endpoint
    await world.follower("f1", stripe_peer.DISPUTED)
    await world.equity("f1", 1_050_000, W13.end_ns - 10**9)
    world.peer.lose_responses = 1
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    (charge,) = await world.charges()
    assert charge.stripe_payment_intent is None
    by_type = {e["type"]: e for e in world.peer.events}
    await deliver(client, by_type["charge.dispute.created"])
    assert [o.result for o in await process_stored_events(world.pool)] == ["deferred"]
    await deliver(client, by_type["payment_intent.succeeded"])
    results = [(o.event_id, o.result) for o in await process_stored_events(world.pool)]
    assert sorted(results) == sorted(
        [
            (by_type["payment_intent.succeeded"]["id"], "applied"),
            (by_type["charge.dispute.created"]["id"], "applied"),  # its wait is over
        ]
    )
    assert (await states(world))["f1"] is ChargeState.DISPUTED
    # The late gateway answer (a resend under the same key) changes nothing.
    async with world.pool.acquire() as conn:
        await conn.execute("UPDATE billing_charges SET send_lease_until = NULL")
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    assert (await states(world))["f1"] is ChargeState.DISPUTED
    assert len(world.peer.payment_intents) == 1


async def test_missed_events_are_recovered_by_listing(
    endpoint: tuple[World, test_utils.TestClient],
) -> None:
    world, _ = endpoint
    await world.follower("f1", stripe_peer.SUCCEEDS)
    await world.equity("f1", 1_050_000, W13.end_ns - 10**9)
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    (charge,) = await world.charges()
    await world.gateway.refund(charge.stripe_payment_intent or "", idempotency_key="refund:f1")
    # No webhook was ever delivered: the hourly sync lists them from Stripe.
    summary = await run_job(world.context(), "hourly_sync", W13.end_ns + 3600 * 10**9)
    assert summary.events > 0
    assert (await states(world))["f1"] is ChargeState.REFUNDED
    again = await run_job(world.context(), "hourly_sync", W13.end_ns + 2 * 3600 * 10**9)
    assert again.events == 0  # listed again, stored nothing new


async def test_the_service_applies_deliveries_in_the_background(database_url: str) -> None:
    world = await make_world(database_url)
    config = BillingConfig(webhook_port=0, event_poll_s=0.05, metrics_port=None)
    service = BillingService(config, database_url, world.gateway, SECRET)
    await service.start()
    try:
        await world.follower("f1", stripe_peer.SUCCEEDS)
        await world.equity("f1", 1_050_000, W13.end_ns - 10**9)
        world.peer.lose_responses = 1  # only the webhook can tell billing it was paid
        await run_job(world.context(), "weekly_fees", W13.end_ns)
        async with ClientSession() as http:
            for event in world.peer.events * 2:
                payload = orjson.dumps(event)
                async with http.post(
                    f"http://127.0.0.1:{service.webhook_port}/stripe/webhook",
                    data=payload,
                    headers={"Stripe-Signature": sign(payload)},
                ) as resp:
                    assert resp.status == 200

        async def paid() -> bool:
            return (await states(world)).get("f1") is ChargeState.SUCCEEDED

        await wait_until(paid, "the worker to apply payment_intent.succeeded")
        assert service.health()["ok"] is True
    finally:
        await service.stop()
        await close_world(world)


# --------------------------------------------------------------------------- dispute outcomes


def dispute_closed(created: dict[str, object], status: str, event_id: str) -> dict[str, object]:
    """``charge.dispute.closed`` for the dispute ``created`` opened, as Stripe sends it: the
    same dispute object with its final ``status`` (the peer does not close disputes)."""
    data = created["data"]
    assert isinstance(data, dict)
    dispute = {**data["object"], "status": status}
    created_s = created["created"]
    assert isinstance(created_s, int)
    return {**created, "id": event_id, "type": "charge.dispute.closed",
            "created": created_s + 1, "data": {"object": dispute}}  # fmt: skip


async def test_a_won_dispute_lifts_the_stop_and_a_lost_one_keeps_it_in_any_order(
    endpoint: tuple[World, test_utils.TestClient],
) -> None:
    world, client = endpoint
    for name in ("won", "lost"):
        await world.follower(name, stripe_peer.DISPUTED)
        await world.equity(name, 1_050_000, W13.end_ns - 10**9)
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    charges = {c.follower: c for c in await world.charges()}
    events = list(world.peer.events)
    opened = {
        c.follower: next(
            e for e in events
            if e["type"] == "charge.dispute.created"
            and e["data"]["object"]["payment_intent"] == c.stripe_payment_intent
        )
        for c in charges.values()
    }  # fmt: skip
    closed = [
        dispute_closed(opened["won"], "won", "evt_closed_won"),
        dispute_closed(opened["lost"], "lost", "evt_closed_lost"),
    ]
    # Every event twice, the outcomes first: the same end state as in Stripe's order.
    deliveries = closed + events + events + closed
    random.Random(5).shuffle(deliveries)
    for event in closed + deliveries:
        assert await deliver(client, event) == 200
    await process_stored_events(world.pool)
    assert await states(world) == {
        "won": ChargeState.DISPUTE_WON,
        "lost": ChargeState.DISPUTE_LOST,
    }
    async with world.pool.acquire() as conn:
        active = await store.enforcement_rows(conn, state="active")
        revenue = await store.operator_revenue(conn)
    # The lost dispute keeps the follower stopped; the won one holds no stop.
    assert [(r.subject, r.cause) for r in active] == [
        ("lost", f"charge:{charges['lost'].idempotency_key}")
    ]
    (month,) = revenue
    assert (month.paid_minor, month.reversed_minor) == (10_000, 10_000)


async def test_a_won_dispute_in_stripe_order_lifts_the_cause_it_raised(
    endpoint: tuple[World, test_utils.TestClient],
) -> None:
    world, client = endpoint
    await world.follower("f1", stripe_peer.DISPUTED)
    await world.equity("f1", 1_050_000, W13.end_ns - 10**9)
    await run_job(world.context(), "weekly_fees", W13.end_ns)
    for event in world.peer.events:
        await deliver(client, event)
    await process_stored_events(world.pool)
    async with world.pool.acquire() as conn:
        (row,) = await store.enforcement_rows(conn, state="active")
    assert row.subject == "f1"
    opened = next(e for e in world.peer.events if e["type"] == "charge.dispute.created")
    await deliver(client, dispute_closed(opened, "warning_closed", "evt_inquiry"))
    await process_stored_events(world.pool)
    assert (await states(world))["f1"] is ChargeState.DISPUTED  # an inquiry changes nothing
    await deliver(client, dispute_closed(opened, "won", "evt_won"))
    await process_stored_events(world.pool)
    assert (await states(world))["f1"] is ChargeState.DISPUTE_WON
    async with world.pool.acquire() as conn:
        assert await store.enforcement_rows(conn, state="active") == []
        (lifted,) = await store.enforcement_rows(conn, state="lifted")
    assert lifted.needs_apply  # the links are resumed by the enforcer after the commit
