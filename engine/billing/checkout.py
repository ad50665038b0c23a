"""Checkout for plan purchase: the API's requests become Stripe Checkout Sessions, and a completed
session activates the plan exactly once.

The API records a request through ``billing_api_request_checkout`` (state ``pending``) and answers
202; while the follower has an open (pending or ready) Checkout of the plan, a request with any
key answers that one (``migrations/0007``), so two paid sessions never make two subscriptions.
The billing service, woken by ``NOTIFY billing_checkout`` or its poll, leases pending
requests (``FOR UPDATE SKIP LOCKED``, so two instances never create one twice at once), makes
sure the follower is a Stripe customer, and creates the session under the key
``checkout:<checkout id>``: a lost answer is sent again under that key, and Stripe answers with
the first session. The URL is stored (``ready``); a refusal is stored with its reason
(``failed``). ``checkout.session.completed`` then subscribes the follower (or reactivates a
cancelled subscription) and, for pay-per-trade, records the allowance bought by that session,
in the transaction that marks the request ``completed`` — a second delivery finds it completed
and changes nothing.

How a plan is sold (one session per plan, whatever its modules):

- with ``subscription``: ``mode=subscription``, a recurring price (month, 3 months, year) in the
  plan's currency, plus the pay-per-trade allowance as a one-time line when the plan has one; a
  destination subscription with ``application_fee_percent`` (the operator plan's platform fee);
- with ``pay_per_trade`` only: ``mode=payment``, a destination charge whose
  ``application_fee_amount`` is the platform fee rounded down (``fees.platform_fee``); the card is
  saved for off-session use (``setup_future_usage=off_session``): the next allowance and any
  weekly fee are charged to it;
- weekly modules only (performance, volume): ``mode=setup``, which saves the card the weekly
  fees are charged to.

The payment method a completed session saved is read back afterwards, never inside the
transaction that applies the event: that transaction marks the request as owing the read
(``lease_until`` set on a ``completed`` request) and notifies ``billing_checkout``;
``save_payment_methods`` leases those requests, reads the session's SetupIntent, PaymentIntent
or Subscription from Stripe, stores the customer and the payment method in
``billing_customers`` and clears the mark in one statement. No answer leaves the mark for a
later pass, with backoff.
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

from engine.billing import enforcement, store
from engine.billing.fees import platform_fee
from engine.billing.gateway import CheckoutResult, PaymentOutcome, StripeGateway
from engine.billing.plans import PlanTerms, plan_terms

log = structlog.get_logger("tradecopy.billing.checkout")

#: The NOTIFY channel ``billing_api_request_checkout`` wakes the service on.
CHANNEL = "billing_checkout"
#: Stripe's events this module applies.
EVENT_TYPES = frozenset({"checkout.session.completed", "checkout.session.expired"})

SESSIONS = Counter(
    "tradecopy_billing_checkout_sessions_total",
    "Checkout requests settled or retried by the session worker, by resulting state",
    ["state"],
)

_INTERVAL = {"monthly": ("month", 1), "quarterly": ("month", 3), "yearly": ("year", 1)}

PAYMENT_METHODS = Counter(
    "tradecopy_billing_checkout_payment_methods_total",
    "Completed Checkout Sessions whose saved payment method was read back, by result",
    ["result"],
)


class CheckoutRequest(msgspec.Struct, frozen=True, kw_only=True):
    checkout_id: uuid.UUID
    follower: str
    provider: str
    plan_id: str
    email: str | None
    success_url: str
    cancel_url: str
    attempts: int


def idempotency_key(checkout_id: uuid.UUID | str) -> str:
    return f"checkout:{checkout_id}"


def session_params(
    plan: PlanTerms, *, checkout_id: str, follower: str, customer: str, success_url: str,
    cancel_url: str,
) -> dict[str, Any]:  # fmt: skip
    """The Checkout Session's parameters for ``plan`` (pure: the tests read them)."""
    if plan.destination is None:
        raise ValueError("the provider has no Stripe account yet (onboarding not started)")
    metadata = {"checkout_id": checkout_id, "follower": follower, "plan_id": plan.plan_id}
    currency = plan.currency.lower()
    name = plan.name or plan.plan_id
    params: dict[str, Any] = {
        "customer": customer,
        "client_reference_id": checkout_id,
        "success_url": success_url,
        "cancel_url": cancel_url,
        "metadata": metadata,
    }
    ppt_line: dict[str, Any] | None = None
    if "pay_per_trade" in plan.modules:
        if plan.ppt_price_minor is None or plan.ppt_trades is None:
            raise ValueError("the pay-per-trade module has no price or trade count")
        ppt_line = {
            "price_data": {
                "currency": currency,
                "unit_amount": plan.ppt_price_minor,
                "product_data": {"name": f"{name}: {plan.ppt_trades} copied trades"},
            },
            "quantity": 1,
        }
    if "subscription" in plan.modules:
        if plan.subscription_price_minor is None or plan.subscription_period is None:
            raise ValueError("the subscription module has no price or period")
        interval, count = _INTERVAL[plan.subscription_period]
        recurring = {
            "price_data": {
                "currency": currency,
                "unit_amount": plan.subscription_price_minor,
                "recurring": {"interval": interval, "interval_count": count},
                "product_data": {"name": name},
            },
            "quantity": 1,
        }
        params["mode"] = "subscription"
        params["line_items"] = [recurring] + ([ppt_line] if ppt_line else [])
        params["subscription_data"] = {
            # Stripe takes at most two decimals here: 12.500000 (numeric's scale) as 12.5.
            "application_fee_percent": format(plan.platform_fee_percent.normalize(), "f"),
            "transfer_data": {"destination": plan.destination},
            "metadata": metadata,
        }
    elif ppt_line is not None:
        split = platform_fee(plan.ppt_price_minor or 0, plan.platform_fee_percent)
        intent: dict[str, Any] = {
            "application_fee_amount": split.application_fee_minor,
            "transfer_data": {"destination": plan.destination},
            "metadata": metadata,
        }
        # Saved for off-session use: the next allowance and any weekly fee are charged to
        # this card without the follower at hand.
        intent["setup_future_usage"] = "off_session"
        params["mode"] = "payment"
        params["line_items"] = [ppt_line]
        params["payment_intent_data"] = intent
    else:
        params["mode"] = "setup"
        params["currency"] = currency
        params["setup_intent_data"] = {"metadata": metadata}
    return params


