"""Express onboarding for providers: the API's requests become a provider's Express account
(once) and a fresh Stripe-hosted account link (each time).

The API records a request through ``billing_api_request_onboarding`` (state ``pending``) and
answers 202. The billing service, woken by ``NOTIFY billing_onboarding`` or its poll, leases
pending requests (``FOR UPDATE SKIP LOCKED``), creates the provider's Express account if
``billing_providers.stripe_account`` is empty (Stripe idempotency key ``account:<provider>``,
so a lost answer, a retry or a second instance gets the same account, never a second one),
stores it, and creates an account link. The link's URL and expiry are stored (``ready``); a
refusal is stored with its reason (``failed``); no answer from Stripe is retried with backoff.

Whether onboarding is complete is Stripe's to say: ``account.updated`` carries the account's
``charges_enabled``, ``payouts_enabled`` and ``details_submitted``, stored on
``billing_providers`` by ``apply_account_event`` with the event's ``created`` so an older event
never overwrites a newer state.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import msgspec
import stripe
import structlog
from prometheus_client import Counter

from engine.billing.gateway import StripeGateway

log = structlog.get_logger("tradecopy.billing.onboarding")

#: The Stripe event that carries an Express account's status.
ACCOUNT_EVENT = "account.updated"

#: The NOTIFY channel ``billing_api_request_onboarding`` wakes the service on.
CHANNEL = "billing_onboarding"

LINKS = Counter(
    "tradecopy_billing_onboarding_links_total",
    "Onboarding requests settled or retried by the onboarding worker, by resulting state",
    ["state"],
)


class OnboardingRequest(msgspec.Struct, frozen=True, kw_only=True):
    onboarding_id: uuid.UUID
    provider: str
    email: str
    country: str
    refresh_url: str
    return_url: str
    attempts: int


async def _claim(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[OnboardingRequest]:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE billing_onboardings SET lease_until = now() + make_interval(secs => $2),"
            " attempts = attempts + 1, updated_at = now()"
            " WHERE onboarding_id IN (SELECT onboarding_id FROM billing_onboardings"
            "  WHERE state = 'pending' AND (lease_until IS NULL OR lease_until < now())"
            "  ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING onboarding_id, provider, email, country, refresh_url, return_url,"
            " attempts",
            limit,
            lease_s,
        )
    return [OnboardingRequest(**dict(row)) for row in rows]


async def express_account(
    pool: asyncpg.Pool, gateway: StripeGateway, req: OnboardingRequest
) -> str:
    """The provider's Express account: the stored one, or one created and stored now."""
    async with pool.acquire() as conn:
        known = await conn.fetchval(
            "SELECT stripe_account FROM billing_providers WHERE provider = $1", req.provider
        )
    if known is not None:
        return str(known)
    account = await gateway.create_express_account(
        provider=req.provider, email=req.email, country=req.country
    )
    async with pool.acquire() as conn:
        # The first stored account wins; the idempotency key makes a concurrent creation
        # answer with the same account anyway.
        stored = await conn.fetchval(
            "UPDATE billing_providers SET stripe_account = coalesce(stripe_account, $2)"
            " WHERE provider = $1 RETURNING stripe_account",
            req.provider,
            account,
        )
    return str(stored)


async def _settle(pool: asyncpg.Pool, onboarding_id: uuid.UUID, **values: Any) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_onboardings SET state = $2, account = $3, url = $4, expires_at = $5,"
            " reason = $6, lease_until = NULL, updated_at = now()"
            " WHERE onboarding_id = $1 AND state = 'pending'",
            onboarding_id,
            values["state"],
            values.get("account"),
            values.get("url"),
            values.get("expires_at"),
            values.get("reason"),
        )


async def _retry_later(pool: asyncpg.Pool, onboarding_id: uuid.UUID, after_s: float) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_onboardings SET lease_until = now() + make_interval(secs => $2)"
            " WHERE onboarding_id = $1 AND state = 'pending'",
            onboarding_id,
            after_s,
        )


