"""The TOTP second factor: RFC 6238 test vectors, enrolment, login with a code or a recovery
code, reuse refused, the per-role policy, and turning it off."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_api_support import PASSWORD, TEST_KEY, Api, Person, api_config, running_api, serve

from engine.api import secondfactor
from engine.api.config import MasterKey
from engine.api.crypto import CredentialsError
from engine.api.store import PLATFORM, Store, rotate_key
from engine.api.totp import (
    hotp,
    matching_step,
    normalise_recovery_code,
    provisioning_uri,
    step_of,
    totp,
)

# RFC 6238 appendix B: 8 digits, T0 = 0, X = 30, seeds per hash.
SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
VECTORS = [
    (59, {"sha1": "94287082", "sha256": "46119246", "sha512": "90693936"}),
    (1111111109, {"sha1": "07081804", "sha256": "68084774", "sha512": "25091201"}),
    (1111111111, {"sha1": "14050471", "sha256": "67062674", "sha512": "99943326"}),
    (1234567890, {"sha1": "89005924", "sha256": "91819424", "sha512": "93441116"}),
    (2000000000, {"sha1": "69279037", "sha256": "90698825", "sha512": "38618901"}),
    (20000000000, {"sha1": "65353130", "sha256": "77737706", "sha512": "47863826"}),
]


@pytest.mark.parametrize(("unix_s", "expected"), VECTORS)
def test_rfc_6238_appendix_b_vectors(unix_s: int, expected: dict[str, str]) -> None:
    for digest, code in expected.items():
        assert totp(SEEDS[digest], unix_s, digits=8, digest=digest) == code


def test_rfc_4226_appendix_d_six_digit_values() -> None:
    expected = ["755224", "287082", "359152", "969429", "338314",
                "254676", "287922", "162583", "399871", "520489"]  # fmt: skip
    assert [hotp(SEEDS["sha1"], i) for i in range(10)] == expected


def test_the_window_is_one_step_either_side_and_a_used_step_never_counts_again() -> None:
    secret = SEEDS["sha1"]
    now = 1_700_000_015.0
    step = step_of(now)
    for offset in (-1, 0, 1):
        code = hotp(secret, step + offset)
        assert matching_step(secret, code, last_step=None, now_s=now) == step + offset
    for offset in (-2, 2):
        assert matching_step(secret, hotp(secret, step + offset), last_step=None, now_s=now) is None
    code = hotp(secret, step)
    assert matching_step(secret, code, last_step=step, now_s=now) is None
    assert matching_step(secret, code, last_step=step + 1, now_s=now) is None
    assert matching_step(secret, hotp(secret, step + 1), last_step=step, now_s=now) == step + 1
    assert matching_step(secret, "12345", last_step=None, now_s=now) is None
    assert matching_step(secret, "１２３４５６", last_step=None, now_s=now) is None


def test_the_provisioning_uri_names_issuer_account_and_secret() -> None:
    uri = provisioning_uri(SEEDS["sha1"], account="ana@example.com", issuer="tradecopy")
    assert uri.startswith("otpauth://totp/tradecopy:ana@example.com?secret=")
    assert "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ" in uri and "period=30" in uri and "digits=6" in uri


def test_recovery_codes_forgive_case_and_separators() -> None:
    assert normalise_recovery_code("ABCD efgh-JKMN pqrs") == "abcd-efgh-jkmn-pqrs"


# ------------------------------------------------------------------------ the API


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as running:
        yield running


def secret_of(enrolment: dict[str, Any]) -> bytes:
    raw = enrolment["secret"]
    return base64.b32decode(raw + "=" * (-len(raw) % 8))


def code_at(secret: bytes, offset_steps: int = 0) -> str:
    return totp(secret, time.time() + 30 * offset_steps)


async def enrol(api: Api, who: Person) -> tuple[bytes, list[str]]:
    status, enrolment = await api.call("POST", "/v1/me/totp", who)
    assert status == 201, enrolment
    secret = secret_of(enrolment)
    status, body = await api.call(
        "POST", "/v1/me/totp/confirm", who, json={"code": code_at(secret)}
    )
    assert status == 200, body
    return secret, body["recovery_codes"]


async def login(api: Api, identifier: str, **extra: Any) -> tuple[int, Any]:
    return await api.call(
        "POST", "/v1/auth/login", json={"identifier": identifier, "password": PASSWORD, **extra}
    )


async def test_enrolment_shows_a_secret_and_recovery_codes_once(api: Api) -> None:
    provider = await api.provider("alpha")
    status, enrolment = await api.call("POST", "/v1/me/totp", provider)
    assert status == 201
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/tradecopy:owner@alpha.example.com")
    secret = secret_of(enrolment)
    status, me = await api.call("GET", "/v1/me", provider)
    assert me["totp_enabled"] is False
    status, body = await api.call("POST", "/v1/me/totp/confirm", provider, json={"code": "000000"})
    if code_at(secret) != "000000":
        assert status == 422
    status, body = await api.call(
        "POST", "/v1/me/totp/confirm", provider, json={"code": code_at(secret)}
    )
    assert status == 200
    codes = body["recovery_codes"]
    assert len(codes) == len(set(codes)) == 10
    status, me = await api.call("GET", "/v1/me", provider)
    assert me["totp_enabled"] is True
    assert (await api.call("POST", "/v1/me/totp", provider))[0] == 409
    assert (await api.call("POST", "/v1/me/totp/confirm", provider,
                           json={"code": code_at(secret, 1)}))[0] == 409  # fmt: skip
    conn = await asyncpg.connect(api.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM api_totp")
        stored = {bytes(r[0]) for r in await conn.fetch("SELECT code_hash FROM api_recovery_codes")}
    finally:
        await conn.close()
    # Sealed at rest and bound to its user: the same ciphertext on another user does not open.
    assert secret not in bytes(row["secret"]) and row["key_id"] == TEST_KEY.key_id
    assert secondfactor.open_secret(TEST_KEY, row) == secret
    with pytest.raises(CredentialsError):
        secondfactor.open_secret(TEST_KEY, {**dict(row), "user_id": uuid.uuid4()})
    assert len(stored) == 10 and not any(c.encode() in b"".join(stored) for c in codes)


async def test_login_needs_the_second_factor_once_enrolled(api: Api) -> None:
    provider = await api.provider("alpha")
    secret, codes = await enrol(api, provider)
    status, body = await login(api, provider.email)
    assert status == 401 and body["type"].endswith("/second-factor-required"), body
    status, body = await login(api, provider.email, password="wrong", totp_code=code_at(secret, 1))
    assert status == 401 and body["type"].endswith("/unauthorized")
    # The confirmation spent the current step: the next one signs in, and only once.
    fresh = code_at(secret, 1)
    status, pair = await login(api, provider.email, totp_code=fresh)
    assert status == 200, pair
    status, body = await login(api, provider.email, totp_code=fresh)
    assert status == 401 and body["detail"] == "wrong or already used second factor"
    status, _ = await login(api, provider.email, totp_code=code_at(secret, 0))
    assert status == 401  # an earlier step than one already used
    # A recovery code works once.
    status, _ = await login(api, provider.email, recovery_code=codes[0].upper())
    assert status == 200
    status, _ = await login(api, provider.email, recovery_code=codes[0])
    assert status == 401
    status, _ = await login(api, provider.email, recovery_code="aaaa-bbbb-cccc-dddd")
    assert status == 401


async def test_a_wrong_code_costs_a_second_login_attempt(api: Api, nc: Any) -> None:
    provider = await api.provider("alpha")
    await enrol(api, provider)
    # Four per client and account: a wrong password costs one, a wrong code two.
    strict_config = api_config(auth_burst=4, auth_rate_per_minute=1)
    client, pool = await serve(api.database_url, nc, strict_config)
    strict = Api(client=client, pool=pool, database_url=api.database_url, js=api.js)
    try:
        answers = [(await login(strict, provider.email, totp_code="000001"))[0] for _ in range(3)]
    finally:
        await client.close()
        await pool.close()
    assert answers == [401, 401, 429]


async def test_operators_require_totp_per_role_and_unenrolled_users_must_enrol_first(
    api: Api,
) -> None:
    operator = await api.as_operator()
    provider = await api.provider("alpha")
    follower = await api.follower(provider, "fiona")
    assert (await api.call("GET", "/v1/security/totp-policy", provider))[0] == 403
    status, _ = await api.call(
        "PUT", "/v1/security/totp-policy", provider, json={"required_roles": []}
    )
    assert status == 403
    status, policy = await api.call(
        "PUT", "/v1/security/totp-policy", operator, json={"required_roles": ["provider"]}
    )
    assert status == 200 and policy == {"required_roles": ["provider"]}
    assert (await api.call("GET", "/v1/security/totp-policy", operator))[1] == policy

    # Signed in again: the token says enrolment is due, and only enrolment is open.
    pending = await api.login(provider.email)
    status, body = await api.call("GET", "/v1/accounts", pending)
    assert status == 403 and body["type"].endswith("/totp-enrolment-required"), body
    assert (await api.call("POST", "/v1/api-keys", pending, json={"name": "x"}))[0] == 403
    assert (await api.call("GET", "/v1/me", pending))[0] == 200
    assert (await api.call("GET", "/v1/accounts", follower))[0] == 200  # not its role
    secret, _ = await enrol(api, pending)
    assert (await api.call("GET", "/v1/accounts", pending))[0] == 403  # the token predates it
    status, pair = await api.call(
        "POST", "/v1/auth/refresh", json={"refresh_token": pending.refresh}
    )
    assert status == 200
    enrolled = Person(provider.email, pair["access_token"], pair["refresh_token"], "", "alpha")
    assert (await api.call("GET", "/v1/accounts", enrolled))[0] == 200
    status, _ = await login(api, provider.email, totp_code=code_at(secret, 1))
    assert status == 200


async def test_turning_totp_off_needs_a_code_or_the_password(api: Api) -> None:
    provider = await api.provider("alpha")
    await enrol(api, provider)
    assert (await api.call("DELETE", "/v1/me/totp", provider, json={}))[0] == 422
    status, _ = await api.call("DELETE", "/v1/me/totp", provider, json={"password": "wrong"})
    assert status == 401
    status, _ = await api.call("DELETE", "/v1/me/totp", provider, json={"code": "000000"})
    assert status == 401
    status, _ = await api.call("DELETE", "/v1/me/totp", provider, json={"password": PASSWORD})
    assert status == 204
    assert (await api.call("DELETE", "/v1/me/totp", provider, json={"password": PASSWORD}))[
        0
    ] == 404
    status, _ = await login(api, provider.email)
    assert status == 200
    status, me = await api.call("GET", "/v1/me", provider)
    assert me["totp_enabled"] is False
    # Again with a code this time.
    secret, _ = await enrol(api, provider)
    status, _ = await api.call("DELETE", "/v1/me/totp", provider, json={"code": code_at(secret, 1)})
    assert status == 204


async def test_a_step_is_spent_once_even_by_racing_transactions(api: Api) -> None:
    """Two logins may both read the same last step: the database's compare-and-set lets
    one spend it; the other waits for the row and then finds it spent."""
    provider = await api.provider("alpha")
    await enrol(api, provider)
    store = Store(api.pool)
    user_id = uuid.UUID(provider.user_id)
    step = step_of(time.time()) + 5

    async def spend() -> bool:
        async with store.tx(PLATFORM) as conn:
            return await store.use_totp_step(conn, user_id, step)

    async with store.tx(PLATFORM) as conn:
        assert await store.use_totp_step(conn, user_id, step)
        racer = asyncio.create_task(spend())
        await asyncio.sleep(0.2)
        assert not racer.done()  # held by the first transaction's row lock
    assert await racer is False
    assert await spend() is False


async def test_rotating_the_master_key_moves_totp_secrets_too(api: Api) -> None:
    provider = await api.provider("alpha")
    secret, _ = await enrol(api, provider)
    new = MasterKey("k2", bytes(range(32, 64)))
    assert await rotate_key(api.database_url, TEST_KEY, new) == 0  # no broker accounts
    conn = await asyncpg.connect(api.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM api_totp")
        after = await conn.fetchval(
            "SELECT after FROM api_audit_log WHERE action = 'rotate' AND entity = 'master_key'"
        )
    finally:
        await conn.close()
    assert row["key_id"] == "k2" and secondfactor.open_secret(new, row) == secret
    assert '"totp": 1' in after
