"""Express onboarding in the billing service: a provider's account is created once (a lost
answer, a retry and a second request all end at the one account), a fresh account link is
made for every request, and what Stripe refuses or never answers ends in ``failed`` with the
reason; ``account.updated``, signed by Stripe's own helper, stores the account's status once
and never lets an older event overwrite a newer one — against real PostgreSQL and the Stripe
peer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
import stripe
from aiohttp import test_utils, web
from stripe_peer import StripePeer

from engine.billing import onboarding, store
from engine.billing.gateway import StripeGateway
from engine.billing.webhooks import process_stored_events, webhook_routes

SECRET = "whsec_onboarding_test"


@dataclass
class Desk:
    pool: asyncpg.Pool
    peer: StripePeer
    gateway: StripeGateway

    async def request(self, provider: str = "p1", country: str = "DE") -> uuid.UUID:
        async with self.pool.acquire() as conn:
            found: uuid.UUID = await conn.fetchval(
                "SELECT billing_api_request_onboarding($1, $2, $3, $4, $5, $6)",
                uuid.uuid4(), provider, f"{provider}@x.test", country,
                "https://app.example.com/refresh", "https://app.example.com/return",
            )  # fmt: skip
        return found

    async def row(self, onboarding_id: uuid.UUID) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM billing_onboardings WHERE onboarding_id = $1", onboarding_id
            )

    def account_keys(self) -> list[str | None]:
        return [k for _, path, k in self.peer.requests if path == "/v1/accounts"]

    async def deliver(self, event: dict[str, Any]) -> None:
        """Stripe posting the event to the webhook endpoint, signed with Stripe's helper."""
        payload = orjson.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET)
        app = web.Application()
        app.add_routes(webhook_routes(self.pool, SECRET))
        async with test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1")) as client:
            resp = await client.post(
                "/stripe/webhook", data=payload, headers={"Stripe-Signature": header}
            )
            assert resp.status == 200, await resp.text()

    async def status(self, provider: str = "p1") -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT charges_enabled, payouts_enabled, details_submitted,"
                " account_status_created_s FROM billing_providers WHERE provider = $1",
                provider,
            )

    async def onboarded_account(self) -> str:
        await self.request()
        await onboarding.create_links(self.pool, self.gateway)
        (account,) = self.peer.accounts
        return str(account)


@pytest.fixture
async def desk(database_url: str) -> AsyncIterator[Desk]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    peer = StripePeer()
    await peer.start()
    gateway = StripeGateway(peer.api_key, api_base=peer.url, timeout_s=10)
    async with pool.acquire() as conn:
        await store.upsert_operator_plan(
            conn, plan_id="op", currency="EUR", platform_fee_percent="10",
            account_pool_limit=10, modules=["subscription"],
        )  # fmt: skip
        for provider in ("p1", "p2"):
            await store.upsert_provider(
                conn, provider=provider, operator_plan="op", stripe_account=None
            )
    try:
        yield Desk(pool, peer, gateway)
    finally:
        await gateway.close()
        await peer.stop()
        await pool.close()


async def test_a_request_gets_an_account_and_a_link_with_its_expiry(desk: Desk) -> None:
    first = await desk.request()
    assert await onboarding.create_links(desk.pool, desk.gateway) == [(str(first), "ready")]
    row = await desk.row(first)
    assert row["state"] == "ready" and row["url"].endswith(f"/express/onboarding/{row['account']}")
    assert row["expires_at"] is not None and row["lease_until"] is None
    (account,) = desk.peer.accounts.values()
    assert account["country"] == "DE" and account["metadata"] == {"provider": "p1"}
    async with desk.pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT stripe_account FROM billing_providers WHERE provider = 'p1'"
        )
    assert stored == row["account"]


async def test_requests_in_one_pass_and_later_share_the_one_account(desk: Desk) -> None:
    a, b = await desk.request(), await desk.request(country="FR")
    assert sorted(await onboarding.create_links(desk.pool, desk.gateway)) == sorted(
        [(str(a), "ready"), (str(b), "ready")]
    )
    c = await desk.request()
    await onboarding.create_links(desk.pool, desk.gateway)
    accounts = {(await desk.row(x))["account"] for x in (a, b, c)}
    assert len(accounts) == 1 and len(desk.peer.accounts) == 1
    assert desk.account_keys() == ["account:p1"]
    links = [p for _, p, _ in desk.peer.requests if p == "/v1/account_links"]
    assert len(links) == 3
    # Another provider gets its own account.
    other = await desk.request("p2")
    await onboarding.create_links(desk.pool, desk.gateway)
    assert (await desk.row(other))["account"] not in accounts
    assert len(desk.peer.accounts) == 2


