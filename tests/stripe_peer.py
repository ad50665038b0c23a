"""A local HTTP peer of the Stripe API: the subset billing calls, with the semantics it relies on.

The real ``stripe`` SDK talks to it as it talks to Stripe (form-encoded requests, Stripe-shaped
JSON objects and errors). What it enforces, as Stripe does:

- **Idempotency.** A POST with an ``Idempotency-Key`` already answered gets the first answer
  again (same status, same body) and changes nothing; the same key with different parameters
  is refused (400, ``idempotency_error``); the same key while its first request is still being
  served is refused (409, ``idempotency_key_in_use``). Like Stripe, a request refused by
  validation (400) stores no result, so it may be retried under the same key.
- **Destination charges.** ``application_fee_amount`` may not exceed ``amount``; the
  ``transfer_data[destination]`` account must exist; the customer must exist and the payment
  method must be attached to it.
- **Test payment methods**, named as Stripe's own test tokens and attached to a customer:
  ``pm_card_visa`` succeeds; ``pm_card_chargeDeclined`` is declined (402 ``card_declined``,
  ``generic_decline``); ``pm_card_chargeDeclinedInsufficientFunds`` (``insufficient_funds``);
  ``pm_card_authenticationRequired`` needs the customer (402 ``authentication_required``,
  the PaymentIntent left in ``requires_payment_method``); ``pm_card_createDispute`` succeeds and
  is then disputed (``charge.dispute.created``).
- **Events.** Every change above makes Stripe's event (``payment_intent.succeeded``,
  ``payment_intent.payment_failed``, ``charge.succeeded``, ``charge.refunded``,
  ``charge.dispute.created``; ``checkout.session.completed`` when a test plays the browser with
  ``complete_checkout_session``, ``checkout.session.expired`` with ``expire_checkout_session``,
  ``account.updated`` when a test plays the provider's onboarding with ``update_account``),
  listed newest first by ``GET /v1/events`` with ``created[gte]``, ``starting_after`` and
  ``limit``, as Stripe pages them. Tests deliver them to the webhook endpoint themselves, signed
  with the SDK's ``WebhookSignature``.

- **Saved cards.** A completed Checkout Session holds a SetupIntent (``setup``), a
  PaymentIntent (``payment``) or a Subscription (``subscription``, its
  ``default_payment_method``) with a card attached to the customer; in ``payment`` mode only
  with ``setup_future_usage``, otherwise attached to no one, so an off-session PaymentIntent
  with it is refused (400 ``resource_missing``). ``GET`` reads sessions, SetupIntents,
  PaymentIntents and subscriptions.

Fault injection: ``lose_responses`` drops the connection of the next N POSTs *after* their
result is stored (the caller cannot tell whether the request happened, like a network cut);
``fail_retrievals`` answers the next N GETs of an object with a 500 ``api_error``;
``fail_posts`` the next N POSTs, before they run.
Subscription updates (a plan change) are checked as Stripe checks them: the item must be one
of the subscription's, ``price_data`` names an existing product (a subscription item takes no
``product_data``), an integer ``unit_amount``, the subscription's currency and a recurring
interval; a refused update changes nothing. A subscription a Checkout Session made holds one
item per recurring line, its price and product made from the line's ``price_data``.
``subscription_updates`` lists the updates that ran (a replay under its key is not one).
Checkout Sessions are checked as Stripe checks them: ``price_data`` line items in one currency,
no recurring price outside ``mode=subscription``, an existing destination account, a platform
fee within the amount (``payment``) or 0-100 % (``subscription``).
What it cannot prove is said in ``engine/billing/README.md`` ("The Stripe peer").
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

_PATH_PART = re.compile(r"\[([^\]]*)\]")

#: Stripe's test tokens and what a charge on each does.
SUCCEEDS = "pm_card_visa"
DECLINED = "pm_card_chargeDeclined"
INSUFFICIENT_FUNDS = "pm_card_chargeDeclinedInsufficientFunds"
AUTHENTICATION_REQUIRED = "pm_card_authenticationRequired"
DISPUTED = "pm_card_createDispute"
TEST_TOKENS = (SUCCEEDS, DECLINED, INSUFFICIENT_FUNDS, AUTHENTICATION_REQUIRED, DISPUTED)


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0]=x``) back to nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        head = key.split("[", 1)[0]
        parts = [head, *_PATH_PART.findall(key)]
        node: Any = root
        for part, nxt in itertools.pairwise(parts):
            container: Any = [] if nxt.isdigit() else {}
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                if node[index] is None:
                    node[index] = container
                node = node[index]
            else:
                node = node.setdefault(part, container)
        last = parts[-1]
        if isinstance(node, list):
            index = int(last)
            while len(node) <= index:
                node.append(None)
            node[index] = value
        else:
            node[last] = value
    return root


class PeerError(Exception):
    def __init__(self, status: int, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": {"type": type_, "message": message, **extra}}


class StripePeer:
    """The peer's state (accounts, customers, payment methods, PaymentIntents, events) and its
    aiohttp application. ``await start()`` serves it on 127.0.0.1 at a free port."""

    def __init__(self, api_key: str = "sk_test_peer") -> None:
        self.api_key = api_key
        self.accounts: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.payment_methods: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.setup_intents: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.subscription_updates: list[tuple[str, dict[str, Any]]] = []
        """Every subscription update that ran (a replay under its key is not one): (id, params)."""
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str | None]] = []
        """Every request seen: (method, path, idempotency key)."""
        self.lose_responses = 0
        self.fail_retrievals = 0
        """The next N GETs of an object (not the event list) answer 500 ``api_error``."""
        self.fail_posts = 0
        """The next N POSTs answer 500 ``api_error`` before running (nothing stored)."""
        self._ids = itertools.count(1)
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}
        self._in_flight: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ serving

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _id(self, prefix: str) -> str:
        return f"{prefix}_peer{next(self._ids):06d}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = (await request.read()).decode()
        key = request.headers.get("Idempotency-Key")
        self.requests.append((request.method, request.path, key))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._json(
                401, PeerError(401, "invalid_request_error", "Invalid API Key provided").body
            )
        params = decode_form(raw if request.method == "POST" else request.query_string)
        if request.method == "POST" and self.fail_posts > 0:
            self.fail_posts -= 1
            return self._json(
                500, PeerError(500, "api_error", "Something went wrong on Stripe's end.").body
            )
        if request.method == "GET" and self.fail_retrievals > 0 and request.path != "/v1/events":
            self.fail_retrievals -= 1
            return self._json(
                500, PeerError(500, "api_error", "Something went wrong on Stripe's end.").body
            )
        if request.method != "POST" or key is None:
            status, body = await self._serve(request.method, request.path, params)
            return self._json(status, body)
        fingerprint = hashlib.sha256(f"{request.method} {request.path}\n{raw}".encode())
        stored = self._idempotent.get(key)
        if stored is not None:
            if stored[0] != fingerprint.hexdigest():
                return self._json(
                    400,
                    PeerError(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters "
                        f"they were first used with. Try using a key other than '{key}' if you "
                        "meant to execute a different request.",
                    ).body,
                )
            return self._raw(stored[1], stored[2], replayed=True)
        if key in self._in_flight:
            return self._json(
                409,
                PeerError(
                    409,
                    "invalid_request_error",
                    "There is currently another in-progress request using this Stripe token "
                    "(probably the same idempotency key).",
                    code="idempotency_key_in_use",
                ).body,
            )
        self._in_flight.add(key)
        try:
            await asyncio.sleep(0)  # a request is served over time, not atomically
            status, body = await self._serve(request.method, request.path, params)
            encoded = orjson.dumps(body)
            # Stripe keeps the result of a request that ran (200, a card error), not of one
            # refused before running (validation), which may be corrected and sent again.
            if status in (200, 402):
                self._idempotent[key] = (fingerprint.hexdigest(), status, encoded)
        finally:
            self._in_flight.discard(key)
        if self.lose_responses > 0:
            self.lose_responses -= 1
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("peer dropped the response on purpose")
        return self._raw(status, encoded)

    def _json(self, status: int, body: dict[str, Any]) -> web.Response:
        return self._raw(status, orjson.dumps(body))

    @staticmethod
    def _raw(status: int, body: bytes, replayed: bool = False) -> web.Response:
        headers = {"Request-Id": f"req_{hashlib.sha1(body).hexdigest()[:14]}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    async def _serve(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, Any]:
        routes: list[tuple[str, str, Any]] = [
            ("POST", r"/v1/accounts", self._create_account),
            ("POST", r"/v1/account_links", self._create_account_link),
            ("POST", r"/v1/customers", self._create_customer),
            ("POST", r"/v1/setup_intents", self._create_setup_intent),
            ("GET", r"/v1/setup_intents/(?P<seti>[^/]+)", self._get_setup_intent),
            ("POST", r"/v1/payment_methods/(?P<pm>[^/]+)/attach", self._attach_payment_method),
            ("POST", r"/v1/payment_intents", self._create_payment_intent),
            ("GET", r"/v1/payment_intents/(?P<pi>[^/]+)", self._get_payment_intent),
            ("POST", r"/v1/refunds", self._create_refund),
            ("POST", r"/v1/checkout/sessions", self._create_checkout_session),
            ("GET", r"/v1/checkout/sessions/(?P<cs>[^/]+)", self._get_checkout_session),
            ("GET", r"/v1/subscriptions/(?P<sub>[^/]+)", self._get_subscription),
            ("POST", r"/v1/subscriptions", self._create_subscription),
            ("POST", r"/v1/subscriptions/(?P<sub>[^/]+)", self._update_subscription),
            ("GET", r"/v1/events", self._list_events),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                try:
                    return 200, handler(params, **match.groupdict())
                except PeerError as exc:
                    return exc.status, exc.body
        return 404, PeerError(
            404, "invalid_request_error", f"Unrecognized request URL ({method}: {path})"
        ).body

    # ------------------------------------------------------------------ objects

    def _event(self, type_: str, obj: dict[str, Any]) -> None:
        self.events.append(
            {
                "id": self._id("evt"),
                "object": "event",
                "type": type_,
                "api_version": None,
                "created": int(time.time()),
                "livemode": False,
                "pending_webhooks": 1,
                "data": {"object": dict(obj)},
            }
        )

    @staticmethod
    def _require(params: dict[str, Any], name: str) -> Any:
        if name not in params or params[name] == "":
            raise PeerError(
                400,
                "invalid_request_error",
                f"Missing required param: {name}.",
                param=name,
                code="parameter_missing",
            )
        return params[name]

    @staticmethod
    def _int(params: dict[str, Any], name: str) -> int:
        value = params.get(name)
        if value is None or not re.fullmatch(r"\d+", str(value)):
            raise PeerError(
                400,
                "invalid_request_error",
                f"Invalid integer: {value}",
                param=name,
                code="parameter_invalid_integer",
            )
        return int(value)

    def _create_account(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("type") != "express" and "controller" not in params:
            raise PeerError(
                400, "invalid_request_error", "the peer creates Express accounts", param="type"
            )
        account = {
            "id": self._id("acct"),
            "object": "account",
            "type": "express",
            "email": params.get("email"),
            "country": params.get("country", "US"),
            "charges_enabled": False,
            "payouts_enabled": False,
            "details_submitted": False,
            "metadata": params.get("metadata", {}),
        }
        self.accounts[account["id"]] = account
        return account

    def update_account(
        self,
        account_id: str,
        *,
        charges_enabled: bool,
        payouts_enabled: bool,
        details_submitted: bool,
        created: int | None = None,
    ) -> dict[str, Any]:
        """What the provider's progress through Stripe's onboarding form does: the account's
        status changes and ``account.updated`` is emitted; the event, to deliver. ``created``
        dates the event (to deliver an older one after a newer)."""
        account = self.accounts[account_id]
        account.update(
            charges_enabled=charges_enabled,
            payouts_enabled=payouts_enabled,
            details_submitted=details_submitted,
        )
        self._event("account.updated", account)
        if created is not None:
            self.events[-1]["created"] = created
        return self.events[-1]

    def _create_account_link(self, params: dict[str, Any]) -> dict[str, Any]:
        account = self._require(params, "account")
        if account not in self.accounts:
            raise PeerError(
                400,
                "invalid_request_error",
                f"No such account: '{account}'",
                param="account",
                code="resource_missing",
            )
        if params.get("type") != "account_onboarding":
            raise PeerError(
                400, "invalid_request_error", "type must be account_onboarding", param="type"
            )
        self._require(params, "refresh_url")
        self._require(params, "return_url")
        return {
            "object": "account_link",
            "created": int(time.time()),
            "expires_at": int(time.time()) + 300,
            "url": f"{self.url}/express/onboarding/{account}",
        }

    def _create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = {
            "id": self._id("cus"),
            "object": "customer",
            "email": params.get("email"),
            "metadata": params.get("metadata", {}),
            "invoice_settings": {"default_payment_method": None},
        }
        self.customers[customer["id"]] = customer
        return customer

    def _customer(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = self._require(params, "customer")
        if customer not in self.customers:
            raise PeerError(
                400,
                "invalid_request_error",
                f"No such customer: '{customer}'",
                param="customer",
                code="resource_missing",
            )
        return self.customers[customer]

    def _create_setup_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = self._customer(params)
        setup_id = self._id("seti")
        intent = {
            "id": setup_id,
            "object": "setup_intent",
            "customer": customer["id"],
            "usage": params.get("usage", "off_session"),
            "status": "requires_payment_method",
            "payment_method": None,
            "client_secret": f"{setup_id}_secret_peer",
        }
        self.setup_intents[setup_id] = intent
        return intent

    @staticmethod
    def _found(objects: dict[str, dict[str, Any]], kind: str, id_: str) -> dict[str, Any]:
        if id_ not in objects:
            raise PeerError(
                404, "invalid_request_error", f"No such {kind}: '{id_}'", code="resource_missing"
            )
        return objects[id_]

    def _get_setup_intent(self, params: dict[str, Any], seti: str) -> dict[str, Any]:
        return self._found(self.setup_intents, "setupintent", seti)

    def _get_checkout_session(self, params: dict[str, Any], cs: str) -> dict[str, Any]:
        return self._found(self.checkout_sessions, "checkout.session", cs)

    def _get_subscription(self, params: dict[str, Any], sub: str) -> dict[str, Any]:
        return self._found(self.subscriptions, "subscription", sub)

    def _card(self, behaviour: str, customer: str | None) -> str:
        """A card the follower entered at Checkout, attached to ``customer`` when the session
        saves it (None: used once, attached to no one)."""
        method = {
            "id": self._id("pm"),
            "object": "payment_method",
            "type": "card",
            "customer": customer,
            "card": {"brand": "visa", "last4": "4242"},
            "behaviour": behaviour,
        }
        self.payment_methods[method["id"]] = method
        return str(method["id"])

    def _attach_payment_method(self, params: dict[str, Any], pm: str) -> dict[str, Any]:
        customer = self._customer(params)
        if pm not in TEST_TOKENS:
            raise PeerError(
                400,
                "invalid_request_error",
                f"No such PaymentMethod: '{pm}'",
                param="payment_method",
                code="resource_missing",
            )
        method = {
            "id": self._id("pm"),
            "object": "payment_method",
            "type": "card",
            "customer": customer["id"],
            "card": {"brand": "visa", "last4": "4242"},
            "behaviour": pm,
        }
        self.payment_methods[method["id"]] = method
        return {k: v for k, v in method.items() if k != "behaviour"}

    def _create_payment_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        amount = self._int(params, "amount")
        if amount < 1:
            raise PeerError(
                400,
                "invalid_request_error",
                "Amount must be at least 1",
                param="amount",
                code="amount_too_small",
            )
        currency = str(self._require(params, "currency")).lower()
        customer = self._customer(params)
        fee = (
            self._int(params, "application_fee_amount")
            if "application_fee_amount" in params
            else None
        )
        if fee is not None and fee > amount:
            raise PeerError(
                400,
                "invalid_request_error",
                "The application fee amount must not exceed the amount.",
                param="application_fee_amount",
            )
        destination = params.get("transfer_data", {}).get("destination")
        if destination is not None and destination not in self.accounts:
            raise PeerError(
                400,
                "invalid_request_error",
                f"No such destination: '{destination}'",
                param="transfer_data[destination]",
                code="resource_missing",
            )
        if fee is not None and destination is None:
            raise PeerError(
                400,
                "invalid_request_error",
                "application_fee_amount needs a connected account "
                "(transfer_data[destination] or Stripe-Account)",
                param="application_fee_amount",
            )
        pm_id = self._require(params, "payment_method")
        method = self.payment_methods.get(pm_id)
        if method is None or method["customer"] != customer["id"]:
            raise PeerError(
                400,
                "invalid_request_error",
                # Stripe's words for a method never attached to this customer (a card a
                # Checkout payment used once, without setup_future_usage).
                f"The customer does not have a payment method with the ID {pm_id}. "
                "The payment method must be attached to the customer.",
                param="payment_method",
                code="resource_missing",
            )
        intent = {
            "id": self._id("pi"),
            "object": "payment_intent",
            "amount": amount,
            "currency": currency,
            "customer": customer["id"],
            "payment_method": pm_id,
            "application_fee_amount": fee,
            "transfer_data": {"destination": destination},
            "metadata": params.get("metadata", {}),
            "status": "requires_confirmation",
            "latest_charge": None,
            "last_payment_error": None,
            "off_session": params.get("off_session") == "true",
        }
        self.payment_intents[intent["id"]] = intent
        if params.get("confirm") != "true":
            return intent
        behaviour = method["behaviour"]
        if behaviour in (DECLINED, INSUFFICIENT_FUNDS, AUTHENTICATION_REQUIRED):
            code, decline = {
                DECLINED: ("card_declined", "generic_decline"),
                INSUFFICIENT_FUNDS: ("card_declined", "insufficient_funds"),
                AUTHENTICATION_REQUIRED: ("authentication_required", "authentication_required"),
            }[behaviour]
            intent["status"] = "requires_payment_method"
            intent["last_payment_error"] = {
                "type": "card_error",
                "code": code,
                "decline_code": decline,
            }
            self._event("payment_intent.payment_failed", intent)
            raise PeerError(
                402,
                "card_error",
                "Your card was declined."
                if code == "card_declined"
                else "This payment requires authentication.",
                code=code,
                decline_code=decline,
                payment_intent=dict(intent),
            )
        charge = {
            "id": self._id("ch"),
            "object": "charge",
            "amount": amount,
            "currency": currency,
            "payment_intent": intent["id"],
            "paid": True,
            "refunded": False,
            "disputed": False,
            "metadata": intent["metadata"],
            "application_fee_amount": fee,
            "destination": destination,
        }
        self.charges[charge["id"]] = charge
        intent["status"] = "succeeded"
        intent["latest_charge"] = charge["id"]
        self._event("charge.succeeded", charge)
        self._event("payment_intent.succeeded", intent)
        if behaviour == DISPUTED:
            charge["disputed"] = True
            self._event(
                "charge.dispute.created",
                {
                    "id": self._id("dp"),
                    "object": "dispute",
                    "amount": amount,
                    "charge": charge["id"],
                    "payment_intent": intent["id"],
                    "status": "needs_response",
                    "reason": "fraudulent",
                },
            )
        return intent

    def _get_payment_intent(self, params: dict[str, Any], pi: str) -> dict[str, Any]:
        if pi not in self.payment_intents:
            raise PeerError(
                404,
                "invalid_request_error",
                f"No such payment_intent: '{pi}'",
                code="resource_missing",
            )
        return self.payment_intents[pi]

    def _create_refund(self, params: dict[str, Any]) -> dict[str, Any]:
        intent = self._get_payment_intent(params, self._require(params, "payment_intent"))
        if intent["status"] != "succeeded":
            raise PeerError(
                400,
                "invalid_request_error",
                "This PaymentIntent has no charge to refund",
                code="charge_not_refundable",
            )
        charge = self.charges[intent["latest_charge"]]
        if charge["refunded"]:
            raise PeerError(
                400,
                "invalid_request_error",
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        charge["refunded"] = True
        self._event("charge.refunded", charge)
        return {
            "id": self._id("re"),
            "object": "refund",
            "amount": charge["amount"],
            "charge": charge["id"],
            "payment_intent": intent["id"],
            "status": "succeeded",
        }

    def _destination(self, data: dict[str, Any], param: str) -> str | None:
        destination = (data.get("transfer_data") or {}).get("destination")
        if destination is not None and destination not in self.accounts:
            raise PeerError(
                400,
                "invalid_request_error",
                f"No such destination: '{destination}'",
                param=f"{param}[transfer_data][destination]",
                code="resource_missing",
            )
        return destination

    def _line_total(self, items: list[Any], mode: str) -> tuple[int, str | None]:
        """The session's total and currency from ``line_items`` (``price_data`` or a price id);
        a recurring price outside subscription mode is refused, as Stripe does."""
        total, currency = 0, None
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise PeerError(
                    400, "invalid_request_error", "Invalid line item", param="line_items"
                )
            quantity = self._int({"q": item.get("quantity", "1")}, "q")
            data = item.get("price_data")
            if data is None:
                self._require(item, "price")
                continue
            where = f"line_items[{n}][price_data]"
            amount = self._int(data, "unit_amount")
            item_currency = self._require(data, "currency")
            if currency is not None and item_currency != currency:
                raise PeerError(
                    400, "invalid_request_error", "All line items must use the same currency",
                    param=f"{where}[currency]",
                )  # fmt: skip
            currency = item_currency
            if "recurring" in data:
                if mode != "subscription":
                    raise PeerError(
                        400, "invalid_request_error",
                        "You specified `payment` mode but passed a recurring price.",
                        param=f"{where}[recurring]",
                    )  # fmt: skip
                if data["recurring"].get("interval") not in ("day", "week", "month", "year"):
                    raise PeerError(
                        400, "invalid_request_error", "Invalid interval",
                        param=f"{where}[recurring][interval]",
                    )  # fmt: skip
            total += amount * quantity
        return total, currency

    def _create_checkout_session(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("mode") not in ("payment", "subscription", "setup"):
            raise PeerError(400, "invalid_request_error", "Invalid mode", param="mode")
        customer = self._customer(params)
        self._require(params, "success_url")
        mode = params["mode"]
        items = params.get("line_items") or []
        if mode != "setup" and not items:
            raise PeerError(
                400,
                "invalid_request_error",
                "line_items is required",
                param="line_items",
                code="parameter_missing",
            )
        if mode == "setup":
            self._require(params, "currency")
        total, currency = self._line_total(items, mode)
        if mode == "subscription":
            data = params.get("subscription_data") or {}
            self._destination(data, "subscription_data")
            percent = data.get("application_fee_percent")
            if percent is not None and (
                not re.fullmatch(r"\d{1,3}(\.\d{1,2})?", str(percent)) or float(percent) > 100
            ):
                raise PeerError(
                    400, "invalid_request_error",
                    "application_fee_percent must be 0-100 with at most two decimals",
                    param="subscription_data[application_fee_percent]",
                )  # fmt: skip
        if mode == "payment":
            data = params.get("payment_intent_data") or {}
            self._destination(data, "payment_intent_data")
            if "application_fee_amount" in data:
                fee = self._int(data, "application_fee_amount")
                if fee > total:
                    raise PeerError(
                        400, "invalid_request_error",
                        "The application fee amount cannot exceed the amount of the charge.",
                        param="payment_intent_data[application_fee_amount]",
                    )  # fmt: skip
        session = {
            "id": self._id("cs"),
            "object": "checkout.session",
            "mode": mode,
            "customer": customer["id"],
            "client_reference_id": params.get("client_reference_id"),
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": total,
            "currency": currency or params.get("currency"),
            "line_items": items,
            "metadata": params.get("metadata", {}),
            "subscription_data": params.get("subscription_data", {}),
            "payment_intent_data": params.get("payment_intent_data", {}),
            "setup_intent_data": params.get("setup_intent_data", {}),
            "subscription": None,
            "payment_intent": None,
            "setup_intent": None,
            "success_url": params["success_url"],
            "cancel_url": params.get("cancel_url"),
        }
        session["url"] = f"{self.url}/checkout/{session['id']}"
        self.checkout_sessions[session["id"]] = session
        return session

    def complete_checkout_session(self, session_id: str, card: str = SUCCEEDS) -> dict[str, Any]:
        """What the follower's browser does at Stripe: pay (or save a card), which completes
        the session and emits ``checkout.session.completed``; the event, to deliver.

        The card (one of the test tokens' behaviours) becomes a payment method: attached to
        the customer and kept on the SetupIntent (``setup``), the PaymentIntent (``payment``,
        attached only with ``setup_future_usage``) or as the subscription's
        ``default_payment_method`` (``subscription``), as Checkout does."""
        session = self.checkout_sessions[session_id]
        if session["status"] != "open":
            raise ValueError(f"session {session_id} is {session['status']}")
        session["status"] = "complete"
        if session["mode"] == "subscription":
            data = session["subscription_data"]
            sub_id = self._id("sub")
            subscription = {
                "id": sub_id,
                "object": "subscription",
                "customer": session["customer"],
                "status": "active",
                "currency": session["currency"],
                "metadata": data.get("metadata", {}),
                "application_fee_percent": data.get("application_fee_percent"),
                "transfer_data": data.get("transfer_data", {}),
                "default_payment_method": self._card(card, session["customer"]),
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": f"si_{sub_id}_{n}",
                            "object": "subscription_item",
                            "quantity": int(item.get("quantity", "1")),
                            "price": self._price(item["price_data"]),
                        }
                        for n, item in enumerate(session["line_items"])
                        if "recurring" in (item.get("price_data") or {})
                    ],
                },
            }
            self.subscriptions[sub_id] = subscription
            self._event("customer.subscription.created", subscription)
            session["subscription"] = sub_id
            session["payment_status"] = "paid"
        elif session["mode"] == "payment":
            data = session["payment_intent_data"]
            future = data.get("setup_future_usage")
            intent = {
                "id": self._id("pi"),
                "object": "payment_intent",
                "amount": session["amount_total"],
                "currency": session["currency"],
                "customer": session["customer"],
                "payment_method": self._card(card, session["customer"] if future else None),
                "setup_future_usage": future,
                "application_fee_amount": data.get("application_fee_amount"),
                "transfer_data": data.get("transfer_data", {}),
                "metadata": data.get("metadata", {}),
                "status": "succeeded",
                "latest_charge": None,
                "last_payment_error": None,
            }
            self.payment_intents[intent["id"]] = intent
            session["payment_intent"] = intent["id"]
            session["payment_status"] = "paid"
        else:
            setup = {
                "id": self._id("seti"),
                "object": "setup_intent",
                "customer": session["customer"],
                "usage": "off_session",
                "status": "succeeded",
                "payment_method": self._card(card, session["customer"]),
                "metadata": (session.get("setup_intent_data") or {}).get("metadata", {}),
            }
            self.setup_intents[setup["id"]] = setup
            session["setup_intent"] = setup["id"]
            session["payment_status"] = "no_payment_required"
        self._event("checkout.session.completed", session)
        return self.events[-1]

    def expire_checkout_session(self, session_id: str) -> dict[str, Any]:
        """The session left unpaid until it expired: ``checkout.session.expired``."""
        session = self.checkout_sessions[session_id]
        session["status"] = "expired"
        self._event("checkout.session.expired", session)
        return self.events[-1]

    def _create_subscription(self, params: dict[str, Any]) -> dict[str, Any]:
        customer = self._customer(params)
        items = params.get("items") or []
        if not items:
            raise PeerError(
                400,
                "invalid_request_error",
                "Missing required param: items.",
                param="items",
                code="parameter_missing",
            )
        destination = params.get("transfer_data", {}).get("destination")
        if destination is not None and destination not in self.accounts:
            raise PeerError(
                400,
                "invalid_request_error",
                f"No such destination: '{destination}'",
                param="transfer_data[destination]",
                code="resource_missing",
            )
        sub_id = self._id("sub")
        subscription = {
            "id": sub_id,
            "object": "subscription",
            "customer": customer["id"],
            "status": "active",
            "metadata": params.get("metadata", {}),
            "application_fee_percent": params.get("application_fee_percent"),
            "transfer_data": {"destination": destination},
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": f"si_{sub_id}_{n}",
                        "object": "subscription_item",
                        "price": {"id": item["price"]},
                    }
                    for n, item in enumerate(items)
                ],
            },
        }
        self.subscriptions[sub_id] = subscription
        self._event("customer.subscription.created", subscription)
        return subscription

    def _price(self, data: dict[str, Any]) -> dict[str, Any]:
        """A Price made inline from ``price_data`` (with ``product_data`` a Product too), as
        Stripe makes one for a Checkout line item or a subscription item."""
        product = data.get("product")
        if product is None:
            product = self._id("prod")
            self.products[product] = {
                "id": product, "object": "product",
                "name": (data.get("product_data") or {}).get("name"),
            }  # fmt: skip
        return {
            "id": self._id("price"),
            "object": "price",
            "product": product,
            "currency": data["currency"],
            "unit_amount": int(data["unit_amount"]),
            "recurring": {
                "interval": data["recurring"]["interval"],
                "interval_count": int(data["recurring"].get("interval_count", "1")),
            },
        }

    def _item_price_data(self, data: Any, subscription: dict[str, Any], n: int) -> dict[str, Any]:
        """A subscription item's ``price_data`` checked as Stripe checks it: an existing
        product (not ``product_data``), an integer amount, the subscription's currency, a
        recurring interval."""
        where = f"items[{n}][price_data]"
        if not isinstance(data, dict):
            raise PeerError(400, "invalid_request_error", "Invalid price_data", param=where)
        if "product_data" in data:
            raise PeerError(
                400, "invalid_request_error", "Received unknown parameter: product_data",
                param=f"{where}[product_data]",
            )  # fmt: skip
        product = self._require(data, "product")
        if product not in self.products:
            raise PeerError(
                400, "invalid_request_error", f"No such product: '{product}'",
                param=f"{where}[product]", code="resource_missing",
            )  # fmt: skip
        self._int(data, "unit_amount")
        currency = self._require(data, "currency")
        if subscription.get("currency") is not None and currency != subscription["currency"]:
            raise PeerError(
                400, "invalid_request_error",
                "You cannot combine currencies on a single customer.",
                param=f"{where}[currency]", code="currency_mismatch",
            )  # fmt: skip
        recurring = data.get("recurring")
        if not isinstance(recurring, dict) or recurring.get("interval") not in (
            "day", "week", "month", "year",
        ):  # fmt: skip
            raise PeerError(
                400, "invalid_request_error", "Invalid interval",
                param=f"{where}[recurring][interval]",
            )  # fmt: skip
        return self._price(data)

    def _update_subscription(self, params: dict[str, Any], sub: str) -> dict[str, Any]:
        subscription = self.subscriptions.get(sub)
        if subscription is None:
            raise PeerError(
                404,
                "invalid_request_error",
                f"No such subscription: '{sub}'",
                code="resource_missing",
            )
        behaviour = params.get("proration_behavior", "create_prorations")
        if behaviour not in ("create_prorations", "none", "always_invoice"):
            raise PeerError(
                400,
                "invalid_request_error",
                "Invalid proration_behavior",
                param="proration_behavior",
            )
        known = {i["id"]: i for i in subscription.get("items", {}).get("data", [])}
        prices: dict[str, dict[str, Any]] = {}
        for n, item in enumerate(params.get("items") or []):
            if item.get("id") not in known:
                raise PeerError(
                    400,
                    "invalid_request_error",
                    f"No such subscription item: '{item.get('id')}'",
                    param=f"items[{n}][id]",
                    code="resource_missing",
                )
            if "price_data" in item:
                prices[item["id"]] = self._item_price_data(item["price_data"], subscription, n)
            else:
                prices[item["id"]] = {"id": self._require(item, "price")}
        # Checked whole before anything changes: a refused update changes nothing.
        for item_id, price in prices.items():
            known[item_id]["price"] = price
        if "metadata" in params:
            subscription["metadata"] = {**subscription.get("metadata", {}), **params["metadata"]}
        subscription["last_proration_behavior"] = behaviour
        self.subscription_updates.append((sub, params))
        self._event("customer.subscription.updated", subscription)
        return subscription

    def _list_events(self, params: dict[str, Any]) -> dict[str, Any]:
        created = params.get("created", {})
        gte = int(created.get("gte", 0)) if isinstance(created, dict) else 0
        limit = min(int(params.get("limit", 10)), 100)
        newest_first = [e for e in reversed(self.events) if e["created"] >= gte]
        after = params.get("starting_after")
        if after:
            ids = [e["id"] for e in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        return {
            "object": "list",
            "url": "/v1/events",
            "data": page,
            "has_more": len(newest_first) > limit,
        }
