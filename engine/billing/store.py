"""Every SQL statement of billing's tables (parameterised, asyncpg), and serializable retries.

Billing owns every ``billing_*`` table (``migrations/0001_billing.sql``). Money moves only
inside ``serializable``: a transaction at SERIALIZABLE isolation that is retried, a bounded
number of times with jittered backoff, when PostgreSQL aborts it for a serialization failure or
a deadlock. A charge's row is unique by its idempotency key, and its state only moves forward
(``ChargeState``), so any number of concurrent jobs and replayed webhooks reach one outcome.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import structlog

from engine.core.errors import TradecopyError
from engine.runtime.postgres import apply_migrations, load_migrations

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
COMPONENT = "billing"

log = structlog.get_logger("tradecopy.billing.store")

T = TypeVar("T")


async def migrate(database_url: str) -> list[str]:
    """Apply billing's missing migrations; the versions applied now."""
    return await apply_migrations(
        database_url, load_migrations(MIGRATIONS_DIR), component=COMPONENT
    )


# --------------------------------------------------------------- serializable transactions


class SerializableRetriesExhausted(TradecopyError):
    """A serializable transaction kept conflicting with concurrent ones; nothing was stored."""


#: SQLSTATEs that mean "run the whole transaction again": the database rolled it back because
#: a concurrent one made its reads stale (40001) or the two waited on each other (40P01).
_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


