"""Billing's emails: every catalogue complete, German and Russian emails through a real SMTP
server (aiosmtpd), the outbox retrying a server that is down until it answers."""

from __future__ import annotations

import base64
import email
import email.policy
import io
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiosmtpd.controller import Controller

from engine.billing import notifications, store
from engine.billing.config import ENV_BILLING_KEY
from engine.billing.notifications import (
    KINDS,
    LANGUAGES,
    PLACEHOLDERS,
    CatalogueError,
    catalogue,
    drain_outbox,
    queue_notifications,
    save_provider_smtp,
)
from engine.billing.store import ChargeDraft, ChargeState
from engine.billing.webhooks import charge_moved
from engine.runtime.mail import SmtpSettings

PORTAL = "https://copy.example/billing"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        )
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
def master_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv(ENV_BILLING_KEY, key)
    return key


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


# --------------------------------------------------------------- catalogues


def test_every_catalogue_has_every_kind_key_and_placeholder() -> None:
    for language in LANGUAGES:
        kinds = catalogue(language)
        assert set(kinds) == set(KINDS)
        for kind, templates in kinds.items():
            assert set(templates) == {"subject", "text", "html"}
            assert set(templates["text"].get_identifiers()) == PLACEHOLDERS[kind]
    assert sorted(p.stem for p in notifications.CATALOGUE_DIR.glob("*.toml")) == sorted(LANGUAGES)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda s: s.replace("[dispute_opened]", "[dispute_opened_x]"), "[dispute_opened]"),
        (lambda s: s.replace('subject = "Pago recibido: $amount"\n', ""), "has no subject"),
        (lambda s: s.replace("(referencia $reference). Gracias.\n\"\"\"", 'Gracias.\n"""', 1),
         "leaves out ['reference']"),
        (lambda s: s.replace("$amount a $provider (ref", "$amount a $vendor (ref", 1),
         "unknown placeholders ['vendor']"),
    ],
)  # fmt: skip
def test_a_catalogue_missing_a_kind_key_or_placeholder_fails(
    tmp_path: Path, change: Any, complaint: str
) -> None:
    for language in LANGUAGES:
        shutil.copy(notifications.CATALOGUE_DIR / f"{language}.toml", tmp_path)
    path = tmp_path / "es.toml"
    original = path.read_text(encoding="utf-8")
    changed = change(original)
    assert changed != original
    path.write_text(changed, encoding="utf-8")
    with pytest.raises(CatalogueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        notifications.check_catalogues(tmp_path)


# --------------------------------------------------------------- SMTP


def charge(key: str, follower: str, currency: str, amount: int) -> ChargeDraft:
    return ChargeDraft(
        idempotency_key=key,
        module="performance",
        follower=follower,
        provider="GoldDesk",
        plan_id="gold",
        window_id="2026-W13",
        currency=currency,
        amount_minor=amount,
        platform_fee_minor=1,
        destination="acct_1",
        lines=({"module": "performance", "amount_minor": amount},),
        issued_ns=1_774_648_800_000_000_000,
    )


async def charge_reaches(pool: asyncpg.Pool, draft: ChargeDraft, target: ChargeState) -> None:
    async def step(conn: asyncpg.Connection) -> None:
        await store.insert_charge(conn, draft)
        await store.transition_charge(conn, draft.idempotency_key, target, cause="test")
        stored = await store.charge_by_key(conn, draft.idempotency_key)
        assert stored is not None
        await charge_moved(conn, stored, target, None)

    await store.serializable(pool, step)


def settings_for(port: int) -> SmtpSettings:
    return SmtpSettings(
        host="127.0.0.1",
        port=port,
        security="none",
        from_address="GoldDesk <billing@golddesk.example>",
    )


def parts(message: email.message.EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


async def test_german_and_russian_emails_arrive_with_text_and_html(
    pool: asyncpg.Pool, smtp: tuple[Inbox, int], master_key: str
) -> None:
    inbox, port = smtp
    async with pool.acquire() as conn:
        await save_provider_smtp(conn, "GoldDesk", settings_for(port))
        sealed = await store.smtp_settings_sealed(conn, "GoldDesk")
        assert sealed is not None and "127.0.0.1" not in sealed  # stored sealed
        await store.save_contact(conn, "anna", "anna@example.de", "de")
        await store.save_contact(conn, "ivan", "ivan@example.ru", "ru")
    await charge_reaches(pool, charge("performance:anna:gold:W13", "anna", "EUR", 1234),
                         ChargeState.FAILED)  # fmt: skip
    await charge_reaches(pool, charge("performance:ivan:gold:W13", "ivan", "JPY", 5000),
                         ChargeState.DISPUTED)  # fmt: skip
    assert await queue_notifications(pool, PORTAL) == 2
    assert await queue_notifications(pool, PORTAL) == 0  # each notification rendered once
    assert await drain_outbox(pool) == {"sent": 2}
    by_to = {str(m["To"]): m for m in inbox.messages}
    assert set(by_to) == {"anna@example.de", "ivan@example.ru"}

    anna = by_to["anna@example.de"]
    assert anna["Subject"] == "Ihre Zahlung über 12.34 EUR ist fehlgeschlagen"
    text, html = parts(anna)
    assert "Ihre Zahlung über 12.34 EUR an GoldDesk (Referenz 2026-W13) ist fehlgeschlagen" in text
    assert f"{PORTAL}/charges/performance%3Aanna%3Agold%3AW13" in text
    assert "<strong>12.34 EUR</strong>" in html
    assert f'<a href="{PORTAL}/charges/performance%3Aanna%3Agold%3AW13">Jetzt bezahlen</a>' in html

    ivan = by_to["ivan@example.ru"]
    assert ivan["Subject"] == "Платёж на сумму 5000 JPY оспорен"
    text, html = parts(ivan)
    assert "Платёж на сумму 5000 JPY в пользу GoldDesk (номер 2026-W13) оспорен" in text
    assert "копирование сделок GoldDesk приостановлено" in text
    assert "<strong>5000 JPY</strong>" in html
    assert await drain_outbox(pool) == {}  # nothing sent twice


async def test_a_failing_smtp_server_is_retried_and_then_sent(
    pool: asyncpg.Pool, master_key: str
) -> None:
    port = free_port()  # nothing listens here yet
    async with pool.acquire() as conn:
        await save_provider_smtp(conn, "GoldDesk", settings_for(port))
        await store.save_contact(conn, "anna", "anna@example.de", "de")
    await charge_reaches(pool, charge("k-anna", "anna", "EUR", 990), ChargeState.SUCCEEDED)
    await queue_notifications(pool, PORTAL)
    assert await drain_outbox(pool, base_delay_s=0.0) == {"retry": 1}
    assert await drain_outbox(pool, base_delay_s=0.0) == {"retry": 1}
    async with pool.acquire() as conn:
        [(email_id, attempts, sent, error)] = await store.outbox_state(conn)
    assert (email_id, attempts, sent) == ("payment_succeeded:k-anna", 2, False)
    assert error is not None and "cannot be reached" in error

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        assert await drain_outbox(pool, base_delay_s=0.0) == {"sent": 1}
    finally:
        controller.stop()
    [message] = inbox.messages
    assert message["Subject"] == "Zahlung erhalten: 9.90 EUR"
    async with pool.acquire() as conn:
        assert await store.outbox_state(conn) == [("payment_succeeded:k-anna", 3, True, None)]


async def test_a_server_that_stays_down_is_given_up_after_the_last_attempt(
    pool: asyncpg.Pool, master_key: str
) -> None:
    async with pool.acquire() as conn:
        await save_provider_smtp(conn, "GoldDesk", settings_for(free_port()))
        await store.save_contact(conn, "anna", "anna@example.de", "de")
    await charge_reaches(pool, charge("k-anna", "anna", "EUR", 990), ChargeState.FAILED)
    await queue_notifications(pool, PORTAL)
    results = [await drain_outbox(pool, base_delay_s=0.0, max_attempts=3) for _ in range(4)]
    assert results == [{"retry": 1}, {"retry": 1}, {"failed": 1}, {}]


def test_every_kind_renders_in_every_language_with_values_escaped_in_html() -> None:
    values = {
        "amount": "12.34 EUR",
        "provider": "Gold & <Silver>",
        "reference": "2026-W13",
        "module": "performance",
        "link": "https://copy.example/x?a=1&b=2",
        "trades": 50,
        "limit": 10,
        "plan": "pro",
        "days": 7,
    }
    for language in LANGUAGES:
        for kind in KINDS:
            wanted = {k: v for k, v in values.items() if k in PLACEHOLDERS[kind]}
            mail = notifications.render(language, kind, to="x@example.com", **wanted)
            for part in (mail.subject, mail.text, mail.html):
                assert "$" not in part, (language, kind)
            assert "\n" not in mail.subject
            if "provider" in wanted:
                assert "Gold & <Silver>" in mail.text
                assert "<Silver>" not in mail.html
            if "link" in wanted:
                assert 'href="https://copy.example/x?a=1&amp;b=2"' in mail.html
    with pytest.raises(CatalogueError, match="needs"):
        notifications.render("de", "invite", to="x@example.com", provider="P")


# --------------------------------------------------------------------------- SMTP login


class OnlyGoldDesk:
    """An aiosmtpd authenticator accepting one login: golddesk / ``password``."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.tries: list[bytes] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> Any:  # fmt: skip
        from aiosmtpd.smtp import AuthResult, LoginPassword

        assert isinstance(auth_data, LoginPassword)
        self.tries.append(auth_data.password)
        ok = auth_data.login == b"golddesk" and auth_data.password == self.password
        return AuthResult(success=ok, handled=False)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_the_sealed_password_logs_in_to_the_providers_server(
    pool: asyncpg.Pool, master_key: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password is given once (from a variable the operator names), stored only sealed,
    and opened to log in at sending time."""
    inbox = Inbox()
    port = free_port()
    login = OnlyGoldDesk("gold-desk-pw-7")
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=login,
                            auth_required=True, auth_require_tls=False)  # fmt: skip
    controller.start()
    try:
        monkeypatch.setenv("GOLDDESK_SMTP_PW", "gold-desk-pw-7")
        password = notifications.read_smtp_password(env_name="GOLDDESK_SMTP_PW")
        monkeypatch.delenv("GOLDDESK_SMTP_PW")
        settings = msgspec.structs.replace(settings_for(port), username="golddesk")
        await notifications.configure_provider_smtp(database_url, "GoldDesk", settings, password)
        async with pool.acquire() as conn:
            sealed = await store.smtp_settings_sealed(conn, "GoldDesk")
            await store.save_contact(conn, "anna", "anna@example.de", "de")
        assert sealed is not None and "gold-desk-pw-7" not in sealed
        assert "gold-desk-pw-7" not in base64.b64decode(sealed).decode(errors="replace")
        await charge_reaches(pool, charge("k-anna", "anna", "EUR", 990), ChargeState.SUCCEEDED)
        await queue_notifications(pool, PORTAL)
        assert await drain_outbox(pool, base_delay_s=0.0) == {"sent": 1}
        assert login.tries == [b"gold-desk-pw-7"] and len(inbox.messages) == 1
        # handed to the SMTP client as an argument: never left in the process's environment
        assert "gold-desk-pw-7" not in os.environ.values()
        # A password the server refuses is a permanent refusal, kept, never in the error.
        await notifications.configure_provider_smtp(database_url, "GoldDesk", settings, "wrong-pw")
        await store.serializable(pool, lambda c: c.execute("DELETE FROM billing_notifications"))
        await charge_reaches(pool, charge("k-ben", "anna", "EUR", 500), ChargeState.SUCCEEDED)
        await queue_notifications(pool, PORTAL)
        assert await drain_outbox(pool, base_delay_s=0.0) == {"failed": 1}
        async with pool.acquire() as conn:
            errors = [e for _, _, sent, e in await store.outbox_state(conn) if not sent]
        assert len(errors) == 1 and "wrong-pw" not in str(errors)
    finally:
        controller.stop()


def test_an_smtp_password_comes_from_stdin_or_a_variable_never_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert notifications.read_smtp_password(stdin=io.StringIO("s3cret\n")) == "s3cret"
    assert notifications.read_smtp_password() is None
    with pytest.raises(notifications.SmtpPasswordError, match="stdin"):
        notifications.read_smtp_password(stdin=io.StringIO(""))
    monkeypatch.delenv("NO_SUCH_SMTP_PW", raising=False)
    with pytest.raises(notifications.SmtpPasswordError, match="NO_SUCH_SMTP_PW"):
        notifications.read_smtp_password(env_name="NO_SUCH_SMTP_PW")
    with pytest.raises(notifications.SmtpPasswordError, match="not both"):
        notifications.read_smtp_password(stdin=io.StringIO("a\n"), env_name="X")


async def test_smtp_set_stores_the_password_sealed_from_a_named_variable_never_argv(
    pool: asyncpg.Pool, master_key: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tradecopy billing smtp-set` reads the password from the variable it is told, and what
    it stores opens to the same settings and password."""
    import asyncio

    from engine.cli import main

    monkeypatch.setenv("DESK_PW", "desk-pw-42")
    argv = ["billing", "smtp-set", "GoldDesk", "--host", "127.0.0.1", "--port", "2525",
            "--security", "none", "--username", "desk", "--from", "Gold Desk <desk@example.com>",
            "--password-env", "DESK_PW", "--database-url", database_url]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    async with pool.acquire() as conn:
        opened = await notifications.provider_smtp(conn, "GoldDesk")
        sealed = await store.smtp_settings_sealed(conn, "GoldDesk")
    assert opened is not None and opened.password == "desk-pw-42"
    assert opened.settings.host == "127.0.0.1" and opened.settings.username == "desk"
    assert sealed is not None and "desk-pw-42" not in sealed