# --------------------------------------------------------------- creating sessions


async def _claim(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[CheckoutRequest]:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE billing_checkouts SET lease_until = now() + make_interval(secs => $2),"
            " attempts = attempts + 1, updated_at = now()"
            " WHERE checkout_id IN (SELECT checkout_id FROM billing_checkouts"
            "  WHERE state = 'pending' AND (lease_until IS NULL OR lease_until < now())"
            "  ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING checkout_id, follower, provider, plan_id, email, success_url,"
            " cancel_url, attempts",
            limit,
            lease_s,
        )
    return [CheckoutRequest(**dict(row)) for row in rows]


async def _settle(
    pool: asyncpg.Pool, checkout_id: uuid.UUID, *, state: str, url: str | None = None,
    session_id: str | None = None, reason: str | None = None,
) -> None:  # fmt: skip
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_checkouts SET state = $2, url = $3,"
            " session_id = coalesce($4, session_id), reason = $5, lease_until = NULL,"
            " updated_at = now() WHERE checkout_id = $1 AND state = 'pending'",
            checkout_id, state, url, session_id, reason,
        )  # fmt: skip


async def _retry_later(pool: asyncpg.Pool, checkout_id: uuid.UUID, after_s: float) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_checkouts SET lease_until = now() + make_interval(secs => $2)"
            " WHERE checkout_id = $1 AND state = 'pending'",
            checkout_id,
            after_s,
        )


async def _customer(pool: asyncpg.Pool, gateway: StripeGateway, request: CheckoutRequest) -> str:
    async with pool.acquire() as conn:
        known = await store.customer(conn, request.follower)
    if known is not None:
        return known[0]
    # Idempotent by the follower (``customer:<follower>``): two sessions make one customer.
    customer = await gateway.create_customer(follower=request.follower, email=request.email or "")
    async with pool.acquire() as conn:
        await store.upsert_customer(
            conn, follower=request.follower, stripe_customer=customer, payment_method=None
        )
    return customer


