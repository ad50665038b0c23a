"""The Stripe gateway through the real SDK against the local Stripe peer (tests/stripe_peer.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import stripe
import stripe_peer
from stripe_peer import StripePeer

from engine.billing.gateway import PaymentOutcome, StripeGateway
from engine.billing.store import Charge, ChargeState


@dataclass
class Connected:
    peer: StripePeer
    gateway: StripeGateway
    account: str
    customer: str

    async def card(self, token: str) -> str:
        return await self.gateway.attach_payment_method(self.customer, token)


@pytest.fixture
async def connected() -> AsyncIterator[Connected]:
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=5)
    try:
        account = await gateway.create_express_account(
            provider="p1", email="p1@example.com", country="DE"
        )
        customer = await gateway.create_customer(follower="f1", email="f1@example.com")
        yield Connected(peer, gateway, account, customer)
    finally:
        await gateway.close()
        await peer.stop()


def charge(
    destination: str,
    *,
    amount: int = 1000,
    fee: int = 125,
    key: str = "performance:f1:plan1:2026-W13",
) -> Charge:
    return Charge(
        charge_id=1,
        idempotency_key=key,
        invoice_id=key,
        module="performance",
        follower="f1",
        provider="p1",
        plan_id="plan1",
        window_id="2026-W13",
        currency="USD",
        amount_minor=amount,
        platform_fee_minor=fee,
        destination=destination,
        state=ChargeState.PENDING,
        attempts=1,
        stripe_payment_intent=None,
        stripe_charge=None,
        failure_code=None,
        issued_ns=0,
    )


async def test_onboarding_link_is_for_the_express_account(connected: Connected) -> None:
    link = await connected.gateway.onboarding_link(
        connected.account, refresh_url="https://x/refresh", return_url="https://x/return"
    )
    assert link.url.endswith(f"/express/onboarding/{connected.account}")
    assert link.expires_at > datetime.now(UTC)
    assert connected.peer.accounts[connected.account]["type"] == "express"


async def test_destination_charge_carries_fee_destination_and_key(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    result = await connected.gateway.charge_off_session(
        charge(connected.account), customer=connected.customer, payment_method=pm
    )
    assert result.outcome is PaymentOutcome.SUCCEEDED
    intent = connected.peer.payment_intents[result.payment_intent or ""]
    assert intent["application_fee_amount"] == 125
    assert intent["transfer_data"] == {"destination": connected.account}
    assert intent["off_session"] is True
    assert intent["metadata"]["charge_key"] == "performance:f1:plan1:2026-W13"
    keys = [k for m, p, k in connected.peer.requests if p == "/v1/payment_intents"]
    assert keys == ["performance:f1:plan1:2026-W13"]


async def test_the_same_key_twice_makes_one_payment_intent(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    results = [
        await connected.gateway.charge_off_session(
            charge(connected.account), customer=connected.customer, payment_method=pm
        )
        for _ in range(3)
    ]
    assert len({r.payment_intent for r in results}) == 1
    assert len(connected.peer.payment_intents) == 1


async def test_the_same_key_with_another_amount_is_refused(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    await connected.gateway.charge_off_session(
        charge(connected.account), customer=connected.customer, payment_method=pm
    )
    with pytest.raises(stripe.IdempotencyError):
        await connected.gateway.charge_off_session(
            charge(connected.account, amount=2000),
            customer=connected.customer,
            payment_method=pm,
        )
    assert len(connected.peer.payment_intents) == 1


async def test_a_fee_above_the_amount_is_refused(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    refused = await connected.gateway.charge_off_session(
        charge(connected.account, amount=100, fee=101),
        customer=connected.customer,
        payment_method=pm,
    )
    assert (refused.outcome, refused.code) == (PaymentOutcome.FAILED, "invalid_request")
    assert "application fee" in (refused.message or "")
    assert connected.peer.payment_intents == {}


async def test_an_unknown_destination_is_refused(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    refused = await connected.gateway.charge_off_session(
        charge("acct_nobody"), customer=connected.customer, payment_method=pm
    )
    assert (refused.outcome, refused.code) == (PaymentOutcome.FAILED, "resource_missing")
    assert "acct_nobody" in (refused.message or "")
    assert connected.peer.payment_intents == {}


async def test_a_decline_fails_and_authentication_asks_the_follower(connected: Connected) -> None:
    declined = await connected.gateway.charge_off_session(
        charge(connected.account, key="k-declined"),
        customer=connected.customer,
        payment_method=await connected.card(stripe_peer.DECLINED),
    )
    assert (declined.outcome, declined.code) == (PaymentOutcome.FAILED, "card_declined")
    assert declined.payment_intent in connected.peer.payment_intents
    auth = await connected.gateway.charge_off_session(
        charge(connected.account, key="k-auth"),
        customer=connected.customer,
        payment_method=await connected.card(stripe_peer.AUTHENTICATION_REQUIRED),
    )
    assert auth.outcome is PaymentOutcome.REQUIRES_ACTION
    assert auth.code == "authentication_required"
    # A decline is a result Stripe keeps: the same key answers the same decline.
    again = await connected.gateway.charge_off_session(
        charge(connected.account, key="k-declined"),
        customer=connected.customer,
        payment_method=declined_pm(connected),
    )
    assert again.payment_intent == declined.payment_intent


def declined_pm(connected: Connected) -> str:
    return next(
        pm
        for pm, m in connected.peer.payment_methods.items()
        if m["behaviour"] == stripe_peer.DECLINED
    )


async def test_a_lost_response_is_unknown_and_the_resend_finds_the_first(
    connected: Connected,
) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    connected.peer.lose_responses = 1
    lost = await connected.gateway.charge_off_session(
        charge(connected.account), customer=connected.customer, payment_method=pm
    )
    assert lost.outcome is PaymentOutcome.UNKNOWN
    assert len(connected.peer.payment_intents) == 1  # it did happen at Stripe
    resent = await connected.gateway.charge_off_session(
        charge(connected.account), customer=connected.customer, payment_method=pm
    )
    assert resent.outcome is PaymentOutcome.SUCCEEDED
    assert resent.payment_intent in connected.peer.payment_intents
    assert len(connected.peer.payment_intents) == 1


async def test_concurrent_sends_of_one_key_charge_once(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    results = await asyncio.gather(
        *(
            connected.gateway.charge_off_session(
                charge(connected.account), customer=connected.customer, payment_method=pm
            )
            for _ in range(5)
        )
    )
    assert len(connected.peer.payment_intents) == 1
    assert {r.outcome for r in results} <= {PaymentOutcome.SUCCEEDED, PaymentOutcome.UNKNOWN}


async def test_checkout_and_subscription_with_proration(connected: Connected) -> None:
    url = await connected.gateway.checkout_for_plan(
        customer=connected.customer,
        price="price_monthly",
        destination=connected.account,
        platform_fee_percent="12.5",
        success_url="https://x/ok",
        cancel_url="https://x/no",
        metadata={"plan": "plan1"},
    )
    session = next(iter(connected.peer.checkout_sessions.values()))
    assert url == session["url"]
    assert session["subscription_data"]["application_fee_percent"] == "12.5"
    sub, item = await connected.gateway.create_subscription(
        customer=connected.customer,
        price="price_monthly",
        destination=connected.account,
        platform_fee_percent="12.5",
        idempotency_key="subscription:f1:plan1:start",
        metadata={"plan": "plan1"},
    )
    await connected.gateway.change_subscription(
        sub, item=item, price="price_yearly", idempotency_key="subscription:f1:plan1:change1"
    )
    stored = connected.peer.subscriptions[sub]
    assert stored["items"]["data"][0]["price"]["id"] == "price_yearly"
    assert stored["last_proration_behavior"] == "create_prorations"


async def test_events_are_listed_for_recovery(connected: Connected) -> None:
    pm = await connected.card(stripe_peer.SUCCEEDS)
    for n in range(3):
        await connected.gateway.charge_off_session(
            charge(connected.account, key=f"k{n}"),
            customer=connected.customer,
            payment_method=pm,
        )
    listed = [e async for e in connected.gateway.events_since(0)]
    assert sorted(e["id"] for e in listed) == sorted(e["id"] for e in connected.peer.events)
    assert {e["type"] for e in listed} == {"charge.succeeded", "payment_intent.succeeded"}
