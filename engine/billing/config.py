"""Billing configuration: the database, Stripe's mode and sealed keys, the jobs' timing."""

from __future__ import annotations

import base64
import enum
import os
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.core.errors import TradecopyError

#: The AES-256 key (32 bytes, base64) that opens the sealed Stripe keys of the config file.
ENV_BILLING_KEY = "TRADECOPY_BILLING_KEY"
#: The sealed Stripe key and webhook secret, when the config file leaves them out: a
#: deployment keeps its config in a ConfigMap and these beside the key in a Secret.
ENV_STRIPE_API_KEY_SEALED = "TRADECOPY_BILLING_STRIPE_API_KEY_SEALED"
ENV_WEBHOOK_SECRET_SEALED = "TRADECOPY_BILLING_WEBHOOK_SECRET_SEALED"
_VERSION = b"\x01"
_NONCE = 12
_PURPOSE = b"tradecopy-billing-secret"


class BillingConfigError(TradecopyError):
    """The billing configuration cannot be used as given (a key that does not open, a live key
    in test mode)."""


class StripeMode(enum.StrEnum):
    TEST = "test"
    LIVE = "live"


class BillingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: str | None = None
    """PostgreSQL; None: ``TRADECOPY_DATABASE_URL``, else the embedded server."""
    stripe_mode: StripeMode = StripeMode.TEST
    """Chosen by the operator: a key of the other mode is refused at start."""
    stripe_api_key_sealed: str | None = None
    """The Stripe secret key sealed with ``seal_secret`` (never stored in clear); None:
    ``$TRADECOPY_BILLING_STRIPE_API_KEY_SEALED``."""
    stripe_webhook_secret_sealed: str | None = None
    """The webhook endpoint's signing secret (``whsec_…``), sealed the same way; None:
    ``$TRADECOPY_BILLING_WEBHOOK_SECRET_SEALED``."""
    stripe_api_base: str | None = None
    """Where the Stripe API is; None: Stripe's own. Tests point it at the local peer."""
    stripe_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    webhook_tolerance_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 300
    webhook_host: str = "127.0.0.1"
    webhook_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9470
    send_lease_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    """How long a job holds a charge while it calls Stripe; a crashed job's charge is sent
    again (same key) once this has passed."""
    event_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    recovery_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """How often missed events are listed from Stripe (the hourly sync)."""
    event_retention_days: Annotated[int, msgspec.Meta(ge=1)] = 90
    migrate: bool = False
    nats_url: str | None = None
    """Where enforcement writes the links (``tc_links``); None: causes are recorded in
    PostgreSQL but no link is written by this instance (run one instance with it set)."""
    enforcement_attempts: Annotated[int, msgspec.Meta(ge=1, le=5)] = 5
    """Tries per link write before it is recorded as failed for the daily recheck."""
    enforcement_base_delay_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    """The first wait between tries; each next one doubles."""
    portal_url: str = "http://127.0.0.1:8080/billing"
    """Where emails send a follower to pay or confirm a charge (``…/charges/<key>``)."""
    email_base_delay_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """The first wait after an email was not accepted; each next one doubles (at most 1 h)."""
    email_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 8
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = 9469


def _master_key(encoded: str | None = None) -> bytes:
    encoded = encoded or os.environ.get(ENV_BILLING_KEY)
    if not encoded:
        raise BillingConfigError(f"{ENV_BILLING_KEY} is not set: sealed keys cannot be opened")
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise BillingConfigError(f"{ENV_BILLING_KEY} is not base64") from exc
    if len(key) != 32:
        raise BillingConfigError(f"{ENV_BILLING_KEY} must be 32 bytes (AES-256)")
    return key


def seal_secret(plaintext: str, master_key: str | None = None) -> str:
    """``plaintext`` (a Stripe key) encrypted with AES-256-GCM, as base64 for a config file."""
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(_master_key(master_key)).encrypt(nonce, plaintext.encode(), _PURPOSE)
    return base64.b64encode(_VERSION + nonce + sealed).decode()


def open_secret(sealed: str, master_key: str | None = None) -> str:
    """The inverse of ``seal_secret``; a wrong key or a changed byte is refused."""
    blob = base64.b64decode(sealed)
    if len(blob) < 1 + _NONCE + 16 or blob[:1] != _VERSION:
        raise BillingConfigError("not a sealed billing secret (version 1)")
    try:
        plain = AESGCM(_master_key(master_key)).decrypt(
            blob[1 : 1 + _NONCE], blob[1 + _NONCE :], _PURPOSE
        )
    except InvalidTag:
        raise BillingConfigError("a sealed billing secret does not open with this key") from None
    return plain.decode()


def stripe_api_key(config: BillingConfig, master_key: str | None = None) -> str:
    """The Stripe secret key, opened, and checked to belong to the configured mode."""
    sealed = config.stripe_api_key_sealed or os.environ.get(ENV_STRIPE_API_KEY_SEALED)
    if not sealed:
        raise BillingConfigError(
            f"no Stripe key configured (stripe_api_key_sealed or ${ENV_STRIPE_API_KEY_SEALED})"
        )
    key = open_secret(sealed, master_key)
    check_key_mode(key, config.stripe_mode)
    return key


def check_key_mode(key: str, mode: StripeMode) -> None:
    """Refuse a live key in test mode and a test key in live mode: the operator chooses."""
    prefix = key.split("_", 2)[:2]
    if len(prefix) < 2 or prefix[0] not in ("sk", "rk") or prefix[1] not in ("test", "live"):
        raise BillingConfigError("a Stripe secret key starts with sk_test_/sk_live_ (or rk_)")
    if prefix[1] != mode.value:
        raise BillingConfigError(f"a {prefix[1]} Stripe key given in {mode.value} mode")


def webhook_secret(config: BillingConfig, master_key: str | None = None) -> str:
    sealed = config.stripe_webhook_secret_sealed or os.environ.get(ENV_WEBHOOK_SECRET_SEALED)
    if not sealed:
        raise BillingConfigError(
            "no webhook secret configured"
            f" (stripe_webhook_secret_sealed or ${ENV_WEBHOOK_SECRET_SEALED})"
        )
    return open_secret(sealed, master_key)
