"""Invites, password reset and email verification through a real SMTP server (aiosmtpd), the
email outbox with its retries, the message catalogue, and the rate limits of these endpoints."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from aiosmtpd.controller import Controller
from conftest import wait_until
from test_api_support import PASSWORD, Api, api_config, serve
from test_mail import Inbox, free_port

from engine.api import emailtexts, identity
from engine.api.config import ApiConfig
from engine.api.handling import STATE_KEY
from engine.api.store import migrate
from engine.runtime.mail import SmtpSettings

NEW_PASSWORD = "a brand new passphrase 42"
_TOKEN = re.compile(r"#token=([A-Za-z0-9_-]+)")


class Mailbox:
    """A real SMTP server on a free port of 127.0.0.1, started and stopped at will."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.port = free_port()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def settings(self) -> SmtpSettings:
        return SmtpSettings(host="127.0.0.1", port=self.port, security="none",
                            from_address="Tradecopy <noreply@tradecopy.example>",
                            timeout_s=2.0)  # fmt: skip

    def to(self, address: str) -> list[Any]:
        return [m for m in self.inbox.messages if m["To"] == address]

    async def token_for(self, address: str, count: int = 1) -> str:
        await wait_until(lambda: len(self.to(address)) >= count, f"email {count} to {address}")
        message = self.to(address)[count - 1]
        text = message.get_body(("plain",)).get_content()
        html = message.get_body(("html",)).get_content()
        found = _TOKEN.search(text)
        assert found is not None, text
        assert found.group(1) in html  # the HTML alternative carries the same link
        return found.group(1)


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    box.start()
    try:
        yield box
    finally:
        box.stop()


def mail_config(box: Mailbox, **overrides: Any) -> ApiConfig:
    values: dict[str, Any] = {"smtp": box.settings, "email_poll_s": 0.05, "email_retry_s": 0.1,
                              "public_url": "https://app.tradecopy.example/"}  # fmt: skip
    values.update(overrides)
    return api_config(**values)


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any, mailbox: Mailbox) -> AsyncIterator[Api]:
    await migrate(database_url)
    client, pool = await serve(database_url, nc, mail_config(mailbox))
    try:
        yield Api(client=client, pool=pool, database_url=database_url, js=js)
    finally:
        await client.close()
        await pool.close()


