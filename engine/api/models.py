"""Request and response bodies of the API: msgspec Structs, also the OpenAPI document's types."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from engine.api.auth import Role
from engine.api.crypto import BrokerCredentials
from schemas.account import TerminalStatus
from schemas.control import StopScope
from schemas.links import CopyLink

T = TypeVar("T")

Email = Annotated[str, msgspec.Meta(pattern=r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{1,60}$")]
Username = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{3,64}$")]
NewPassword = Annotated[str, msgspec.Meta(min_length=12, max_length=1024)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
TenantId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A request body: strict, an unknown field is an error that names it."""


class View(msgspec.Struct, frozen=True, kw_only=True):
    """A response body."""


class Page(View, Generic[T], kw_only=True):
    """One page of a list; pass ``next_cursor`` as ``cursor`` for the next (null: no more)."""

    items: list[T]
    next_cursor: str | None = None


# ------------------------------------------------------------------------------ auth


class LoginRequest(Body, kw_only=True):
    identifier: Annotated[str, msgspec.Meta(min_length=1, max_length=254)]
    """Email or username."""
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    totp_code: Annotated[str, msgspec.Meta(min_length=1, max_length=16)] | None = None
    """The current code of the authenticator app, for an account with TOTP."""
    recovery_code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    """One of the account's recovery codes instead of a TOTP code (each works once)."""


class RefreshRequest(Body, kw_only=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class TokenPair(View, kw_only=True):
    access_token: str
    refresh_token: str
    token_type: str = "Bearer"
    expires_in: int
    """Seconds the access token is valid."""


class UserView(View, kw_only=True):
    user_id: str
    role: Role
    tenant_id: str | None
    email: str
    username: str | None = None
    created_at: str
    email_verified: bool = False
    totp_enabled: bool | None = None
    """Whether the user signs in with a second factor (``GET /v1/me`` only; null elsewhere)."""


class PasswordChange(Body, kw_only=True):
    current_password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    new_password: NewPassword


class NewFollower(Body, kw_only=True):
    email: Email
    username: Username | None = None
    password: NewPassword


class NewTenant(Body, kw_only=True):
    tenant_id: TenantId
    name: Name
    provider_email: Email
    provider_username: Username | None = None
    provider_password: NewPassword


class TenantView(View, kw_only=True):
    tenant_id: str
    name: str
    created_at: str


class NewApiKey(Body, kw_only=True):
    name: Name


class ApiKeyView(View, kw_only=True):
    key_id: str
    name: str
    prefix: str
    created_at: str
    revoked: bool = False


class ApiKeyCreated(View, kw_only=True):
    key_id: str
    name: str
    prefix: str
    key: str
    """Shown this once: only its hash is kept. Send it as ``X-API-Key``."""


# -------------------------------------------------------------------------- accounts


class Platform(enum.StrEnum):
    MT4 = "mt4"
    MT5 = "mt5"
    PAPER = "paper"


class AccountRole(enum.StrEnum):
    MASTER = "master"
    FOLLOWER = "follower"


class NewAccount(Body, kw_only=True):
    name: Name
    platform: Platform
    role: AccountRole
    credentials: BrokerCredentials
    owner_user_id: str | None = None
    """The follower user the account belongs to (a provider may name one of its followers;
    a follower's own accounts are always its own)."""


class AccountUpdate(Body, kw_only=True):
    name: Name | None = None
    credentials: BrokerCredentials | None = None


class ConnectionState(enum.StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    SILENT = "silent"
    """The connector has published nothing for a while: it may be down."""
    UNKNOWN = "unknown"
    """No state was ever published for the account."""


class ConnectionStatus(View, kw_only=True):
    state: ConnectionState
    ts_ns: int | None = None
    currency: str | None = None
    balance: float | None = None
    equity: float | None = None
    terminal: TerminalStatus | None = None


class AccountView(View, kw_only=True):
    account_id: str
    name: str
    platform: Platform
    role: AccountRole
    owner_user_id: str | None = None
    key_id: str
    has_terminal_token: bool
    created_at: str
    updated_at: str
    status: ConnectionStatus | None = None


class TerminalToken(View, kw_only=True):
    account_id: str
    token: str
    """Shown this once: the terminal presents it; only its hash is kept."""


# ----------------------------------------------------------------------------- links


class LinkView(View, kw_only=True):
    link: CopyLink
    created_at: str


# ----------------------------------------------------------------------------- stops


class StopRequest(Body, kw_only=True):
    scope: StopScope
    target: Annotated[str, msgspec.Meta(max_length=64)] = ""
    active: bool = True
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""
    force: bool = False
    """Set a stop on a link or account nothing in NATS knows yet."""


# ----------------------------------------------------------------------------- audit


class AuditEntry(View, kw_only=True):
    audit_id: int
    tenant_id: str | None
    actor_user_id: str | None
    actor_key_id: str | None
    action: str
    entity: str
    entity_id: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    at: str
