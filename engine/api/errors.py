"""The API's errors, each answered as an RFC 9457 problem detail."""

from __future__ import annotations

import msgspec

PROBLEM_TYPE_BASE = "https://tradecopy.dev/problems/"


class FieldProblem(msgspec.Struct, frozen=True, kw_only=True):
    """One invalid field of a request: where it is and what is wrong with it."""

    field: str
    message: str


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[FieldProblem] = []
    """Every invalid field, for a request that failed validation."""


class ApiError(Exception):
    """A request that cannot be served; ``status`` and ``slug`` become the problem."""

    status = 500
    slug = "internal"
    title = "Internal error"

    def __init__(self, detail: str = "", *, errors: list[FieldProblem] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.errors = errors or []

    def problem(self, instance: str = "") -> Problem:
        return Problem(
            type=PROBLEM_TYPE_BASE + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
        )


class BadRequest(ApiError):
    status, slug, title = 400, "bad-request", "Bad request"


class ValidationFailed(ApiError):
    status, slug, title = 422, "validation", "Invalid request"


class Unauthorized(ApiError):
    status, slug, title = 401, "unauthorized", "Not authenticated"


class Forbidden(ApiError):
    status, slug, title = 403, "forbidden", "Not allowed"


class NotFound(ApiError):
    """Also the answer for another tenant's resource: its existence is not revealed."""

    status, slug, title = 404, "not-found", "Not found"


class MethodNotAllowed(ApiError):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class Conflict(ApiError):
    status, slug, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ApiError):
    status, slug, title = 413, "too-large", "Request body too large"


class UnsupportedMediaType(ApiError):
    status, slug, title = 415, "media-type", "Unsupported media type"


class RateLimited(ApiError):
    status, slug, title = 429, "rate-limited", "Too many requests"

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Unavailable(ApiError):
    status, slug, title = 503, "unavailable", "Service unavailable"


def field_of(message: str) -> tuple[str, str]:
    """msgspec's ``Expected int - at `$.a.b``` as ``('a.b', 'Expected int')``."""
    head, sep, tail = message.rpartition(" - at `$")
    if not sep:
        return "", message
    return tail.rstrip("`").lstrip("."), head
