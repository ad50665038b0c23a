"""Plan changes: a follower's subscription moved from plan A to plan B mid-period, prorated.

The API records a request through ``billing_api_request_plan_change`` (``pending``,
``migrations/0008``) and answers 202. The billing service, woken by ``NOTIFY
billing_plan_change`` or its poll, leases pending requests (``FOR UPDATE SKIP LOCKED``) and for
each one:

1. computes ``fees.change_plan(A, B, anchor_ns, at_ns=request time)``: the credit of A's unused
   part, B's charge for the period that now runs, the net and the new anchor;
2. when the subscription is a Stripe subscription, reads its item (``subscriptions.retrieve``;
   the item id is then kept in ``billing_subscriptions.stripe_subscription_item``) and moves
   the item to B's terms with ``price_data`` and ``proration_behavior=create_prorations``,
   under the key ``plan-change:<request id>``: a lost answer is sent again under that key and
   Stripe answers with the first update, so two passes or two instances change Stripe once;
3. in one serializable transaction (run again on a conflict): the request is still pending and
   the subscription still on A, the subscription row moves to B (see "what carries over"), the
   outcome is stored on the request (``applied``), and the follower is marked due for
   provisioning, so B's risk template reaches the follower's links (``provisioning.py``).

Stripe is called before the transaction, never inside it (a transaction may run several
times). A definitive refusal from Stripe fails the request with Stripe's code; no answer
(timeout, 409, 5xx) leaves it pending, retried on a later pass under the same key.

What carries over from A to B: the high-water mark and the settled performance and volume
windows (they are the follower's account's history, and a new plan must never charge profit or
volume already charged); ``started_ns`` and the Stripe subscription. The pay-per-trade
allowance carries over only when B sells pay-per-trade too (trades bought are the follower's),
and so does a stop for an allowance used up (raised again under B's name); otherwise the
allowance is cleared, as B has nothing to count it against, and its stop is lifted.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any

import asyncpg
import msgspec
import structlog
from prometheus_client import Counter

from engine.billing import enforcement, store
from engine.billing.fees import BillingPeriod, PlanChange, SubscriptionPlan, change_plan
from engine.billing.gateway import PaymentOutcome, StripeGateway
from engine.billing.plans import PlanTerms, plan_terms
from engine.billing.provisioning import Provisioner

log = structlog.get_logger("tradecopy.billing.plan_changes")

#: The NOTIFY channel ``billing_api_request_plan_change`` wakes the service on.
CHANNEL = "billing_plan_change"

CHANGES = Counter(
    "tradecopy_billing_plan_changes_total",
    "Plan change requests settled or retried by the plan-change worker, by resulting state",
    ["state"],
)

_INTERVAL = {"monthly": ("month", 1), "quarterly": ("month", 3), "yearly": ("year", 1)}


class PlanChangeRequest(msgspec.Struct, frozen=True, kw_only=True):
    plan_change_id: uuid.UUID
    follower: str
    from_plan: str
    to_plan: str
    requested_ns: int
    attempts: int


class PlanChangeRefused(Exception):
    """The change cannot be made (definitive): the request fails with this reason."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def idempotency_key(plan_change_id: uuid.UUID | str) -> str:
    return f"plan-change:{plan_change_id}"


def subscription_plan(plan: PlanTerms) -> SubscriptionPlan:
    """The subscription module's terms of ``plan`` (refused when it has none)."""
    if plan.subscription_price_minor is None or plan.subscription_period is None:
        raise PlanChangeRefused(f"plan {plan.plan_id} has no subscription module")
    return SubscriptionPlan(
        plan_id=plan.plan_id,
        price_minor=plan.subscription_price_minor,
        period=BillingPeriod(plan.subscription_period),
    )


def item_price_data(plan: PlanTerms, product: str) -> dict[str, Any]:
    """The subscription item's ``price_data`` for ``plan`` (pure: the tests read it). Stripe
    takes an existing product here (not ``product_data``): the item's own."""
    terms = subscription_plan(plan)
    interval, count = _INTERVAL[terms.period.value]
    return {
        "currency": plan.currency.lower(),
        "product": product,
        "unit_amount": terms.price_minor,
        "recurring": {"interval": interval, "interval_count": count},
    }


# --------------------------------------------------------------- the worker


async def _claim(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[PlanChangeRequest]:
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE billing_plan_changes SET lease_until = now() + make_interval(secs => $2),"
            " attempts = attempts + 1, updated_at = now()"
            " WHERE plan_change_id IN (SELECT plan_change_id FROM billing_plan_changes"
            "  WHERE status = 'pending' AND (lease_until IS NULL OR lease_until < now())"
            "  ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING plan_change_id, follower, from_plan, to_plan, requested_ns, attempts",
            limit,
            lease_s,
        )
    return [PlanChangeRequest(**dict(row)) for row in rows]