async def create_sessions(
    pool: asyncpg.Pool, gateway: StripeGateway, *, limit: int = 20, lease_s: float = 60.0,
    retry_after_s: float = 5.0, max_attempts: int = 5,
) -> list[tuple[str, str]]:  # fmt: skip
    """One pass: a Checkout Session for every pending request; (checkout id, state) of each
    request settled or retried in this pass."""
    done: list[tuple[str, str]] = []
    for request in await _claim(pool, limit, lease_s):
        async with pool.acquire() as conn:
            plan = await plan_terms(conn, request.plan_id)
        result: CheckoutResult
        try:
            if plan is None:
                raise ValueError(f"no plan {request.plan_id}")
            customer = await _customer(pool, gateway, request)
            params = session_params(
                plan, checkout_id=str(request.checkout_id), follower=request.follower,
                customer=customer, success_url=request.success_url,
                cancel_url=request.cancel_url,
            )  # fmt: skip
            result = await gateway.create_checkout_session(
                params, idempotency_key=idempotency_key(request.checkout_id)
            )
        except ValueError as exc:
            result = CheckoutResult(outcome=PaymentOutcome.FAILED, message=str(exc))
        except stripe.InvalidRequestError as exc:
            result = CheckoutResult(outcome=PaymentOutcome.FAILED, message=exc.user_message)
        except stripe.StripeError as exc:
            result = CheckoutResult(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        if result.outcome is PaymentOutcome.SUCCEEDED:
            await _settle(
                pool, request.checkout_id, state="ready", url=result.url,
                session_id=result.session_id,
            )  # fmt: skip
            state = "ready"
        elif result.outcome is PaymentOutcome.UNKNOWN and request.attempts < max_attempts:
            await _retry_later(pool, request.checkout_id, retry_after_s * 2**request.attempts)
            state = "pending"
        else:
            reason = result.message or result.code or "refused"
            if result.outcome is PaymentOutcome.UNKNOWN:
                reason = f"Stripe gave no answer after {request.attempts} attempts: {reason}"
            await _settle(pool, request.checkout_id, state="failed", reason=reason)
            state = "failed"
        SESSIONS.labels(state=state).inc()
        log.info(
            "checkout_session", checkout_id=str(request.checkout_id), state=state,
            attempts=request.attempts, reason=result.message,
        )  # fmt: skip
        done.append((str(request.checkout_id), state))
    return done


class PaymentMethodRead(msgspec.Struct, frozen=True, kw_only=True):
    checkout_id: uuid.UUID
    follower: str
    session_id: str
    attempts: int


async def _claim_reads(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[PaymentMethodRead]:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE billing_checkouts SET lease_until = now() + make_interval(secs => $2),"
            " attempts = attempts + 1"
            " WHERE checkout_id IN (SELECT checkout_id FROM billing_checkouts"
            "  WHERE state = 'completed' AND session_id IS NOT NULL"
            "  AND lease_until IS NOT NULL AND lease_until < now()"
            "  ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING checkout_id, follower, session_id, attempts",
            limit,
            lease_s,
        )
    return [PaymentMethodRead(**dict(row)) for row in rows]


async def _read_done(
    pool: asyncpg.Pool, read: PaymentMethodRead, customer: str | None, payment_method: str | None
) -> None:
    """Store what was read and clear the request's mark, together: a crash between the two
    would only read it again, and storing the same method twice changes nothing."""
    async with pool.acquire() as conn, conn.transaction():
        if customer is not None and payment_method is not None:
            await store.upsert_customer(
                conn, follower=read.follower, stripe_customer=customer,
                payment_method=payment_method,
            )  # fmt: skip
        await conn.execute(
            "UPDATE billing_checkouts SET lease_until = NULL, updated_at = now()"
            " WHERE checkout_id = $1 AND state = 'completed'",
            read.checkout_id,
        )


async def save_payment_methods(
    pool: asyncpg.Pool, gateway: StripeGateway, *, limit: int = 20, lease_s: float = 60.0,
    retry_after_s: float = 5.0, max_retry_s: float = 3600.0,
) -> list[tuple[str, str]]:  # fmt: skip
    """One pass: the payment method of every completed session not read back yet stored in
    ``billing_customers``; (checkout id, result) of each request handled in this pass:
    ``saved``, ``none`` (the session saved none), ``refused`` (Stripe refused the read) or
    ``retry`` (no answer: the mark stays, read again after a backoff)."""
    done: list[tuple[str, str]] = []
    for read in await _claim_reads(pool, limit, lease_s):
        saved = await gateway.saved_payment_method(read.session_id)
        if saved.outcome is PaymentOutcome.UNKNOWN:
            # Never given up: without the method every off-session charge would fail.
            delay = min(retry_after_s * 2 ** (read.attempts - 1), max_retry_s)
            await _retry_read_later(pool, read.checkout_id, delay)
            result = "retry"
        elif saved.outcome is PaymentOutcome.SUCCEEDED and saved.payment_method is not None:
            await _read_done(pool, read, saved.customer, saved.payment_method)
            result = "saved"
        else:
            await _read_done(pool, read, None, None)
            result = "none" if saved.outcome is PaymentOutcome.SUCCEEDED else "refused"
        PAYMENT_METHODS.labels(result=result).inc()
        log_event = log.warning if result in ("refused", "none") else log.info
        log_event(
            "checkout_payment_method", checkout_id=str(read.checkout_id),
            follower=read.follower, session=read.session_id, result=result,
            payment_method=saved.payment_method, attempts=read.attempts, reason=saved.message,
        )  # fmt: skip
        done.append((str(read.checkout_id), result))
    return done


async def _retry_read_later(pool: asyncpg.Pool, checkout_id: uuid.UUID, after_s: float) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_checkouts SET lease_until = now() + make_interval(secs => $2)"
            " WHERE checkout_id = $1 AND state = 'completed' AND lease_until IS NOT NULL",
            checkout_id,
            after_s,
        )