async def serializable(
    pool: asyncpg.Pool,
    fn: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    attempts: int = 12,
    base_delay_s: float = 0.005,
    max_delay_s: float = 0.5,
) -> T:
    """Run ``fn(conn)`` in a SERIALIZABLE transaction, again from the start on a conflict.

    ``fn`` must do nothing outside the database (no Stripe call, no publish): it may run
    several times and only the last run's writes are kept. Backoff is exponential with full
    jitter, so the losers of one conflict do not collide again in step.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with pool.acquire() as conn, conn.transaction(isolation="serializable"):
                return await fn(conn)
        except _RETRYABLE as exc:
            if attempt == attempts:
                raise SerializableRetriesExhausted(
                    f"serializable transaction conflicted {attempts} times: {exc}"
                ) from exc
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2**attempt))
            log.debug("serializable_retry", attempt=attempt, sqlstate=exc.sqlstate, delay=delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------- the charge state machine


class ChargeState(enum.StrEnum):
    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    """Stripe asked for the customer (``authentication_required``): back on-session."""
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    DISPUTED = "disputed"
    DISPUTE_WON = "dispute_won"
    """The dispute closed in the provider's favour: paid, and the follower's stop lifted."""
    DISPUTE_LOST = "dispute_lost"
    """The dispute closed for the cardholder: the money went back, the stop stays."""
    REFUNDED = "refunded"


#: Each state's place in a charge's life. A charge only moves to a later state: a
#: ``payment_intent.succeeded`` after a failure (the follower paid on-session), a dispute or a
#: refund after the success. Because the order is total, applying the same set of Stripe events
#: in any order ends in the same state (the latest one), and a replay changes nothing. A dispute
#: or a refund seen before the success still means the money moved, so it may skip ahead.
_RANK: dict[ChargeState, int] = {
    ChargeState.PENDING: 0,
    ChargeState.REQUIRES_ACTION: 1,
    ChargeState.FAILED: 2,
    ChargeState.SUCCEEDED: 3,
    ChargeState.DISPUTED: 4,
    # A dispute's outcome comes after the dispute (so a late ``charge.dispute.created`` is
    # stale), won and lost share a rank (a dispute closes once: the other one is refused), and
    # a refund after a won dispute is still possible.
    ChargeState.DISPUTE_WON: 5,
    ChargeState.DISPUTE_LOST: 5,
    ChargeState.REFUNDED: 6,
}


class IllegalChargeTransition(TradecopyError):
    """A charge was asked to move back in its life (refunded → succeeded): refused."""

    def __init__(self, charge_key: str, current: ChargeState, target: ChargeState) -> None:
        super().__init__(f"charge {charge_key!r} cannot go from {current} to {target}")
        self.charge_key = charge_key
        self.current = current
        self.target = target


def can_transition(current: ChargeState, target: ChargeState) -> bool:
    """True when ``current → target`` is a step forward (the same state is not a step)."""
    return _RANK[target] > _RANK[current]


class TransitionOutcome(enum.StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    """Already in the target state: a replayed event or a second instance, nothing changes."""


# --------------------------------------------------------------- rows


class Charge(msgspec.Struct, frozen=True, kw_only=True):
    charge_id: int
    idempotency_key: str
    invoice_id: str
    module: str
    follower: str
    provider: str
    plan_id: str
    window_id: str
    currency: str
    amount_minor: int
    platform_fee_minor: int
    destination: str
    state: ChargeState
    attempts: int
    stripe_payment_intent: str | None
    stripe_charge: str | None
    failure_code: str | None
    issued_ns: int


_CHARGE_COLUMNS = (
    "charge_id, idempotency_key, invoice_id, module, follower, provider, plan_id, window_id,"
    " currency, amount_minor, platform_fee_minor, destination, state, attempts,"
    " stripe_payment_intent, stripe_charge, failure_code, issued_ns"
)


def _charge(row: asyncpg.Record) -> Charge:
    values = dict(row)
    values["state"] = ChargeState(values["state"])
    return Charge(**values)


class ChargeDraft(msgspec.Struct, frozen=True, kw_only=True):
    """An invoice and its charge, before they are stored: what one job computed."""

    idempotency_key: str
    module: str
    follower: str
    provider: str
    plan_id: str
    window_id: str
    currency: str
    amount_minor: int
    platform_fee_minor: int
    destination: str
    lines: tuple[dict[str, Any], ...]
    issued_ns: int


# --------------------------------------------------------------- plans and subscriptions


async def upsert_operator_plan(
    conn: asyncpg.Connection,
    *,
    plan_id: str,
    currency: str,
    platform_fee_percent: Decimal | str,
    account_pool_limit: int,
    modules: Sequence[str],
    recurring_minor: int = 0,
    setup_minor: int = 0,
    period: str = "monthly",
) -> None:
    await conn.execute(
        "INSERT INTO billing_operator_plans (plan_id, currency, recurring_minor, setup_minor,"
        " period, platform_fee_percent, account_pool_limit, modules)"
        " VALUES ($1, $2, $3, $4, $5, $6::numeric, $7, $8)"
        " ON CONFLICT (plan_id) DO UPDATE SET currency = EXCLUDED.currency,"
        " recurring_minor = EXCLUDED.recurring_minor, setup_minor = EXCLUDED.setup_minor,"
        " period = EXCLUDED.period, platform_fee_percent = EXCLUDED.platform_fee_percent,"
        " account_pool_limit = EXCLUDED.account_pool_limit, modules = EXCLUDED.modules",
        plan_id,
        currency,
        recurring_minor,
        setup_minor,
        period,
        str(platform_fee_percent),
        account_pool_limit,
        list(modules),
    )


async def upsert_provider(
    conn: asyncpg.Connection, *, provider: str, operator_plan: str, stripe_account: str | None
) -> None:
    await conn.execute(
        "INSERT INTO billing_providers (provider, operator_plan, stripe_account)"
        " VALUES ($1, $2, $3) ON CONFLICT (provider) DO UPDATE SET"
        " operator_plan = EXCLUDED.operator_plan,"
        " stripe_account = coalesce(EXCLUDED.stripe_account, billing_providers.stripe_account)",
        provider,
        operator_plan,
        stripe_account,
    )


async def upsert_follower_plan(
    conn: asyncpg.Connection,
    *,
    plan_id: str,
    provider: str,
    currency: str,
    modules: Sequence[str],
    subscription_price_minor: int | None = None,
    subscription_period: str | None = None,
    ppt_trades: int | None = None,
    ppt_price_minor: int | None = None,
    performance_rate: Decimal | str | None = None,
    volume_rate_per_lot_minor: Decimal | str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO billing_follower_plans (plan_id, provider, currency, modules,"
        " subscription_price_minor, subscription_period, ppt_trades, ppt_price_minor,"
        " performance_rate, volume_rate_per_lot_minor)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::numeric, $10::numeric)"
        " ON CONFLICT (plan_id) DO UPDATE SET modules = EXCLUDED.modules,"
        " subscription_price_minor = EXCLUDED.subscription_price_minor,"
        " subscription_period = EXCLUDED.subscription_period,"
        " ppt_trades = EXCLUDED.ppt_trades, ppt_price_minor = EXCLUDED.ppt_price_minor,"
        " performance_rate = EXCLUDED.performance_rate,"
        " volume_rate_per_lot_minor = EXCLUDED.volume_rate_per_lot_minor",
        plan_id,
        provider,
        currency,
        list(modules),
        subscription_price_minor,
        subscription_period,
        ppt_trades,
        ppt_price_minor,
        None if performance_rate is None else str(performance_rate),
        None if volume_rate_per_lot_minor is None else str(volume_rate_per_lot_minor),
    )


async def upsert_customer(
    conn: asyncpg.Connection, *, follower: str, stripe_customer: str, payment_method: str | None
) -> None:
    await conn.execute(
        "INSERT INTO billing_customers (follower, stripe_customer, payment_method)"
        " VALUES ($1, $2, $3) ON CONFLICT (follower) DO UPDATE SET"
        " stripe_customer = EXCLUDED.stripe_customer,"
        " payment_method = coalesce(EXCLUDED.payment_method, billing_customers.payment_method),"
        " updated_at = now()",
        follower,
        stripe_customer,
        payment_method,
    )


async def subscribe(
    conn: asyncpg.Connection,
    *,
    follower: str,
    plan_id: str,
    started_ns: int,
    start_equity_minor: int | None = None,
) -> bool:
    """Put ``follower`` on ``plan_id`` from ``started_ns``; the mark starts at the equity when
    copying starts. False when already subscribed (the stored mark is kept, never reset)."""
    status: str = await conn.execute(
        "INSERT INTO billing_subscriptions (follower, plan_id, started_ns, anchor_ns,"
        " hwm_mark_minor, hwm_flows_through_ns) VALUES ($1, $2, $3, $3, $4, $5)"
        " ON CONFLICT (follower, plan_id) DO NOTHING",
        follower,
        plan_id,
        started_ns,
        start_equity_minor,
        None if start_equity_minor is None else started_ns,
    )
    return status.endswith(" 1")


class WeeklySubscription(msgspec.Struct, frozen=True, kw_only=True):
    """An active subscription to a plan with a weekly module, and everything its charge needs."""

    follower: str
    plan_id: str
    provider: str
    currency: str
    modules: tuple[str, ...]
    performance_rate: Decimal | None
    volume_rate_per_lot_minor: Decimal | None
    platform_fee_percent: Decimal
    destination: str | None
    started_ns: int
    hwm_mark_minor: int | None
    hwm_flows_through_ns: int | None
    hwm_settled_window: str | None
    hwm_settled_end_ns: int
    volume_settled_end_ns: int


_WEEKLY = (
    "SELECT s.follower, s.plan_id, p.provider, p.currency, p.modules, p.performance_rate,"
    " p.volume_rate_per_lot_minor, o.platform_fee_percent, v.stripe_account AS destination,"
    " s.started_ns, s.hwm_mark_minor, s.hwm_flows_through_ns, s.hwm_settled_window,"
    " s.hwm_settled_end_ns, s.volume_settled_end_ns"
    " FROM billing_subscriptions s"
    " JOIN billing_follower_plans p USING (plan_id)"
    " JOIN billing_providers v ON v.provider = p.provider"
    " JOIN billing_operator_plans o ON o.plan_id = v.operator_plan"
    " WHERE s.status = 'active' AND p.modules && ARRAY['performance', 'volume']::text[]"
)


def _weekly(row: asyncpg.Record) -> WeeklySubscription:
    values = dict(row)
    values["modules"] = tuple(values["modules"])
    return WeeklySubscription(**values)


async def weekly_subscriptions(conn: asyncpg.Connection) -> list[WeeklySubscription]:
    """Active subscriptions with a performance or volume module, in (follower, plan) order."""
    rows = await conn.fetch(_WEEKLY + " ORDER BY s.follower, s.plan_id")
    return [_weekly(row) for row in rows]


async def weekly_subscription(
    conn: asyncpg.Connection, follower: str, plan_id: str
) -> WeeklySubscription | None:
    """One subscription read inside the caller's transaction (its fee state is what it folds)."""
    row = await conn.fetchrow(
        _WEEKLY + " AND s.follower = $1 AND s.plan_id = $2", follower, plan_id
    )
    return None if row is None else _weekly(row)