async def _fail(pool: asyncpg.Pool, request: PlanChangeRequest, refused: PlanChangeRefused) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_plan_changes SET status = 'failed', reason = $2, failure_code = $3,"
            " lease_until = NULL, updated_at = now()"
            " WHERE plan_change_id = $1 AND status = 'pending'",
            request.plan_change_id,
            refused.reason,
            refused.code,
        )


async def _retry_later(pool: asyncpg.Pool, plan_change_id: uuid.UUID, after_s: float) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE billing_plan_changes SET lease_until = now() + make_interval(secs => $2)"
            " WHERE plan_change_id = $1 AND status = 'pending'",
            plan_change_id,
            after_s,
        )


class _Prepared(msgspec.Struct, frozen=True, kw_only=True):
    old: PlanTerms
    new: PlanTerms
    change: PlanChange
    stripe_subscription: str | None
    stripe_item: str | None


async def _prepare(pool: asyncpg.Pool, request: PlanChangeRequest) -> _Prepared:
    async with pool.acquire() as conn:
        old = await plan_terms(conn, request.from_plan)
        new = await plan_terms(conn, request.to_plan)
        sub = await conn.fetchrow(
            "SELECT anchor_ns, stripe_subscription, stripe_subscription_item"
            " FROM billing_subscriptions WHERE follower = $1 AND plan_id = $2"
            " AND status = 'active'",
            request.follower,
            request.from_plan,
        )
    if old is None or new is None:
        raise PlanChangeRefused("a plan of the change no longer exists")
    if sub is None:
        raise PlanChangeRefused(f"no active subscription to {request.from_plan}")
    if old.provider != new.provider or old.currency != new.currency:
        raise PlanChangeRefused("a change stays with one provider and one currency")
    try:
        change = change_plan(
            subscription_plan(old), subscription_plan(new), anchor_ns=sub["anchor_ns"],
            at_ns=request.requested_ns,
        )  # fmt: skip
    except ValueError as exc:
        raise PlanChangeRefused(str(exc)) from None
    return _Prepared(
        old=old, new=new, change=change, stripe_subscription=sub["stripe_subscription"],
        stripe_item=sub["stripe_subscription_item"],
    )  # fmt: skip


async def _change_at_stripe(
    gateway: StripeGateway, request: PlanChangeRequest, prepared: _Prepared
) -> str | None:
    """B's terms on the Stripe subscription's item; the item's id. None: no definitive answer
    (retry later under the same key)."""
    subscription = prepared.stripe_subscription
    assert subscription is not None
    found = await gateway.subscription_item(subscription, prepared.stripe_item)
    if found.outcome is PaymentOutcome.UNKNOWN:
        return None
    if found.outcome is not PaymentOutcome.SUCCEEDED or found.item is None:
        raise PlanChangeRefused(found.message or "the subscription item is gone", found.code)
    if found.product is None:
        raise PlanChangeRefused("the subscription item's price has no product", "no_product")
    changed = await gateway.change_subscription_terms(
        subscription, item=found.item, price_data=item_price_data(prepared.new, found.product),
        metadata={"plan_change_id": str(request.plan_change_id), "plan_id": prepared.new.plan_id},
        idempotency_key=idempotency_key(request.plan_change_id),
    )  # fmt: skip
    if changed.outcome is PaymentOutcome.UNKNOWN:
        return None
    if changed.outcome is not PaymentOutcome.SUCCEEDED:
        raise PlanChangeRefused(changed.message or "Stripe refused the change", changed.code)
    return found.item


