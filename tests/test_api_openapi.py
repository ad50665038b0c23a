"""The OpenAPI 3.1 document: generated from the msgspec types, checked in, served, complete."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_api_support import (
    Api,
    running_api,
)

from engine.api import openapi
from engine.api.routes import ROUTES


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as running:
        yield running


def _document() -> dict[str, Any]:
    return openapi.document(ROUTES)


def test_checked_in_document_is_current() -> None:
    assert openapi.main(["--check"]) == 0, "run: tradecopy api openapi"
    assert openapi.OPENAPI_FILE.read_text(encoding="utf-8") == openapi.render(_document())


def test_check_detects_a_stale_document(tmp_path: Any, monkeypatch: Any) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr(openapi, "OPENAPI_FILE", stale)
    assert openapi.main(["--check"]) == 1
    assert openapi.main([]) == 0 and openapi.main(["--check"]) == 0


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.add(value)
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def test_every_reference_resolves_and_the_version_is_3_1() -> None:
    doc = _document()
    assert doc["openapi"] == "3.1.0"
    names = set(doc["components"]["schemas"])
    missing = {ref for ref in _refs(doc) if ref.removeprefix("#/components/schemas/") not in names}
    assert missing == set()
    settings = doc["components"]["schemas"]["LinkSettings"]
    assert "link_id" not in settings["properties"] and "link_id" not in settings.get("required", [])


def test_every_operation_says_how_it_fails_with_problem_details() -> None:
    for path, item in _document()["paths"].items():
        for method, op in item.items():
            assert op["operationId"] and op["summary"], (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert "application/problem+json" in response["content"], (method, path)
            if op["security"]:
                assert {"401", "403"} <= set(op["responses"]), (method, path)


async def test_every_route_of_the_app_is_documented_and_served(api: Api) -> None:
    status, served = await api.call("GET", "/v1/openapi.json")
    assert status == 200
    assert served == json.loads(openapi.OPENAPI_FILE.read_text(encoding="utf-8"))
    documented = {(m.upper(), p) for p, item in served["paths"].items() for m in item}
    in_router = {
        (r.method, r.resource.canonical)
        for r in api.client.app.router.routes()
        if r.method not in ("HEAD", "OPTIONS")
    }
    assert documented == in_router
    for path, item in served["paths"].items():
        for op in item.values():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
