"""API configuration, and the secrets it reads from the environment."""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Annotated

import msgspec

from engine.core.errors import TradecopyError

#: HMAC key of the access tokens (HS256): at least 32 bytes of randomness.
ENV_JWT_SECRET = "TRADECOPY_API_JWT_SECRET"
#: The AES-256 key that encrypts broker credentials: 32 bytes, base64.
ENV_MASTER_KEY = "TRADECOPY_API_MASTER_KEY"
#: The id recorded beside every ciphertext made with ``ENV_MASTER_KEY`` (default ``k1``).
ENV_MASTER_KEY_ID = "TRADECOPY_API_MASTER_KEY_ID"

_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}\Z")
_MIN_JWT_SECRET = 32


class ApiConfigError(TradecopyError):
    """A secret is missing or malformed."""


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    """Nothing listens on every interface unless told to (``0.0.0.0``)."""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str | None = None
    """PostgreSQL; None: ``TRADECOPY_DATABASE_URL``, else the embedded server."""
    database_role: str | None = "tradecopy_api"
    """Every pooled connection runs ``SET ROLE`` to it: a role that owns no table, so
    row-level security applies. None only where the connecting user already is such a role."""
    migrate: bool = False
    """Apply the API's migrations at start (local modes)."""
    issuer: str = "tradecopy"
    audience: str = "tradecopy-api"
    access_ttl_s: Annotated[int, msgspec.Meta(ge=60, le=3600)] = 900
    refresh_ttl_s: Annotated[int, msgspec.Meta(ge=3600, le=90 * 86400)] = 30 * 86400
    auth_rate_per_minute: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    """Auth attempts a client (IP, and IP + account name) may make per minute."""
    auth_burst: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    cors_origins: list[str] = []
    """Browser origins allowed to call the API (exact ``scheme://host[:port]``); none by default."""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    page_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = 9466


@dataclass(frozen=True, slots=True, repr=False)
class MasterKey:
    """One AES-256 key and the id stored beside what it encrypts."""

    key_id: str
    key: bytes

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.key_id):
            raise ApiConfigError(f"key id {self.key_id!r}: 1-32 of letters, digits, _ . -")
        if len(self.key) != 32:
            raise ApiConfigError(
                f"key {self.key_id!r}: AES-256 needs 32 bytes, got {len(self.key)}"
            )

    def __repr__(self) -> str:  # never print the key
        return f"MasterKey(key_id={self.key_id!r})"

    @classmethod
    def parse(cls, key_id: str, encoded: str) -> MasterKey:
        try:
            raw = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ApiConfigError(f"key {key_id!r} is not valid base64") from None
        return cls(key_id, raw)

    @classmethod
    def generate(cls, key_id: str) -> MasterKey:
        return cls(key_id, secrets.token_bytes(32))


@dataclass(frozen=True, slots=True, repr=False)
class ApiSecrets:
    jwt_secret: bytes
    master_key: MasterKey
    ephemeral: bool = False
    """Generated for this process (``--dev``): tokens and credentials die with it."""

    def __repr__(self) -> str:
        return f"ApiSecrets(master_key={self.master_key!r}, ephemeral={self.ephemeral})"


def secrets_from_env(env: dict[str, str] | None = None, *, dev: bool = False) -> ApiSecrets:
    """The JWT secret and master key from the environment; refuse to go on without them,
    unless ``dev``, which generates ephemeral ones and says so on stderr."""
    env = dict(os.environ) if env is None else env
    jwt_raw = env.get(ENV_JWT_SECRET, "")
    key_raw = env.get(ENV_MASTER_KEY, "")
    key_id = env.get(ENV_MASTER_KEY_ID, "k1") or "k1"
    if not jwt_raw or not key_raw:
        if not dev:
            missing = [
                n for n, v in ((ENV_JWT_SECRET, jwt_raw), (ENV_MASTER_KEY, key_raw)) if not v
            ]
            raise ApiConfigError(
                f"{', '.join(missing)} not set: the API refuses to start without its secrets "
                "(development only: --dev generates throw-away ones)"
            )
        print(
            "WARNING: tradecopy api --dev: EPHEMERAL secrets generated; every token and every "
            "stored broker credential is unreadable after this process ends. Never in production.",
            file=sys.stderr,
        )
        return ApiSecrets(
            jwt_secret=jwt_raw.encode() if jwt_raw else secrets.token_bytes(32),
            master_key=MasterKey.parse(key_id, key_raw) if key_raw else MasterKey.generate("dev"),
            ephemeral=True,
        )
    if len(jwt_raw.encode()) < _MIN_JWT_SECRET:
        raise ApiConfigError(f"{ENV_JWT_SECRET} must be at least {_MIN_JWT_SECRET} bytes")
    return ApiSecrets(jwt_secret=jwt_raw.encode(), master_key=MasterKey.parse(key_id, key_raw))
