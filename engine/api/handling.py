"""What every endpoint shares: the route table entry, authentication, body parsing, replies,
cursors, CORS and security headers, and problem details for every failure."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import msgspec
import structlog
from aiohttp import web

from engine.api import metrics
from engine.api.auth import Caller, Role, TotpEnrolmentRequired, verify_access_token
from engine.api.errors import (
    ApiError,
    BadRequest,
    FieldProblem,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
    field_of,
)

log = structlog.get_logger("tradecopy.api")

T = TypeVar("T")

PROBLEM_JSON = "application/problem+json"
STATE_KEY: web.AppKey[Any] = web.AppKey("tradecopy_api_state", object)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE"
_CORS_HEADERS = "Authorization, Content-Type, X-API-Key"


@dataclass(frozen=True, slots=True)
class Context:
    """One request as a handler sees it."""

    state: Any
    caller: Caller | None
    request: web.Request

    @property
    def who(self) -> Caller:
        if self.caller is None:  # pragma: no cover - routes with roles always authenticate
            raise Unauthorized("authentication required")
        return self.caller


Handler = Callable[[Context], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: its handler and what the OpenAPI document says about it."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    roles: frozenset[Role] | None = None
    """Who may call it; None: anyone, unauthenticated."""
    request: Any = None
    response: Any = None
    status: int = 200
    query: tuple[str, ...] = ()
    rate_limited: bool = False
    errors: tuple[int, ...] = field(default=())
    before_totp: bool = False
    """Open to a caller whose role must use TOTP and who has not enrolled yet."""
    media_type: str = "application/json"
    """Of the answer: ``text/event-stream`` for a live stream."""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.lstrip("_")


ANY_USER = frozenset(Role)
PROVIDERS = frozenset({Role.PROVIDER})
OPERATORS = frozenset({Role.OPERATOR})
TENANT_USERS = frozenset({Role.PROVIDER, Role.FOLLOWER})


# ------------------------------------------------------------------------- requests


async def body_bytes(request: web.Request) -> bytes:
    ctype = request.content_type
    if ctype != "application/json":
        raise UnsupportedMediaType(f"send application/json, not {ctype or 'nothing'}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"at most {request.app[STATE_KEY].config.max_body_bytes} bytes"
        ) from None


def _refuse_nul(raw: bytes) -> None:
    # PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database.
    if b"\\u0000" in raw:
        raise ValidationFailed("text may not contain the NUL character (\\u0000)")


async def parse_body(request: web.Request, tp: type[T]) -> T:
    raw = await body_bytes(request)
    _refuse_nul(raw)
    try:
        return msgspec.json.decode(raw, type=tp)
    except msgspec.ValidationError as exc:
        where, message = field_of(str(exc))
        raise ValidationFailed(
            message, errors=[FieldProblem(field=where, message=message)]
        ) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not valid JSON: {exc}") from None


async def parse_object(request: web.Request) -> dict[str, Any]:
    raw = await body_bytes(request)
    _refuse_nul(raw)
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def encode_cursor(value: str | int) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(value)).decode().rstrip("=")


def page_params(ctx: Context, kind: type[T]) -> tuple[T | None, int]:
    """``(after, limit)`` from ``?cursor=&limit=``; fetch ``limit + 1`` to know of a next page."""
    query = ctx.request.query
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        raise ValidationFailed(
            "limit must be an integer",
            errors=[FieldProblem(field="limit", message="must be an integer")],
        ) from None
    page_max = ctx.state.config.page_max
    if not 1 <= limit <= page_max:
        raise ValidationFailed(
            f"limit must be 1-{page_max}",
            errors=[FieldProblem(field="limit", message=f"must be 1-{page_max}")],
        )
    cursor = query.get("cursor")
    if not cursor:
        return None, limit
    invalid = ValidationFailed(
        "cursor is not one this API gave out",
        errors=[FieldProblem(field="cursor", message="invalid cursor")],
    )
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = msgspec.json.decode(base64.urlsafe_b64decode(padded), type=kind)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise invalid from None
    if isinstance(after, int) and not 0 <= after < 2**63:
        raise invalid
    if isinstance(after, str) and ("\x00" in after or len(after) > 128):
        raise invalid
    return after, limit


def next_cursor(rows: list[Any], limit: int, key: Callable[[Any], str | int]) -> str | None:
    return encode_cursor(key(rows[limit - 1])) if len(rows) > limit else None


def iso(ts: Any) -> str:
    return ts.isoformat()


# -------------------------------------------------------------------- authentication


async def authenticate(request: web.Request) -> Caller:
    state = request.app[STATE_KEY]
    api_key = request.headers.get("X-API-Key")
    if api_key is not None:
        return await state.caller_of_api_key(api_key)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send Authorization: Bearer <access token> or X-API-Key")
    cfg = state.config
    return verify_access_token(
        token.strip(), secret=state.secrets.jwt_secret, issuer=cfg.issuer, audience=cfg.audience
    )


def endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        if any("\x00" in v for v in (*request.match_info.values(), *request.query.values())):
            raise BadRequest("the path or query contains the NUL character")
        if route.rate_limited:
            state.limit(request, "route:" + route.path)
        caller = None
        if route.roles is not None:
            caller = await authenticate(request)
            if caller.role not in route.roles:
                raise Forbidden(f"{route.method} {route.path} is not open to a {caller.role}")
            if caller.totp_enrolment_pending and not route.before_totp:
                raise TotpEnrolmentRequired(
                    "your role must use a second factor: enrol with POST /v1/me/totp, confirm,"
                    " then refresh your tokens"
                )
        status, body = await route.handler(Context(state, caller, request))
        if isinstance(body, web.StreamResponse):  # a live stream, already written and ended
            return body
        if body is None:
            return web.Response(status=status)
        return web.Response(
            status=status, body=msgspec.json.encode(body), content_type="application/json"
        )

    handle.__name__ = route.operation_id
    return handle


# ------------------------------------------------------------------------ middleware


def problem_response(error: ApiError, request: web.Request) -> web.Response:
    response = web.Response(
        status=error.status,
        body=msgspec.json.encode(error.problem(instance=request.path)),
        content_type=PROBLEM_JSON,
    )
    if isinstance(error, RateLimited):
        response.headers["Retry-After"] = str(max(1, round(error.retry_after_s + 0.5)))
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="tradecopy"'
    return response


def _from_http(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such endpoint")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"allowed: {', '.join(sorted(exc.allowed_methods))}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(exc.text or "")
    error = ApiError(exc.reason)
    error.status, error.slug, error.title = exc.status, "http", exc.reason
    return error


@web.middleware
async def api_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    started = time.perf_counter()
    state = request.app[STATE_KEY]
    origin = request.headers.get("Origin")
    allowed_origin = origin if origin is not None and origin in state.cors_origins else None
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        if allowed_origin is not None:
            response.headers.update(
                {
                    "Access-Control-Allow-Methods": _CORS_METHODS,
                    "Access-Control-Allow-Headers": _CORS_HEADERS,
                    "Access-Control-Max-Age": "600",
                }
            )
    else:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = problem_response(exc, request)
        except web.HTTPException as exc:
            response = problem_response(_from_http(exc), request)
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as exc:
            # A database the ledger (or the API) was never migrated in: say so, not "500".
            log.error("api_database_not_migrated", path=request.path, error=str(exc))
            response = problem_response(
                Unavailable(
                    "the database lacks a table or view this request reads: run `tradecopy db"
                    " migrate` (the ledger's and the API's migrations) against it"
                ),
                request,
            )
        except Exception:
            log.exception("api_request_failed", method=request.method, path=request.path)
            response = problem_response(ApiError("the request failed; it is logged"), request)
    response.headers.update(SECURITY_HEADERS)
    if allowed_origin is not None:
        response.headers["Access-Control-Allow-Origin"] = allowed_origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    if origin is not None:
        response.headers["Vary"] = "Origin"
    info = request.match_info.route.resource
    path = info.canonical if info is not None else "unmatched"
    metrics.REQUESTS.labels(request.method, path, str(response.status)).inc()
    metrics.LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
    return response