async def save_weekly_state(
    conn: asyncpg.Connection,
    *,
    follower: str,
    plan_id: str,
    hwm_mark_minor: int | None,
    hwm_flows_through_ns: int | None,
    hwm_settled_window: str | None,
    hwm_settled_end_ns: int,
    volume_settled_end_ns: int,
) -> None:
    await conn.execute(
        "UPDATE billing_subscriptions SET hwm_mark_minor = $3, hwm_flows_through_ns = $4,"
        " hwm_settled_window = $5, hwm_settled_end_ns = $6, volume_settled_end_ns = $7,"
        " updated_at = now() WHERE follower = $1 AND plan_id = $2",
        follower,
        plan_id,
        hwm_mark_minor,
        hwm_flows_through_ns,
        hwm_settled_window,
        hwm_settled_end_ns,
        volume_settled_end_ns,
    )


async def customer(conn: asyncpg.Connection, follower: str) -> tuple[str, str | None] | None:
    """The follower's Stripe customer and saved payment method, if set up."""
    row = await conn.fetchrow(
        "SELECT stripe_customer, payment_method FROM billing_customers WHERE follower = $1",
        follower,
    )
    return None if row is None else (row["stripe_customer"], row["payment_method"])


async def record_cash_flow(
    conn: asyncpg.Connection,
    *,
    flow_id: str,
    follower: str,
    kind: str,
    amount_minor: int,
    ts_ns: int,
) -> bool:
    """Record a deposit or withdrawal once by its id; False when already recorded."""
    status: str = await conn.execute(
        "INSERT INTO billing_cash_flows (flow_id, follower, kind, amount_minor, ts_ns)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (flow_id) DO NOTHING",
        flow_id,
        follower,
        kind,
        amount_minor,
        ts_ns,
    )
    return status.endswith(" 1")


async def cash_flows(
    conn: asyncpg.Connection, follower: str, after_ns: int, until_ns: int
) -> list[tuple[str, int, int]]:
    """(kind, amount, ts_ns) of the follower's flows in ``(after_ns, until_ns]``, in time order."""
    rows = await conn.fetch(
        "SELECT kind, amount_minor, ts_ns FROM billing_cash_flows WHERE follower = $1"
        " AND ts_ns > $2 AND ts_ns <= $3 ORDER BY ts_ns, flow_id",
        follower,
        after_ns,
        until_ns,
    )
    return [(row["kind"], row["amount_minor"], row["ts_ns"]) for row in rows]


# --------------------------------------------------------------- invoices and charges


async def insert_charge(conn: asyncpg.Connection, draft: ChargeDraft) -> bool:
    """Store the invoice and its pending charge once; False when the key is already stored.

    The invoice id is the idempotency key: one invoice per charge, and a second run that
    computed the same charge stores nothing.
    """
    status: str = await conn.execute(
        "INSERT INTO billing_invoices (invoice_id, follower, provider, plan_id, window_id,"
        " currency, total_minor, platform_fee_minor, lines, issued_ns)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)"
        " ON CONFLICT (invoice_id) DO NOTHING",
        draft.idempotency_key,
        draft.follower,
        draft.provider,
        draft.plan_id,
        draft.window_id,
        draft.currency,
        draft.amount_minor,
        draft.platform_fee_minor,
        msgspec.json.encode(list(draft.lines)).decode(),
        draft.issued_ns,
    )
    if not status.endswith(" 1"):
        return False
    charge_id = await conn.fetchval(
        "INSERT INTO billing_charges (idempotency_key, invoice_id, module, follower, provider,"
        " plan_id, window_id, currency, amount_minor, platform_fee_minor, destination,"
        " issued_ns) VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " RETURNING charge_id",
        draft.idempotency_key,
        draft.module,
        draft.follower,
        draft.provider,
        draft.plan_id,
        draft.window_id,
        draft.currency,
        draft.amount_minor,
        draft.platform_fee_minor,
        draft.destination,
        draft.issued_ns,
    )
    await conn.execute(
        "INSERT INTO billing_charge_transitions (charge_id, from_state, to_state, cause)"
        " VALUES ($1, NULL, 'pending', 'issued')",
        charge_id,
    )
    return True


async def charge_by_key(conn: asyncpg.Connection, key: str) -> Charge | None:
    row = await conn.fetchrow(
        f"SELECT {_CHARGE_COLUMNS} FROM billing_charges WHERE idempotency_key = $1", key
    )
    return None if row is None else _charge(row)


async def charge_by_payment_intent(conn: asyncpg.Connection, payment_intent: str) -> Charge | None:
    row = await conn.fetchrow(
        f"SELECT {_CHARGE_COLUMNS} FROM billing_charges WHERE stripe_payment_intent = $1",
        payment_intent,
    )
    return None if row is None else _charge(row)


async def charges(conn: asyncpg.Connection) -> list[Charge]:
    rows = await conn.fetch(f"SELECT {_CHARGE_COLUMNS} FROM billing_charges ORDER BY charge_id")
    return [_charge(row) for row in rows]


async def claim_charges_to_send(
    conn: asyncpg.Connection, *, lease_s: float, limit: int = 100, keys: Sequence[str] = ()
) -> list[Charge]:
    """Lease pending charges no gateway call has settled yet, for this caller alone.

    A charge is sent by whoever holds its lease; concurrent jobs skip it. A caller that
    crashes mid-call lets the lease run out and the next run sends the charge again under the
    same idempotency key, which Stripe answers with the first call's result.
    """
    rows = await conn.fetch(
        f"UPDATE billing_charges SET send_lease_until = now() + make_interval(secs => $1),"
        f" attempts = attempts + 1, updated_at = now()"
        f" WHERE charge_id IN (SELECT charge_id FROM billing_charges"
        f"  WHERE state = 'pending' AND stripe_payment_intent IS NULL"
        f"  AND (send_lease_until IS NULL OR send_lease_until < now())"
        f"  AND (cardinality($3::text[]) = 0 OR idempotency_key = ANY($3::text[]))"
        f"  ORDER BY charge_id LIMIT $2 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {_CHARGE_COLUMNS}",
        lease_s,
        limit,
        list(keys),
    )
    return sorted((_charge(row) for row in rows), key=lambda c: c.charge_id)


