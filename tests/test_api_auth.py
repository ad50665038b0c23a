"""Logins, access tokens, refresh rotation with family revocation, API keys, rate limits."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jwt
import pytest
from test_api_support import (
    PASSWORD,
    TEST_SECRETS,
    Api,
    api_config,
    running_api,
    serve,
)

from engine.api.auth import Caller, Role, hash_password, issue_access_token, verify_password
from engine.api.config import ApiConfigError, secrets_from_env
from engine.api.store import create_operator, migrate


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as running:
        yield running


@pytest.fixture
async def migrated_url(database_url: str) -> str:
    await migrate(database_url)
    return database_url


async def test_login_with_email_or_username_returns_a_token_pair(api: Api) -> None:
    operator = await api.as_operator()
    assert operator.tenant_id is None
    provider = await api.provider("alpha")
    assert provider.tenant_id == "alpha"
    status, body = await api.call(
        "POST",
        "/v1/auth/login",
        json={"identifier": "OWNER@alpha.example.com", "password": PASSWORD},
    )
    assert status == 200 and body["token_type"] == "Bearer" and body["expires_in"] == 900


async def test_wrong_password_and_unknown_user_get_the_same_answer(api: Api) -> None:
    await api.provider("alpha")
    wrong = await api.call(
        "POST", "/v1/auth/login", json={"identifier": "owner@alpha.example.com", "password": "nope"}
    )
    unknown = await api.call(
        "POST", "/v1/auth/login", json={"identifier": "ghost@alpha.example.com", "password": "nope"}
    )
    assert wrong[0] == unknown[0] == 401
    assert wrong[1]["detail"] == unknown[1]["detail"]
    assert wrong[1]["type"].endswith("/unauthorized")


async def test_passwords_are_stored_as_argon2id_hashes(api: Api) -> None:
    await api.provider("alpha")
    conn = await asyncpg.connect(api.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT password_hash FROM api_users WHERE email = 'owner@alpha.example.com'"
        )
    finally:
        await conn.close()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert verify_password(stored, PASSWORD) and not verify_password(stored, PASSWORD + "x")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_access_token_of_another_algorithm_or_audience_is_refused(api: Api) -> None:
    provider = await api.provider("alpha")
    claims = jwt.decode(provider.token, options={"verify_signature": False})
    forged = [
        jwt.encode(claims, "", algorithm="none"),
        jwt.encode(claims, TEST_SECRETS.jwt_secret, algorithm="HS512"),
        jwt.encode({**claims, "aud": "elsewhere"}, TEST_SECRETS.jwt_secret, algorithm="HS256"),
        jwt.encode({**claims, "iss": "elsewhere"}, TEST_SECRETS.jwt_secret, algorithm="HS256"),
        jwt.encode(
            {**claims, "exp": int(time.time()) - 5}, TEST_SECRETS.jwt_secret, algorithm="HS256"
        ),
        jwt.encode({**claims, "tid": "beta"}, b"k" * 48, algorithm="HS256"),
    ]
    for token in forged:
        status, body = await api.call("GET", "/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert status == 401, (token, body)
    assert (await api.call("GET", "/v1/me", provider))[0] == 200


async def test_refresh_rotates_and_reuse_revokes_the_whole_family(api: Api) -> None:
    provider = await api.provider("alpha")
    first = provider.refresh
    status, second = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": first})
    assert status == 200 and second["refresh_token"] != first
    status, third = await api.call(
        "POST", "/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}
    )
    assert status == 200
    # The first token again: stolen. Every token of its family dies, the newest included.
    status, body = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": first})
    assert status == 401, body
    status, _ = await api.call(
        "POST", "/v1/auth/refresh", json={"refresh_token": third["refresh_token"]}
    )
    assert status == 401
    # Another login (another family) is untouched.
    other = await api.login("owner@alpha.example.com")
    assert (await api.call("POST", "/v1/auth/refresh", json={"refresh_token": other.refresh}))[
        0
    ] == 200
    status, audit = await api.call("GET", "/v1/audit", provider)
    assert status == 200, audit
    assert any(e["action"] == "revoke_family" for e in audit["items"])


async def test_refresh_tokens_are_stored_hashed(api: Api) -> None:
    provider = await api.provider("alpha")
    conn = await asyncpg.connect(api.database_url)
    try:
        hashes = [
            bytes(r[0]) for r in await conn.fetch("SELECT token_hash FROM api_refresh_tokens")
        ]
    finally:
        await conn.close()
    assert hashes and all(provider.refresh.encode() not in h for h in hashes)
    assert all(len(h) == 32 for h in hashes)


async def test_logout_revokes_the_refresh_token(api: Api) -> None:
    provider = await api.provider("alpha")
    status, _ = await api.call("POST", "/v1/auth/logout", json={"refresh_token": provider.refresh})
    assert status == 204
    status, _ = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": provider.refresh})
    assert status == 401


async def test_api_key_authenticates_as_its_creator_until_revoked(api: Api) -> None:
    provider = await api.provider("alpha")
    status, created = await api.call("POST", "/v1/api-keys", provider, json={"name": "backend"})
    assert status == 201 and created["key"].startswith(created["prefix"] + "_")
    key_headers = {"X-API-Key": created["key"]}
    status, me = await api.call("GET", "/v1/me", headers=key_headers)
    assert status == 200 and me["tenant_id"] == "alpha" and me["role"] == "provider"
    status, user = await api.call(
        "POST", "/v1/users", json={"email": "k@alpha.example.com", "password": PASSWORD},
        headers=key_headers,
    )  # fmt: skip
    assert status == 201, user
    status, audit = await api.call("GET", "/v1/audit", provider)
    entry = next(e for e in audit["items"] if e["entity_id"] == user["user_id"])
    assert entry["actor_key_id"] == created["key_id"] and entry["actor_user_id"] == provider.user_id
    status, listed = await api.call("GET", "/v1/api-keys", provider)
    assert status == 200, listed
    assert [k["prefix"] for k in listed["items"]] == [created["prefix"]]
    assert "key" not in listed["items"][0]
    status, _ = await api.call("DELETE", f"/v1/api-keys/{created['key_id']}", provider)
    assert status == 204
    status, body = await api.call("GET", "/v1/me", headers=key_headers)
    assert status == 401, body
    status, _ = await api.call("GET", "/v1/me", headers={"X-API-Key": created["key"] + "x"})
    assert status == 401


async def test_login_is_rate_limited_per_client(migrated_url: str, nc: object) -> None:
    client, pool = await serve(migrated_url, nc, api_config(auth_burst=3, auth_rate_per_minute=1))
    try:
        statuses = []
        for _ in range(5):
            resp = await client.post(
                "/v1/auth/login", json={"identifier": "x@example.com", "password": "wrong-pw"}
            )
            statuses.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1
                assert resp.content_type == "application/problem+json"
        assert statuses[:3] == [401, 401, 401] and statuses[3:] == [429, 429]
    finally:
        await client.close()
        await pool.close()


async def test_only_an_operator_may_create_tenants(api: Api) -> None:
    provider = await api.provider("alpha")
    status, body = await api.call(
        "POST", "/v1/tenants", provider,
        json={"tenant_id": "beta", "name": "B", "provider_email": "b@b.example.com",
              "provider_password": PASSWORD},
    )  # fmt: skip
    assert status == 403, body


async def test_create_operator_refuses_a_taken_email_and_a_short_password(
    migrated_url: str,
) -> None:
    await create_operator(migrated_url, "root@example.com", PASSWORD)
    from engine.api.errors import Conflict, ValidationFailed

    with pytest.raises(Conflict):
        await create_operator(migrated_url, "ROOT@example.com".lower(), PASSWORD)
    with pytest.raises(ValidationFailed):
        await create_operator(migrated_url, "other@example.com", "short")


def test_secrets_are_required_unless_dev(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ApiConfigError, match="TRADECOPY_API_JWT_SECRET"):
        secrets_from_env({})
    dev = secrets_from_env({}, dev=True)
    assert dev.ephemeral and len(dev.master_key.key) == 32
    assert "EPHEMERAL" in capsys.readouterr().err
    with pytest.raises(ApiConfigError, match="at least 32"):
        secrets_from_env(
            {"TRADECOPY_API_JWT_SECRET": "short", "TRADECOPY_API_MASTER_KEY": "A" * 44}
        )
    good = secrets_from_env(
        {
            "TRADECOPY_API_JWT_SECRET": "s" * 40,
            "TRADECOPY_API_MASTER_KEY": "A" * 43 + "=",
            "TRADECOPY_API_MASTER_KEY_ID": "k7",
        }
    )
    assert good.master_key.key_id == "k7" and not good.ephemeral
    assert "AAAA" not in repr(good)


def test_issued_tokens_carry_tenant_role_and_expiry() -> None:
    caller = Caller(user_id=uuid.uuid4(), role=Role.PROVIDER, tenant_id="alpha")
    token = issue_access_token(
        caller, secret=b"s" * 32, issuer="tradecopy", audience="tradecopy-api", ttl_s=900
    )
    claims = jwt.decode(token, b"s" * 32, algorithms=["HS256"], audience="tradecopy-api")
    assert claims["tid"] == "alpha" and claims["role"] == "provider"
    assert 899 <= claims["exp"] - claims["iat"] <= 900
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert hash_password("x") != hash_password("x")


async def test_changing_the_password_needs_the_current_one_and_ends_other_sessions(
    api: Api,
) -> None:
    provider = await api.provider("alpha")
    other_session = await api.login("owner@alpha.example.com")
    status, body = await api.call(
        "PUT", "/v1/me/password", provider,
        json={"current_password": "wrong", "new_password": "a brand new passphrase"},
    )  # fmt: skip
    assert status == 401, body
    status, body = await api.call(
        "PUT", "/v1/me/password", provider,
        json={"current_password": PASSWORD, "new_password": "a brand new passphrase"},
    )  # fmt: skip
    assert status == 204, body
    for refresh in (provider.refresh, other_session.refresh):
        status, _ = await api.call("POST", "/v1/auth/refresh", json={"refresh_token": refresh})
        assert status == 401
    status, _ = await api.call(
        "POST", "/v1/auth/login",
        json={"identifier": "owner@alpha.example.com", "password": PASSWORD},
    )  # fmt: skip
    assert status == 401
    await api.login("owner@alpha.example.com", "a brand new passphrase")


def test_token_bucket_refills_at_its_rate_and_keeps_clients_apart() -> None:
    from engine.api.ratelimit import TokenBuckets

    buckets = TokenBuckets(rate_per_s=0.5, burst=2)
    assert buckets.take("a", now=0.0) == 0 and buckets.take("a", now=0.0) == 0
    assert buckets.take("a", now=0.0) == pytest.approx(2.0)
    assert buckets.take("b", now=0.0) == 0  # another client has its own bucket
    assert buckets.take("a", now=1.0) == pytest.approx(1.0)  # half a token back, not enough
    assert buckets.take("a", now=2.0) == 0
