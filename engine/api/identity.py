"""Invites, password reset, email verification and the TOTP second factor."""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Any

import msgspec
import structlog

from engine.api import metrics, secondfactor
from engine.api.auth import (
    Caller,
    InvalidToken,
    Role,
    hash_password,
    new_email_token,
    same_digest,
    token_hash,
    verify_password,
)
from engine.api.errors import (
    Conflict,
    FieldProblem,
    Forbidden,
    NotFound,
    Unauthorized,
    ValidationFailed,
)
from engine.api.handling import (
    ANY_USER,
    OPERATORS,
    Context,
    Route,
    iso,
    next_cursor,
    page_params,
    parse_body,
)
from engine.api.models import Body, Email, NewPassword, Page, TenantId, TokenPair, Username, View
from engine.api.outbox import enqueue_email
from engine.api.people import _issue_tokens, path_uuid
from engine.api.store import PLATFORM, Scope
from engine.api.totp import (
    new_recovery_codes,
    new_secret,
    provisioning_uri,
    recovery_code_hash,
    secret_base32,
)

log = structlog.get_logger("tradecopy.api")

EmailToken = Annotated[str, msgspec.Meta(min_length=16, max_length=128)]
TotpCodeText = Annotated[str, msgspec.Meta(min_length=6, max_length=16)]
INVITERS = frozenset({Role.OPERATOR, Role.PROVIDER})
PASSWORD_RESET = "password_reset"
VERIFY_EMAIL = "verify_email"
#: Where the dashboards take a token from an email: after ``#``, so it never reaches a
#: server's access log or a ``Referer`` header.
LINK_PATHS = {
    "invite": "/invite",
    PASSWORD_RESET: "/reset-password",
    VERIFY_EMAIL: "/verify-email",
}


class InvitedRole(enum.StrEnum):
    PROVIDER = "provider"
    FOLLOWER = "follower"