async def transition_charge(
    conn: asyncpg.Connection,
    key: str,
    target: ChargeState,
    *,
    cause: str,
    payment_intent: str | None = None,
    stripe_charge: str | None = None,
    failure_code: str | None = None,
) -> TransitionOutcome:
    """Move the charge ``key`` to ``target``; refused (``IllegalChargeTransition``) when that is
    a step back, a no-op when it is already there. Stripe ids are recorded either way (an event
    may bring the PaymentIntent id before the gateway's own answer does)."""
    row = await conn.fetchrow(
        "SELECT charge_id, state FROM billing_charges WHERE idempotency_key = $1 FOR UPDATE", key
    )
    if row is None:
        raise KeyError(key)
    current = ChargeState(row["state"])
    await conn.execute(
        "UPDATE billing_charges SET"
        " stripe_payment_intent = coalesce(stripe_payment_intent, $2),"
        " stripe_charge = coalesce($3, stripe_charge) WHERE charge_id = $1",
        row["charge_id"],
        payment_intent,
        stripe_charge,
    )
    if current is target:
        return TransitionOutcome.UNCHANGED
    if not can_transition(current, target):
        raise IllegalChargeTransition(key, current, target)
    await conn.execute(
        "UPDATE billing_charges SET state = $2, failure_code = coalesce($3, failure_code),"
        " send_lease_until = NULL, updated_at = now() WHERE charge_id = $1",
        row["charge_id"],
        target.value,
        failure_code,
    )
    await conn.execute(
        "INSERT INTO billing_charge_transitions (charge_id, from_state, to_state, cause)"
        " VALUES ($1, $2, $3, $4)",
        row["charge_id"],
        current.value,
        target.value,
        cause,
    )
    return TransitionOutcome.APPLIED


async def record_payment_intent(conn: asyncpg.Connection, key: str, payment_intent: str) -> None:
    """The gateway's answer named the PaymentIntent: the charge is sent, whatever its state."""
    await conn.execute(
        "UPDATE billing_charges SET stripe_payment_intent = coalesce(stripe_payment_intent, $2),"
        " send_lease_until = NULL, updated_at = now() WHERE idempotency_key = $1",
        key,
        payment_intent,
    )


async def charge_transitions(conn: asyncpg.Connection, key: str) -> list[tuple[str | None, str]]:
    rows = await conn.fetch(
        "SELECT t.from_state, t.to_state FROM billing_charge_transitions t"
        " JOIN billing_charges c USING (charge_id) WHERE c.idempotency_key = $1"
        " ORDER BY t.transition_id",
        key,
    )
    return [(row["from_state"], row["to_state"]) for row in rows]


# --------------------------------------------------------------- histories and revenue


class HistoryLine(msgspec.Struct, frozen=True, kw_only=True):
    """One charge as a follower or provider sees it in their billing history."""

    idempotency_key: str
    module: str
    follower: str
    provider: str
    plan_id: str
    window_id: str
    currency: str
    amount_minor: int
    platform_fee_minor: int
    provider_minor: int
    state: ChargeState
    issued_ns: int


_HISTORY = (
    "SELECT idempotency_key, module, follower, provider, plan_id, window_id, currency,"
    " amount_minor, platform_fee_minor, amount_minor - platform_fee_minor AS provider_minor,"
    " state, issued_ns FROM billing_charges"
)


def _history(rows: list[asyncpg.Record]) -> list[HistoryLine]:
    return [HistoryLine(**{**dict(r), "state": ChargeState(r["state"])}) for r in rows]


async def follower_history(conn: asyncpg.Connection, follower: str) -> list[HistoryLine]:
    """Every charge of a follower, newest first."""
    rows = await conn.fetch(
        _HISTORY + " WHERE follower = $1 ORDER BY issued_ns DESC, charge_id DESC", follower
    )
    return _history(rows)


async def provider_history(conn: asyncpg.Connection, provider: str) -> list[HistoryLine]:
    """Every charge on a provider's plans, newest first."""
    rows = await conn.fetch(
        _HISTORY + " WHERE provider = $1 ORDER BY issued_ns DESC, charge_id DESC", provider
    )
    return _history(rows)


class MonthlyRevenue(msgspec.Struct, frozen=True, kw_only=True):
    """The operator's revenue of one month (UTC, by the charge's issue instant) and currency."""

    month: str
    currency: str
    total_minor: int
    """Every charge issued."""
    platform_fee_minor: int
    """The platform's part of the charges paid (and not since refunded or disputed)."""
    paid_minor: int
    unpaid_minor: int
    """Pending, waiting for the customer, or failed."""
    reversed_minor: int
    """Refunded or disputed after payment."""


async def operator_revenue(conn: asyncpg.Connection) -> list[MonthlyRevenue]:
    """Revenue per month and currency, oldest first; money never summed across currencies."""
    rows = await conn.fetch(
        "SELECT to_char(to_timestamp(issued_ns / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM')"
        " AS month, currency,"
        " sum(amount_minor)::bigint AS total_minor,"
        " coalesce(sum(platform_fee_minor) FILTER (WHERE state IN"
        " ('succeeded', 'dispute_won')), 0)::bigint AS platform_fee_minor,"
        " coalesce(sum(amount_minor) FILTER (WHERE state IN ('succeeded', 'dispute_won')), 0)"
        "::bigint AS paid_minor,"
        " coalesce(sum(amount_minor) FILTER (WHERE state IN"
        " ('pending', 'requires_action', 'failed')), 0)::bigint AS unpaid_minor,"
        " coalesce(sum(amount_minor) FILTER (WHERE state IN"
        " ('disputed', 'dispute_lost', 'refunded')), 0)::bigint AS reversed_minor"
        " FROM billing_charges GROUP BY 1, 2 ORDER BY 1, 2"
    )
    return [MonthlyRevenue(**dict(row)) for row in rows]


# --------------------------------------------------------------- webhook events


async def insert_event(
    conn: asyncpg.Connection,
    *,
    event_id: str,
    type_: str,
    created_s: int,
    payload: bytes,
    source: str,
) -> bool:
    """Store a Stripe event once by id; False when it was already stored (a redelivery)."""
    status: str = await conn.execute(
        "INSERT INTO billing_webhook_events (event_id, type, created_s, payload, source)"
        " VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT (event_id) DO NOTHING",
        event_id,
        type_,
        created_s,
        payload.decode(),
        source,
    )
    return status.endswith(" 1")


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    type: str
    created_s: int
    payload: bytes
    attempts: int


