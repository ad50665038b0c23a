"""Stripe Connect through the official SDK: onboarding, customers and their saved payment
methods, destination charges, plans.

Every call goes through ``stripe.StripeClient`` (its async methods over aiohttp). A call's
outcome is reported only on definitive evidence: a card decline is ``FAILED``, a request for
the customer (``authentication_required``) is ``REQUIRES_ACTION``; a timeout, a dropped
connection, a 409 or a 5xx is ``UNKNOWN``, and the caller sends the same request again later
under the same idempotency key, which Stripe answers with the first result instead of charging
twice. The SDK's own retries are off: the key, the lease and the retry belong to the job.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import stripe
import structlog

from engine.billing.store import Charge

log = structlog.get_logger("tradecopy.billing.gateway")


class PaymentOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    PROCESSING = "processing"
    """Accepted, not final (bank debits): the webhook settles it."""
    REQUIRES_ACTION = "requires_action"
    """The bank wants the customer: the follower is asked to pay on-session."""
    FAILED = "failed"
    UNKNOWN = "unknown"
    """No definitive answer: send again with the same key."""


class PaymentResult(msgspec.Struct, frozen=True, kw_only=True):
    outcome: PaymentOutcome
    payment_intent: str | None = None
    stripe_charge: str | None = None
    code: str | None = None
    """Stripe's error code (``card_declined``, ``authentication_required``…) when it failed."""
    message: str | None = None


#: PaymentIntent statuses after an off-session confirm, and what each means for the charge.
_STATUS: dict[str, PaymentOutcome] = {
    "succeeded": PaymentOutcome.SUCCEEDED,
    "processing": PaymentOutcome.PROCESSING,
    "requires_action": PaymentOutcome.REQUIRES_ACTION,
    "requires_payment_method": PaymentOutcome.FAILED,
    "canceled": PaymentOutcome.FAILED,
}


class CheckoutResult(msgspec.Struct, frozen=True, kw_only=True):
    """A Checkout Session's creation: its id and URL, or why not (definitive or unknown)."""

    outcome: PaymentOutcome
    """SUCCEEDED (the session exists), FAILED (refused: do not retry), UNKNOWN (retry)."""
    session_id: str | None = None
    url: str | None = None
    code: str | None = None
    message: str | None = None


class SavedPaymentMethod(msgspec.Struct, frozen=True, kw_only=True):
    """What a completed Checkout Session saved: SUCCEEDED with the customer and the payment
    method (None when the session saved none), FAILED (Stripe refused the read: do not
    retry), UNKNOWN (no answer: read again later)."""

    outcome: PaymentOutcome
    customer: str | None = None
    payment_method: str | None = None
    message: str | None = None


class SubscriptionItem(msgspec.Struct, frozen=True, kw_only=True):
    """A subscription's item as Stripe holds it: SUCCEEDED with its id, product and currency,
    FAILED (no such subscription or item: do not retry), UNKNOWN (no answer: read again)."""

    outcome: PaymentOutcome
    item: str | None = None
    product: str | None = None
    currency: str | None = None
    code: str | None = None
    message: str | None = None


class SubscriptionChange(msgspec.Struct, frozen=True, kw_only=True):
    """A subscription item moved to new terms: SUCCEEDED, FAILED (Stripe's code: do not
    retry), UNKNOWN (no answer: send again under the same key)."""

    outcome: PaymentOutcome
    code: str | None = None
    message: str | None = None


def stripe_idempotency_key(charge: Charge) -> str:
    """The key sent to Stripe: the charge's own (``module:follower:plan:window``)."""
    return charge.idempotency_key


class AccountLink(msgspec.Struct, frozen=True, kw_only=True):
    """A one-time Express onboarding link."""

    url: str
    expires_at: datetime