async def sql(api: Api, query: str, *args: Any) -> list[Any]:
    """Past every wall (the test's own superuser connection)."""
    conn = await asyncpg.connect(api.database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- invites


async def test_an_invite_is_emailed_accepted_and_the_follower_signs_in(
    api: Api, mailbox: Mailbox
) -> None:
    provider = await api.provider("alpha")
    email = "newcomer@example.com"
    status, invite = await api.call(
        "POST", "/v1/invites", provider, json={"email": email, "role": "follower"}
    )
    assert status == 201, invite
    assert invite["status"] == "pending" and invite["tenant_id"] == "alpha"
    token = await mailbox.token_for(email)
    message = mailbox.to(email)[0]
    assert message["Subject"] == "You are invited to Alpha on Tradecopy"
    assert (
        f"https://app.tradecopy.example/invite#token={token}"
        in message.get_body(("plain",)).get_content()
    )
    status, pair = await api.call(
        "POST", "/v1/invites/accept",
        json={"token": token, "password": PASSWORD, "username": "newcomer"},
    )  # fmt: skip
    assert status == 201, pair
    assert pair["token_type"] == "Bearer" and pair["refresh_token"]
    status, me = await api.call(
        "GET", "/v1/me", headers={"Authorization": f"Bearer {pair['access_token']}"}
    )
    assert status == 200, me
    assert (me["role"], me["tenant_id"], me["email"]) == ("follower", "alpha", email)
    assert me["email_verified"] is True and me["username"] == "newcomer"
    follower = await api.login("newcomer")
    assert follower.tenant_id == "alpha"
    status, page = await api.call("GET", "/v1/invites", provider)
    assert [i["status"] for i in page["items"]] == ["accepted"]
    # Stored: the token's SHA-256 only; the sent email's sealed body is gone.
    rows = await sql(api, "SELECT token_hash FROM api_invites")
    assert token.encode() not in bytes(rows[0]["token_hash"])
    outbox = await sql(api, "SELECT sealed, sent_at, attempts FROM api_email_outbox")
    assert [(r["sealed"], r["attempts"]) for r in outbox] == [(None, 1)]


async def test_an_operator_invites_a_provider_into_a_tenant(api: Api, mailbox: Mailbox) -> None:
    operator = await api.as_operator()
    await api.provider("alpha")
    status, body = await api.call(
        "POST", "/v1/invites", operator, json={"email": "second@alpha.example", "role": "provider"}
    )
    assert status == 422 and body["errors"][0]["field"] == "tenant_id"
    status, body = await api.call(
        "POST", "/v1/invites", operator,
        json={"email": "second@alpha.example", "role": "provider", "tenant_id": "nowhere"},
    )  # fmt: skip
    assert status == 404
    status, invite = await api.call(
        "POST", "/v1/invites", operator,
        json={"email": "second@alpha.example", "role": "provider", "tenant_id": "alpha"},
    )  # fmt: skip
    assert status == 201, invite
    token = await mailbox.token_for("second@alpha.example")
    status, _ = await api.call(
        "POST", "/v1/invites/accept", json={"token": token, "password": PASSWORD}
    )
    assert status == 201
    second = await api.login("second@alpha.example")
    status, me = await api.call("GET", "/v1/me", second)
    assert (me["role"], me["tenant_id"]) == ("provider", "alpha")


async def test_who_may_invite_whom(api: Api) -> None:
    provider = await api.provider("alpha")
    await api.provider("bravo")
    follower = await api.follower(provider, "fiona")
    status, body = await api.call(
        "POST", "/v1/invites", provider, json={"email": "p@example.com", "role": "provider"}
    )
    assert status == 403, body
    status, _ = await api.call(
        "POST", "/v1/invites", provider,
        json={"email": "p@example.com", "role": "follower", "tenant_id": "bravo"},
    )  # fmt: skip
    assert status == 404  # another tenant: as if there were none
    status, _ = await api.call(
        "POST", "/v1/invites", follower, json={"email": "p@example.com", "role": "follower"}
    )
    assert status == 403


async def test_an_invite_works_once(api: Api, mailbox: Mailbox) -> None:
    provider = await api.provider("alpha")
    await api.call("POST", "/v1/invites", provider, json={"email": "a@example.com",
                                                          "role": "follower"})  # fmt: skip
    token = await mailbox.token_for("a@example.com")
    first = await api.call("POST", "/v1/invites/accept", json={"token": token,
                                                                "password": PASSWORD})  # fmt: skip
    assert first[0] == 201
    again = await api.call("POST", "/v1/invites/accept", json={"token": token,
                                                                "password": PASSWORD})  # fmt: skip
    assert again[0] == 400 and again[1]["type"].endswith("/invalid-token")
    guess = await api.call("POST", "/v1/invites/accept",
                           json={"token": token[:-2] + "xy", "password": PASSWORD})  # fmt: skip
    assert guess[0] == 400 and guess[1]["detail"] == again[1]["detail"]


async def test_an_expired_invite_is_refused(api: Api, mailbox: Mailbox) -> None:
    provider = await api.provider("alpha")
    status, invite = await api.call(
        "POST", "/v1/invites", provider, json={"email": "late@example.com", "role": "follower"}
    )
    assert invite["expires_at"] > invite["created_at"]
    rows = await sql(
        api, "SELECT expires_at - created_at AS ttl FROM api_invites WHERE invite_id = $1::uuid",
        invite["invite_id"],
    )  # fmt: skip
    assert rows[0]["ttl"].days == 7
    token = await mailbox.token_for("late@example.com")
    await sql(api, "UPDATE api_invites SET expires_at = now() - interval '1 second'")
    status, body = await api.call(
        "POST", "/v1/invites/accept", json={"token": token, "password": PASSWORD}
    )
    assert status == 400 and body["type"].endswith("/invalid-token")
    status, page = await api.call("GET", "/v1/invites", provider)
    assert page["items"][0]["status"] == "expired"


async def test_a_revoked_invite_is_refused_and_others_cannot_revoke(
    api: Api, mailbox: Mailbox
) -> None:
    provider = await api.provider("alpha")
    other = await api.provider("bravo")
    status, invite = await api.call(
        "POST", "/v1/invites", provider, json={"email": "gone@example.com", "role": "follower"}
    )
    token = await mailbox.token_for("gone@example.com")
    path = f"/v1/invites/{invite['invite_id']}"
    assert (await api.call("DELETE", path, other))[0] == 404
    assert (await api.call("GET", "/v1/invites", other))[1]["items"] == []
    assert (await api.call("DELETE", path, provider))[0] == 204
    assert (await api.call("DELETE", path, provider))[0] == 204  # as API keys: idempotent
    status, _ = await api.call(
        "POST", "/v1/invites/accept", json={"token": token, "password": PASSWORD}
    )
    assert status == 400
    status, page = await api.call("GET", "/v1/invites", provider)
    assert page["items"][0]["status"] == "revoked"


# -------------------------------------------------------------------- password reset


async def test_a_password_reset_goes_through_smtp_and_ends_every_session(
    api: Api, mailbox: Mailbox
) -> None:
    provider = await api.provider("alpha")
    email = "owner@alpha.example.com"
    status, body = await api.call("POST", "/v1/auth/password-reset", json={"email": email})
    assert (status, body) == (202, None)
    token = await mailbox.token_for(email)
    assert mailbox.to(email)[0]["Subject"] == "Reset your Tradecopy password"
    status, _ = await api.call(
        "POST", "/v1/auth/password-reset/confirm",
        json={"token": token, "new_password": NEW_PASSWORD},
    )  # fmt: skip
    assert status == 204
    status, _ = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": provider.refresh})
    assert status == 401  # the session from before the reset is over
    status, _ = await api.call(
        "POST", "/v1/auth/login", json={"identifier": email, "password": PASSWORD}
    )
    assert status == 401
    await api.login(email, NEW_PASSWORD)
    status, body = await api.call(
        "POST", "/v1/auth/password-reset/confirm",
        json={"token": token, "new_password": "yet another passphrase"},
    )  # fmt: skip
    assert status == 400 and body["type"].endswith("/invalid-token")
    audit = await sql(api, "SELECT action FROM api_audit_log WHERE action = 'reset_password'")
    assert len(audit) == 1


async def test_a_reset_request_tells_nothing_about_the_email(api: Api, mailbox: Mailbox) -> None:
    await api.provider("alpha")
    known = await api.client.post(
        "/v1/auth/password-reset", json={"email": "owner@alpha.example.com"}
    )
    unknown = await api.client.post(
        "/v1/auth/password-reset", json={"email": "ghost@alpha.example.com"}
    )
    assert known.status == unknown.status == 202
    assert await known.read() == await unknown.read() == b""
    assert set(known.headers) == set(unknown.headers)
    await mailbox.token_for("owner@alpha.example.com")
    await asyncio.sleep(0.3)
    assert mailbox.to("ghost@alpha.example.com") == []
    assert len(await sql(api, "SELECT 1 FROM api_user_tokens")) == 1


async def test_an_expired_reset_link_is_refused(api: Api, mailbox: Mailbox) -> None:
    await api.provider("alpha")
    email = "owner@alpha.example.com"
    await api.call("POST", "/v1/auth/password-reset", json={"email": email})
    token = await mailbox.token_for(email)
    rows = await sql(api, "SELECT expires_at - created_at AS ttl FROM api_user_tokens")
    assert rows[0]["ttl"].total_seconds() == 3600
    await sql(api, "UPDATE api_user_tokens SET expires_at = now() - interval '1 second'")
    status, _ = await api.call(
        "POST", "/v1/auth/password-reset/confirm",
        json={"token": token, "new_password": NEW_PASSWORD},
    )  # fmt: skip
    assert status == 400
    await api.login(email)  # the password did not change


# ---------------------------------------------------------------- email verification


async def test_an_email_is_verified_by_its_link(api: Api, mailbox: Mailbox) -> None:
    provider = await api.provider("alpha")
    follower = await api.follower(provider, "fiona")
    status, me = await api.call("GET", "/v1/me", follower)
    assert me["email_verified"] is False
    status, _ = await api.call("POST", "/v1/me/email-verification", follower)
    assert status == 202
    token = await mailbox.token_for(follower.email)
    assert (
        "https://app.tradecopy.example/verify-email#token="
        in mailbox.to(follower.email)[0].get_body(("plain",)).get_content()
    )
    assert (await api.call("POST", "/v1/auth/verify-email", json={"token": token}))[0] == 204
    status, me = await api.call("GET", "/v1/me", follower)
    assert me["email_verified"] is True
    assert (await api.call("POST", "/v1/auth/verify-email", json={"token": token}))[0] == 400
    assert (await api.call("POST", "/v1/me/email-verification", follower))[0] == 409
    status, users = await api.call("GET", "/v1/users", provider)
    assert {u["email"]: u["email_verified"] for u in users["items"]}[follower.email] is True


# ------------------------------------------------------------------------ the outbox


async def test_the_outbox_retries_while_smtp_is_down_and_delivers_when_it_is_back(
    database_url: str, nc: Any, js: Any
) -> None:
    box = Mailbox()  # not started: nothing listens on its port yet
    await migrate(database_url)
    client, pool = await serve(database_url, nc, mail_config(box, email_retry_s=0.2))
    api = Api(client=client, pool=pool, database_url=database_url, js=js)
    try:
        provider = await api.provider("alpha")
        status, _ = await api.call(
            "POST", "/v1/invites", provider, json={"email": "w@example.com", "role": "follower"}
        )
        assert status == 201

        async def failed_twice() -> bool:
            rows = await sql(api, "SELECT attempts, last_error FROM api_email_outbox")
            return bool(rows) and rows[0]["attempts"] >= 2

        await wait_until(failed_twice, "two failed attempts")
        row = (await sql(api, "SELECT * FROM api_email_outbox"))[0]
        assert "cannot be reached" in row["last_error"]
        assert row["sent_at"] is None and row["sealed"] is not None
        box.start()
        try:
            await box.token_for("w@example.com")
        finally:
            box.stop()

        async def marked_sent() -> bool:
            # The server has the message before the outbox's row says so: wait for the row.
            return (await sql(api, "SELECT sent_at FROM api_email_outbox"))[0][
                "sent_at"
            ] is not None

        await wait_until(marked_sent, "the outbox row marked sent")
        rows = await sql(api, "SELECT attempts, sent_at, sealed, last_error FROM api_email_outbox")
        assert rows[0]["sent_at"] is not None and rows[0]["attempts"] >= 3
        assert rows[0]["sealed"] is None and rows[0]["last_error"] is None
        assert len(box.inbox.messages) == 1  # sent once, though tried many times
    finally:
        await client.close()
        await pool.close()


async def test_the_backoff_doubles_and_a_permanent_refusal_stops_retries(
    api: Api, mailbox: Mailbox
) -> None:
    from engine.api.outbox import retry_delay_s

    assert [retry_delay_s(n, 10) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert retry_delay_s(30, 10) == 3600
    mailbox.inbox.refuse = ("bounce@example.com",)
    provider = await api.provider("alpha")
    await api.call("POST", "/v1/invites", provider, json={"email": "bounce@example.com",
                                                          "role": "follower"})  # fmt: skip

    async def gave_up() -> bool:
        rows = await sql(api, "SELECT failed_at FROM api_email_outbox")
        return bool(rows) and rows[0]["failed_at"] is not None

    await wait_until(gave_up, "the outbox to give up on a refused recipient")
    row = (await sql(api, "SELECT * FROM api_email_outbox"))[0]
    assert row["attempts"] == 1 and "550" in row["last_error"] and row["sealed"] is None


async def test_without_smtp_emails_wait_and_one_warning_says_so(
    database_url: str, nc: Any, js: Any
) -> None:
    await migrate(database_url)
    client, pool = await serve(database_url, nc, api_config(email_poll_s=0.05))
    api = Api(client=client, pool=pool, database_url=database_url, js=js)
    try:
        provider = await api.provider("alpha")
        status, _ = await api.call("POST", "/v1/me/email-verification", provider)
        assert status == 202
        state = client.app[STATE_KEY]
        with structlog.testing.capture_logs() as logs:
            state.mailer._warned = False
            assert await state.mailer.send_due() == 0
            assert await state.mailer.send_due() == 0
        warnings = [e for e in logs if e["event"] == "api_email_not_configured"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
        rows = await sql(api, "SELECT attempts, sent_at FROM api_email_outbox")
        assert [(r["attempts"], r["sent_at"]) for r in rows] == [(0, None)]
    finally:
        await client.close()
        await pool.close()


# ------------------------------------------------------------------------ rate limits


async def test_every_unauthenticated_identity_endpoint_is_rate_limited(
    database_url: str, nc: Any, js: Any
) -> None:
    open_routes = [r for r in identity.ROUTES if r.roles is None]
    assert open_routes and all(r.rate_limited for r in open_routes)
    await migrate(database_url)
    client, pool = await serve(database_url, nc, api_config(auth_burst=2, auth_rate_per_minute=1))
    api = Api(client=client, pool=pool, database_url=database_url, js=js)
    bodies = {
        "/v1/invites/accept": {"token": "x" * 43, "password": PASSWORD},
        "/v1/auth/password-reset": {"email": "ghost@example.com"},
        "/v1/auth/password-reset/confirm": {"token": "x" * 43, "new_password": PASSWORD},
        "/v1/auth/verify-email": {"token": "x" * 43},
    }
    try:
        assert set(bodies) == {r.path for r in open_routes}
        for path, body in bodies.items():
            answers = [(await api.call("POST", path, json=body))[0] for _ in range(3)]
            assert answers[:2] != [429, 429] and answers[2] == 429, (path, answers)
    finally:
        await client.close()
        await pool.close()


async def test_reset_requests_are_limited_per_email(database_url: str, nc: Any, js: Any) -> None:
    """Besides the route's bucket per client, each email named has its own (as login has)."""
    await migrate(database_url)
    client, pool = await serve(database_url, nc, api_config(auth_burst=2, auth_rate_per_minute=1))
    state = client.app[STATE_KEY]
    api = Api(client=client, pool=pool, database_url=database_url, js=js)
    try:
        status, _ = await api.call(
            "POST", "/v1/auth/password-reset", json={"email": "X@example.com"}
        )
        assert status == 202
        keys = [k.partition("|")[2] for k in state.auth_limits._buckets]
        assert sorted(keys) == ["reset:x@example.com", "route:/v1/auth/password-reset"]
        # Spend the email's bucket alone: the next request for it is refused, others pass.
        state.auth_limits.take(next(k for k in state.auth_limits._buckets if "reset:" in k))
        state.auth_limits._buckets.pop(next(k for k in state.auth_limits._buckets if "route:" in k))
        status, _ = await api.call(
            "POST", "/v1/auth/password-reset", json={"email": "x@example.com"}
        )
        assert status == 429
        status, _ = await api.call(
            "POST", "/v1/auth/password-reset", json={"email": "y@example.com"}
        )
        assert status == 202
    finally:
        await client.close()
        await pool.close()


# ------------------------------------------------------------------ the catalogue


def test_every_language_has_every_kind_and_key() -> None:
    assert "en" in emailtexts.languages()
    for language in emailtexts.languages():
        found = emailtexts.catalogue(language)
        assert set(found) == set(emailtexts.KINDS)
        for templates in found.values():
            assert set(templates) == set(emailtexts.KEYS)


def test_a_catalogue_missing_a_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    english = (emailtexts.CATALOGUE_DIR / "en.toml").read_text(encoding="utf-8")
    broken = english.replace('subject = "Reset your Tradecopy password"\n', "")
    assert broken != english
    (tmp_path / "xx.toml").write_text(broken, encoding="utf-8")
    (tmp_path / "yy.toml").write_text(english.replace("$link", "$lnk", 1), encoding="utf-8")
    monkeypatch.setattr(emailtexts, "CATALOGUE_DIR", tmp_path)
    emailtexts.catalogue.cache_clear()
    try:
        with pytest.raises(emailtexts.CatalogueError, match=r"\[password_reset\] has no subject"):
            emailtexts.catalogue("xx")
        with pytest.raises(emailtexts.CatalogueError, match="unknown placeholders"):
            emailtexts.catalogue("yy")
        with pytest.raises(emailtexts.CatalogueError, match="no email catalogue"):
            emailtexts.catalogue("zz")
    finally:
        emailtexts.catalogue.cache_clear()


def test_values_are_escaped_in_html_only() -> None:
    email = emailtexts.render(
        "en", "invite", to="a@example.com", link="https://x.example/invite#token=t",
        tenant="<b>Evil & Co</b>", role="follower", days=7,
    )  # fmt: skip
    assert "<b>Evil & Co</b>" in email.text
    assert "&lt;b&gt;Evil &amp; Co&lt;/b&gt;" in email.html and "<b>Evil" not in email.html


# ------------------------------------------------------------ settings from the environment


def test_smtp_and_public_url_come_from_the_environment_when_the_config_leaves_them() -> None:
    from engine.api.config import ApiConfigError, with_environment

    env = {"TRADECOPY_SMTP_HOST": "smtp.example.com", "TRADECOPY_SMTP_PORT": "465",
           "TRADECOPY_SMTP_SECURITY": "tls", "TRADECOPY_SMTP_USERNAME": "mailer",
           "TRADECOPY_SMTP_FROM": "Tradecopy <noreply@example.com>",
           "TRADECOPY_API_PUBLIC_URL": "https://app.example.com"}  # fmt: skip
    config = with_environment(ApiConfig(), env)
    assert config.smtp == SmtpSettings(
        host="smtp.example.com", port=465, security="tls", username="mailer",
        from_address="Tradecopy <noreply@example.com>",
    )  # fmt: skip
    assert config.link_base == "https://app.example.com"
    assert with_environment(ApiConfig(), {}).smtp is None
    assert with_environment(ApiConfig(port=9000), {}).link_base == "http://127.0.0.1:9000"
    own = ApiConfig(smtp=SmtpSettings(host="relay", from_address="a@b.example"))
    assert with_environment(own, env).smtp == own.smtp  # the file wins
    with pytest.raises(ApiConfigError, match="TRADECOPY_SMTP_FROM"):
        with_environment(ApiConfig(), {"TRADECOPY_SMTP_HOST": "h"})
    with pytest.raises(ApiConfigError, match="SMTP settings"):
        with_environment(ApiConfig(), {**env, "TRADECOPY_SMTP_SECURITY": "ssl"})
