"""Stripe webhooks: signature check, store once by event id, apply later, recover missed ones.

Receiving only verifies and stores (``billing_webhook_events``, unique by event id), so Stripe
gets its 2xx fast and a redelivery stores nothing. A worker applies stored events to charges
afterwards, each in its own serializable transaction with marking it processed. Charges only
move forward (``store.ChargeState``), so events applied in any order, or twice, end in the same
state; an event about a charge not known yet waits in the table for a later pass. Events the
endpoint never got are found by listing them from Stripe (``recover_missed_events``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import asyncpg
import msgspec
import structlog
from aiohttp import web

from engine.billing import checkout, enforcement, metrics, onboarding, store
from engine.billing.gateway import StripeGateway
from engine.billing.store import ChargeState, IllegalChargeTransition
from engine.core.errors import TradecopyError

log = structlog.get_logger("tradecopy.billing.webhooks")

#: How far in the past a webhook's ``t`` may be (and how far ahead, for a skewed clock).
TOLERANCE_S = 300
#: Listing for recovery starts this long before the newest stored event: Stripe's ``created``
#: is per second and events are not delivered in creation order.
RECOVERY_OVERLAP_S = 3600


class SignatureError(TradecopyError):
    """A webhook's ``Stripe-Signature`` does not prove it came from Stripe, now."""


def verify_signature(
    payload: bytes, header: str | None, secret: str, *, now_s: int, tolerance_s: int = TOLERANCE_S
) -> None:
    """Check ``Stripe-Signature: t=…,v1=…[,v1=…]`` over the raw body.

    The signed message is ``"{t}.{raw body}"``, HMAC-SHA256 with the endpoint secret; any
    ``v1`` may match (Stripe sends one per active secret while a secret rolls), each compared
    in constant time; ``t`` more than ``tolerance_s`` from now, either way, is refused (a
    replay of an old delivery).
    """
    if not header:
        raise SignatureError("no Stripe-Signature header")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("a Stripe-Signature item is not name=value")
        if name == "t":
            timestamps.append(value)
        elif name == "v1":
            signatures.append(value)
    if len(timestamps) != 1 or not timestamps[0].isdigit():
        raise SignatureError("Stripe-Signature needs exactly one numeric t")
    if not signatures:
        raise SignatureError("Stripe-Signature has no v1 signature")
    signed = timestamps[0].encode() + b"." + payload
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
    matched = False
    for candidate in signatures:
        # Every candidate is compared (no early exit) so timing says nothing about which.
        matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise SignatureError("no v1 signature matches the payload")
    if abs(now_s - int(timestamps[0])) > tolerance_s:
        raise SignatureError("the signature's timestamp is outside the tolerance")


