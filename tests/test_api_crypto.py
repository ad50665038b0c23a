"""Broker credentials at rest: AES-256-GCM bound to tenant and account, key ids, rotation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_api_support import (
    CREDENTIALS,
    TEST_KEY,
    Api,
    new_key,
    running_api,
)

from engine.api.crypto import (
    BrokerCredentials,
    CredentialsError,
    decrypt,
    encrypt,
    open_credentials,
    seal_credentials,
)
from engine.api.store import rotate_key


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as running:
        yield running


CREDS = BrokerCredentials(**CREDENTIALS)


def test_credentials_round_trip_and_never_appear_in_the_ciphertext() -> None:
    sealed = seal_credentials(TEST_KEY, CREDS, "alpha", "acc-1")
    assert CREDS.password.encode() not in sealed and CREDS.login.encode() not in sealed
    assert open_credentials(TEST_KEY, sealed, "alpha", "acc-1") == CREDS
    assert sealed != seal_credentials(TEST_KEY, CREDS, "alpha", "acc-1")  # fresh nonce


@pytest.mark.parametrize(("tenant", "account"), [("beta", "acc-1"), ("alpha", "acc-2")])
def test_a_ciphertext_moved_to_another_tenant_or_account_does_not_decrypt(
    tenant: str, account: str
) -> None:
    sealed = encrypt(TEST_KEY, b"secret", "alpha", "acc-1")
    with pytest.raises(CredentialsError):
        decrypt(TEST_KEY, sealed, tenant, account)


def test_a_tampered_ciphertext_or_another_key_does_not_decrypt() -> None:
    sealed = bytearray(encrypt(TEST_KEY, b"secret", "alpha", "acc-1"))
    sealed[-1] ^= 1
    with pytest.raises(CredentialsError):
        decrypt(TEST_KEY, bytes(sealed), "alpha", "acc-1")
    with pytest.raises(CredentialsError):
        decrypt(new_key("other"), encrypt(TEST_KEY, b"s", "alpha", "acc-1"), "alpha", "acc-1")
    with pytest.raises(CredentialsError):
        decrypt(TEST_KEY, b"\x02" + bytes(40), "alpha", "acc-1")


def test_master_key_repr_hides_the_key() -> None:
    assert TEST_KEY.key.hex() not in repr(TEST_KEY) and "test-k1" in repr(TEST_KEY)


async def _stored(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT account_id, tenant_id, credentials, key_id FROM api_accounts ORDER BY 1"
        )
    finally:
        await conn.close()


async def test_accounts_store_credentials_encrypted_with_the_key_id(api: Api) -> None:
    provider = await api.provider("alpha")
    created = await api.account(provider, "master")
    assert "credentials" not in created and created["key_id"] == TEST_KEY.key_id
    [row] = await _stored(api.database_url)
    raw = bytes(row["credentials"])
    assert CREDENTIALS["password"].encode() not in raw and CREDENTIALS["login"].encode() not in raw
    assert open_credentials(TEST_KEY, raw, "alpha", row["account_id"]) == CREDS


async def test_rotate_key_re_encrypts_every_row_of_the_old_key(api: Api) -> None:
    alpha = await api.provider("alpha")
    beta = await api.provider("beta")
    await api.account(alpha, "master")
    await api.account(beta, "follower")
    new = new_key("k2")
    assert await rotate_key(api.database_url, TEST_KEY, new) == 2
    rows = await _stored(api.database_url)
    for row in rows:
        assert row["key_id"] == "k2"
        raw = bytes(row["credentials"])
        assert open_credentials(new, raw, row["tenant_id"], row["account_id"]) == CREDS
        with pytest.raises(CredentialsError):
            open_credentials(TEST_KEY, raw, row["tenant_id"], row["account_id"])
    assert await rotate_key(api.database_url, TEST_KEY, new) == 0  # nothing left on the old key
    status, audit = await api.call("GET", "/v1/audit", await api.as_operator())
    assert status == 200, audit
    assert any(e["entity"] == "master_key" and e["after"]["accounts"] == 2 for e in audit["items"])


async def test_rotate_key_with_a_wrong_old_key_changes_nothing(api: Api) -> None:
    provider = await api.provider("alpha")
    await api.account(provider, "master")
    before = await _stored(api.database_url)
    with pytest.raises(CredentialsError):
        await rotate_key(api.database_url, new_key(TEST_KEY.key_id), new_key("k2"))
    assert await _stored(api.database_url) == before
