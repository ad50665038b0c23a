"""The email outbox: emails are written (and sealed) in the transaction that made their token,
and a sender task hands them to SMTP with retries and exponential backoff, so none is lost."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import msgspec
import structlog

from engine.api import metrics
from engine.api.crypto import CredentialsError, decrypt, encrypt
from engine.api.emailtexts import RenderedEmail, render
from engine.api.sealing import email_binding
from engine.api.store import PLATFORM
from engine.runtime.mail import MailError, MailRefused, build_message, send_email

log = structlog.get_logger("tradecopy.api")

#: Emails claimed per pass; each is leased for long enough to be sent.
_BATCH = 20
_MAX_BACKOFF_S = 3600.0


async def enqueue_email(
    state: Any, conn: Any, *, tenant_id: str | None, kind: str, to: str, **values: str | int
) -> uuid.UUID:
    """Write the email of ``kind`` to the outbox, in ``conn``'s transaction; the sender is
    woken once that transaction is committed (``state.mailer.wake()`` by the caller)."""
    email = render(state.config.email_language, kind, to=to, **values)
    email_id = uuid.uuid4()
    key = state.secrets.master_key
    sealed = encrypt(key, msgspec.json.encode(email), *email_binding(tenant_id, email_id))
    await state.store.enqueue_email(
        conn, email_id=email_id, tenant_id=tenant_id, kind=kind, recipient=to, sealed=sealed,
        key_id=key.key_id,
    )  # fmt: skip
    return email_id


def retry_delay_s(attempts: int, first_s: float) -> float:
    """The wait after the ``attempts``-th failure: ``first_s``, then doubling, up to an hour."""
    return min(_MAX_BACKOFF_S, first_s * 2 ** max(0, attempts - 1))


class EmailSender:
    """Drains the outbox while the API runs. Several API instances may run one each: a
    claimed email is leased (``SKIP LOCKED``), so each is sent by one of them."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="api-email-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        cfg = self.state.config
        while True:
            try:
                await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be away a while: the loop outlives it
                log.exception("api_email_outbox_pass_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), cfg.email_poll_s)
            self._wake.clear()

    async def send_due(self) -> int:
        """One pass: send every due email; return how many were accepted."""
        cfg = self.state.config
        if cfg.smtp is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "api_email_not_configured",
                    detail="no smtp in the API configuration: emails stay in the outbox",
                )
            return 0
        store = self.state.store
        lease_s = cfg.smtp.timeout_s * 4 + 30
        async with store.tx(PLATFORM) as conn:
            rows = await store.claim_due_emails(conn, _BATCH, lease_s)
        sent = 0
        for row in rows:
            sent += await self._send_one(row)
        return sent

    async def _send_one(self, row: Any) -> int:
        cfg = self.state.config
        store = self.state.store
        kind, email_id = row["kind"], row["email_id"]
        error: str
        permanent = False
        try:
            email = self._open(row)
            message = build_message(
                cfg.smtp, to=email.to, subject=email.subject, text=email.text, html=email.html
            )
            await send_email(cfg.smtp, message)
        except MailRefused as exc:
            error, permanent = str(exc), exc.permanent
        except MailError as exc:
            error = str(exc)
        except CredentialsError as exc:  # sealed under a key this instance does not hold
            error, permanent = str(exc), True
        else:
            async with store.tx(PLATFORM) as conn:
                await store.mark_email_sent(conn, email_id)
            metrics.EMAILS_SENT.labels(kind).inc()
            log.info("api_email_sent", email_id=str(email_id), kind=kind)
            return 1
        attempts = row["attempts"] + 1
        give_up = permanent or attempts >= cfg.email_max_attempts
        retry_in = None if give_up else retry_delay_s(attempts, cfg.email_retry_s)
        async with store.tx(PLATFORM) as conn:
            await store.mark_email_failed(conn, email_id, error, retry_in)
        metrics.EMAILS_FAILED.labels(kind, "gave_up" if give_up else "retry").inc()
        log.warning(
            "api_email_failed", email_id=str(email_id), kind=kind, attempts=attempts,
            error=error, retry_in_s=retry_in,
        )  # fmt: skip
        return 0

    def _open(self, row: Any) -> RenderedEmail:
        key = self.state.secrets.master_key
        if row["key_id"] != key.key_id or row["sealed"] is None:
            raise CredentialsError(f"email {row['email_id']}: sealed under key {row['key_id']!r}")
        plain = decrypt(key, row["sealed"], *email_binding(row["tenant_id"], row["email_id"]))
        return msgspec.json.decode(plain, type=RenderedEmail)
