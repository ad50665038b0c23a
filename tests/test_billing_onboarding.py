"""Express onboarding in the billing service: a provider's account is created once (a lost
answer, a retry and a second request all end at the one account), a fresh account link is
made for every request, and what Stripe refuses or never answers ends in ``failed`` with the
reason — against real PostgreSQL and the Stripe peer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from stripe_peer import StripePeer

from engine.billing import onboarding, store
from engine.billing.gateway import StripeGateway


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
