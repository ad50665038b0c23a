"""The shared SMTP client against a real SMTP server (aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiosmtpd.controller import Controller

from engine.runtime.mail import (
    MailError,
    MailRefused,
    MailUnreachable,
    SmtpSettings,
    build_message,
    send_email,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Inbox:
    """An aiosmtpd handler keeping what it accepts; refuses recipients at ``refuse``."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[Any] = []
        self.refuse = refuse

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:  # fmt: skip
        if address in self.refuse:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.messages.append(
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        )
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox(refuse=("nobody@example.com",))
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def settings_for(port: int, **overrides: Any) -> SmtpSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "security": "none",
                              "from_address": "Tradecopy <noreply@tradecopy.example>"}  # fmt: skip
    values.update(overrides)
    return SmtpSettings(**values)


async def test_a_message_is_delivered_with_its_headers(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    settings = settings_for(port)
    message = build_message(settings, to="ana@example.com", subject="Welcome", text="Hello Ana")
    await send_email(settings, message)
    assert len(inbox.messages) == 1
    got = inbox.messages[0]
    assert got["To"] == "ana@example.com"
    assert got["From"] == "Tradecopy <noreply@tradecopy.example>"
    assert got["Subject"] == "Welcome"
    assert got["Message-ID"].endswith("@tradecopy.example>")
    assert got["Date"]
    assert inbox.envelopes[0].mail_from == "noreply@tradecopy.example"
    assert inbox.envelopes[0].rcpt_tos == ["ana@example.com"]
    assert got.get_content().strip() == "Hello Ana"


async def test_text_and_html_parts_and_unicode_arrive_intact(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    settings = settings_for(port)
    subject = "Приглашение — Einladung ✓ 招待"
    text = "Grüße, Ана! Ссылка: https://x.example/a?t=1\n"
    html = "<p>Grüße, <b>Ана</b> — 招待</p>\n"
    await send_email(
        settings,
        build_message(settings, to="ana@example.com", subject=subject, text=text, html=html),
    )
    got = inbox.messages[0]
    assert got["Subject"] == subject
    assert got.get_content_type() == "multipart/alternative"
    parts = {  # SMTP carries CRLF line ends
        part.get_content_type(): part.get_content().replace("\r\n", "\n")
        for part in got.iter_parts()
    }
    assert parts == {"text/plain": text, "text/html": html}


async def test_a_refused_recipient_is_a_clear_permanent_error(smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    settings = settings_for(port)
    message = build_message(settings, to="nobody@example.com", subject="x", text="x")
    with pytest.raises(MailRefused) as refused:
        await send_email(settings, message)
    assert refused.value.code == 550 and refused.value.permanent
    assert "nobody@example.com" in str(refused.value) and "no such mailbox" in str(refused.value)
    assert inbox.messages == []


async def test_nothing_listening_is_unreachable() -> None:
    settings = settings_for(free_port(), timeout_s=2.0)
    message = build_message(settings, to="ana@example.com", subject="x", text="x")
    with pytest.raises(MailUnreachable) as unreachable:
        await send_email(settings, message)
    assert "cannot be reached" in str(unreachable.value)


async def test_a_silent_server_fails_within_the_timeout() -> None:
    """A server that accepts the connection and never greets: the timeout ends the wait."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = settings_for(port, timeout_s=0.5)
    message = build_message(settings, to="ana@example.com", subject="x", text="x")
    started = time.monotonic()
    try:
        with pytest.raises(MailUnreachable) as unreachable:
            await send_email(settings, message)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 3.0
    assert "did not answer within 0.5 s" in str(unreachable.value)


async def test_a_login_without_its_password_variable_is_refused_before_connecting(
    smtp: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, port = smtp
    monkeypatch.delenv("TC_TEST_SMTP_PASSWORD", raising=False)
    settings = settings_for(port, username="mailer", password_env="TC_TEST_SMTP_PASSWORD")
    message = build_message(settings, to="ana@example.com", subject="x", text="x")
    with pytest.raises(MailError, match="TC_TEST_SMTP_PASSWORD is not"):
        await send_email(settings, message)
    assert inbox.messages == []


def test_settings_hold_no_password_field() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            {"host": "h", "from_address": "a@b.example", "password": "secret"}, SmtpSettings
        )


# ------------------------------------------------------------------- TLS and login


def self_signed(tmp_path: Any) -> ssl.SSLContext:
    """A server context with a throw-away certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
            ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class OnlyMailer:
    """Accepts one login: mailer / the test's password."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> Any:  # fmt: skip
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == b"mailer"
            and auth_data.password == self.password
        )
        return AuthResult(success=ok, handled=False)  # not handled: the server answers 535


async def test_starttls_with_a_login_delivers_and_a_wrong_password_is_refused_unlogged(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox, hostname="127.0.0.1", port=port, tls_context=self_signed(tmp_path),
        require_starttls=True, authenticator=OnlyMailer("s3cret-mail-pw"), auth_required=True,
        auth_require_tls=True,
    )  # fmt: skip
    controller.start()
    try:
        settings = settings_for(port, security="starttls", verify_tls=False, username="mailer",
                                password_env="TC_TEST_SMTP_PASSWORD")  # fmt: skip
        monkeypatch.setenv("TC_TEST_SMTP_PASSWORD", "s3cret-mail-pw")
        await send_email(settings, build_message(settings, to="a@example.com", subject="s",
                                                 text="over TLS"))  # fmt: skip
        assert len(inbox.messages) == 1
        monkeypatch.setenv("TC_TEST_SMTP_PASSWORD", "wrong-pw-123")
        wrong = build_message(settings, to="a@example.com", subject="s", text="x")
        with structlog.testing.capture_logs() as logs, pytest.raises(MailRefused) as refused:
            await send_email(settings, wrong)
        assert refused.value.permanent and "refused the login of 'mailer'" in str(refused.value)
        assert "wrong-pw-123" not in str(refused.value) and "wrong-pw-123" not in str(logs)
        # With certificate checks on, a self-signed server is not trusted.
        monkeypatch.setenv("TC_TEST_SMTP_PASSWORD", "s3cret-mail-pw")
        strict = settings_for(port, security="starttls", username="mailer",
                              password_env="TC_TEST_SMTP_PASSWORD")  # fmt: skip
        with pytest.raises(MailUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await send_email(strict, build_message(strict, to="a@example.com", subject="s",
                                                   text="x"))  # fmt: skip
        assert len(inbox.messages) == 1
    finally:
        controller.stop()


async def test_implicit_tls_delivers(tmp_path: Any) -> None:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port,
                            ssl_context=self_signed(tmp_path))  # fmt: skip
    controller.start()
    try:
        settings = settings_for(port, security="tls", verify_tls=False)
        await send_email(settings, build_message(settings, to="a@example.com", subject="s",
                                                 text="implicit TLS"))  # fmt: skip
        assert inbox.messages[0].get_content().strip() == "implicit TLS"
    finally:
        controller.stop()
