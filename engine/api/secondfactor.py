"""The TOTP second factor at rest and at login: secrets sealed with the master key, and the
check a login with a confirmed TOTP must pass (a fresh code, or an unused recovery code)."""

from __future__ import annotations

import uuid
from typing import Any

from engine.api import metrics
from engine.api.auth import SecondFactorRequired, Unauthorized
from engine.api.config import MasterKey
from engine.api.crypto import CredentialsError, decrypt, encrypt
from engine.api.sealing import totp_binding
from engine.api.store import PLATFORM
from engine.api.totp import matching_step, recovery_code_hash


def seal_secret(key: MasterKey, secret: bytes, tenant_id: str | None, user_id: uuid.UUID) -> bytes:
    return encrypt(key, secret, *totp_binding(tenant_id, user_id))


def open_secret(key: MasterKey, row: Any) -> bytes:
    """The secret of an ``api_totp`` row; ``CredentialsError`` under another key."""
    if row["key_id"] != key.key_id:
        raise CredentialsError(f"TOTP secret sealed under key {row['key_id']!r}")
    return decrypt(key, bytes(row["secret"]), *totp_binding(row["tenant_id"], row["user_id"]))


async def accept_code(state: Any, conn: Any, row: Any, code: str, *, confirm: bool = False) -> bool:
    """True when ``code`` is a TOTP code of the user's secret for a step not used before;
    that step is then spent (in ``conn``'s transaction), and with ``confirm`` TOTP is on."""
    step = matching_step(
        open_secret(state.secrets.master_key, row), code, last_step=row["last_step"]
    )
    return step is not None and await state.store.use_totp_step(
        conn, row["user_id"], step, confirm=confirm
    )


async def check_login(
    ctx: Any, conn: Any, user: Any, totp_code: str | None, recovery_code: str | None, rate_key: str
) -> None:
    """Pass when the user has no confirmed TOTP or gives a good second factor; a wrong one
    costs a second attempt of the login's rate limit (``rate_key``)."""
    state = ctx.state
    store = state.store
    row = await store.get_totp(conn, PLATFORM, user["user_id"])
    if row is None or row["confirmed_at"] is None:
        return
    if totp_code is None and recovery_code is None:
        raise SecondFactorRequired(
            "this account signs in with a second factor: send totp_code (the authenticator's"
            " current code) or recovery_code"
        )
    if totp_code is not None:
        ok = await accept_code(state, conn, row, totp_code)
    else:
        assert recovery_code is not None
        ok = await store.spend_recovery_code(
            conn, user["user_id"], recovery_code_hash(recovery_code)
        )
        if ok:
            left = await store.recovery_codes_left(conn, user["user_id"])
            await store.audit(
                conn, None, tenant_id=user["tenant_id"], action="use_recovery_code",
                entity="user", entity_id=str(user["user_id"]), after={"codes_left": left},
            )  # fmt: skip
    if ok:
        return
    metrics.AUTH_FAILURES.labels("second_factor").inc()
    state.limit(ctx.request, rate_key)
    raise Unauthorized("wrong or already used second factor")
