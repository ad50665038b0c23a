"""Who owns an account, for billing: the API's ``api_billing_account_owners()`` read past its
row-level security by a member of the reader role only, ``billing_accounts`` for accounts the
API does not know, and a billing-only database (no API tables) said once in the log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from engine.api.store import migrate as migrate_api
from engine.billing import store
from engine.billing.enforcement import Enforcer
from engine.runtime.jetstream import ensure_buckets
from engine.runtime.links import apply_links
from schemas import codec, subjects
from schemas.links import CopyLink

U1 = uuid.UUID("00000000-0000-4000-8000-000000000001")
U2 = uuid.UUID("00000000-0000-4000-8000-000000000002")
LINKS = [
    CopyLink(link_id="l1", master="m1", follower="a1"),  # u1's API account at P1
    CopyLink(link_id="l2", master="m1", follower="b9"),  # u1's account known only to billing
    CopyLink(link_id="l3", master="m2", follower="c1"),  # u2 at P2
]
TEST_READER = "tc_test_account_owner_reader"


async def api_accounts(conn: asyncpg.Connection) -> None:
    """P1 sells m1 and u1 follows with a1; P2 sells m2 and u2 follows with c1."""
    for tenant in ("p1", "p2"):
        await conn.execute("INSERT INTO api_tenants (tenant_id, name) VALUES ($1, $1)", tenant)
    for user, tenant in ((U1, "p1"), (U2, "p2")):
        await conn.execute(
            "INSERT INTO api_users (user_id, tenant_id, role, email, password_hash)"
            " VALUES ($1, $2, 'follower', $3, 'x')",
            user,
            tenant,
            f"{user}@x.test",
        )
    for account, tenant, owner, role in (
        ("m1", "p1", None, "master"),
        ("a1", "p1", U1, "follower"),
        ("m2", "p2", None, "master"),
        ("c1", "p2", U2, "follower"),
    ):
        await conn.execute(
            "INSERT INTO api_accounts (account_id, tenant_id, owner_user_id, name, platform,"
            " role, credentials, key_id) VALUES ($1, $2, $3, $1, 'paper', $4, '\\x00', 'k')",
            account,
            tenant,
            owner,
            role,
        )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await store.migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def links_kv(js: JetStreamContext) -> KeyValue:
    kv = (await ensure_buckets(js))[subjects.KV_LINKS]
    await apply_links(kv, LINKS)
    return kv


async def enabled(kv: KeyValue) -> dict[str, bool]:
    found = {}
    for link in LINKS:
        entry = await kv.get(link.link_id)
        assert entry.value is not None
        found[link.link_id] = codec.copy_link_decoder.decode(entry.value).enabled
    return found


EXPECTED = {
    "m1": ("p1", None),
    "a1": ("p1", str(U1)),
    "m2": ("p2", None),
    "c1": ("p2", str(U2)),
}


async def test_the_reader_role_sees_every_owner_and_nothing_else_of_the_api(
    database_url: str, pool: asyncpg.Pool
) -> None:
    await migrate_api(database_url)
    async with pool.acquire() as conn:
        await api_accounts(conn)
        await conn.execute(
            f"DO $$ BEGIN CREATE ROLE {TEST_READER} NOLOGIN;"
            " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )
        await conn.execute(f"GRANT tradecopy_account_owner_reader TO {TEST_READER}")
        tx = conn.transaction()
        await tx.start()
        try:
            # Owned by a role under row-level security (not a superuser, as in production),
            # the function still sees every tenant's accounts: it sets the platform-wide
            # scope for its own duration. (Rolled back: the owner change is this test's.)
            await conn.execute("ALTER FUNCTION api_billing_account_owners() OWNER TO tradecopy_api")
            await conn.execute(f"SET LOCAL ROLE {TEST_READER}")
            rows = await conn.fetch("SELECT * FROM api_billing_account_owners()")
            assert {r["account_id"]: (r["provider"], r["follower"]) for r in rows} == EXPECTED
            # ... and leaves the caller's scope as it was.
            scope = await conn.fetchval("SELECT current_setting('tradecopy.tenant', true)")
            assert scope in (None, "")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT credentials FROM api_accounts")
        finally:
            await tx.rollback()
        owners = await store.all_account_owners(conn)
    assert owners.api_available and owners.accounts == EXPECTED


async def test_enforcement_finds_api_accounts_and_billing_only_ones(
    database_url: str, pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    await migrate_api(database_url)
    async with pool.acquire() as conn:
        await api_accounts(conn)
        # Registered without the API (a platform backend of its own): billing's table.
        await store.upsert_account_owner(conn, account_id="b9", provider="p1", follower=str(U1))
    enforcer = Enforcer(pool, js, links_kv, base_delay_s=0.02, op_timeout_s=0.5)
    cause = store.EnforcementCause(
        scope="follower", subject=str(U1), cause="charge:k1", provider="p1"
    )
    with structlog.testing.capture_logs() as logs:
        assert await enforcer.stop_for(cause) == []
    assert await enabled(links_kv) == {"l1": False, "l2": False, "l3": True}
    assert not [e for e in logs if e["event"] == "enforcement_without_api_accounts"]
    await enforcer.lift(cause)
    assert await enabled(links_kv) == {"l1": True, "l2": True, "l3": True}


async def test_a_billing_only_database_uses_billing_accounts_and_says_so_once(
    pool: asyncpg.Pool, js: JetStreamContext, links_kv: KeyValue
) -> None:
    async with pool.acquire() as conn:
        for account, provider, follower in (
            ("m1", "p1", None),
            ("a1", "p1", "F1"),
            ("b9", "p1", "F2"),
            ("m2", "p2", None),
            ("c1", "p2", "F1"),
        ):
            await store.upsert_account_owner(
                conn, account_id=account, provider=provider, follower=follower
            )
        owners = await store.all_account_owners(conn)
    assert not owners.api_available and owners.accounts["a1"] == ("p1", "F1")
    enforcer = Enforcer(pool, js, links_kv, base_delay_s=0.02, op_timeout_s=0.5)
    provider = store.EnforcementCause(scope="provider", subject="p2", cause="operator:2026-04")
    follower = store.EnforcementCause(scope="follower", subject="F1", cause="x", provider="p1")
    with structlog.testing.capture_logs() as logs:
        await enforcer.stop_for(provider)
        await enforcer.stop_for(follower)
        await enforcer.recheck()
    assert await enabled(links_kv) == {"l1": False, "l2": True, "l3": False}
    said = [e for e in logs if e["event"] == "enforcement_without_api_accounts"]
    assert len(said) == 1 and said[0]["log_level"] == "warning"