async def listen(conn: asyncpg.Connection, wake: asyncio.Event) -> None:
    """Set ``wake`` whenever the API records a request (``NOTIFY billing_checkout``)."""

    def notified(*_: Any) -> None:
        wake.set()

    await conn.add_listener(CHANNEL, notified)


# --------------------------------------------------------------- completion (webhook)


async def apply_checkout_event(
    conn: asyncpg.Connection, event_type: str, event_id: str, created_s: int, obj: dict[str, Any]
) -> str:
    """Apply ``checkout.session.completed`` / ``.expired`` inside the caller's transaction."""
    raw_id = (obj.get("metadata") or {}).get("checkout_id") or obj.get("client_reference_id")
    try:
        checkout_id = uuid.UUID(str(raw_id))
    except ValueError:
        return "ignored"  # a session this billing did not make
    row = await conn.fetchrow(
        "SELECT follower, plan_id, state FROM billing_checkouts WHERE checkout_id = $1 FOR UPDATE",
        checkout_id,
    )
    if row is None:
        return "ignored"
    if row["state"] == "completed":
        return "unchanged"
    session_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    if event_type == "checkout.session.expired":
        if row["state"] == "failed":
            return "unchanged"
        await conn.execute(
            "UPDATE billing_checkouts SET state = 'failed', reason = 'the Checkout Session"
            " expired unpaid', session_id = coalesce($2, session_id), updated_at = now()"
            " WHERE checkout_id = $1",
            checkout_id,
            session_id,
        )
        return "applied"
    # ``lease_until`` on a completed request: its saved payment method is still to be read
    # from Stripe (``save_payment_methods``, after this commit; the NOTIFY wakes it).
    await conn.execute(
        "UPDATE billing_checkouts SET state = 'completed', completed_by = $2, reason = NULL,"
        " session_id = coalesce($3, session_id), lease_until = now(), attempts = 0,"
        " updated_at = now() WHERE checkout_id = $1",
        checkout_id,
        event_id,
        session_id,
    )
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(checkout_id))
    await activate(
        conn, follower=row["follower"], plan_id=row["plan_id"], started_ns=created_s * 10**9,
        purchase_id=session_id or str(checkout_id), stripe_customer=obj.get("customer"),
        stripe_subscription=obj.get("subscription"),
    )  # fmt: skip
    return "applied"


async def activate(
    conn: asyncpg.Connection, *, follower: str, plan_id: str, started_ns: int, purchase_id: str,
    stripe_customer: Any = None, stripe_subscription: Any = None,
) -> None:  # fmt: skip
    """The plan bought: the subscription (new, or a cancelled one reactivated, its mark kept),
    and the pay-per-trade allowance of this purchase. Provisioning follows from the
    subscription's trigger (``billing_provisioning_due``)."""
    plan = await plan_terms(conn, plan_id)
    if plan is None:
        raise ValueError(f"no plan {plan_id}")
    if isinstance(stripe_customer, str) and await store.customer(conn, follower) is None:
        await store.upsert_customer(
            conn, follower=follower, stripe_customer=stripe_customer, payment_method=None
        )
    if not await store.subscribe(conn, follower=follower, plan_id=plan_id, started_ns=started_ns):
        await enforcement.reactivate_subscription(conn, follower, plan_id)
    if isinstance(stripe_subscription, str):
        await conn.execute(
            "UPDATE billing_subscriptions SET stripe_subscription = $3, updated_at = now()"
            " WHERE follower = $1 AND plan_id = $2",
            follower,
            plan_id,
            stripe_subscription,
        )
    if "pay_per_trade" in plan.modules and plan.ppt_trades is not None:
        current = await conn.fetchval(
            "SELECT ppt_purchase_id FROM billing_subscriptions"
            " WHERE follower = $1 AND plan_id = $2",
            follower,
            plan_id,
        )
        if current != purchase_id:
            await store.save_allowance(
                conn, follower=follower, plan_id=plan_id, purchase_id=purchase_id,
                trades_bought=plan.ppt_trades, counted=(), over=(),
            )  # fmt: skip
            await enforcement.allowance_renewed(conn, follower, plan_id)
    log.info("plan_activated", follower=follower, plan_id=plan_id, purchase_id=purchase_id)