async def apply_change(
    conn: asyncpg.Connection, request: PlanChangeRequest, prepared: _Prepared, item: str | None
) -> bool:
    """Move the subscription and store the outcome, inside the caller's (serializable)
    transaction; False when the request was settled meanwhile (another instance)."""
    status = await conn.fetchval(
        "SELECT status FROM billing_plan_changes WHERE plan_change_id = $1 FOR UPDATE",
        request.plan_change_id,
    )
    if status != "pending":
        return False
    moved = await conn.fetchval(
        "SELECT count(*) FROM billing_subscriptions WHERE follower = $1 AND plan_id = $2"
        " AND status = 'active'",
        request.follower,
        request.from_plan,
    )
    if not moved:
        raise PlanChangeRefused(f"no active subscription to {request.from_plan}")
    # A cancelled subscription to B left from before gives way: A's row carries the state.
    await conn.execute(
        "DELETE FROM billing_subscriptions WHERE follower = $1 AND plan_id = $2"
        " AND status = 'cancelled'",
        request.follower,
        request.to_plan,
    )
    keep_allowance = "pay_per_trade" in prepared.new.modules
    change = prepared.change
    await conn.execute(
        "UPDATE billing_subscriptions SET plan_id = $3, anchor_ns = $4,"
        " stripe_subscription_item = coalesce($5, stripe_subscription_item),"
        " ppt_purchase_id = CASE WHEN $6 THEN ppt_purchase_id END,"
        " ppt_trades_bought = CASE WHEN $6 THEN ppt_trades_bought ELSE 0 END,"
        " ppt_counted = CASE WHEN $6 THEN ppt_counted ELSE '{}' END,"
        " ppt_over = CASE WHEN $6 THEN ppt_over ELSE '{}' END, updated_at = now()"
        " WHERE follower = $1 AND plan_id = $2",
        request.follower, request.from_plan, request.to_plan, change.anchor_ns, item,
        keep_allowance,
    )  # fmt: skip
    await conn.execute(
        "UPDATE billing_plan_changes SET status = 'applied', credit_minor = $2,"
        " charge_minor = $3, net_minor = $4, anchor_ns = $5, period_start_ns = $6,"
        " period_end_ns = $7, stripe_subscription = $8, reason = NULL, lease_until = NULL,"
        " updated_at = now() WHERE plan_change_id = $1",
        request.plan_change_id, change.credit_minor, change.charge_minor, change.net_minor,
        change.anchor_ns, change.period_start_ns, change.period_end_ns,
        prepared.stripe_subscription,
    )  # fmt: skip
    # A's used-up allowance stopped the follower's links under A's name: the stop follows the
    # allowance to B, or ends with it when B sells no pay-per-trade.
    provider = prepared.old.provider
    if (
        await enforcement.lift_cause(
            conn, enforcement.allowance_cause(request.follower, request.from_plan, provider)
        )
        and keep_allowance
    ):
        await enforcement.raise_cause(
            conn, enforcement.allowance_cause(request.follower, request.to_plan, provider)
        )
    # The row's trigger fires on activation only: B's template is made due here.
    await conn.execute(
        "INSERT INTO billing_provisioning_due (follower, plan_id) VALUES ($1, $2)"
        " ON CONFLICT (follower, plan_id) DO UPDATE SET due_at = now()",
        request.follower,
        request.to_plan,
    )
    return True


async def apply_plan_changes(
    pool: asyncpg.Pool, gateway: StripeGateway, *, provisioner: Provisioner | None = None,
    limit: int = 20, lease_s: float = 60.0, retry_after_s: float = 5.0,
    max_retry_s: float = 3600.0,
) -> list[tuple[str, str]]:  # fmt: skip
    """One pass over pending requests; (request id, state) of each handled in this pass:
    ``applied``, ``failed``, ``pending`` (no answer from Stripe: retried later, same key) or
    ``unchanged`` (settled meanwhile by another instance)."""
    done: list[tuple[str, str]] = []
    for request in await _claim(pool, limit, lease_s):
        state = "pending"
        reason: str | None = None
        try:
            prepared = await _prepare(pool, request)
            item: str | None = None
            stripe_answered = True
            if prepared.stripe_subscription is not None:
                item = await _change_at_stripe(gateway, request, prepared)
                stripe_answered = item is not None
            if not stripe_answered:
                # Never given up: Stripe may have applied it; the same key settles it later.
                delay = min(retry_after_s * 2 ** (request.attempts - 1), max_retry_s)
                await _retry_later(pool, request.plan_change_id, delay)
            else:
                move = functools.partial(
                    apply_change, request=request, prepared=prepared, item=item
                )
                state = "applied" if await store.serializable(pool, move) else "unchanged"
        except PlanChangeRefused as refused:
            await _fail(pool, request, refused)
            state, reason = "failed", refused.reason
        CHANGES.labels(state=state).inc()
        log_event = log.warning if state == "failed" else log.info
        log_event(
            "plan_change", plan_change_id=str(request.plan_change_id), follower=request.follower,
            from_plan=request.from_plan, to_plan=request.to_plan, state=state,
            attempts=request.attempts, reason=reason,
        )  # fmt: skip
        if state == "applied" and provisioner is not None:
            await provisioner.drain_due()
        done.append((str(request.plan_change_id), state))
    return done


async def listen(conn: asyncpg.Connection, wake: asyncio.Event) -> None:
    """Set ``wake`` whenever the API records a request (``NOTIFY billing_plan_change``)."""

    def notified(*_: Any) -> None:
        wake.set()

    await conn.add_listener(CHANNEL, notified)
