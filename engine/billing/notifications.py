"""Billing's emails: catalogues in six languages, an outbox in PostgreSQL, sent over SMTP.

Texts live in ``messages/<language>.toml`` (de, en, fr, es, pt, ru), never in code: each kind
has a subject, a text and an HTML body, ``$placeholder`` templates checked whole when a
catalogue is loaded (a missing kind or key, an unknown placeholder, or a text that leaves out
one of its kind's placeholders fails at start). Amounts are written by
``engine.core.money.format_money``. A notification is rendered once into
``billing_email_outbox`` (in the transaction that marks its ``billing_notifications`` row
queued, or by a caller for kinds that are not about a charge) and sent by ``drain_outbox``
over the provider's own SMTP server, whose settings are stored sealed like billing's Stripe
keys. A send that fails is tried again with exponential backoff; a permanent refusal (5xx) or
``max_attempts`` failures give up and keep the error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from string import Template
from typing import TextIO
from urllib.parse import quote

import asyncpg
import msgspec
import structlog

from engine.billing import metrics, store
from engine.billing.config import open_secret, seal_secret
from engine.core.errors import TradecopyError
from engine.core.money import format_money
from engine.runtime.catalogue import (
    CatalogueError as CatalogueError,  # what a catalogue check raises, for billing's callers
)
from engine.runtime.catalogue import (
    RenderedEmail,
    catalogue_path,
    load_catalogue,
    render_email,
)
from engine.runtime.mail import MailError, MailRefused, SmtpSettings, build_message, send_email

log = structlog.get_logger("tradecopy.billing.notifications")

CATALOGUE_DIR = Path(__file__).parent / "messages"
LANGUAGES = ("de", "en", "es", "fr", "pt", "ru")
#: Each kind's placeholders: its templates may use only these, and its text uses every one.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "payment_succeeded": frozenset({"amount", "provider", "reference"}),
    "payment_failed": frozenset({"amount", "provider", "reference", "link"}),
    "authentication_required": frozenset({"amount", "provider", "link"}),
    "dispute_opened": frozenset({"amount", "provider", "reference"}),
    "fee_charged": frozenset({"amount", "provider", "module", "reference"}),
    "allowance_used_up": frozenset({"trades", "provider", "link"}),
    "pool_limit_reached": frozenset({"limit", "plan", "link"}),
    "invite": frozenset({"provider", "link", "days"}),
}
KINDS = tuple(PLACEHOLDERS)


@functools.cache
def catalogue(language: str, directory: Path = CATALOGUE_DIR) -> dict[str, dict[str, Template]]:
    """Every kind of ``language``, checked whole (``engine.runtime.catalogue``): every text
    shows all its kind's placeholders."""
    path = catalogue_path(directory, language, "billing")
    return load_catalogue(path, PLACEHOLDERS, PLACEHOLDERS)


def check_catalogues(directory: Path = CATALOGUE_DIR) -> None:
    """Load every language (what the service does at start)."""
    for language in LANGUAGES:
        catalogue(language, directory)


def render(language: str, kind: str, *, to: str, **values: str | int) -> RenderedEmail:
    """The email of ``kind`` in ``language`` (English when the language has no catalogue);
    values are escaped in the HTML body."""
    templates = catalogue(language if language in LANGUAGES else "en")[kind]
    return render_email(templates, PLACEHOLDERS[kind], kind, to=to, values=values)


# --------------------------------------------------------------- the provider's SMTP server


