"""Every SQL statement of the API's tables (``api_*``), parameterised, asyncpg.

Each request runs in one transaction opened by ``Store.tx(scope)``, which sets the
row-level-security settings (``tradecopy.tenant``, ``tradecopy.follower``) and the
non-owner role for that transaction only. Every statement also filters by the caller's tenant
(and, for a follower, by its own user id) itself: the policies are the second wall, not the
first. ``app_scoping=False`` drops the first wall (tests prove the second holds alone).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from engine.api.auth import Caller, Role
from engine.api.config import MasterKey
from engine.api.crypto import decrypt, encrypt
from engine.api.sealing import email_binding, totp_binding
from engine.runtime.postgres import apply_migrations, load_migrations

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
COMPONENT = "api"

Row = asyncpg.Record


async def migrate(database_url: str) -> list[str]:
    return await apply_migrations(
        database_url, load_migrations(MIGRATIONS_DIR), component=COMPONENT
    )


@dataclass(frozen=True, slots=True)
class Scope:
    """What one transaction may see: a tenant (None: platform-wide) and, for a follower,
    only its own rows."""

    tenant: str | None
    follower: uuid.UUID | None = None

    @classmethod
    def of(cls, caller: Caller) -> Scope:
        if caller.role is Role.OPERATOR:
            return cls(None)
        return cls(caller.tenant_id, caller.user_id if caller.role is Role.FOLLOWER else None)


#: Before anyone is known (login, refresh, API keys) and for platform jobs (key rotation).
PLATFORM = Scope(None)

#: What ``Store.read`` puts into SQL as literals: anything else takes the parameterised path.
_TENANT_LITERAL = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ROLE_LITERAL = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_UUID_LITERAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Store:
    def __init__(self, pool: Any, *, role: str | None = "tradecopy_api", app_scoping: bool = True):
        self.pool = pool
        self.role = role
        self.app_scoping = app_scoping

    @asynccontextmanager
    async def tx(self, scope: Scope) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('tradecopy.tenant', $1, true),"
                " set_config('tradecopy.follower', $2, true),"
                " CASE WHEN $3::text IS NULL THEN NULL ELSE set_config('role', $3, true) END",
                "*" if scope.tenant is None else scope.tenant,
                "" if scope.follower is None else str(scope.follower),
                self.role,
            )
            yield conn

    @asynccontextmanager
    async def read(self, scope: Scope) -> AsyncIterator[Any]:
        """A read-only transaction in ``scope``, as ``tx`` but one round trip shorter: BEGIN
        and the scope settings travel as one simple query (three round trips for one
        statement: BEGIN + settings, the statement, COMMIT). The settings are literals there,
        so each must match its strict shape (a tenant id, a UUID, a role name) or the
        parameterised ``tx`` is used instead. No savepoints inside (``conn.transaction()``
        refuses in a transaction it did not start): reads need none."""
        prologue = self._read_prologue(scope)
        if prologue is None:
            async with self.tx(scope) as conn:
                yield conn
            return
        async with self.pool.acquire() as conn:
            await conn.execute(prologue)
            try:
                yield conn
            except BaseException:
                # best effort: a connection that cannot roll back is dropped by the pool
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    def _read_prologue(self, scope: Scope) -> str | None:
        tenant = "*" if scope.tenant is None else scope.tenant
        follower = "" if scope.follower is None else str(scope.follower)
        if tenant != "*" and _TENANT_LITERAL.fullmatch(tenant) is None:
            return None
        if follower and _UUID_LITERAL.fullmatch(follower) is None:
            return None
        if self.role is not None and _ROLE_LITERAL.fullmatch(self.role) is None:
            return None
        role = "" if self.role is None else f", set_config('role', '{self.role}', true)"
        return (
            "BEGIN READ ONLY; SELECT set_config('tradecopy.tenant', '" + tenant + "', true),"
            " set_config('tradecopy.follower', '" + follower + "', true)" + role
        )

    def _tenant(self, scope: Scope) -> str | None:
        return scope.tenant if self.app_scoping else None

    def _follower(self, scope: Scope) -> uuid.UUID | None:
        return scope.follower if self.app_scoping else None

    # ------------------------------------------------------------------- tenants, users

    async def create_tenant(self, conn: Any, tenant_id: str, name: str) -> Row | None:
        return await conn.fetchrow(
            "INSERT INTO api_tenants (tenant_id, name) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING *",
            tenant_id, name,
        )  # fmt: skip

    async def list_tenants(self, conn: Any, after: str | None, limit: int) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_tenants WHERE ($1::text IS NULL OR tenant_id > $1)"
            " ORDER BY tenant_id LIMIT $2",
            after, limit,
        )  # fmt: skip

    async def create_user(
        self,
        conn: Any,
        *,
        role: Role,
        tenant_id: str | None,
        email: str,
        username: str | None,
        password_hash: str,
    ) -> Row | None:
        """The new user, or None when its email or username is taken."""
        return await conn.fetchrow(
            "INSERT INTO api_users (user_id, tenant_id, role, email, username, password_hash)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING *",
            uuid.uuid4(), tenant_id, role.value, email.lower(), username, password_hash,
        )  # fmt: skip

    async def user_by_login(self, conn: Any, identifier: str) -> Row | None:
        """Platform scope: before login nobody's tenant is known."""
        return await conn.fetchrow(
            "SELECT * FROM api_users WHERE email = lower($1) OR lower(username) = lower($1)"
            " ORDER BY (email = lower($1)) DESC LIMIT 1",
            identifier,
        )

    async def set_password_hash(self, conn: Any, user_id: uuid.UUID, password_hash: str) -> None:
        await conn.execute(
            "UPDATE api_users SET password_hash = $2 WHERE user_id = $1", user_id, password_hash
        )

    async def revoke_user_refresh_tokens(self, conn: Any, user_id: uuid.UUID) -> int:
        result = await conn.execute(
            "UPDATE api_refresh_tokens SET revoked_at = now()"
            " WHERE user_id = $1 AND revoked_at IS NULL",
            user_id,
        )
        return int(result.split()[-1])

    async def get_user(self, conn: Any, scope: Scope, user_id: uuid.UUID) -> Row | None:
        return await conn.fetchrow(
            "SELECT * FROM api_users WHERE user_id = $1"
            " AND ($2::text IS NULL OR tenant_id = $2) AND ($3::uuid IS NULL OR user_id = $3)",
            user_id, self._tenant(scope), self._follower(scope),
        )  # fmt: skip

    async def list_users(
        self, conn: Any, scope: Scope, after: uuid.UUID | None, limit: int
    ) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_users WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR user_id = $2) AND ($3::uuid IS NULL OR user_id > $3)"
            " ORDER BY user_id LIMIT $4",
            self._tenant(scope), self._follower(scope), after, limit,
        )  # fmt: skip

    # ------------------------------------------------------------------ refresh tokens

    async def add_refresh_token(
        self,
        conn: Any,
        *,
        user_id: uuid.UUID,
        tenant_id: str | None,
        family_id: uuid.UUID,
        token_hash: bytes,
        ttl_s: int,
    ) -> None:
        await conn.execute(
            "INSERT INTO api_refresh_tokens (token_id, family_id, user_id, tenant_id, token_hash,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
            uuid.uuid4(), family_id, user_id, tenant_id, token_hash, float(ttl_s),
        )  # fmt: skip

    async def refresh_token_for_update(self, conn: Any, token_hash: bytes) -> Row | None:
        """The token's row, locked, with whether it is still valid (platform scope)."""
        return await conn.fetchrow(
            "SELECT t.*, t.expires_at <= now() AS expired, u.role, u.disabled"
            " FROM api_refresh_tokens t JOIN api_users u USING (user_id)"
            " WHERE t.token_hash = $1 FOR UPDATE OF t",
            token_hash,
        )

    async def mark_refresh_token_used(self, conn: Any, token_id: uuid.UUID) -> None:
        await conn.execute(
            "UPDATE api_refresh_tokens SET used_at = now() WHERE token_id = $1", token_id
        )

    async def revoke_refresh_family(self, conn: Any, family_id: uuid.UUID) -> int:
        result = await conn.execute(
            "UPDATE api_refresh_tokens SET revoked_at = now()"
            " WHERE family_id = $1 AND revoked_at IS NULL",
            family_id,
        )
        return int(result.split()[-1])

    # ------------------------------------------------------------------------ API keys

    async def create_api_key(
        self,
        conn: Any,
        caller: Caller,
        *,
        name: str,
        prefix: str,
        key_hash: bytes,
    ) -> Row:
        return await conn.fetchrow(
            "INSERT INTO api_keys (key_id, tenant_id, user_id, name, prefix, key_hash)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            uuid.uuid4(), caller.tenant_id, caller.user_id, name, prefix, key_hash,
        )  # fmt: skip

    async def api_key_owner(self, conn: Any, key_hash: bytes) -> Row | None:
        """A live key's row with its user's role (platform scope: the key says who it is)."""
        return await conn.fetchrow(
            "SELECT k.key_id, k.key_hash, k.user_id, k.tenant_id, u.role FROM api_keys k"
            " JOIN api_users u USING (user_id)"
            " WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND NOT u.disabled",
            key_hash,
        )

    async def list_api_keys(
        self, conn: Any, scope: Scope, caller: Caller, after: uuid.UUID | None, limit: int
    ) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_keys WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR user_id = $2) AND ($3::uuid IS NULL OR key_id > $3)"
            " ORDER BY key_id LIMIT $4",
            self._tenant(scope), caller.user_id if self.app_scoping else None, after, limit,
        )  # fmt: skip

    async def revoke_api_key(
        self, conn: Any, scope: Scope, caller: Caller, key_id: uuid.UUID
    ) -> Row | None:
        return await conn.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1"
            " AND ($2::text IS NULL OR tenant_id = $2) AND ($3::uuid IS NULL OR user_id = $3)"
            " RETURNING *",
            key_id, self._tenant(scope), caller.user_id if self.app_scoping else None,
        )  # fmt: skip

    # ------------------------------------------------------------------------ accounts

    async def account_pool(self, conn: Any, tenant_id: str) -> tuple[int | None, int]:
        """``(limit, used)`` of the tenant's account pool, under a lock held until the
        transaction ends, so concurrent creations cannot both take the last place. No limit
        (None) when billing is not in this database or the provider is on no operator plan."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('api-account-pool:' || $1))",
                           tenant_id)  # fmt: skip
        limit = None
        if await conn.fetchval("SELECT to_regclass('billing_account_pool_limits') IS NOT NULL"):
            limit = await conn.fetchval(
                "SELECT account_pool_limit FROM billing_account_pool_limits WHERE tenant_id = $1",
                tenant_id,
            )
        # The tenant's whole pool, also when a follower (who sees its own rows) adds one.
        used = await conn.fetchval("SELECT api_tenant_account_count()")
        return limit, int(used)

    async def create_account(
        self,
        conn: Any,
        *,
        account_id: str,
        tenant_id: str,
        owner_user_id: uuid.UUID | None,
        name: str,
        platform: str,
        role: str,
        credentials: bytes,
        key_id: str,
    ) -> Row:
        return await conn.fetchrow(
            "INSERT INTO api_accounts (account_id, tenant_id, owner_user_id, name, platform, role,"
            " credentials, key_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
            account_id, tenant_id, owner_user_id, name, platform, role, credentials, key_id,
        )  # fmt: skip

    async def get_account(
        self, conn: Any, scope: Scope, account_id: str, *, lock: bool = False
    ) -> Row | None:
        return await conn.fetchrow(
            "SELECT * FROM api_accounts WHERE account_id = $1"
            " AND ($2::text IS NULL OR tenant_id = $2)"
            " AND ($3::uuid IS NULL OR owner_user_id = $3)" + (" FOR UPDATE" if lock else ""),
            account_id, self._tenant(scope), self._follower(scope),
        )  # fmt: skip

    async def list_accounts(
        self, conn: Any, scope: Scope, after: str | None, limit: int
    ) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_accounts WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR owner_user_id = $2)"
            " AND ($3::text IS NULL OR account_id > $3) ORDER BY account_id LIMIT $4",
            self._tenant(scope), self._follower(scope), after, limit,
        )  # fmt: skip

    async def update_account(
        self,
        conn: Any,
        account_id: str,
        *,
        name: str,
        credentials: bytes,
        key_id: str,
    ) -> Row:
        """After ``get_account(..., lock=True)`` found it in scope."""
        return await conn.fetchrow(
            "UPDATE api_accounts SET name = $2, credentials = $3, key_id = $4, updated_at = now()"
            " WHERE account_id = $1 RETURNING *",
            account_id, name, credentials, key_id,
        )  # fmt: skip

    async def delete_account(self, conn: Any, account_id: str) -> bool:
        """False while a link still names the account (the foreign key refuses)."""
        try:
            async with conn.transaction():  # a savepoint: the caller's transaction survives
                await conn.execute("DELETE FROM api_accounts WHERE account_id = $1", account_id)
        except asyncpg.ForeignKeyViolationError:
            return False
        return True

    async def set_terminal_token(self, conn: Any, account_id: str, token_hash: bytes) -> None:
        await conn.execute(
            "UPDATE api_accounts SET terminal_token_hash = $2, updated_at = now()"
            " WHERE account_id = $1",
            account_id, token_hash,
        )  # fmt: skip

    async def terminal_token_hash(self, conn: Any, account_id: str) -> bytes | None:
        return await conn.fetchval(
            "SELECT terminal_token_hash FROM api_accounts WHERE account_id = $1", account_id
        )

    # --------------------------------------------------------------------------- links

    async def create_link(
        self,
        conn: Any,
        *,
        link_id: str,
        tenant_id: str,
        master: str,
        follower: str,
        owner_user_id: uuid.UUID | None,
    ) -> Row:
        return await conn.fetchrow(
            "INSERT INTO api_links (link_id, tenant_id, master, follower, owner_user_id)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING *",
            link_id, tenant_id, master, follower, owner_user_id,
        )  # fmt: skip

    async def get_link(
        self, conn: Any, scope: Scope, link_id: str, *, lock: bool = False
    ) -> Row | None:
        return await conn.fetchrow(
            "SELECT * FROM api_links WHERE link_id = $1 AND ($2::text IS NULL OR tenant_id = $2)"
            " AND ($3::uuid IS NULL OR owner_user_id = $3)" + (" FOR UPDATE" if lock else ""),
            link_id, self._tenant(scope), self._follower(scope),
        )  # fmt: skip

    async def list_links(self, conn: Any, scope: Scope, after: str | None, limit: int) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_links WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR owner_user_id = $2)"
            " AND ($3::text IS NULL OR link_id > $3) ORDER BY link_id LIMIT $4",
            self._tenant(scope), self._follower(scope), after, limit,
        )  # fmt: skip

    async def update_link_accounts(
        self, conn: Any, link_id: str, master: str, follower: str, owner: uuid.UUID | None
    ) -> None:
        await conn.execute(
            "UPDATE api_links SET master = $2, follower = $3, owner_user_id = $4"
            " WHERE link_id = $1",
            link_id, master, follower, owner,
        )  # fmt: skip

    async def delete_link(self, conn: Any, link_id: str) -> None:
        await conn.execute("DELETE FROM api_links WHERE link_id = $1", link_id)

    # ---------------------------------------------------------- invites (identity.py)

    async def tenant_name(self, conn: Any, scope: Scope, tenant_id: str) -> str | None:
        return await conn.fetchval(
            "SELECT name FROM api_tenants WHERE tenant_id = $1"
            " AND ($2::text IS NULL OR tenant_id = $2)",
            tenant_id, self._tenant(scope),
        )  # fmt: skip

    async def create_invite(
        self,
        conn: Any,
        *,
        tenant_id: str,
        email: str,
        role: Role,
        token_hash: bytes,
        invited_by: uuid.UUID | None,
        ttl_s: int,
    ) -> Row:
        return await conn.fetchrow(
            "INSERT INTO api_invites (invite_id, tenant_id, email, role, token_hash, invited_by,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))"
            " RETURNING *, expires_at <= now() AS expired",
            uuid.uuid4(), tenant_id, email.lower(), role.value, token_hash, invited_by,
            float(ttl_s),
        )  # fmt: skip

    async def list_invites(
        self, conn: Any, scope: Scope, after: uuid.UUID | None, limit: int
    ) -> list[Row]:
        return await conn.fetch(
            "SELECT *, expires_at <= now() AS expired FROM api_invites"
            " WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::uuid IS NULL OR invite_id > $2)"
            " ORDER BY invite_id LIMIT $3",
            self._tenant(scope), after, limit,
        )  # fmt: skip

    async def revoke_invite(self, conn: Any, scope: Scope, invite_id: uuid.UUID) -> Row | None:
        """Revoke a pending invite; None when there is none of that id in scope (an accepted
        one stays accepted and is returned unchanged)."""
        return await conn.fetchrow(
            "UPDATE api_invites SET revoked_at = coalesce(revoked_at, now())"
            " WHERE invite_id = $1 AND ($2::text IS NULL OR tenant_id = $2)"
            " AND accepted_at IS NULL RETURNING *",
            invite_id, self._tenant(scope),
        )  # fmt: skip

    async def invite_for_update(self, conn: Any, token_hash: bytes) -> Row | None:
        """The invite a token belongs to, locked (platform scope: the token says which)."""
        return await conn.fetchrow(
            "SELECT *, expires_at <= now() AS expired FROM api_invites WHERE token_hash = $1"
            " FOR UPDATE",
            token_hash,
        )

    async def mark_invite_accepted(
        self, conn: Any, invite_id: uuid.UUID, user_id: uuid.UUID
    ) -> None:
        await conn.execute(
            "UPDATE api_invites SET accepted_at = now(), accepted_user_id = $2"
            " WHERE invite_id = $1",
            invite_id, user_id,
        )  # fmt: skip

    # ------------------------------------------ one-use tokens by email (identity.py)

    async def user_by_email(self, conn: Any, email: str) -> Row | None:
        """Platform scope: a password reset names nobody's tenant."""
        return await conn.fetchrow("SELECT * FROM api_users WHERE email = lower($1)", email)

    async def add_user_token(
        self,
        conn: Any,
        *,
        user_id: uuid.UUID,
        tenant_id: str | None,
        purpose: str,
        token_hash: bytes,
        ttl_s: int,
    ) -> None:
        await conn.execute(
            "INSERT INTO api_user_tokens (token_id, tenant_id, user_id, purpose, token_hash,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
            uuid.uuid4(), tenant_id, user_id, purpose, token_hash, float(ttl_s),
        )  # fmt: skip

    async def user_token_for_update(self, conn: Any, token_hash: bytes, purpose: str) -> Row | None:
        """The token's row, locked, with its user (platform scope: the token says who)."""
        return await conn.fetchrow(
            "SELECT t.*, t.expires_at <= now() AS expired, u.role, u.email, u.disabled"
            " FROM api_user_tokens t JOIN api_users u USING (user_id)"
            " WHERE t.token_hash = $1 AND t.purpose = $2 FOR UPDATE OF t",
            token_hash, purpose,
        )  # fmt: skip

    async def spend_user_tokens(self, conn: Any, user_id: uuid.UUID, purpose: str) -> int:
        """Use up every open token of ``purpose``: one reset ends every other reset link."""
        result = await conn.execute(
            "UPDATE api_user_tokens SET used_at = now()"
            " WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL",
            user_id, purpose,
        )  # fmt: skip
        return int(result.split()[-1])

    async def set_email_verified(self, conn: Any, user_id: uuid.UUID) -> None:
        await conn.execute(
            "UPDATE api_users SET email_verified_at = coalesce(email_verified_at, now())"
            " WHERE user_id = $1",
            user_id,
        )

    # --------------------------------------------------- the email outbox (identity.py)

    async def enqueue_email(
        self,
        conn: Any,
        *,
        email_id: uuid.UUID,
        tenant_id: str | None,
        kind: str,
        recipient: str,
        sealed: bytes,
        key_id: str,
    ) -> None:
        await conn.execute(
            "INSERT INTO api_email_outbox (email_id, tenant_id, kind, recipient, sealed, key_id)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            email_id, tenant_id, kind, recipient, sealed, key_id,
        )  # fmt: skip

    async def claim_due_emails(self, conn: Any, limit: int, lease_s: float) -> list[Row]:
        """Due emails, leased for ``lease_s`` so another instance skips them meanwhile (a
        sender that dies mid-send leaves them to be tried again when the lease ends)."""
        return await conn.fetch(
            "UPDATE api_email_outbox SET next_attempt_at = now() + make_interval(secs => $2)"
            " WHERE email_id IN (SELECT email_id FROM api_email_outbox WHERE sent_at IS NULL"
            " AND failed_at IS NULL AND next_attempt_at <= now() ORDER BY next_attempt_at"
            " LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *",
            limit, lease_s,
        )  # fmt: skip

    async def mark_email_sent(self, conn: Any, email_id: uuid.UUID) -> None:
        # The sealed message (it carries a token link) is dropped once delivered.
        await conn.execute(
            "UPDATE api_email_outbox SET sent_at = now(), sealed = NULL,"
            " attempts = attempts + 1, last_error = NULL WHERE email_id = $1",
            email_id,
        )

    async def mark_email_failed(
        self, conn: Any, email_id: uuid.UUID, error: str, retry_in_s: float | None
    ) -> None:
        """One more failed attempt: try again in ``retry_in_s``, or never (None)."""
        await conn.execute(
            "UPDATE api_email_outbox SET attempts = attempts + 1, last_error = $2,"
            " next_attempt_at = now() + make_interval(secs => coalesce($3, 0)),"
            " failed_at = CASE WHEN $3::float8 IS NULL THEN now() END,"
            " sealed = CASE WHEN $3::float8 IS NULL THEN NULL ELSE sealed END"
            " WHERE email_id = $1",
            email_id, error[:1000], retry_in_s,
        )  # fmt: skip

    # ------------------------------------------------- the second factor (identity.py)

    async def get_totp(self, conn: Any, scope: Scope, user_id: uuid.UUID) -> Row | None:
        return await conn.fetchrow(
            "SELECT * FROM api_totp WHERE user_id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
            user_id, self._tenant(scope),
        )  # fmt: skip

    async def begin_totp(
        self, conn: Any, *, user_id: uuid.UUID, tenant_id: str | None, secret: bytes, key_id: str
    ) -> Row | None:
        """A new unconfirmed secret (replacing an unconfirmed one); None when confirmed."""
        return await conn.fetchrow(
            "INSERT INTO api_totp (user_id, tenant_id, secret, key_id) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (user_id) DO UPDATE SET secret = $3, key_id = $4, created_at = now(),"
            " last_step = NULL WHERE api_totp.confirmed_at IS NULL RETURNING *",
            user_id, tenant_id, secret, key_id,
        )  # fmt: skip

    async def use_totp_step(
        self, conn: Any, user_id: uuid.UUID, step: int, *, confirm: bool = False
    ) -> bool:
        """Record ``step`` as used; False when it (or a later one) already was, so two
        requests racing with one code cannot both pass."""
        result = await conn.execute(
            "UPDATE api_totp SET last_step = $2,"
            " confirmed_at = CASE WHEN $3 THEN coalesce(confirmed_at, now()) ELSE confirmed_at END"
            " WHERE user_id = $1 AND (last_step IS NULL OR last_step < $2)",
            user_id, step, confirm,
        )  # fmt: skip
        return result == "UPDATE 1"

    async def delete_totp(self, conn: Any, user_id: uuid.UUID) -> None:
        await conn.execute("DELETE FROM api_recovery_codes WHERE user_id = $1", user_id)
        await conn.execute("DELETE FROM api_totp WHERE user_id = $1", user_id)

    async def replace_recovery_codes(
        self, conn: Any, user_id: uuid.UUID, tenant_id: str | None, hashes: list[bytes]
    ) -> None:
        await conn.execute("DELETE FROM api_recovery_codes WHERE user_id = $1", user_id)
        await conn.executemany(
            "INSERT INTO api_recovery_codes (code_hash, user_id, tenant_id) VALUES ($1, $2, $3)",
            [(h, user_id, tenant_id) for h in hashes],
        )

    async def spend_recovery_code(self, conn: Any, user_id: uuid.UUID, code_hash: bytes) -> bool:
        result = await conn.execute(
            "UPDATE api_recovery_codes SET used_at = now()"
            " WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
            user_id, code_hash,
        )  # fmt: skip
        return result == "UPDATE 1"

    async def recovery_codes_left(self, conn: Any, user_id: uuid.UUID) -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM api_recovery_codes WHERE user_id = $1 AND used_at IS NULL",
                user_id,
            )
        )

    async def totp_required_roles(self, conn: Any) -> list[str]:
        """Platform scope."""
        return [r[0] for r in await conn.fetch("SELECT role FROM api_totp_required_roles")]

    async def set_totp_required_roles(
        self, conn: Any, roles: list[str], set_by: uuid.UUID | None
    ) -> None:
        await conn.execute(
            "DELETE FROM api_totp_required_roles WHERE role <> ALL($1::text[])", roles
        )
        await conn.executemany(
            "INSERT INTO api_totp_required_roles (role, set_by) VALUES ($1, $2)"
            " ON CONFLICT (role) DO NOTHING",
            [(role, set_by) for role in roles],
        )

    async def totp_enrolment_pending(self, conn: Any, user_id: uuid.UUID, role: Role) -> bool:
        """The user's role must use TOTP and the user has not confirmed one (platform scope)."""
        pending = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM api_totp_required_roles WHERE role = $2)"
            " AND NOT EXISTS (SELECT 1 FROM api_totp WHERE user_id = $1"
            " AND confirmed_at IS NOT NULL)",
            user_id, role.value,
        )  # fmt: skip
        return bool(pending)

    # --------------------------------------------------------------------------- audit

    async def audit(
        self,
        conn: Any,
        caller: Caller | None,
        *,
        tenant_id: str | None,
        action: str,
        entity: str,
        entity_id: str,
        before: Any = None,
        after: Any = None,
    ) -> None:
        await conn.execute(
            "INSERT INTO api_audit_log (tenant_id, actor_user_id, actor_key_id, action, entity,"
            " entity_id, before, after) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb)",
            tenant_id,
            None if caller is None else caller.user_id,
            None if caller is None else caller.key_id,
            action, entity, entity_id, _json(before), _json(after),
        )  # fmt: skip

    async def list_audit(self, conn: Any, scope: Scope, after: int | None, limit: int) -> list[Row]:
        """Newest first."""
        return await conn.fetch(
            "SELECT * FROM api_audit_log WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::bigint IS NULL OR audit_id < $2) ORDER BY audit_id DESC LIMIT $3",
            self._tenant(scope), after, limit,
        )  # fmt: skip

    # ------------------------------------------------------------------- ledger reads
    # The ledger's read views (engine/ledger/migrations/0002_read_views.sql) carry no
    # row-level security of their own: each statement joins them to api_accounts, so the
    # caller sees only facts of accounts its scope (and that table's policy) lets it see.

    async def ledger_account_facts(
        self, conn: Any, scope: Scope, account_id: str
    ) -> list[Row] | None:
        """Every ledger fact (``kind``, ``payload``, ``stream_seq``, ``stored_at``) of one
        account in time order; None when the account is not in scope (or does not exist).
        One statement: the account check and the facts together."""
        rows = await conn.fetch(
            "SELECT f.kind, f.payload, f.stream_seq, f.stored_at FROM api_accounts a"
            " LEFT JOIN ledger_account_facts f ON f.account = a.account_id AND f.account = $1"
            " WHERE a.account_id = $1 AND ($2::text IS NULL OR a.tenant_id = $2)"
            " AND ($3::uuid IS NULL OR a.owner_user_id = $3) ORDER BY f.ts_ns, f.stream_seq",
            account_id, self._tenant(scope), self._follower(scope),
        )  # fmt: skip
        if not rows:
            return None
        return [row for row in rows if row["kind"] is not None]

    async def ledger_facts_version_now(
        self, scope: Scope, account_id: str
    ) -> tuple[int, Any, int] | None:
        """What changes whenever a fact of the account is stored or pruned: (count, latest
        ``stored_at``, Σ ``stream_seq``); None when the account is not in scope. One round
        trip, no transaction of its own: a function sets the scope and the role before its
        query (``api_ledger_facts_version``, migrations/0004), so row-level security holds
        as in ``tx``."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM api_ledger_facts_version($1, $2, $3, $4, $5, $6)",
                "*" if scope.tenant is None else scope.tenant,
                "" if scope.follower is None else str(scope.follower),
                self.role, account_id, self._tenant(scope), self._follower(scope),
            )  # fmt: skip
        return None if row is None else (int(row[0]), row[1], int(row[2]))

    async def ledger_account_balances(
        self, conn: Any, scope: Scope, account_id: str, after_ns: int | None, limit: int
    ) -> list[Row]:
        """Balance samples after ``after_ns``, oldest first; no rows when the account is not
        in scope, one row of NULLs when it is and has none (left)."""
        return await conn.fetch(
            "SELECT b.ts_ns, b.currency, b.balance_minor, b.equity_minor FROM api_accounts a"
            " LEFT JOIN ledger_account_balances b ON b.account = a.account_id"
            " AND b.account = $1 AND ($4::bigint IS NULL OR b.ts_ns > $4)"
            " WHERE a.account_id = $1 AND ($2::text IS NULL OR a.tenant_id = $2)"
            " AND ($3::uuid IS NULL OR a.owner_user_id = $3) ORDER BY b.ts_ns LIMIT $5",
            account_id, self._tenant(scope), self._follower(scope), after_ns, limit,
        )  # fmt: skip

    async def ledger_decisions(
        self,
        conn: Any,
        scope: Scope,
        *,
        account_id: str | None,
        link_id: str | None,
        before: tuple[int, str] | None,
        limit: int,
    ) -> list[Row]:
        """Copy decisions about accounts in scope, newest first, before ``(ts_ns, id)``."""
        return await conn.fetch(
            "SELECT d.decision_id, d.account, d.ts_ns, d.payload FROM ledger_copy_decisions d"
            " JOIN api_accounts a ON a.account_id = d.account"
            " WHERE ($1::text IS NULL OR a.tenant_id = $1)"
            " AND ($2::uuid IS NULL OR a.owner_user_id = $2)"
            " AND ($3::text IS NULL OR d.account = $3) AND ($4::text IS NULL OR d.link_id = $4)"
            " AND ($5::bigint IS NULL OR (d.ts_ns, d.decision_id) < ($5, $6::text))"
            " ORDER BY d.ts_ns DESC, d.decision_id DESC LIMIT $7",
            self._tenant(scope), self._follower(scope), account_id, link_id,
            None if before is None else before[0], None if before is None else before[1], limit,
        )  # fmt: skip

    # ------------------------------------------- trading: live streams, orders, templates

    async def stream_accounts(self, conn: Any, scope: Scope) -> list[Row]:
        """Every account the caller may follow live (``account_id``, ``role``)."""
        return await conn.fetch(
            "SELECT account_id, role FROM api_accounts WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR owner_user_id = $2) ORDER BY account_id",
            self._tenant(scope), self._follower(scope),
        )  # fmt: skip

    async def create_risk_template(
        self, conn: Any, *, tenant_id: str, name: str, settings: Any
    ) -> Row | None:
        """The new template, or None when the tenant has one of that name."""
        return await conn.fetchrow(
            "INSERT INTO api_risk_templates (template_id, tenant_id, name, settings)"
            " VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT DO NOTHING RETURNING *",
            uuid.uuid4(), tenant_id, name, _json(settings),
        )  # fmt: skip

    async def get_risk_template(
        self, conn: Any, scope: Scope, template_id: uuid.UUID, *, lock: bool = False
    ) -> Row | None:
        return await conn.fetchrow(
            "SELECT * FROM api_risk_templates WHERE template_id = $1"
            " AND ($2::text IS NULL OR tenant_id = $2)" + (" FOR UPDATE" if lock else ""),
            template_id, self._tenant(scope),
        )  # fmt: skip

    async def list_risk_templates(
        self, conn: Any, scope: Scope, after: uuid.UUID | None, limit: int
    ) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_risk_templates WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR template_id > $2) ORDER BY template_id LIMIT $3",
            self._tenant(scope), after, limit,
        )  # fmt: skip

    async def update_risk_template(
        self, conn: Any, template_id: uuid.UUID, *, name: str, settings: Any
    ) -> Row | None:
        """After ``get_risk_template(..., lock=True)``; None when the name is taken."""
        try:
            async with conn.transaction():  # a savepoint: the caller's transaction survives
                return await conn.fetchrow(
                    "UPDATE api_risk_templates SET name = $2, settings = $3::jsonb,"
                    " updated_at = now() WHERE template_id = $1 RETURNING *",
                    template_id, name, _json(settings),
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return None

    async def delete_risk_template(self, conn: Any, template_id: uuid.UUID) -> None:
        await conn.execute("DELETE FROM api_risk_templates WHERE template_id = $1", template_id)

    async def create_order_template(
        self, conn: Any, caller: Caller, *, name: str, fields: dict[str, Any]
    ) -> Row | None:
        """The new preset, or None when the user has one of that name."""
        return await conn.fetchrow(
            "INSERT INTO api_order_templates (template_id, tenant_id, owner_user_id, name,"
            " symbol, side, volume, sl_points, tp_points)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING RETURNING *",
            uuid.uuid4(), caller.tenant_id, caller.user_id, name, fields["symbol"],
            fields["side"], fields["volume"], fields["sl_points"], fields["tp_points"],
        )  # fmt: skip

    async def get_order_template(
        self, conn: Any, scope: Scope, caller: Caller, template_id: uuid.UUID, *, lock: bool = False
    ) -> Row | None:
        return await conn.fetchrow(
            "SELECT * FROM api_order_templates WHERE template_id = $1"
            " AND ($2::text IS NULL OR tenant_id = $2) AND ($3::uuid IS NULL OR owner_user_id = $3)"
            + (" FOR UPDATE" if lock else ""),
            template_id, self._tenant(scope), caller.user_id if self.app_scoping else None,
        )  # fmt: skip

    async def list_order_templates(
        self, conn: Any, scope: Scope, caller: Caller, after: uuid.UUID | None, limit: int
    ) -> list[Row]:
        return await conn.fetch(
            "SELECT * FROM api_order_templates WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::uuid IS NULL OR owner_user_id = $2)"
            " AND ($3::uuid IS NULL OR template_id > $3) ORDER BY template_id LIMIT $4",
            self._tenant(scope), caller.user_id if self.app_scoping else None, after, limit,
        )  # fmt: skip

    async def update_order_template(
        self, conn: Any, template_id: uuid.UUID, *, name: str, fields: dict[str, Any]
    ) -> Row | None:
        """After ``get_order_template(..., lock=True)``; None when the name is taken."""
        try:
            async with conn.transaction():
                return await conn.fetchrow(
                    "UPDATE api_order_templates SET name = $2, symbol = $3, side = $4,"
                    " volume = $5, sl_points = $6, tp_points = $7, updated_at = now()"
                    " WHERE template_id = $1 RETURNING *",
                    template_id, name, fields["symbol"], fields["side"], fields["volume"],
                    fields["sl_points"], fields["tp_points"],
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return None

    async def delete_order_template(self, conn: Any, template_id: uuid.UUID) -> None:
        await conn.execute("DELETE FROM api_order_templates WHERE template_id = $1", template_id)


async def register_local_tenant(
    database_url: str,
    master_key: MasterKey,
    *,
    tenant_id: str,
    masters: list[str],
    followers: list[str],
) -> dict[str, str]:
    """Local stacks (``up``, ``demo``, ``bench api``): a tenant with its provider, the master
    accounts, a follower user owning each follower account, and a new API key of each
    follower; the follower account → its key (shown once, as every key is).

    Accounts keep the ids the venue runs them under, so the ledger's facts are theirs (the
    API makes its own ids for accounts added through it). Running it again on the same
    database keeps what exists and only adds keys. Passwords are random and never shown:
    these people call with their keys."""
    import secrets as random_secrets

    from engine.api.auth import hash_password, new_api_key, token_hash
    from engine.api.crypto import BrokerCredentials, seal_credentials

    def _password() -> str:
        return hash_password(random_secrets.token_urlsafe(24))

    async def _user(conn: Any, role: Role, email: str) -> uuid.UUID:
        row = await Store(None).create_user(
            conn, role=role, tenant_id=tenant_id, email=email, username=None,
            password_hash=_password(),
        )  # fmt: skip
        if row is not None:
            return row["user_id"]
        return await conn.fetchval(
            "SELECT user_id FROM api_users WHERE email = $1 AND tenant_id = $2", email, tenant_id
        )

    async def _account(conn: Any, account_id: str, role: str, owner: uuid.UUID | None) -> None:
        paper = BrokerCredentials(login=account_id, password="paper", server="paper")
        await conn.execute(
            "INSERT INTO api_accounts (account_id, tenant_id, owner_user_id, name, platform,"
            " role, credentials, key_id) VALUES ($1, $2, $3, $1, 'paper', $4, $5, $6)"
            " ON CONFLICT (account_id) DO NOTHING",
            account_id, tenant_id, owner, role,
            seal_credentials(master_key, paper, tenant_id, account_id), master_key.key_id,
        )  # fmt: skip

    keys: dict[str, str] = {}
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('tradecopy.tenant', '*', true)")
            await Store(None).create_tenant(conn, tenant_id, tenant_id.title())
            provider = await _user(conn, Role.PROVIDER, f"provider@{tenant_id}.local")
            for master in masters:
                await _account(conn, master, "master", None)
            for follower in followers:
                owner = await _user(conn, Role.FOLLOWER, f"{follower.lower()}@{tenant_id}.local")
                await _account(conn, follower, "follower", owner)
                key, prefix = new_api_key()
                await conn.execute(
                    "INSERT INTO api_keys (key_id, tenant_id, user_id, name, prefix, key_hash)"
                    " VALUES ($1, $2, $3, 'local', $4, $5)",
                    uuid.uuid4(), tenant_id, owner, prefix, token_hash(key),
                )  # fmt: skip
                keys[follower] = key
            await Store(None).audit(
                conn, None, tenant_id=tenant_id, action="register", entity="local_tenant",
                entity_id=tenant_id, after={"provider": str(provider), "masters": masters,
                                            "followers": followers},
            )  # fmt: skip
    finally:
        await conn.close()
    return keys


# -------------------------------------------------- signal sources (engine/api/signals.py)
# Module functions over a Store: the same two walls (each statement filters by the scope's
# tenant, the policies of 0006_signal_sources.sql hold alone with app_scoping off).


async def create_signal_source(
    store: Store, conn: Any, *, source_id: str, tenant_id: str, fields: dict[str, Any]
) -> Row:
    return await conn.fetchrow(
        "INSERT INTO api_signal_sources (source_id, tenant_id, name, master_account_id,"
        " symbol_map, volume_scale, allowed_ips, secret_hash)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, $8) RETURNING *",
        source_id, tenant_id, fields["name"], fields["master_account_id"],
        _json(fields["symbol_map"]), fields["volume_scale"], _json(fields["allowed_ips"]),
        fields["secret_hash"],
    )  # fmt: skip


async def get_signal_source(store: Store, conn: Any, scope: Scope, source_id: str) -> Row | None:
    return await conn.fetchrow(
        "SELECT * FROM api_signal_sources WHERE source_id = $1"
        " AND ($2::text IS NULL OR tenant_id = $2)",
        source_id, store._tenant(scope),
    )  # fmt: skip


async def list_signal_sources(
    store: Store, conn: Any, scope: Scope, after: str | None, limit: int
) -> list[Row]:
    return await conn.fetch(
        "SELECT * FROM api_signal_sources WHERE ($1::text IS NULL OR tenant_id = $1)"
        " AND ($2::text IS NULL OR source_id > $2) ORDER BY source_id LIMIT $3",
        store._tenant(scope), after, limit,
    )  # fmt: skip


async def delete_signal_source(store: Store, conn: Any, source_id: str) -> None:
    await conn.execute("DELETE FROM api_signal_sources WHERE source_id = $1", source_id)


async def add_signal_log(
    store: Store, conn: Any, *, tenant_id: str, source_id: str, outcome: str, reason: str,
    alert_id: str | None, remote: str, order_ids: list[str] | None = None,
) -> bool:  # fmt: skip
    """False when the alert was accepted before (an ``accepted`` entry of its id exists)."""
    row = await conn.fetchrow(
        "INSERT INTO api_signal_log (tenant_id, source_id, outcome, reason, alert_id, remote,"
        " order_ids) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) ON CONFLICT DO NOTHING"
        " RETURNING log_id",
        tenant_id, source_id, outcome, reason, alert_id, remote, _json(order_ids),
    )  # fmt: skip
    return row is not None


async def accepted_signal(store: Store, conn: Any, source_id: str, alert_id: str) -> Row | None:
    return await conn.fetchrow(
        "SELECT * FROM api_signal_log WHERE source_id = $1 AND alert_id = $2"
        " AND outcome = 'accepted'",
        source_id, alert_id,
    )  # fmt: skip


async def list_signal_log(
    store: Store, conn: Any, scope: Scope, source_id: str, after: int | None, limit: int
) -> list[Row]:
    """Newest first."""
    return await conn.fetch(
        "SELECT * FROM api_signal_log WHERE source_id = $1"
        " AND ($2::text IS NULL OR tenant_id = $2)"
        " AND ($3::bigint IS NULL OR log_id < $3) ORDER BY log_id DESC LIMIT $4",
        source_id, store._tenant(scope), after, limit,
    )  # fmt: skip


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


# ------------------------------------------------------------------ platform jobs (CLI)


async def rotate_key(database_url: str, old: MasterKey, new: MasterKey) -> int:
    """Re-encrypt every account credential stored under ``old`` with ``new``; return how many.

    One transaction: either every row moves or none does, and the service can run on either
    key id meanwhile only if it holds both (it holds one: restart it with the new key after).
    """
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('tradecopy.tenant', '*', true)")
            rows = await conn.fetch(
                "SELECT account_id, tenant_id, credentials FROM api_accounts"
                " WHERE key_id = $1 FOR UPDATE",
                old.key_id,
            )
            for row in rows:
                plain = decrypt(old, row["credentials"], row["tenant_id"], row["account_id"])
                sealed = encrypt(new, plain, row["tenant_id"], row["account_id"])
                await conn.execute(
                    "UPDATE api_accounts SET credentials = $2, key_id = $3 WHERE account_id = $1",
                    row["account_id"], sealed, new.key_id,
                )  # fmt: skip
            resealed = await _reseal_identity(conn, old, new)
            await conn.execute(
                "INSERT INTO api_audit_log (tenant_id, action, entity, entity_id, before, after)"
                " VALUES (NULL, 'rotate', 'master_key', $1, $2::jsonb, $3::jsonb)",
                new.key_id,
                _json({"key_id": old.key_id}),
                _json({"key_id": new.key_id, "accounts": len(rows), **resealed}),
            )
        return len(rows)
    finally:
        await conn.close()


async def _reseal_identity(conn: Any, old: MasterKey, new: MasterKey) -> dict[str, int]:
    """TOTP secrets and emails not yet sent are sealed with the master key too: they move
    to the new key in the same transaction (else every TOTP user is locked out)."""
    counts = {}
    for table, id_column, column, binding in (
        ("api_totp", "user_id", "secret", totp_binding),
        ("api_email_outbox", "email_id", "sealed", email_binding),
    ):
        rows = await conn.fetch(
            f"SELECT {id_column} AS id, tenant_id, {column} AS blob FROM {table}"
            f" WHERE key_id = $1 AND {column} IS NOT NULL FOR UPDATE",
            old.key_id,
        )
        for row in rows:
            bound = binding(row["tenant_id"], row["id"])
            sealed = encrypt(new, decrypt(old, bytes(row["blob"]), *bound), *bound)
            await conn.execute(
                f"UPDATE {table} SET {column} = $2, key_id = $3 WHERE {id_column} = $1",
                row["id"], sealed, new.key_id,
            )  # fmt: skip
        counts[table.removeprefix("api_")] = len(rows)
    return counts


async def create_operator(
    database_url: str, email: str, password: str, username: str | None = None
) -> uuid.UUID:
    """Bootstrap: add an operator (platform-wide) user; refuses a taken email or username."""
    from engine.api.auth import hash_password
    from engine.api.errors import Conflict, FieldProblem, ValidationFailed, field_of
    from engine.api.models import NewFollower

    try:
        msgspec.convert({"email": email, "username": username, "password": password}, NewFollower)
    except msgspec.ValidationError as exc:
        field, message = field_of(str(exc))
        raise ValidationFailed(
            message, errors=[FieldProblem(field=field, message=message)]
        ) from None
    password_hash = hash_password(password)
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('tradecopy.tenant', '*', true)")
            store = Store(None)
            row = await store.create_user(
                conn, role=Role.OPERATOR, tenant_id=None, email=email, username=username,
                password_hash=password_hash,
            )  # fmt: skip
            if row is None:
                raise Conflict(f"a user with email {email!r} or that username already exists")
            await store.audit(
                conn, None, tenant_id=None, action="create", entity="user",
                entity_id=str(row["user_id"]), after={"role": "operator", "email": row["email"]},
            )  # fmt: skip
        return row["user_id"]
    finally:
        await conn.close()