async def create_links(
    pool: asyncpg.Pool, gateway: StripeGateway, *, limit: int = 20, lease_s: float = 60.0,
    retry_after_s: float = 5.0, max_attempts: int = 5,
) -> list[tuple[str, str]]:  # fmt: skip
    """One pass: an account (if needed) and a link for every pending request; (onboarding id,
    state) of each request settled or retried in this pass."""
    done: list[tuple[str, str]] = []
    for req in await _claim(pool, limit, lease_s):
        account: str | None = None
        reason: str | None = None
        retry = False
        try:
            account = await express_account(pool, gateway, req)
            link = await gateway.onboarding_link(
                account, refresh_url=req.refresh_url, return_url=req.return_url
            )
        except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
            reason = exc.user_message or str(exc)
        except stripe.StripeError as exc:
            reason, retry = str(exc), True
        if reason is None:
            await _settle(
                pool, req.onboarding_id, state="ready", account=account, url=link.url,
                expires_at=link.expires_at,
            )  # fmt: skip
            state = "ready"
        elif retry and req.attempts < max_attempts:
            await _retry_later(pool, req.onboarding_id, retry_after_s * 2**req.attempts)
            state = "pending"
        else:
            if retry:
                reason = f"Stripe gave no answer after {req.attempts} attempts: {reason}"
            await _settle(pool, req.onboarding_id, state="failed", account=account, reason=reason)
            state = "failed"
        LINKS.labels(state=state).inc()
        log.info(
            "onboarding_link", onboarding_id=str(req.onboarding_id), provider=req.provider,
            state=state, attempts=req.attempts, reason=reason,
        )  # fmt: skip
        done.append((str(req.onboarding_id), state))
    return done


async def apply_account_event(
    conn: asyncpg.Connection, event_id: str, created_s: int, obj: dict[str, Any]
) -> str:
    """Store an Express account's status from ``account.updated`` inside the caller's
    transaction: applied, stale (an older event than the one stored), deferred (the provider's
    account is not stored yet) or ignored (an account that is not a provider's)."""
    account = obj.get("id")
    if not isinstance(account, str):
        return "ignored"
    row = await conn.fetchrow(
        "UPDATE billing_providers SET charges_enabled = $2, payouts_enabled = $3,"
        " details_submitted = $4, account_status_created_s = $5, account_status_event = $6"
        " WHERE stripe_account = $1"
        " AND (account_status_created_s IS NULL OR account_status_created_s <= $5)"
        " RETURNING provider",
        account,
        bool(obj.get("charges_enabled")),
        bool(obj.get("payouts_enabled")),
        bool(obj.get("details_submitted")),
        created_s,
        event_id,
    )
    if row is not None:
        log.info(
            "provider_account_status", provider=row["provider"], account=account,
            charges_enabled=bool(obj.get("charges_enabled")),
            payouts_enabled=bool(obj.get("payouts_enabled")),
            details_submitted=bool(obj.get("details_submitted")), event_id=event_id,
        )  # fmt: skip
        return "applied"
    if await conn.fetchval("SELECT 1 FROM billing_providers WHERE stripe_account = $1", account):
        return "stale"  # Stripe delivers in no particular order: a newer state is stored
    provider = (obj.get("metadata") or {}).get("provider")
    if isinstance(provider, str) and await conn.fetchval(
        "SELECT 1 FROM billing_providers WHERE provider = $1 AND stripe_account IS NULL",
        provider,
    ):
        # The account was created but its answer is not stored yet (lost, or in flight):
        # the next pass applies the event once onboarding stores the account.
        return "deferred"
    return "ignored"


async def listen(conn: asyncpg.Connection, wake: asyncio.Event) -> None:
    """Set ``wake`` whenever the API records a request (``NOTIFY billing_onboarding``)."""

    def notified(*_: Any) -> None:
        wake.set()

    await conn.add_listener(CHANNEL, notified)