async def test_a_lost_answer_is_sent_again_under_the_providers_key(desk: Desk) -> None:
    first = await desk.request()
    desk.peer.lose_responses = 1
    assert await onboarding.create_links(desk.pool, desk.gateway, retry_after_s=0) == [
        (str(first), "pending")
    ]
    assert await onboarding.create_links(desk.pool, desk.gateway) == [(str(first), "ready")]
    assert len(desk.peer.accounts) == 1
    assert desk.account_keys() == ["account:p1", "account:p1"]


async def test_a_request_waiting_for_its_retry_is_not_taken_again(desk: Desk) -> None:
    first = await desk.request()
    desk.peer.lose_responses = 1
    await onboarding.create_links(desk.pool, desk.gateway, retry_after_s=60)
    assert await onboarding.create_links(desk.pool, desk.gateway) == []
    assert (await desk.row(first))["state"] == "pending"


async def test_no_answer_after_the_last_attempt_fails_with_the_reason(desk: Desk) -> None:
    first = await desk.request()
    desk.peer.lose_responses = 1
    assert await onboarding.create_links(desk.pool, desk.gateway, max_attempts=1) == [
        (str(first), "failed")
    ]
    row = await desk.row(first)
    assert row["reason"].startswith("Stripe gave no answer after 1 attempts"), row["reason"]
    assert row["url"] is None


async def test_a_link_for_an_account_stripe_does_not_know_fails_with_the_reason(
    desk: Desk,
) -> None:
    async with desk.pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_providers SET stripe_account = 'acct_gone' WHERE provider = 'p1'"
        )
    first = await desk.request()
    assert await onboarding.create_links(desk.pool, desk.gateway) == [(str(first), "failed")]
    row = await desk.row(first)
    assert "No such account: 'acct_gone'" in row["reason"] and desk.peer.accounts == {}


async def test_a_provider_billing_does_not_know_is_refused(desk: Desk) -> None:
    with pytest.raises(asyncpg.NoDataFoundError, match="no operator plan"):
        await desk.request("stranger")


async def test_account_updated_delivered_twice_stores_the_status_once(desk: Desk) -> None:
    account = await desk.onboarded_account()
    assert tuple(await desk.status()) == (None, None, None, None)
    event = desk.peer.update_account(
        account, charges_enabled=True, payouts_enabled=True, details_submitted=True
    )
    await desk.deliver(event)
    await desk.deliver(event)
    outcomes = await process_stored_events(desk.pool)
    assert [(o.event_id, o.result) for o in outcomes] == [(event["id"], "applied")]
    assert tuple(await desk.status()) == (True, True, True, event["created"])
    assert await process_stored_events(desk.pool) == []
    # The onboarding answer the API reads carries the status.
    async with desk.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL tradecopy.tenant = 'p1'")
        seen = await conn.fetch(
            "SELECT charges_enabled, details_submitted FROM billing_api_onboardings"
        )
    assert [tuple(r) for r in seen] == [(True, True)]


async def test_an_older_account_updated_never_overwrites_a_newer_status(desk: Desk) -> None:
    account = await desk.onboarded_account()
    newer = desk.peer.update_account(
        account, charges_enabled=True, payouts_enabled=True, details_submitted=True,
        created=2_000_000_000,
    )  # fmt: skip
    older = desk.peer.update_account(
        account, charges_enabled=False, payouts_enabled=False, details_submitted=True,
        created=1_999_999_000,
    )  # fmt: skip
    await desk.deliver(newer)
    assert [o.result for o in await process_stored_events(desk.pool)] == ["applied"]
    await desk.deliver(older)  # Stripe delivers in no particular order
    assert [o.result for o in await process_stored_events(desk.pool)] == ["stale"]
    assert tuple(await desk.status()) == (True, True, True, 2_000_000_000)


async def test_account_updated_before_the_account_is_stored_waits_for_it(desk: Desk) -> None:
    account = await desk.gateway.create_express_account(
        provider="p1", email="p1@x.test", country="DE"
    )
    event = desk.peer.update_account(
        account, charges_enabled=False, payouts_enabled=False, details_submitted=True
    )
    await desk.deliver(event)
    assert [o.result for o in await process_stored_events(desk.pool)] == ["deferred"]
    await desk.request()
    await onboarding.create_links(desk.pool, desk.gateway)  # stores the same account
    assert [o.result for o in await process_stored_events(desk.pool)] == ["applied"]
    assert tuple(await desk.status())[:3] == (False, False, True)
