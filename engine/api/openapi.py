"""The OpenAPI 3.1 document, generated from the route table and the msgspec types the
handlers decode and return; checked in as ``engine/api/openapi.json``.

``tradecopy api openapi`` rewrites the file; ``--check`` fails when it is stale.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from engine.api.errors import Problem
from schemas import WIRE_VERSION
from schemas.links import CopyLink

OPENAPI_FILE = Path(__file__).parent / "openapi.json"
_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")
_LINK_SETTINGS = "LinkSettings"

_STATUS_TEXT = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No content", 400: "Bad request",
    401: "Not authenticated", 403: "Not allowed", 404: "Not found", 409: "Conflict",
    413: "Request body too large", 415: "Unsupported media type", 422: "Invalid request",
    429: "Too many requests", 503: "NATS or the database is unavailable",
}  # fmt: skip

_QUERY = {
    "cursor": {
        "name": "cursor", "in": "query", "required": False,
        "description": "The `next_cursor` of the previous page.",
        "schema": {"type": "string", "maxLength": 512},
    },
    "limit": {
        "name": "limit", "in": "query", "required": False,
        "description": "Items per page (default 50).",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
    "account_id": {
        "name": "account_id", "in": "query", "required": False,
        "description": "Only what concerns this account.",
        "schema": {"type": "string", "maxLength": 128},
    },
    "link_id": {
        "name": "link_id", "in": "query", "required": False,
        "description": "Only what concerns this link.",
        "schema": {"type": "string", "maxLength": 128},
    },
    "follower": {
        "name": "follower", "in": "query", "required": False,
        "description": "Only this follower's (a user id).",
        "schema": {"type": "string", "maxLength": 64},
    },
    "points": {
        "name": "points", "in": "query", "required": False,
        "description": "Equity chart samples, evenly spaced (default 200).",
        "schema": {"type": "integer", "minimum": 2, "maximum": 1000},
    },
    "sort": {
        "name": "sort", "in": "query", "required": False,
        "description": "gain (default), drawdown (smallest first), win_rate or followers.",
        "schema": {"type": "string", "enum": ["gain", "drawdown", "win_rate", "followers"]},
    },
}  # fmt: skip


def _types(routes: Sequence[Any]) -> list[Any]:
    found: list[Any] = [Problem, CopyLink]
    for route in routes:
        for tp in (route.request, route.response):
            if tp is not None and not isinstance(tp, str) and tp not in found:
                found.append(tp)
    return found


def _ref_name(tp: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    return refs[tp]


def document(routes: Sequence[Any]) -> dict[str, Any]:
    types = _types(routes)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, schemas, strict=True))
    components = dict(components)
    settings = copy.deepcopy(components[CopyLink.__name__])
    settings["title"] = _LINK_SETTINGS
    settings["description"] = (
        "A copy link's settings: a CopyLink without `link_id` (the server or the path names "
        "it). Validated by the same rules as `tradecopy links validate`; every invalid field "
        "is named in the problem's `errors`."
    )
    settings["properties"].pop("link_id", None)
    settings["required"] = [f for f in settings.get("required", []) if f != "link_id"]
    components[_LINK_SETTINGS] = settings
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    for route in routes:
        links = _links(route, routes)
        if links:
            paths[route.path][route.method.lower()]["responses"][str(route.status)]["links"] = links
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tradecopy platform API",
            "version": f"{WIRE_VERSION}",
            "description": (
                "The HTTP facade for operator, provider and follower dashboards and platform "
                "backends. Every request acts for the tenant of its token or key; another "
                "tenant's resources answer 404. Errors are RFC 9457 problem details."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def _links(creator: Any, routes: Sequence[Any]) -> dict[str, Any]:
    """OpenAPI links from a creating operation to every operation whose path parameters its
    answer names (``POST /v1/accounts`` answers ``account_id`` -> ``GET
    /v1/accounts/{account_id}``, ...): clients and stateful tests follow them."""
    answer = creator.response
    if creator.method != "POST" or answer is None or isinstance(answer, str):
        return {}
    pointers = _id_pointers(answer)
    links: dict[str, Any] = {}
    for route in routes:
        names = _PATH_PARAM.findall(route.path)
        if route is creator or not names or not set(names) <= pointers.keys():
            continue
        if not route.path.startswith(creator.path.rstrip("/") + "/"):
            continue
        links[route.operation_id] = {
            "operationId": route.operation_id,
            "parameters": {name: f"$response.body#{pointers[name]}" for name in names},
        }
    return dict(sorted(links.items()))


def _id_pointers(tp: Any) -> dict[str, str]:
    """Field name -> JSON pointer for the fields of a Struct and of the Structs it holds
    (``LinkView.link.link_id`` -> ``/link/link_id``); the outer field wins."""
    found: dict[str, str] = {}
    hints = msgspec.structs.fields(tp) if hasattr(tp, "__struct_fields__") else ()
    for info in hints:
        inner = info.type
        if hasattr(inner, "__struct_fields__"):
            for sub in msgspec.structs.fields(inner):
                found.setdefault(sub.encode_name, f"/{info.encode_name}/{sub.encode_name}")
    for info in hints:
        found[info.encode_name] = f"/{info.encode_name}"
    return found


def _content(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {media: {"schema": schema}}


def _operation(route: Any, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    params = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "minLength": 1, "maxLength": 64}}
        for name in _PATH_PARAM.findall(route.path)
    ] + [_QUERY[name] for name in route.query]  # fmt: skip
    if params:
        op["parameters"] = params
    if route.request is not None:
        schema = (
            {"$ref": _REF.format(name=route.request)}
            if isinstance(route.request, str)
            else refs[route.request]
        )
        op["requestBody"] = {"required": True, "content": _content(schema)}
    if route.roles is None:
        op["security"] = []
    else:
        op["security"] = [{"bearer": []}, {"apiKey": []}]
        op["description"] = "Roles: " + ", ".join(sorted(r.value for r in route.roles)) + "."
    responses: dict[str, Any] = {}
    ok: dict[str, Any] = {"description": _STATUS_TEXT[route.status]}
    if route.response is not None:
        ok["content"] = _content(refs[route.response], route.media_type)
    responses[str(route.status)] = ok
    errors = set(route.errors)
    if route.roles is not None:
        errors |= {401, 403}
    if route.request is not None:
        errors |= {400, 413, 415, 422}
    if route.query:
        errors |= {400, 422}  # a malformed cursor or limit, or NUL in the query
    elif _PATH_PARAM.search(route.path):
        errors.add(400)  # NUL in a path parameter
    if route.rate_limited:
        errors.add(429)
    for status in sorted(errors):
        responses[str(status)] = {
            "description": _STATUS_TEXT[status],
            "content": _content(refs[Problem], "application/problem+json"),
        }
    op["responses"] = responses
    return op


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from engine.api.routes import ROUTES

    args = list(sys.argv[1:] if argv is None else argv)
    text = render(document(ROUTES))
    if "--check" in args:
        current = OPENAPI_FILE.read_text(encoding="utf-8") if OPENAPI_FILE.exists() else ""
        if current != text:
            print(f"{OPENAPI_FILE} is stale: run tradecopy api openapi", file=sys.stderr)
            return 1
        return 0
    OPENAPI_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {OPENAPI_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
