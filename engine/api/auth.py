"""Who is calling: password hashes (Argon2id), access tokens (JWT, HS256 only), refresh
tokens and API keys (random, stored as SHA-256), and the caller a request acts as."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from engine.api.errors import BadRequest, Forbidden, Unauthorized

#: The only algorithm an access token may use: a token naming any other is refused.
JWT_ALGORITHM = "HS256"
API_KEY_PREFIX = "tck_"

# argon2-cffi's defaults are Argon2id (RFC 9106 low-memory profile: t=3, m=64 MiB, p=4).
_hasher = PasswordHasher()
#: Compared against when no user matches, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class Role(enum.StrEnum):
    OPERATOR = "operator"
    PROVIDER = "provider"
    FOLLOWER = "follower"


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated principal of one request. ``tenant_id`` comes from the token or
    key, never from the request: operators have none (platform-wide)."""

    user_id: uuid.UUID
    role: Role
    tenant_id: str | None
    key_id: uuid.UUID | None = None
    totp_enrolment_pending: bool = False
    """The user's role must use TOTP and the user has not enrolled: the access token says so
    (claim ``enrol_totp``), and only enrolment, ``GET /v1/me`` and logout are open to it."""


class SecondFactorRequired(Unauthorized):
    """The password was right; the account also needs its TOTP or a recovery code."""

    slug, title = "second-factor-required", "Second factor required"


class InvalidToken(BadRequest):
    """An emailed token (invite, reset, verification) that is unknown, used, revoked or
    expired: one answer for all, so it tells a guesser nothing."""

    slug, title = "invalid-token", "Invalid or expired token"


class TotpEnrolmentRequired(Forbidden):
    """The role must use TOTP: enrol (``POST /v1/me/totp``) before anything else."""

    slug, title = "totp-enrolment-required", "Enrol in TOTP first"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches; the same work is done when there is no user."""
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_needs_rehash(stored: str) -> bool:
    return _hasher.check_needs_rehash(stored)


def issue_access_token(
    caller: Caller, *, secret: bytes, issuer: str, audience: str, ttl_s: int
) -> str:
    now = int(time.time())
    claims = {
        "sub": str(caller.user_id),
        "role": caller.role.value,
        "tid": caller.tenant_id,
        "iss": issuer,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "jti": secrets.token_hex(8),
    }
    if caller.totp_enrolment_pending:
        claims["enrol_totp"] = True
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def verify_access_token(token: str, *, secret: bytes, issuer: str, audience: str) -> Caller:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
        role = Role(claims["role"])
        tenant = claims.get("tid")
        user_id = uuid.UUID(claims["sub"])
        pending = claims.get("enrol_totp", False) is True
    except (jwt.InvalidTokenError, KeyError, ValueError, TypeError):
        raise Unauthorized("invalid or expired access token") from None
    if (role is Role.OPERATOR) != (tenant is None) or not (
        tenant is None or isinstance(tenant, str)
    ):
        raise Unauthorized("invalid or expired access token")
    return Caller(user_id=user_id, role=role, tenant_id=tenant, totp_enrolment_pending=pending)


def token_hash(token: str) -> bytes:
    """SHA-256 of a high-entropy token: enough, since it cannot be guessed to begin with."""
    return hashlib.sha256(token.encode()).digest()


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def new_email_token() -> str:
    """A token mailed as a link (invites, password resets, verifications): 256 random bits."""
    return secrets.token_urlsafe(32)


def new_terminal_token() -> str:
    return "tct_" + secrets.token_urlsafe(32)


def new_api_key() -> tuple[str, str]:
    """``(key, prefix)``: the key is shown once; the prefix identifies it in lists."""
    prefix = API_KEY_PREFIX + secrets.token_hex(4)
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix


def same_digest(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