async def claim_events(conn: asyncpg.Connection, limit: int) -> list[StoredEvent]:
    """Unprocessed events, oldest first, locked for this caller (others skip them); call inside
    a transaction that also marks them."""
    rows = await conn.fetch(
        "SELECT event_id, type, created_s, payload::text AS payload, attempts"
        " FROM billing_webhook_events WHERE processed_at IS NULL"
        " ORDER BY created_s, event_id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return [StoredEvent(**{**dict(row), "payload": row["payload"].encode()}) for row in rows]


async def mark_event_processed(conn: asyncpg.Connection, event_id: str) -> None:
    await conn.execute(
        "UPDATE billing_webhook_events SET processed_at = now(), attempts = attempts + 1,"
        " last_error = NULL WHERE event_id = $1",
        event_id,
    )


async def mark_event_deferred(conn: asyncpg.Connection, event_id: str, error: str) -> None:
    """Not processable yet (its charge is not stored): tried again by the next pass."""
    await conn.execute(
        "UPDATE billing_webhook_events SET attempts = attempts + 1, last_error = $2"
        " WHERE event_id = $1",
        event_id,
        error,
    )


async def unprocessed_event_ids(conn: asyncpg.Connection, limit: int) -> list[str]:
    """Ids of events not processed yet, oldest first (a pass takes each in its own
    transaction, so one that must wait does not hold up the rest)."""
    rows = await conn.fetch(
        "SELECT event_id FROM billing_webhook_events WHERE processed_at IS NULL"
        " ORDER BY created_s, event_id LIMIT $1",
        limit,
    )
    return [row["event_id"] for row in rows]


async def lock_unprocessed_event(conn: asyncpg.Connection, event_id: str) -> StoredEvent | None:
    """The event, locked for this transaction; None when processed or held by another worker."""
    row = await conn.fetchrow(
        "SELECT event_id, type, created_s, payload::text AS payload, attempts"
        " FROM billing_webhook_events WHERE event_id = $1 AND processed_at IS NULL"
        " FOR UPDATE SKIP LOCKED",
        event_id,
    )
    if row is None:
        return None
    return StoredEvent(**{**dict(row), "payload": row["payload"].encode()})


async def notify_follower(
    conn: asyncpg.Connection, *, kind: str, charge: Charge, payment_intent: str | None
) -> bool:
    """Ask the follower to act on ``charge`` (once per kind and charge)."""
    status: str = await conn.execute(
        "INSERT INTO billing_notifications (notification_id, follower, kind, charge_key,"
        " payment_intent) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        f"{kind}:{charge.idempotency_key}",
        charge.follower,
        kind,
        charge.idempotency_key,
        payment_intent,
    )
    return status.endswith(" 1")


async def notifications(conn: asyncpg.Connection, follower: str) -> list[tuple[str, str]]:
    """(kind, charge key) of every notification to ``follower``, oldest first."""
    rows = await conn.fetch(
        "SELECT kind, charge_key FROM billing_notifications WHERE follower = $1"
        " ORDER BY created_at, notification_id",
        follower,
    )
    return [(row["kind"], row["charge_key"]) for row in rows]


async def latest_event_created(conn: asyncpg.Connection) -> int | None:
    """The newest event's ``created`` (seconds): recovery lists from a little before it."""
    value: int | None = await conn.fetchval("SELECT max(created_s) FROM billing_webhook_events")
    return value


async def unprocessed_event_count(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM billing_webhook_events WHERE processed_at IS NULL"
    )
    return count


async def prune_events(conn: asyncpg.Connection, before_s: int) -> int:
    """Delete processed events created before ``before_s``; unprocessed ones are kept."""
    status: str = await conn.execute(
        "DELETE FROM billing_webhook_events WHERE processed_at IS NOT NULL AND created_s < $1",
        before_s,
    )
    return int(status.rsplit(" ", 1)[1])


# --------------------------------------------------------------- job runs


async def job_run_finished(conn: asyncpg.Connection, job: str, run_key: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT finished_at IS NOT NULL FROM billing_job_runs WHERE job = $1 AND run_key = $2",
            job,
            run_key,
        )
    )


async def start_job_run(conn: asyncpg.Connection, job: str, run_key: str) -> None:
    await conn.execute(
        "INSERT INTO billing_job_runs (job, run_key) VALUES ($1, $2)"
        " ON CONFLICT (job, run_key) DO NOTHING",
        job,
        run_key,
    )


async def finish_job_run(
    conn: asyncpg.Connection, job: str, run_key: str, summary: dict[str, Any]
) -> None:
    await conn.execute(
        "UPDATE billing_job_runs SET finished_at = coalesce(finished_at, now()),"
        " summary = $3::jsonb WHERE job = $1 AND run_key = $2",
        job,
        run_key,
        msgspec.json.encode(summary).decode(),
    )


async def last_finished_run(conn: asyncpg.Connection, job: str) -> str | None:
    """The newest finished run key of ``job`` (weekly run keys are window ids: they sort)."""
    value: str | None = await conn.fetchval(
        "SELECT max(run_key) FROM billing_job_runs WHERE job = $1 AND finished_at IS NOT NULL",
        job,
    )
    return value


# --------------------------------------------------------------- enforcement (0003)


class EnforcementCause(msgspec.Struct, frozen=True, kw_only=True):
    """One reason to stop copying (``billing_enforcement``)."""

    scope: str
    """provider | follower | account"""
    subject: str
    cause: str
    provider: str | None = None
    """For a follower: only links into this provider's masters (None: all of its links)."""


