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
from engine.runtime.mail import SmtpSettings

#: HMAC key of the access tokens (HS256): at least 32 bytes of randomness.
ENV_JWT_SECRET = "TRADECOPY_API_JWT_SECRET"
#: The AES-256 key that encrypts broker credentials: 32 bytes, base64.
ENV_MASTER_KEY = "TRADECOPY_API_MASTER_KEY"
#: The id recorded beside every ciphertext made with ``ENV_MASTER_KEY`` (default ``k1``).
ENV_MASTER_KEY_ID = "TRADECOPY_API_MASTER_KEY_ID"

#: Where people reach the dashboards (``ApiConfig.public_url`` when the file leaves it unset).
ENV_PUBLIC_URL = "TRADECOPY_API_PUBLIC_URL"
#: The SMTP server of the emails (``ApiConfig.smtp`` when the file leaves it unset): host,
#: port, security (starttls, tls, none), username and From address; the password is
#: ``TRADECOPY_SMTP_PASSWORD``, read only when an email is sent.
ENV_SMTP = {
    "host": "TRADECOPY_SMTP_HOST",
    "port": "TRADECOPY_SMTP_PORT",
    "security": "TRADECOPY_SMTP_SECURITY",
    "username": "TRADECOPY_SMTP_USERNAME",
    "from_address": "TRADECOPY_SMTP_FROM",
}

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
    signal_client_ip_header: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    """Behind a reverse proxy: the header it sets with the client's address
    (``X-Forwarded-For``); its last entry is a TradingView webhook's sender, checked against
    the source's allow-list. None: the TCP peer. Set it only when every request comes
    through that proxy, or a client can name any address."""
    cors_origins: list[str] = []
    """Browser origins allowed to call the API (exact ``scheme://host[:port]``); none by default."""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    page_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200
    sse_queue_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000
    """Events one live stream (``GET /v1/stream``) may hold unsent; more drops the client."""
    sse_write_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    """A write to a live stream that takes longer drops the client (it stopped reading)."""
    sse_keepalive_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0
    """A comment line after this long without an event keeps proxies from closing the stream."""
    sse_streams_per_caller: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    """Live streams one user (token or API key) may hold open at once."""
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = 9466
    public_url: str | None = None
    """Where people reach the dashboards: links in emails are ``public_url`` + path + token.
    None: ``http://<host>:<port>`` (right for local use only)."""
    smtp: SmtpSettings | None = None
    """The SMTP server emails go through; None: they wait in the outbox (a warning says so)."""
    email_language: str = "en"
    """The catalogue emails are written from (``emails/<language>.toml``)."""
    email_poll_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    """How often the outbox is looked at for due emails."""
    email_retry_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    """The wait after a first failed attempt; doubled after each further one (up to an hour)."""
    email_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    invite_ttl_s: Annotated[int, msgspec.Meta(ge=3600, le=30 * 86400)] = 7 * 86400
    password_reset_ttl_s: Annotated[int, msgspec.Meta(ge=300, le=86400)] = 3600
    verify_email_ttl_s: Annotated[int, msgspec.Meta(ge=3600, le=30 * 86400)] = 2 * 86400

    @property
    def link_base(self) -> str:
        base = self.public_url or f"http://{self.host}:{self.port}"
        return base.rstrip("/")


def smtp_from_env(env: dict[str, str] | None = None) -> SmtpSettings | None:
    """SMTP settings from ``TRADECOPY_SMTP_*``; None when no host is set."""
    env = dict(os.environ) if env is None else env
    values: dict[str, object] = {
        field: env[name] for field, name in ENV_SMTP.items() if env.get(name)
    }
    if "host" not in values:
        return None
    if "port" in values:
        try:
            values["port"] = int(str(values["port"]))
        except ValueError:
            raise ApiConfigError(f"{ENV_SMTP['port']} must be a port number") from None
    if "from_address" not in values:
        raise ApiConfigError(f"{ENV_SMTP['host']} is set: set {ENV_SMTP['from_address']} too")
    try:
        return msgspec.convert(values, SmtpSettings)
    except msgspec.ValidationError as exc:
        raise ApiConfigError(f"SMTP settings from the environment: {exc}") from None


def with_environment(config: ApiConfig, env: dict[str, str] | None = None) -> ApiConfig:
    """``config`` with what it leaves unset taken from the environment (``smtp``,
    ``public_url``): a deployment sets them where it sets the secrets."""
    env = dict(os.environ) if env is None else env
    return msgspec.structs.replace(
        config,
        smtp=config.smtp if config.smtp is not None else smtp_from_env(env),
        public_url=config.public_url or env.get(ENV_PUBLIC_URL) or None,
    )


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