class ProviderSmtp(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What is sealed per provider: the server and its password."""

    settings: SmtpSettings
    password: str | None = None


async def save_provider_smtp(
    conn: asyncpg.Connection,
    provider: str,
    settings: SmtpSettings,
    password: str | None = None,
    master_key: str | None = None,
) -> None:
    """Store the provider's SMTP settings sealed (AES-256-GCM, ``$TRADECOPY_BILLING_KEY``)."""
    plain = msgspec.json.encode(ProviderSmtp(settings=settings, password=password)).decode()
    await store.save_smtp_settings(conn, provider, seal_secret(plain, master_key))


async def provider_smtp(
    conn: asyncpg.Connection, provider: str, master_key: str | None = None
) -> ProviderSmtp | None:
    """The provider's SMTP settings and password, opened; None when the provider has none.
    The password goes to the SMTP client as an argument, never through the environment."""
    sealed = await store.smtp_settings_sealed(conn, provider)
    if sealed is None:
        return None
    opened = msgspec.json.decode(open_secret(sealed, master_key), type=ProviderSmtp)
    return ProviderSmtp(
        settings=msgspec.structs.replace(opened.settings, password_env=None),
        password=opened.password if opened.settings.username is not None else None,
    )


class SmtpPasswordError(TradecopyError):
    """An SMTP password was asked for where none was given (an empty stdin, an unset variable)."""


def read_smtp_password(*, stdin: TextIO | None = None, env_name: str | None = None) -> str | None:
    """A provider's SMTP password as an operator gives it: the first line of ``stdin``, or the
    variable ``env_name`` names (never an argument: argv is visible to every user of the
    machine and stays in shell histories). None when neither is asked for."""
    if stdin is not None and env_name is not None:
        raise SmtpPasswordError("give the SMTP password on stdin or in a variable, not both")
    if stdin is not None:
        password = stdin.readline().rstrip("\r\n")
        if not password:
            raise SmtpPasswordError("no SMTP password on stdin")
        return password
    if env_name is not None:
        password = os.environ.get(env_name)
        if not password:
            raise SmtpPasswordError(f"{env_name} is not set: no SMTP password")
        return password
    return None


async def configure_provider_smtp(
    database_url: str,
    provider: str,
    settings: SmtpSettings,
    password: str | None,
    master_key: str | None = None,
) -> None:
    """Store ``provider``'s SMTP settings and password sealed in ``billing_smtp_settings``:
    the only place billing keeps it. The settings name no variable (``password_env``): the
    password is opened from the sealed row at the moment of sending."""
    if settings.username is not None and password is None:
        raise SmtpPasswordError(f"SMTP user {settings.username!r} needs a password")
    stored = msgspec.structs.replace(settings, password_env=None)
    conn = await asyncpg.connect(database_url)
    try:
        await save_provider_smtp(conn, provider, stored, password, master_key)
    finally:
        await conn.close()
    log.info("provider_smtp_configured", provider=provider, host=settings.host,
             login=settings.username is not None)  # fmt: skip


# --------------------------------------------------------------- the outbox


def charge_link(portal_url: str, charge_key: str) -> str:
    """Where the follower pays or confirms one charge."""
    return f"{portal_url.rstrip('/')}/charges/{quote(charge_key, safe='')}"


async def queue_notifications(pool: asyncpg.Pool, portal_url: str, *, limit: int = 200) -> int:
    """Render every ``billing_notifications`` row whose follower has a contact into the
    outbox, once (the row is marked queued in the same transaction); how many."""

    async def queue(conn: asyncpg.Connection) -> int:
        pending = await store.notifications_to_queue(conn, limit)
        for note in pending:
            values = {
                "amount": format_money(note.amount_minor, note.currency),
                "provider": note.provider,
                "reference": note.window_id,
                "module": note.module,
                "link": charge_link(portal_url, note.charge_key),
            }
            wanted = {k: v for k, v in values.items() if k in PLACEHOLDERS[note.kind]}
            email = render(note.language, note.kind, to=note.email, **wanted)
            await queue_email(
                conn, note.notification_id, note.provider, note.kind, note.language, email
            )
            await store.notification_queued(conn, note.notification_id)
        return len(pending)

    return await store.serializable(pool, queue)


async def queue_email(
    conn: asyncpg.Connection,
    email_id: str,
    provider: str,
    kind: str,
    language: str,
    email: RenderedEmail,
) -> bool:
    """Put one rendered email in the outbox (once by ``email_id``)."""
    return await store.queue_email(
        conn,
        store.OutboxEmail(
            email_id=email_id,
            provider=provider,
            kind=kind,
            language=language,
            recipient=email.to,
            subject=email.subject,
            body_text=email.text,
            body_html=email.html,
            attempts=0,
        ),
    )


SmtpLookup = Callable[[asyncpg.Connection, str], Awaitable[ProviderSmtp | None]]


async def drain_outbox(
    pool: asyncpg.Pool,
    *,
    smtp_for: SmtpLookup = provider_smtp,
    base_delay_s: float = 30.0,
    max_delay_s: float = 3600.0,
    max_attempts: int = 8,
    lease_s: float = 300.0,
    limit: int = 50,
) -> dict[str, int]:
    """Send every due email over its provider's SMTP server; counts by result.

    A failure waits ``base × 2^(attempts − 1)`` (at most ``max_delay_s``) before the next try;
    a permanent refusal, or ``max_attempts`` tries, gives up and keeps the error."""
    counts: dict[str, int] = {}
    async with pool.acquire() as conn:
        due = await store.claim_due_emails(conn, lease_s=lease_s, limit=limit)
    for email in due:
        error = await _send_one(pool, email, smtp_for)
        async with pool.acquire() as conn:
            if error is None:
                await store.email_sent(conn, email.email_id)
                result = "sent"
            else:
                permanent = isinstance(error, MailRefused) and error.permanent
                give_up = permanent or email.attempts >= max_attempts
                delay = min(max_delay_s, base_delay_s * 2 ** (email.attempts - 1))
                await store.email_retry(
                    conn, email.email_id, after_s=delay, error=str(error), give_up=give_up
                )
                result = "failed" if give_up else "retry"
                log.warning(
                    "billing_email_not_sent",
                    email_id=email.email_id,
                    attempt=email.attempts,
                    give_up=give_up,
                    error=str(error),
                )
        metrics.EMAILS.labels(result=result).inc()
        counts[result] = counts.get(result, 0) + 1
    return counts


async def _send_one(
    pool: asyncpg.Pool, email: store.OutboxEmail, smtp_for: SmtpLookup
) -> MailError | None:
    """Hand one email to its provider's server; the error, or None when it was accepted."""
    try:
        async with pool.acquire() as conn:
            smtp = await smtp_for(conn, email.provider)
    except TradecopyError as exc:  # sealed settings that do not open with this key
        return MailError(str(exc))
    if smtp is None:
        return MailError(f"provider {email.provider!r} has no SMTP settings")
    settings = smtp.settings
    message = build_message(
        settings,
        to=email.recipient,
        subject=email.subject,
        text=email.body_text,
        html=email.body_html,
    )
    try:
        await send_email(settings, message, password=smtp.password)
    except MailError as exc:
        return exc
    return None