class EnforcementRow(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    subject: str
    cause: str
    provider: str | None
    state: str
    needs_apply: bool


_ENFORCEMENT_COLUMNS = "scope, subject, cause, provider, state, needs_apply"


async def upsert_account_owner(
    conn: asyncpg.Connection, *, account_id: str, provider: str, follower: str | None
) -> None:
    """Record which provider (and, for a follower account, which follower) owns an account."""
    await conn.execute(
        "INSERT INTO billing_accounts (account_id, provider, follower) VALUES ($1, $2, $3)"
        " ON CONFLICT (account_id) DO UPDATE SET provider = EXCLUDED.provider,"
        " follower = EXCLUDED.follower",
        account_id,
        provider,
        follower,
    )


async def delete_account_owner(conn: asyncpg.Connection, account_id: str) -> None:
    await conn.execute("DELETE FROM billing_accounts WHERE account_id = $1", account_id)


async def account_owners(conn: asyncpg.Connection) -> dict[str, tuple[str, str | None]]:
    """account id → (provider, follower or None)."""
    rows = await conn.fetch("SELECT account_id, provider, follower FROM billing_accounts")
    return {row["account_id"]: (row["provider"], row["follower"]) for row in rows}


async def set_enforcement(conn: asyncpg.Connection, cause: EnforcementCause, state: str) -> bool:
    """Activate or lift ``cause``; True when its state changed (then it waits to be applied).
    Lifting a cause that was never raised records nothing."""
    if state == "active":
        status: str = await conn.execute(
            "INSERT INTO billing_enforcement (scope, subject, cause, provider, state)"
            " VALUES ($1, $2, $3, $4, 'active') ON CONFLICT (scope, subject, cause) DO UPDATE"
            " SET state = 'active', needs_apply = true, lifted_at = NULL, updated_at = now(),"
            " provider = EXCLUDED.provider WHERE billing_enforcement.state <> 'active'",
            cause.scope,
            cause.subject,
            cause.cause,
            cause.provider,
        )
    else:
        status = await conn.execute(
            "UPDATE billing_enforcement SET state = 'lifted', needs_apply = true,"
            " lifted_at = now(), updated_at = now()"
            " WHERE scope = $1 AND subject = $2 AND cause = $3 AND state = 'active'",
            cause.scope,
            cause.subject,
            cause.cause,
        )
    return status.endswith(" 1")


async def enforcement_rows(
    conn: asyncpg.Connection, *, state: str | None = None, needs_apply: bool | None = None
) -> list[EnforcementRow]:
    rows = await conn.fetch(
        f"SELECT {_ENFORCEMENT_COLUMNS} FROM billing_enforcement"
        " WHERE ($1::text IS NULL OR state = $1) AND ($2::boolean IS NULL OR needs_apply = $2)"
        " ORDER BY started_at, scope, subject, cause",
        state,
        needs_apply,
    )
    return [EnforcementRow(**dict(row)) for row in rows]


async def mark_enforcement_applied(
    conn: asyncpg.Connection, row: EnforcementRow | EnforcementCause
) -> None:
    await conn.execute(
        "UPDATE billing_enforcement SET needs_apply = false"
        " WHERE scope = $1 AND subject = $2 AND cause = $3",
        row.scope,
        row.subject,
        row.cause,
    )


class EnforcedLink(msgspec.Struct, frozen=True, kw_only=True):
    link_id: str
    billing_disabled: bool
    status: str
    attempts: int
    last_error: str | None


async def enforced_links(conn: asyncpg.Connection) -> dict[str, EnforcedLink]:
    rows = await conn.fetch(
        "SELECT link_id, billing_disabled, status, attempts, last_error FROM billing_enforced_links"
    )
    return {row["link_id"]: EnforcedLink(**dict(row)) for row in rows}


async def hold_link(
    conn: asyncpg.Connection, link_id: str, *, billing_disabled: bool, status: str = "applied"
) -> None:
    """Record that billing holds ``link_id`` stopped; ``billing_disabled`` only ever turns
    true here (once billing wrote the stop, a later pass that finds it stopped keeps that)."""
    await conn.execute(
        "INSERT INTO billing_enforced_links (link_id, billing_disabled, status)"
        " VALUES ($1, $2, $3) ON CONFLICT (link_id) DO UPDATE SET"
        " billing_disabled = billing_enforced_links.billing_disabled OR EXCLUDED.billing_disabled,"
        " status = EXCLUDED.status, attempts = 0, last_error = NULL, updated_at = now()",
        link_id,
        billing_disabled,
        status,
    )


async def set_link_billing_disabled(
    conn: asyncpg.Connection, link_id: str, billing_disabled: bool
) -> None:
    await conn.execute(
        "UPDATE billing_enforced_links SET billing_disabled = $2, updated_at = now()"
        " WHERE link_id = $1",
        link_id,
        billing_disabled,
    )


async def link_failed(
    conn: asyncpg.Connection,
    link_id: str,
    *,
    status: str,
    attempts: int,
    error: str,
    billing_disabled: bool,
) -> None:
    """Retries ran out for ``link_id``: recorded for the daily recheck. ``billing_disabled``:
    billing tried to stop an enabled link, and the write may have landed unseen."""
    await conn.execute(
        "INSERT INTO billing_enforced_links (link_id, billing_disabled, status, attempts,"
        " last_error) VALUES ($1, $5, $2, $3, $4) ON CONFLICT (link_id) DO UPDATE SET"
        " billing_disabled = billing_enforced_links.billing_disabled OR EXCLUDED.billing_disabled,"
        " status = EXCLUDED.status, attempts = EXCLUDED.attempts,"
        " last_error = EXCLUDED.last_error, updated_at = now()",
        link_id,
        status,
        attempts,
        error,
        billing_disabled,
    )


async def release_link(conn: asyncpg.Connection, link_id: str) -> None:
    await conn.execute("DELETE FROM billing_enforced_links WHERE link_id = $1", link_id)


async def deletion_state(conn: asyncpg.Connection, account_id: str) -> str | None:
    value: str | None = await conn.fetchval(
        "SELECT state FROM billing_account_deletions WHERE account_id = $1", account_id
    )
    return value


async def set_deletion_state(
    conn: asyncpg.Connection, account_id: str, state: str, error: str | None = None
) -> None:
    await conn.execute(
        "INSERT INTO billing_account_deletions (account_id, state, error) VALUES ($1, $2, $3)"
        " ON CONFLICT (account_id) DO UPDATE SET state = EXCLUDED.state,"
        " error = EXCLUDED.error, updated_at = now()",
        account_id,
        state,
        error,
    )


async def set_subscription_status(
    conn: asyncpg.Connection, follower: str, plan_id: str, status: str
) -> str | None:
    """Set a subscription's status; its plan's provider, or None when there is no such one."""
    value: str | None = await conn.fetchval(
        "UPDATE billing_subscriptions s SET status = $3, updated_at = now()"
        " FROM billing_follower_plans p WHERE p.plan_id = s.plan_id"
        " AND s.follower = $1 AND s.plan_id = $2 RETURNING p.provider",
        follower,
        plan_id,
        status,
    )
    return value


async def plan_provider(conn: asyncpg.Connection, plan_id: str) -> str | None:
    value: str | None = await conn.fetchval(
        "SELECT provider FROM billing_follower_plans WHERE plan_id = $1", plan_id
    )
    return value


async def enforcement_failed(
    conn: asyncpg.Connection, cause: EnforcementRow | EnforcementCause, error: str
) -> None:
    """A cause could not be applied (NATS unreachable): it stays to be applied again."""
    await conn.execute(
        "UPDATE billing_enforcement SET last_error = $4"
        " WHERE scope = $1 AND subject = $2 AND cause = $3",
        cause.scope,
        cause.subject,
        cause.cause,
        error,
    )


# --------------------------------------------------------------- email outbox (0003)


class OutboxEmail(msgspec.Struct, frozen=True, kw_only=True):
    email_id: str
    provider: str
    kind: str
    language: str
    recipient: str
    subject: str
    body_text: str
    body_html: str
    attempts: int


_OUTBOX_COLUMNS = (
    "email_id, provider, kind, language, recipient, subject, body_text, body_html, attempts"
)


async def save_contact(conn: asyncpg.Connection, follower: str, email: str, language: str) -> None:
    await conn.execute(
        "INSERT INTO billing_contacts (follower, email, language) VALUES ($1, $2, $3)"
        " ON CONFLICT (follower) DO UPDATE SET email = EXCLUDED.email,"
        " language = EXCLUDED.language, updated_at = now()",
        follower,
        email,
        language,
    )


async def save_smtp_settings(conn: asyncpg.Connection, provider: str, sealed: str) -> None:
    await conn.execute(
        "INSERT INTO billing_smtp_settings (provider, settings_sealed) VALUES ($1, $2)"
        " ON CONFLICT (provider) DO UPDATE SET settings_sealed = EXCLUDED.settings_sealed,"
        " updated_at = now()",
        provider,
        sealed,
    )


async def smtp_settings_sealed(conn: asyncpg.Connection, provider: str) -> str | None:
    value: str | None = await conn.fetchval(
        "SELECT settings_sealed FROM billing_smtp_settings WHERE provider = $1", provider
    )
    return value


async def queue_email(conn: asyncpg.Connection, email: OutboxEmail) -> bool:
    """Put a rendered email in the outbox once by its id; False when it is there already."""
    status: str = await conn.execute(
        "INSERT INTO billing_email_outbox (email_id, provider, kind, language, recipient,"
        " subject, body_text, body_html) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (email_id) DO NOTHING",
        email.email_id,
        email.provider,
        email.kind,
        email.language,
        email.recipient,
        email.subject,
        email.body_text,
        email.body_html,
    )
    return status.endswith(" 1")


async def claim_due_emails(
    conn: asyncpg.Connection, *, lease_s: float, limit: int
) -> list[OutboxEmail]:
    """Due emails, leased to this caller (its attempt counted): others skip them until the
    lease runs out, so a sender that crashes mid-send has its emails sent again."""
    rows = await conn.fetch(
        f"UPDATE billing_email_outbox SET attempts = attempts + 1,"
        f" next_attempt_at = now() + make_interval(secs => $1)"
        f" WHERE email_id IN (SELECT email_id FROM billing_email_outbox"
        f"  WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()"
        f"  ORDER BY created_at, email_id LIMIT $2 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {_OUTBOX_COLUMNS}",
        lease_s,
        limit,
    )
    return sorted((OutboxEmail(**dict(r)) for r in rows), key=lambda e: e.email_id)


async def email_sent(conn: asyncpg.Connection, email_id: str) -> None:
    await conn.execute(
        "UPDATE billing_email_outbox SET sent_at = now(), last_error = NULL WHERE email_id = $1",
        email_id,
    )


async def email_retry(
    conn: asyncpg.Connection, email_id: str, *, after_s: float, error: str, give_up: bool
) -> None:
    await conn.execute(
        "UPDATE billing_email_outbox SET last_error = $2,"
        " next_attempt_at = now() + make_interval(secs => $3),"
        " failed_at = CASE WHEN $4 THEN now() END WHERE email_id = $1",
        email_id,
        error,
        after_s,
        give_up,
    )


async def outbox_state(conn: asyncpg.Connection) -> list[tuple[str, int, bool, str | None]]:
    """(email id, attempts, sent, last error) of every email, in id order."""
    rows = await conn.fetch(
        "SELECT email_id, attempts, sent_at IS NOT NULL AS sent, last_error"
        " FROM billing_email_outbox ORDER BY email_id"
    )
    return [(r["email_id"], r["attempts"], r["sent"], r["last_error"]) for r in rows]


class PendingNotification(msgspec.Struct, frozen=True, kw_only=True):
    """A ``billing_notifications`` row not in the outbox yet, with its charge and contact."""

    notification_id: str
    kind: str
    follower: str
    charge_key: str
    provider: str
    currency: str
    amount_minor: int
    module: str
    window_id: str
    email: str
    language: str


async def notifications_to_queue(conn: asyncpg.Connection, limit: int) -> list[PendingNotification]:
    """Notifications not rendered yet whose follower has a contact (the others wait for one),
    locked for this transaction."""
    rows = await conn.fetch(
        "SELECT n.notification_id, n.kind, n.follower, n.charge_key, c.provider, c.currency,"
        " c.amount_minor, c.module, c.window_id, k.email, k.language"
        " FROM billing_notifications n"
        " JOIN billing_charges c ON c.idempotency_key = n.charge_key"
        " JOIN billing_contacts k ON k.follower = n.follower"
        " WHERE n.queued_at IS NULL ORDER BY n.created_at, n.notification_id LIMIT $1"
        " FOR UPDATE OF n SKIP LOCKED",
        limit,
    )
    return [PendingNotification(**dict(r)) for r in rows]


async def notification_queued(conn: asyncpg.Connection, notification_id: str) -> None:
    await conn.execute(
        "UPDATE billing_notifications SET queued_at = now() WHERE notification_id = $1",
        notification_id,
    )


# --------------------------------------------------------------- subscription and pay-per-trade


class PeriodSubscription(msgspec.Struct, frozen=True, kw_only=True):
    """An active subscription to a plan with a subscription or pay-per-trade module."""

    follower: str
    plan_id: str
    provider: str
    currency: str
    modules: tuple[str, ...]
    subscription_price_minor: int | None
    subscription_period: str | None
    ppt_trades: int | None
    ppt_price_minor: int | None
    platform_fee_percent: Decimal
    destination: str | None
    started_ns: int
    anchor_ns: int
    ppt_purchase_id: str | None
    ppt_trades_bought: int
    ppt_counted: tuple[str, ...]
    ppt_over: tuple[str, ...]
    ppt_purchased_ns: int | None = None
    """When the current allowance was bought (``migrations/0005``); its copies count from then."""


_PERIOD = (
    "SELECT s.follower, s.plan_id, p.provider, p.currency, p.modules,"
    " p.subscription_price_minor, p.subscription_period, p.ppt_trades, p.ppt_price_minor,"
    " o.platform_fee_percent, v.stripe_account AS destination, s.started_ns, s.anchor_ns,"
    " s.ppt_purchase_id, s.ppt_trades_bought, s.ppt_counted, s.ppt_over, s.ppt_purchased_ns"
    " FROM billing_subscriptions s"
    " JOIN billing_follower_plans p USING (plan_id)"
    " JOIN billing_providers v ON v.provider = p.provider"
    " JOIN billing_operator_plans o ON o.plan_id = v.operator_plan"
    " WHERE s.status = 'active' AND p.modules && ARRAY['subscription', 'pay_per_trade']::text[]"
)


def _period(row: asyncpg.Record) -> PeriodSubscription:
    values = dict(row)
    for column in ("modules", "ppt_counted", "ppt_over"):
        values[column] = tuple(values[column])
    return PeriodSubscription(**values)


async def period_subscriptions(conn: asyncpg.Connection) -> list[PeriodSubscription]:
    """Active subscriptions with a subscription or pay-per-trade module, (follower, plan) order."""
    rows = await conn.fetch(_PERIOD + " ORDER BY s.follower, s.plan_id")
    return [_period(row) for row in rows]


async def period_subscription(
    conn: asyncpg.Connection, follower: str, plan_id: str
) -> PeriodSubscription | None:
    """One subscription read inside the caller's transaction (its allowance is what it folds)."""
    row = await conn.fetchrow(
        _PERIOD + " AND s.follower = $1 AND s.plan_id = $2", follower, plan_id
    )
    return None if row is None else _period(row)


async def save_allowance(
    conn: asyncpg.Connection,
    *,
    follower: str,
    plan_id: str,
    purchase_id: str,
    trades_bought: int,
    counted: Sequence[str],
    over: Sequence[str],
    purchased_ns: int | None = None,
) -> None:
    """Store the allowance's state; ``purchased_ns``: when a new purchase was bought (left
    out, a new purchase id is stamped with the transaction's time)."""
    await conn.execute(
        "UPDATE billing_subscriptions SET ppt_purchase_id = $3, ppt_trades_bought = $4,"
        " ppt_counted = $5, ppt_over = $6,"
        " ppt_purchased_ns = coalesce($7, ppt_purchased_ns), updated_at = now()"
        " WHERE follower = $1 AND plan_id = $2",
        follower,
        plan_id,
        purchase_id,
        trades_bought,
        list(counted),
        list(over),
        purchased_ns,
    )


async def restart_subscription(
    conn: asyncpg.Connection,
    *,
    follower: str,
    plan_id: str,
    started_ns: int,
    start_equity_minor: int | None,
) -> None:
    """Start ``follower``'s fee state on ``plan_id`` over from ``started_ns``: for an account
    that itself starts over (the demo's paper accounts are new on every run), whose old mark
    and settled windows describe an account that no longer exists."""
    await conn.execute(
        "UPDATE billing_subscriptions SET status = 'active', started_ns = $3, anchor_ns = $3,"
        " hwm_mark_minor = $4, hwm_flows_through_ns = $5, hwm_settled_window = NULL,"
        " hwm_settled_end_ns = 0, volume_settled_end_ns = 0, ppt_purchase_id = NULL,"
        " ppt_trades_bought = 0, ppt_counted = '{}', ppt_over = '{}', updated_at = now()"
        " WHERE follower = $1 AND plan_id = $2",
        follower,
        plan_id,
        started_ns,
        start_equity_minor,
        None if start_equity_minor is None else started_ns,
    )


# --------------------------------------------------------------- scheduled period charges


async def stripe_managed_subscriptions(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    """(follower, plan) of active subscriptions Stripe renews itself (bought through Checkout)."""
    rows = await conn.fetch(
        "SELECT follower, plan_id FROM billing_subscriptions"
        " WHERE status = 'active' AND stripe_subscription IS NOT NULL"
    )
    return {(row["follower"], row["plan_id"]) for row in rows}


async def last_charged_period_start(
    conn: asyncpg.Connection, follower: str, plan_id: str, module: str
) -> str | None:
    """The newest period id (``20260401T000000Z``, which sorts) charged for ``module``; charges
    over other windows (the demo's, a weekly window) are not periods and are passed over."""
    value: str | None = await conn.fetchval(
        "SELECT max(window_id) FROM billing_charges WHERE follower = $1 AND plan_id = $2"
        " AND module = $3 AND window_id ~ '^[0-9]{8}T[0-9]{6}Z$'",
        follower,
        plan_id,
        module,
    )
    return value


# --------------------------------------------------------------- account owners (API view)


class AccountOwners(msgspec.Struct, frozen=True, kw_only=True):
    accounts: dict[str, tuple[str, str | None]]
    """account id → (provider, follower or None)."""
    api_available: bool
    """The API's ``api_billing_account_owners()`` is in this database."""


async def all_account_owners(conn: asyncpg.Connection) -> AccountOwners:
    """Every account's owner: the API's ``api_billing_account_owners()`` (its accounts, tenant =
    provider, owner user = follower), with ``billing_accounts`` for accounts the API does not
    know (registered without it). A billing-only database has no API function: then
    ``billing_accounts`` alone, and ``api_available`` False."""
    owners = await account_owners(conn)
    available = bool(
        await conn.fetchval("SELECT to_regprocedure('api_billing_account_owners()') IS NOT NULL")
    )
    if available:
        rows = await conn.fetch(
            "SELECT account_id, provider, follower FROM api_billing_account_owners()"
        )
        owners.update({row["account_id"]: (row["provider"], row["follower"]) for row in rows})
    return AccountOwners(accounts=owners, api_available=available)


async def contact(conn: asyncpg.Connection, follower: str) -> tuple[str, str] | None:
    """The follower's email address and language, when billing has them."""
    row = await conn.fetchrow(
        "SELECT email, language FROM billing_contacts WHERE follower = $1", follower
    )
    return None if row is None else (row["email"], row["language"])
