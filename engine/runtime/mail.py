"""The SMTP client the services share (the API's emails, billing's invoices): settings, messages,
and ``send_email``, which runs the standard library's ``smtplib`` in a thread."""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Annotated, Literal

import msgspec
import structlog

from engine.core.errors import TradecopyError

log = structlog.get_logger("tradecopy.mail")

Security = Literal["starttls", "tls", "none"]


class MailError(TradecopyError):
    """A message was not accepted by the SMTP server (or the server was not reached)."""


class MailUnreachable(MailError):
    """The server did not answer in time or refused the connection: try again later."""


class MailRefused(MailError):
    """The server answered and refused (a recipient, the sender, the login or the data)."""

    def __init__(self, message: str, *, code: int | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.permanent = permanent
        """5xx: sending the same message again will fail the same way."""


class SmtpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where and how to hand messages over. The password is never in the settings: the caller
    passes it to ``send_email`` (billing opens it from its sealed row), or it is read from the
    environment variable ``password_env`` names, at the moment of sending."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    security: Security = "starttls"
    """``starttls`` (submission, 587), ``tls`` (implicit TLS, 465), ``none`` (a local relay)."""
    username: str | None = None
    password_env: str | None = "TRADECOPY_SMTP_PASSWORD"
    """The environment variable holding the password; used only when ``username`` is set."""
    from_address: str
    """``Name <address>`` or a bare address."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0
    """Per network operation: connecting, each command, the data."""
    verify_tls: bool = True
    """Check the server's certificate and name (off only for a test server)."""


def build_message(
    settings: SmtpSettings,
    *,
    to: str,
    subject: str,
    text: str,
    html: str | None = None,
    reply_to: str | None = None,
) -> EmailMessage:
    """A message with a plain text body and, when given, an HTML alternative (mail readers
    show the last alternative they can: text first, HTML second)."""
    message = EmailMessage()
    message["From"] = settings.from_address
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = settings.from_address.rpartition("@")[2].strip(" >") or None
    message["Message-ID"] = make_msgid(domain=domain)
    if reply_to is not None:
        message["Reply-To"] = reply_to
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def _password(settings: SmtpSettings, given: str | None) -> str | None:
    if settings.username is None:
        return None
    if given is not None:
        return given
    if settings.password_env is None:
        return None
    password = os.environ.get(settings.password_env)
    if password is None:
        raise MailError(
            f"SMTP user {settings.username!r} is set but {settings.password_env} is not"
        )
    return password


def _send_blocking(settings: SmtpSettings, message: EmailMessage, given: str | None) -> None:
    password = _password(settings, given)
    context = ssl.create_default_context()
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    client: smtplib.SMTP
    if settings.security == "tls":
        client = smtplib.SMTP_SSL(
            settings.host, settings.port, timeout=settings.timeout_s, context=context
        )
    else:
        client = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout_s)
    with client:
        client.ehlo()
        if settings.security == "starttls":
            client.starttls(context=context)
            client.ehlo()
        if settings.username is not None and password is not None:
            client.login(settings.username, password)
        refused = client.send_message(message)
    if refused:  # some recipients were accepted, these were not
        code, reason = next(iter(refused.values()))
        raise MailRefused(
            f"recipients refused: {', '.join(refused)} ({code} {_text(reason)})",
            code=code,
            permanent=500 <= code < 600,
        )


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


async def send_email(
    settings: SmtpSettings, message: EmailMessage, *, password: str | None = None
) -> None:
    """Hand ``message`` to the server; raise ``MailUnreachable`` (network, timeout: retry
    later) or ``MailRefused`` (the server said no) — nothing else of smtplib leaks out.

    ``password``: the login's password when the caller holds it (a sealed setting it opened);
    otherwise it is read from the variable ``settings.password_env`` names."""
    where = f"{settings.host}:{settings.port}"
    try:
        await asyncio.to_thread(_send_blocking, settings, message, password)
    except MailError:
        raise
    except smtplib.SMTPRecipientsRefused as exc:
        code, reason = next(iter(exc.recipients.values()))
        raise MailRefused(
            f"{where} refused every recipient: {', '.join(exc.recipients)} "
            f"({code} {_text(reason)})",
            code=code,
            permanent=500 <= code < 600,
        ) from None
    except smtplib.SMTPAuthenticationError as exc:
        # The reply text only: never the credentials that were sent.
        raise MailRefused(
            f"{where} refused the login of {settings.username!r} ({exc.smtp_code})",
            code=exc.smtp_code,
            permanent=True,
        ) from None
    except smtplib.SMTPResponseException as exc:
        raise MailRefused(
            f"{where} refused the message ({exc.smtp_code} {_text(exc.smtp_error)})",
            code=exc.smtp_code,
            permanent=500 <= exc.smtp_code < 600,
        ) from None
    except smtplib.SMTPServerDisconnected as exc:
        if "timed out" in str(exc):  # smtplib reports a read timeout as a disconnect
            raise MailUnreachable(
                f"{where} did not answer within {settings.timeout_s:g} s"
            ) from None
        raise MailUnreachable(f"{where} closed the connection: {exc}") from None
    except smtplib.SMTPException as exc:
        raise MailRefused(f"{where}: {exc}") from None
    except TimeoutError:
        raise MailUnreachable(f"{where} did not answer within {settings.timeout_s:g} s") from None
    except (OSError, ssl.SSLError) as exc:
        raise MailUnreachable(f"{where} cannot be reached: {exc}") from None
    log.info("email_sent", to=message["To"], server=where)
