"""Every SQL statement of the API's tables (``api_*``), parameterised, asyncpg.

Each request runs in one transaction opened by ``Store.tx(scope)``, which sets the
row-level-security settings (``tradecopy.tenant``, ``tradecopy.follower``) and the
non-owner role for that transaction only. Every statement also filters by the caller's tenant
(and, for a follower, by its own user id) itself: the policies are the second wall, not the
first. ``app_scoping=False`` drops the first wall (tests prove the second holds alone).
"""

from __future__ import annotations

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
            await conn.execute(
                "INSERT INTO api_audit_log (tenant_id, action, entity, entity_id, before, after)"
                " VALUES (NULL, 'rotate', 'master_key', $1, $2::jsonb, $3::jsonb)",
                new.key_id,
                _json({"key_id": old.key_id}),
                _json({"key_id": new.key_id, "accounts": len(rows)}),
            )
        return len(rows)
    finally:
        await conn.close()


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