class StripeGateway:
    """One ``StripeClient`` for the process. ``api_base`` None means Stripe's own hosts."""

    def __init__(self, api_key: str, *, api_base: str | None = None, timeout_s: float = 30.0):
        addresses: dict[str, str] = {}
        if api_base is not None:
            addresses = {"api": api_base, "connect": api_base, "files": api_base}
        self._http = stripe.AIOHTTPClient(timeout=timeout_s)
        self.client = stripe.StripeClient(
            api_key,
            base_addresses=addresses,  # type: ignore[arg-type]
            http_client=self._http,
            max_network_retries=0,
        )

    async def close(self) -> None:
        await self._http.close_async()

    # --------------------------------------------------------------- Connect onboarding

    async def create_express_account(self, *, provider: str, email: str, country: str) -> str:
        """A connected Express account for a provider; its id is the charges' destination."""
        account = await self.client.v1.accounts.create_async(
            {
                "type": "express",
                "email": email,
                "country": country,
                "capabilities": {"transfers": {"requested": True}},
                "metadata": {"provider": provider},
            },
            {"idempotency_key": f"account:{provider}"},
        )
        return account.id

    async def onboarding_link(
        self, account: str, *, refresh_url: str, return_url: str
    ) -> AccountLink:
        """A one-time Express onboarding URL (Stripe-hosted) for the provider to finish, and
        when it expires (the provider asks again after that)."""
        link = await self.client.v1.account_links.create_async(
            {
                "account": account,
                "type": "account_onboarding",
                "refresh_url": refresh_url,
                "return_url": return_url,
            }
        )
        return AccountLink(url=link.url, expires_at=datetime.fromtimestamp(link.expires_at, UTC))

    # --------------------------------------------------------------- customers

    async def create_customer(self, *, follower: str, email: str) -> str:
        customer = await self.client.v1.customers.create_async(
            {"email": email, "metadata": {"follower": follower}},
            {"idempotency_key": f"customer:{follower}"},
        )
        return customer.id

    async def setup_payment_method(self, customer: str) -> str:
        """A SetupIntent for off-session use: its client secret lets the follower's browser save
        a card (with any authentication done now, so weekly charges can run off-session)."""
        intent = await self.client.v1.setup_intents.create_async(
            {
                "customer": customer,
                "usage": "off_session",
                "automatic_payment_methods": {"enabled": True},
            }
        )
        if intent.client_secret is None:
            raise ValueError("Stripe returned a SetupIntent without a client secret")
        return intent.client_secret

    async def attach_payment_method(self, customer: str, payment_method: str) -> str:
        """Attach a payment method to the customer and make it the default; the attached id."""
        method = await self.client.v1.payment_methods.attach_async(
            payment_method, {"customer": customer}
        )
        return method.id

    # --------------------------------------------------------------- charges

    async def charge_off_session(
        self, charge: Charge, *, customer: str, payment_method: str
    ) -> PaymentResult:
        """The charge as a destination PaymentIntent confirmed off-session, under its key."""
        params: dict[str, Any] = {
            "amount": charge.amount_minor,
            "currency": charge.currency.lower(),
            "customer": customer,
            "payment_method": payment_method,
            "off_session": True,
            "confirm": True,
            "application_fee_amount": charge.platform_fee_minor,
            "transfer_data": {"destination": charge.destination},
            "description": f"{charge.module} {charge.window_id}",
            "metadata": {
                "charge_key": charge.idempotency_key,
                "follower": charge.follower,
                "provider": charge.provider,
                "window": charge.window_id,
            },
        }
        try:
            intent = await self.client.v1.payment_intents.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": stripe_idempotency_key(charge)},
            )
        except stripe.CardError as exc:
            error = exc.error
            intent_id = getattr(getattr(error, "payment_intent", None), "id", None)
            code = exc.code
            outcome = (
                PaymentOutcome.REQUIRES_ACTION
                if code == "authentication_required"
                else PaymentOutcome.FAILED
            )
            log.info(
                "charge_declined", key=charge.idempotency_key, code=code, payment_intent=intent_id
            )
            return PaymentResult(
                outcome=outcome, payment_intent=intent_id, code=code, message=exc.user_message
            )
        except stripe.IdempotencyError:
            # The same key with other parameters: the stored charge changed after it was sent,
            # which must never happen; say so loudly rather than charge under a new key.
            log.error("charge_key_reused_with_other_parameters", key=charge.idempotency_key)
            raise
        except stripe.InvalidRequestError as exc:
            # Refused before anything ran (a destination that does not exist, a fee above
            # the amount): definitive for this request, and Stripe kept no result under the key.
            log.error(
                "charge_refused",
                key=charge.idempotency_key,
                code=exc.code,
                param=exc.param,
                error=exc.user_message,
            )
            return PaymentResult(
                outcome=PaymentOutcome.FAILED,
                code=exc.code or "invalid_request",
                message=exc.user_message,
            )
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            log.warning("charge_outcome_unknown", key=charge.idempotency_key, error=str(exc))
            return PaymentResult(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        except stripe.APIError as exc:
            # 409 (the same key in flight elsewhere) and 5xx: nothing definitive was said.
            log.warning(
                "charge_outcome_unknown",
                key=charge.idempotency_key,
                status=exc.http_status,
                error=str(exc),
            )
            return PaymentResult(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        outcome = _STATUS.get(intent.status, PaymentOutcome.UNKNOWN)
        latest = intent.latest_charge
        return PaymentResult(
            outcome=outcome,
            payment_intent=intent.id,
            stripe_charge=latest if isinstance(latest, str) or latest is None else latest.id,
        )

    async def refund(self, payment_intent: str, *, idempotency_key: str) -> str:
        refund = await self.client.v1.refunds.create_async(
            {"payment_intent": payment_intent}, {"idempotency_key": idempotency_key}
        )
        return refund.id

    # --------------------------------------------------------------- plans

    async def checkout_for_plan(
        self,
        *,
        customer: str,
        price: str,
        destination: str,
        platform_fee_percent: str,
        success_url: str,
        cancel_url: str,
        metadata: dict[str, str],
    ) -> str:
        """A Checkout session for buying a recurring plan; its URL, for the follower's browser.

        The subscription it makes is a destination subscription: each invoice's money goes to
        the provider's account, the platform keeping ``application_fee_percent``.
        """
        session = await self.client.v1.checkout.sessions.create_async(
            {
                "mode": "subscription",
                "customer": customer,
                "line_items": [{"price": price, "quantity": 1}],
                "subscription_data": {
                    "application_fee_percent": platform_fee_percent,
                    "transfer_data": {"destination": destination},
                    "metadata": metadata,
                },
                "metadata": metadata,
                "success_url": success_url,
                "cancel_url": cancel_url,
            }
        )
        if session.url is None:
            raise ValueError("Stripe returned a Checkout session without a URL")
        return session.url

    async def create_subscription(
        self,
        *,
        customer: str,
        price: str,
        destination: str,
        platform_fee_percent: str,
        idempotency_key: str,
        metadata: dict[str, str],
    ) -> tuple[str, str]:
        """A subscription charged to the saved payment method; (subscription id, item id)."""
        subscription = await self.client.v1.subscriptions.create_async(
            {
                "customer": customer,
                "items": [{"price": price}],
                "application_fee_percent": platform_fee_percent,
                "transfer_data": {"destination": destination},
                "off_session": True,
                "metadata": metadata,
            },
            {"idempotency_key": idempotency_key},
        )
        return subscription.id, subscription["items"]["data"][0]["id"]

    async def change_subscription(
        self, subscription: str, *, item: str, price: str, idempotency_key: str
    ) -> None:
        """Move the subscription to another price, prorated by Stripe (``create_prorations``)."""
        await self.client.v1.subscriptions.update_async(
            subscription,
            {"items": [{"id": item, "price": price}], "proration_behavior": "create_prorations"},
            {"idempotency_key": idempotency_key},
        )

    async def subscription_item(self, subscription: str, item: str | None) -> SubscriptionItem:
        """The subscription's item ``item`` (None: its only item), read from Stripe: a
        subscription Checkout made is known here by its id only."""
        try:
            found = await self.client.v1.subscriptions.retrieve_async(subscription)
        except stripe.InvalidRequestError as exc:
            log.error("subscription_item_refused", subscription=subscription, code=exc.code)
            return SubscriptionItem(
                outcome=PaymentOutcome.FAILED, code=exc.code or "invalid_request",
                message=exc.user_message or str(exc),
            )  # fmt: skip
        except stripe.StripeError as exc:
            log.warning("subscription_item_unknown", subscription=subscription, error=str(exc))
            return SubscriptionItem(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        items = found["items"]["data"] if "items" in found else []
        chosen = [i for i in items if item is None or i["id"] == item]
        if len(chosen) != 1:
            what = f"no item {item}" if item is not None else f"{len(items)} items"
            return SubscriptionItem(
                outcome=PaymentOutcome.FAILED, code="resource_missing",
                message=f"subscription {subscription} has {what}",
            )  # fmt: skip
        # A StripeObject is no dict (``get`` is refused): read the price's fields as one.
        price = chosen[0]["price"].to_dict()
        return SubscriptionItem(
            outcome=PaymentOutcome.SUCCEEDED, item=chosen[0]["id"],
            product=_id_of(price.get("product")), currency=price.get("currency"),
        )  # fmt: skip

    async def change_subscription_terms(
        self, subscription: str, *, item: str, price_data: dict[str, Any],
        metadata: dict[str, str], idempotency_key: str,
    ) -> SubscriptionChange:  # fmt: skip
        """Move the item to the terms in ``price_data`` (no Price object, as Checkout does),
        prorated by Stripe (``create_prorations``), under ``idempotency_key``: a lost answer is
        sent again under it and Stripe answers with the first update."""
        try:
            await self.client.v1.subscriptions.update_async(
                subscription,
                {
                    "items": [{"id": item, "price_data": price_data}],  # type: ignore[typeddict-item]
                    "proration_behavior": "create_prorations",
                    "metadata": metadata,
                },
                {"idempotency_key": idempotency_key},
            )
        except stripe.IdempotencyError as exc:
            # The same key with other parameters: the stored request changed after it was
            # sent. Definitive: retrying under the key can only be refused again.
            log.error("subscription_change_key_reused", key=idempotency_key)
            return SubscriptionChange(
                outcome=PaymentOutcome.FAILED, code="idempotency_error", message=str(exc)
            )
        except (stripe.InvalidRequestError, stripe.CardError) as exc:
            log.error("subscription_change_refused", key=idempotency_key, code=exc.code)
            return SubscriptionChange(
                outcome=PaymentOutcome.FAILED, code=exc.code or "invalid_request",
                message=exc.user_message or str(exc),
            )  # fmt: skip
        except stripe.StripeError as exc:
            # A timeout, a dropped connection, 409 (the key in flight) or 5xx: nothing
            # definitive was said.
            log.warning("subscription_change_unknown", key=idempotency_key, error=str(exc))
            return SubscriptionChange(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        return SubscriptionChange(outcome=PaymentOutcome.SUCCEEDED)

    # --------------------------------------------------------------- events

    async def events_since(self, created_gte: int) -> AsyncIterator[dict[str, Any]]:
        """Every event created at or after ``created_gte`` (seconds), paging as Stripe does."""
        page = await self.client.v1.events.list_async(
            {"created": {"gte": created_gte}, "limit": 100}
        )
        async for event in page.auto_paging_iter():
            yield event.to_dict(for_json=True)

    async def create_checkout_session(
        self, params: dict[str, Any], *, idempotency_key: str
    ) -> CheckoutResult:
        """A Checkout Session from ``params`` (``checkout.session_params``), under the request's
        key: a retry after a lost answer gets the first session, never a second one."""
        try:
            session = await self.client.v1.checkout.sessions.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.IdempotencyError:
            log.error("checkout_key_reused_with_other_parameters", key=idempotency_key)
            raise
        except stripe.InvalidRequestError as exc:
            log.error("checkout_refused", key=idempotency_key, code=exc.code, param=exc.param)
            return CheckoutResult(
                outcome=PaymentOutcome.FAILED,
                code=exc.code or "invalid_request",
                message=exc.user_message or str(exc),
            )
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            log.warning("checkout_outcome_unknown", key=idempotency_key, error=str(exc))
            return CheckoutResult(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        if session.url is None:
            return CheckoutResult(
                outcome=PaymentOutcome.FAILED,
                session_id=session.id,
                code="no_url",
                message="Stripe returned a Checkout Session without a URL",
            )
        return CheckoutResult(
            outcome=PaymentOutcome.SUCCEEDED, session_id=session.id, url=session.url
        )

    # --------------------------------------------------------------- saved payment methods

    async def saved_payment_method(self, session_id: str) -> SavedPaymentMethod:
        """The payment method a completed Checkout Session saved for off-session charges.

        Checkout names what it made (a SetupIntent, a PaymentIntent or a Subscription), not the
        payment method: the session is read, then that object. A PaymentIntent saved its method
        only with ``setup_future_usage`` (otherwise Stripe leaves it unattached, and an
        off-session charge with it is refused); a subscription's is its
        ``default_payment_method``, which Checkout sets.
        """
        try:
            session = await self.client.v1.checkout.sessions.retrieve_async(session_id)
            customer = _id_of(session.customer)
            method: str | None = None
            if session.mode == "setup" and session.setup_intent is not None:
                setup = await self.client.v1.setup_intents.retrieve_async(
                    _id_of(session.setup_intent) or ""
                )
                customer = _id_of(setup.customer) or customer
                method = _id_of(setup.payment_method)
            elif session.mode == "payment" and session.payment_intent is not None:
                intent = await self.client.v1.payment_intents.retrieve_async(
                    _id_of(session.payment_intent) or ""
                )
                customer = _id_of(intent.customer) or customer
                if intent.setup_future_usage is not None:
                    method = _id_of(intent.payment_method)
            elif session.mode == "subscription" and session.subscription is not None:
                subscription = await self.client.v1.subscriptions.retrieve_async(
                    _id_of(session.subscription) or ""
                )
                customer = _id_of(subscription.customer) or customer
                method = _id_of(subscription.default_payment_method)
        except stripe.InvalidRequestError as exc:
            # The session or its object does not exist for this key: asking again will not
            # change that.
            log.error("saved_payment_method_refused", session=session_id, code=exc.code)
            return SavedPaymentMethod(
                outcome=PaymentOutcome.FAILED, message=exc.user_message or str(exc)
            )
        except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
            log.warning("saved_payment_method_unknown", session=session_id, error=str(exc))
            return SavedPaymentMethod(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        except stripe.StripeError as exc:
            # A key refused (401/403) is not the session's fault: keep the read owed, loudly,
            # until the operator fixes the key.
            log.error("saved_payment_method_unreadable", session=session_id, error=str(exc))
            return SavedPaymentMethod(outcome=PaymentOutcome.UNKNOWN, message=str(exc))
        return SavedPaymentMethod(
            outcome=PaymentOutcome.SUCCEEDED, customer=customer, payment_method=method
        )


def _id_of(value: Any) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if value is None or isinstance(value, str):
        return value
    found = getattr(value, "id", None)
    return found if isinstance(found, str) else None