class _EventHead(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int


async def store_event(pool: asyncpg.Pool, payload: bytes, *, source: str) -> bool:
    """Store one Stripe event (already verified, or listed from Stripe); False if it was."""
    head = msgspec.json.decode(payload, type=_EventHead)
    async with pool.acquire() as conn:
        stored = await store.insert_event(
            conn,
            event_id=head.id,
            type_=head.type,
            created_s=head.created,
            payload=payload,
            source=source,
        )
    metrics.EVENTS_RECEIVED.labels(source=source, duplicate=str(not stored).lower()).inc()
    log.info(
        "stripe_event_stored" if stored else "stripe_event_duplicate",
        event_id=head.id,
        type=head.type,
        source=source,
    )
    return stored


def webhook_routes(
    pool: asyncpg.Pool, secret: str, path: str = "/stripe/webhook"
) -> web.RouteTableDef:
    """The endpoint Stripe posts to: 400 on a bad signature or body, 200 once stored."""
    routes = web.RouteTableDef()

    @routes.post(path)
    async def receive(request: web.Request) -> web.Response:
        payload = await request.read()
        try:
            verify_signature(
                payload, request.headers.get("Stripe-Signature"), secret, now_s=int(time.time())
            )
            await store_event(pool, payload, source="webhook")
        except SignatureError as exc:
            metrics.WEBHOOKS_REFUSED.labels(reason="signature").inc()
            log.warning("stripe_webhook_refused", reason=str(exc))
            return web.json_response({"error": "signature"}, status=400)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            metrics.WEBHOOKS_REFUSED.labels(reason="payload").inc()
            log.warning("stripe_webhook_refused", reason=str(exc))
            return web.json_response({"error": "payload"}, status=400)
        return web.json_response({"received": True})

    return routes


# --------------------------------------------------------------- applying events


class EventOutcome(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    result: str
    """applied | unchanged | stale | ignored | deferred"""


def _object(event: dict[str, Any]) -> dict[str, Any]:
    obj = event.get("data", {}).get("object", {})
    return obj if isinstance(obj, dict) else {}


def _target(event_type: str, obj: dict[str, Any]) -> ChargeState | None:
    if event_type == "payment_intent.succeeded":
        return ChargeState.SUCCEEDED
    if event_type == "payment_intent.requires_action":
        return ChargeState.REQUIRES_ACTION
    if event_type == "payment_intent.payment_failed":
        error = obj.get("last_payment_error") or {}
        if error.get("code") == "authentication_required":
            return ChargeState.REQUIRES_ACTION
        return ChargeState.FAILED
    if event_type == "charge.refunded":
        return ChargeState.REFUNDED
    if event_type == "charge.dispute.created":
        return ChargeState.DISPUTED
    if event_type == "charge.dispute.closed":
        # Stripe closes a dispute as won or lost; ``warning_closed`` (an inquiry that never
        # became a dispute) and anything else leave the charge as it is.
        return _DISPUTE_OUTCOME.get(str(obj.get("status")))
    return None


_DISPUTE_OUTCOME = {"won": ChargeState.DISPUTE_WON, "lost": ChargeState.DISPUTE_LOST}


async def _find_charge(conn: asyncpg.Connection, obj: dict[str, Any]) -> store.Charge | None:
    key = (obj.get("metadata") or {}).get("charge_key")
    if key:
        return await store.charge_by_key(conn, key)
    intent = obj.get("payment_intent") if obj.get("object") != "payment_intent" else obj["id"]
    if isinstance(intent, str):
        return await store.charge_by_payment_intent(conn, intent)
    return None


async def apply_event(conn: asyncpg.Connection, event: store.StoredEvent) -> str:
    """Apply one stored event to its charge inside the caller's transaction; the result."""
    body = msgspec.json.decode(event.payload)
    obj = _object(body)
    if event.type in checkout.EVENT_TYPES:
        # A plan bought through Checkout: activated once, in this transaction.
        return await checkout.apply_checkout_event(
            conn, event.type, event.event_id, event.created_s, obj
        )
    if event.type == onboarding.ACCOUNT_EVENT:
        # A provider's Express account: whether it may take charges and receive payouts.
        return await onboarding.apply_account_event(conn, event.event_id, event.created_s, obj)
    target = _target(event.type, obj)
    if target is None:
        return "ignored"
    if not (obj.get("metadata") or {}).get("charge_key") and not (
        obj.get("object") == "dispute" or obj.get("payment_intent")
    ):
        return "ignored"  # a payment that is not one of our charges (a Stripe invoice, say)
    charge = await _find_charge(conn, obj)
    if charge is None:
        return "deferred"
    intent = obj["id"] if obj.get("object") == "payment_intent" else obj.get("payment_intent")
    stripe_charge = obj["id"] if obj.get("object") == "charge" else None
    error = obj.get("last_payment_error") or {}
    try:
        outcome = await store.transition_charge(
            conn,
            charge.idempotency_key,
            target,
            cause=f"{event.type} {event.event_id}",
            payment_intent=intent if isinstance(intent, str) else None,
            stripe_charge=stripe_charge,
            failure_code=error.get("code"),
        )
    except IllegalChargeTransition:
        # Stripe delivers in no particular order: this event describes a state the charge
        # has already left (a success after its refund), so it changes nothing.
        return "stale"
    if outcome == "applied":
        await charge_moved(conn, charge, target, intent if isinstance(intent, str) else None)
    return str(outcome)


#: What a follower is told when a charge reaches a state.
_NOTIFY = {
    ChargeState.REQUIRES_ACTION: "authentication_required",
    ChargeState.FAILED: "payment_failed",
    ChargeState.SUCCEEDED: "payment_succeeded",
    ChargeState.DISPUTED: "dispute_opened",
}


async def charge_moved(
    conn: asyncpg.Connection,
    charge: store.Charge,
    target: ChargeState,
    payment_intent: str | None,
) -> None:
    """What follows a charge's step, in the transaction that made it: the follower's
    notification, and enforcement (a failed or disputed charge stops the follower's links to
    the provider; a payment lifts it). The links themselves are written after the commit."""
    kind = _NOTIFY.get(target)
    if kind is not None:
        await store.notify_follower(conn, kind=kind, charge=charge, payment_intent=payment_intent)
    if target in (ChargeState.FAILED, ChargeState.DISPUTED, ChargeState.DISPUTE_LOST):
        await enforcement.raise_cause(conn, enforcement.charge_cause(charge))
    elif target in (ChargeState.SUCCEEDED, ChargeState.DISPUTE_WON):
        await enforcement.lift_cause(conn, enforcement.charge_cause(charge))


async def process_stored_events(pool: asyncpg.Pool, *, limit: int = 500) -> list[EventOutcome]:
    """One pass over the unprocessed events, oldest first, each in its own transaction."""
    async with pool.acquire() as conn:
        ids = await store.unprocessed_event_ids(conn, limit)
    outcomes: list[EventOutcome] = []
    for event_id in ids:

        async def apply(conn: asyncpg.Connection, event_id: str = event_id) -> str | None:
            event = await store.lock_unprocessed_event(conn, event_id)
            if event is None:
                return None  # processed meanwhile, or another worker holds it
            result = await apply_event(conn, event)
            if result == "deferred":
                await store.mark_event_deferred(
                    conn, event_id, "its charge or its provider's account is not stored yet"
                )
            else:
                await store.mark_event_processed(conn, event_id)
            return result

        result = await store.serializable(pool, apply)
        if result is not None:
            metrics.EVENTS_APPLIED.labels(result=result).inc()
            log.info("stripe_event_applied", event_id=event_id, result=result)
            outcomes.append(EventOutcome(event_id=event_id, result=result))
    return outcomes


async def recover_missed_events(
    pool: asyncpg.Pool, gateway: StripeGateway, *, since_s: int | None = None
) -> int:
    """List events from Stripe and store those the endpoint never got; how many were new.

    Without ``since_s`` the listing starts an hour before the newest stored event (everything
    Stripe still lists when none is stored yet).
    """
    if since_s is None:
        async with pool.acquire() as conn:
            latest = await store.latest_event_created(conn)
        since_s = 0 if latest is None else max(latest - RECOVERY_OVERLAP_S, 0)
    new = 0
    async for event in gateway.events_since(since_s):
        if await store_event(pool, msgspec.json.encode(event), source="recovery"):
            new += 1
    log.info("stripe_events_recovered", new=new, since_s=since_s)
    return new