class InviteStatus(enum.StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REVOKED = "revoked"
    EXPIRED = "expired"


class NewInvite(Body, kw_only=True):
    email: Email
    role: InvitedRole
    """A provider invites followers; an operator invites providers (or followers)."""
    tenant_id: TenantId | None = None
    """The tenant to join: an operator names it; a provider's invites join its own."""


class InviteView(View, kw_only=True):
    invite_id: str
    tenant_id: str
    email: str
    role: InvitedRole
    status: InviteStatus
    invited_by: str | None = None
    created_at: str
    expires_at: str


class InviteAcceptance(Body, kw_only=True):
    token: EmailToken
    password: NewPassword
    username: Username | None = None


class PasswordResetRequest(Body, kw_only=True):
    email: Email


class PasswordResetConfirmation(Body, kw_only=True):
    token: EmailToken
    new_password: NewPassword


class EmailVerification(Body, kw_only=True):
    token: EmailToken


class TotpEnrolment(View, kw_only=True):
    secret: str
    """Base32, for typing into an authenticator app by hand."""
    otpauth_uri: str
    """The same as an ``otpauth://`` URI (show it as a QR code)."""


class TotpConfirmation(Body, kw_only=True):
    code: TotpCodeText


class RecoveryCodes(View, kw_only=True):
    recovery_codes: list[str]
    """Shown this once (only their hashes are kept); each signs in once instead of a code."""


class TotpRemoval(Body, kw_only=True):
    """Proof that the caller holds the account: a current code, or the password."""

    code: TotpCodeText | None = None
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None


class TotpPolicy(Body, kw_only=True):
    required_roles: list[Role]
    """Users of these roles must enrol in TOTP before anything but enrolment is open to them."""


def _link(ctx: Context, kind: str, token: str) -> str:
    return f"{ctx.state.config.link_base}{LINK_PATHS[kind]}#token={token}"


# --------------------------------------------------------------------------- invites


def invite_view(row: Any) -> InviteView:
    if row["accepted_at"] is not None:
        status = InviteStatus.ACCEPTED
    elif row["revoked_at"] is not None:
        status = InviteStatus.REVOKED
    elif row["expired"]:
        status = InviteStatus.EXPIRED
    else:
        status = InviteStatus.PENDING
    invited_by = row["invited_by"]
    return InviteView(
        invite_id=str(row["invite_id"]), tenant_id=row["tenant_id"], email=row["email"],
        role=InvitedRole(row["role"]), status=status,
        invited_by=None if invited_by is None else str(invited_by),
        created_at=iso(row["created_at"]), expires_at=iso(row["expires_at"]),
    )  # fmt: skip


async def create_invite(ctx: Context) -> tuple[int, Any]:
    """Invite someone by email into a tenant: the email carries a link valid for 7 days."""
    caller = ctx.who
    body = await parse_body(ctx.request, NewInvite)
    if caller.role is Role.PROVIDER:
        if body.role is not InvitedRole.FOLLOWER:
            raise Forbidden("a provider invites followers")
        if body.tenant_id not in (None, caller.tenant_id):
            raise NotFound("no such tenant")
        tenant_id = caller.tenant_id
    else:
        if body.tenant_id is None:
            raise ValidationFailed(
                "name the tenant to invite into",
                errors=[FieldProblem(field="tenant_id", message="required for an operator")],
            )
        tenant_id = body.tenant_id
    assert tenant_id is not None
    cfg = ctx.state.config
    token = new_email_token()
    store = ctx.state.store
    scope = Scope.of(caller)
    async with store.tx(scope) as conn:
        tenant_name = await store.tenant_name(conn, scope, tenant_id)
        if tenant_name is None:
            raise NotFound("no such tenant")
        row = await store.create_invite(
            conn, tenant_id=tenant_id, email=body.email, role=Role(body.role.value),
            token_hash=token_hash(token), invited_by=caller.user_id, ttl_s=cfg.invite_ttl_s,
        )  # fmt: skip
        await enqueue_email(
            ctx.state, conn, tenant_id=tenant_id, kind="invite", to=row["email"],
            link=_link(ctx, "invite", token), tenant=tenant_name, role=body.role.value,
            days=cfg.invite_ttl_s // 86400,
        )  # fmt: skip
        await store.audit(
            conn, caller, tenant_id=tenant_id, action="create", entity="invite",
            entity_id=str(row["invite_id"]), after={"email": row["email"], "role": row["role"]},
        )  # fmt: skip
    ctx.state.mailer.wake()
    return 201, invite_view(row)


async def list_invites(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    after, limit = page_params(ctx, uuid.UUID)
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        rows = await store.list_invites(conn, Scope.of(caller), after, limit + 1)
    items = [invite_view(r) for r in rows[:limit]]
    return 200, Page(
        items=items, next_cursor=next_cursor(rows, limit, lambda r: str(r["invite_id"]))
    )


async def revoke_invite(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    invite_id = path_uuid(ctx, "invite_id")
    store = ctx.state.store
    async with store.tx(Scope.of(caller)) as conn:
        row = await store.revoke_invite(conn, Scope.of(caller), invite_id)
        if row is None:
            raise NotFound("no such pending invite")
        await store.audit(
            conn, caller, tenant_id=row["tenant_id"], action="revoke", entity="invite",
            entity_id=str(invite_id), after={"revoked": True},
        )  # fmt: skip
    return 204, None


async def accept_invite(ctx: Context) -> tuple[int, Any]:
    """The invited person chooses a password: the user is made in the invite's tenant with its
    role (the email counts as verified: the token came through it) and signed in."""
    body = await parse_body(ctx.request, InviteAcceptance)
    password_hash = hash_password(body.password)
    digest = token_hash(body.token)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        invite = await store.invite_for_update(conn, digest)
        if (
            invite is None
            or not same_digest(bytes(invite["token_hash"]), digest)
            or invite["accepted_at"] is not None
            or invite["revoked_at"] is not None
            or invite["expired"]
        ):
            metrics.AUTH_FAILURES.labels("invite").inc()
            raise InvalidToken("this invite is unknown, used, revoked or expired")
        role = Role(invite["role"])
        user = await store.create_user(
            conn, role=role, tenant_id=invite["tenant_id"], email=invite["email"],
            username=body.username, password_hash=password_hash,
        )  # fmt: skip
        if user is None:
            raise Conflict("a user with that email or username exists")
        await store.set_email_verified(conn, user["user_id"])
        await store.mark_invite_accepted(conn, invite["invite_id"], user["user_id"])
        await store.audit(
            conn, None, tenant_id=invite["tenant_id"], action="accept", entity="invite",
            entity_id=str(invite["invite_id"]),
            after={"user_id": str(user["user_id"]), "role": role.value, "email": user["email"]},
        )  # fmt: skip
        caller = Caller(user_id=user["user_id"], role=role, tenant_id=invite["tenant_id"])
        pair = await _issue_tokens(ctx, conn, caller, uuid.uuid4())
    log.info("api_invite_accepted", user_id=str(caller.user_id), role=role.value)
    return 201, pair


# -------------------------------------------------------------------- password reset


async def request_password_reset(ctx: Context) -> tuple[int, Any]:
    """Always 202, at once: whether the email belongs to anyone is decided after the answer
    (a background task), so neither the answer nor its timing tells."""
    body = await parse_body(ctx.request, PasswordResetRequest)
    ctx.state.limit(ctx.request, "reset:" + body.email.lower())
    ctx.state.spawn(_send_password_reset(ctx, body.email))
    return 202, None


async def _send_password_reset(ctx: Context, email: str) -> None:
    cfg = ctx.state.config
    store = ctx.state.store
    token = new_email_token()
    try:
        async with store.tx(PLATFORM) as conn:
            user = await store.user_by_email(conn, email)
            if user is None or user["disabled"]:
                return
            await store.add_user_token(
                conn, user_id=user["user_id"], tenant_id=user["tenant_id"],
                purpose=PASSWORD_RESET, token_hash=token_hash(token),
                ttl_s=cfg.password_reset_ttl_s,
            )  # fmt: skip
            await enqueue_email(
                ctx.state, conn, tenant_id=user["tenant_id"], kind=PASSWORD_RESET,
                to=user["email"], link=_link(ctx, PASSWORD_RESET, token),
                minutes=cfg.password_reset_ttl_s // 60,
            )  # fmt: skip
    except Exception:  # nobody awaits this task: say what failed
        log.exception("api_password_reset_failed")
        return
    ctx.state.mailer.wake()


async def _spend_token(ctx: Context, conn: Any, token: str, purpose: str) -> Any:
    """The user row of a valid ``purpose`` token, now used; ``InvalidToken`` otherwise."""
    digest = token_hash(token)
    row = await ctx.state.store.user_token_for_update(conn, digest, purpose)
    if (
        row is None
        or not same_digest(bytes(row["token_hash"]), digest)
        or row["used_at"] is not None
        or row["expired"]
        or row["disabled"]
    ):
        metrics.AUTH_FAILURES.labels(purpose).inc()
        raise InvalidToken("this link is unknown, used or expired")
    await ctx.state.store.spend_user_tokens(conn, row["user_id"], purpose)
    return row


async def confirm_password_reset(ctx: Context) -> tuple[int, Any]:
    """A new password for the token's user; every refresh token of the user is revoked."""
    body = await parse_body(ctx.request, PasswordResetConfirmation)
    password_hash = hash_password(body.new_password)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        row = await _spend_token(ctx, conn, body.token, PASSWORD_RESET)
        await store.set_password_hash(conn, row["user_id"], password_hash)
        await store.set_email_verified(conn, row["user_id"])  # the link came through it
        revoked = await store.revoke_user_refresh_tokens(conn, row["user_id"])
        await store.audit(
            conn, None, tenant_id=row["tenant_id"], action="reset_password", entity="user",
            entity_id=str(row["user_id"]), after={"refresh_tokens_revoked": revoked},
        )  # fmt: skip
    log.info("api_password_reset", user_id=str(row["user_id"]))
    return 204, None


# ---------------------------------------------------------------- email verification


async def request_email_verification(ctx: Context) -> tuple[int, Any]:
    caller = ctx.who
    ctx.state.limit(ctx.request, f"verify:{caller.user_id}")
    cfg = ctx.state.config
    store = ctx.state.store
    token = new_email_token()
    scope = Scope.of(caller)
    async with store.tx(scope) as conn:
        user = await store.get_user(conn, scope, caller.user_id)
        if user is None:
            raise Unauthorized("the user of this token no longer exists")
        if user["email_verified_at"] is not None:
            raise Conflict("the email address is already verified")
        await store.add_user_token(
            conn, user_id=caller.user_id, tenant_id=caller.tenant_id, purpose=VERIFY_EMAIL,
            token_hash=token_hash(token), ttl_s=cfg.verify_email_ttl_s,
        )  # fmt: skip
        await enqueue_email(
            ctx.state, conn, tenant_id=caller.tenant_id, kind=VERIFY_EMAIL, to=user["email"],
            link=_link(ctx, VERIFY_EMAIL, token), hours=cfg.verify_email_ttl_s // 3600,
        )  # fmt: skip
    ctx.state.mailer.wake()
    return 202, None


async def verify_email(ctx: Context) -> tuple[int, Any]:
    body = await parse_body(ctx.request, EmailVerification)
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        row = await _spend_token(ctx, conn, body.token, VERIFY_EMAIL)
        await store.set_email_verified(conn, row["user_id"])
        await store.audit(
            conn, None, tenant_id=row["tenant_id"], action="verify_email", entity="user",
            entity_id=str(row["user_id"]), after={"email": row["email"]},
        )  # fmt: skip
    return 204, None


# ------------------------------------------------------------------------------ TOTP


async def begin_totp(ctx: Context) -> tuple[int, Any]:
    """A new secret to enrol (replacing one not yet confirmed); 409 once TOTP is on."""
    caller = ctx.who
    state = ctx.state
    store = state.store
    scope = Scope.of(caller)
    secret = new_secret()
    sealed = secondfactor.seal_secret(
        state.secrets.master_key, secret, caller.tenant_id, caller.user_id
    )
    async with store.tx(scope) as conn:
        user = await store.get_user(conn, scope, caller.user_id)
        if user is None:
            raise Unauthorized("the user of this token no longer exists")
        row = await store.begin_totp(
            conn, user_id=caller.user_id, tenant_id=caller.tenant_id, secret=sealed,
            key_id=state.secrets.master_key.key_id,
        )  # fmt: skip
        if row is None:
            raise Conflict("TOTP is already on: turn it off first (DELETE /v1/me/totp)")
    uri = provisioning_uri(secret, account=user["email"], issuer=state.config.issuer)
    return 201, TotpEnrolment(secret=secret_base32(secret), otpauth_uri=uri)


async def confirm_totp(ctx: Context) -> tuple[int, Any]:
    """The first code from the app turns TOTP on and returns the recovery codes, once."""
    caller = ctx.who
    ctx.state.limit(ctx.request, f"totp:{caller.user_id}")
    body = await parse_body(ctx.request, TotpConfirmation)
    store = ctx.state.store
    scope = Scope.of(caller)
    codes = new_recovery_codes()
    async with store.tx(scope) as conn:
        row = await store.get_totp(conn, scope, caller.user_id)
        if row is None or row["confirmed_at"] is not None:
            raise Conflict("no TOTP enrolment to confirm: begin with POST /v1/me/totp")
        if not await secondfactor.accept_code(ctx.state, conn, row, body.code, confirm=True):
            metrics.AUTH_FAILURES.labels("totp_confirm").inc()
            raise ValidationFailed(
                "the code does not match", errors=[FieldProblem(field="code", message="wrong")]
            )
        await store.replace_recovery_codes(
            conn, caller.user_id, caller.tenant_id, [recovery_code_hash(c) for c in codes]
        )
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="enable_totp", entity="user",
            entity_id=str(caller.user_id), after={"recovery_codes": len(codes)},
        )  # fmt: skip
    return 200, RecoveryCodes(recovery_codes=codes)


async def disable_totp(ctx: Context) -> tuple[int, Any]:
    """Turn TOTP off (and drop the recovery codes): needs a current code or the password."""
    caller = ctx.who
    ctx.state.limit(ctx.request, f"totp:{caller.user_id}")
    body = await parse_body(ctx.request, TotpRemoval)
    if body.code is None and body.password is None:
        raise ValidationFailed(
            "send a current code or the password",
            errors=[FieldProblem(field="code", message="a code or the password is required")],
        )
    store = ctx.state.store
    scope = Scope.of(caller)
    async with store.tx(scope) as conn:
        row = await store.get_totp(conn, scope, caller.user_id)
        if row is None:
            raise NotFound("TOTP is not on")
        if row["confirmed_at"] is not None:
            if body.code is not None:
                proven = await secondfactor.accept_code(ctx.state, conn, row, body.code)
            else:
                user = await store.get_user(conn, scope, caller.user_id)
                proven = user is not None and verify_password(
                    user["password_hash"], body.password or ""
                )
            if not proven:
                metrics.AUTH_FAILURES.labels("totp_disable").inc()
                raise Unauthorized("wrong code or password")
        await store.delete_totp(conn, caller.user_id)
        await store.audit(
            conn, caller, tenant_id=caller.tenant_id, action="disable_totp", entity="user",
            entity_id=str(caller.user_id), after={"was_confirmed": row["confirmed_at"] is not None},
        )  # fmt: skip
    return 204, None


async def get_totp_policy(ctx: Context) -> tuple[int, Any]:
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        roles = await store.totp_required_roles(conn)
    return 200, TotpPolicy(required_roles=sorted(Role(r) for r in roles))


async def set_totp_policy(ctx: Context) -> tuple[int, Any]:
    """Which roles must use TOTP. Tokens say it from their next issue (login or refresh):
    access tokens already out keep their claims until they expire (``access_ttl_s``)."""
    caller = ctx.who
    body = await parse_body(ctx.request, TotpPolicy)
    roles = sorted({r.value for r in body.required_roles})
    store = ctx.state.store
    async with store.tx(PLATFORM) as conn:
        before = await store.totp_required_roles(conn)
        await store.set_totp_required_roles(conn, roles, caller.user_id)
        await store.audit(
            conn, caller, tenant_id=None, action="set", entity="totp_policy", entity_id="roles",
            before={"required_roles": sorted(before)}, after={"required_roles": roles},
        )  # fmt: skip
    return 200, TotpPolicy(required_roles=[Role(r) for r in roles])


ROUTES: list[Route] = [
    Route("POST", "/v1/invites", create_invite, "Invite someone by email into a tenant",
          "invites", roles=INVITERS, request=NewInvite, response=InviteView, status=201,
          errors=(403, 404, 422)),
    Route("GET", "/v1/invites", list_invites, "Invites of the caller's tenant", "invites",
          roles=INVITERS, response=Page[InviteView], query=("cursor", "limit")),
    Route("DELETE", "/v1/invites/{invite_id}", revoke_invite, "Revoke a pending invite",
          "invites", roles=INVITERS, status=204, errors=(404,)),
    Route("POST", "/v1/invites/accept", accept_invite,
          "Accept an invite: choose a password, get a token pair", "invites",
          request=InviteAcceptance, response=TokenPair, status=201, rate_limited=True,
          errors=(400, 409, 422, 429)),
    Route("POST", "/v1/auth/password-reset", request_password_reset,
          "Email a password reset link (202 whether or not the email is known)", "auth",
          request=PasswordResetRequest, status=202, rate_limited=True, errors=(422, 429)),
    Route("POST", "/v1/auth/password-reset/confirm", confirm_password_reset,
          "Set a new password with a reset token; every session ends", "auth",
          request=PasswordResetConfirmation, status=204, rate_limited=True,
          errors=(400, 422, 429)),
    Route("POST", "/v1/auth/verify-email", verify_email, "Mark an email verified by its token",
          "auth", request=EmailVerification, status=204, rate_limited=True,
          errors=(400, 422, 429)),
    Route("POST", "/v1/me/email-verification", request_email_verification,
          "Email a verification link to the caller's address", "users", roles=ANY_USER,
          status=202, rate_limited=True, errors=(409, 429)),
    Route("POST", "/v1/me/totp", begin_totp, "Begin TOTP enrolment: a new secret", "totp",
          roles=ANY_USER, response=TotpEnrolment, status=201, errors=(409,), before_totp=True),
    Route("POST", "/v1/me/totp/confirm", confirm_totp,
          "Confirm TOTP with a first code: recovery codes, shown once", "totp", roles=ANY_USER,
          request=TotpConfirmation, response=RecoveryCodes, rate_limited=True,
          errors=(409, 422, 429), before_totp=True),
    Route("DELETE", "/v1/me/totp", disable_totp, "Turn TOTP off (a current code or password)",
          "totp", roles=ANY_USER, request=TotpRemoval, status=204, rate_limited=True,
          errors=(401, 404, 422, 429), before_totp=True),
    Route("GET", "/v1/security/totp-policy", get_totp_policy, "Roles that must use TOTP",
          "totp", roles=OPERATORS, response=TotpPolicy),
    Route("PUT", "/v1/security/totp-policy", set_totp_policy, "Set the roles that must use TOTP",
          "totp", roles=OPERATORS, request=TotpPolicy, response=TotpPolicy, errors=(422,)),
]  # fmt: skip
