"""Property-based requests generated from the checked-in OpenAPI document (schemathesis)
against the API served over real HTTP: no input makes it answer 5xx, and every error is a
problem detail."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import asyncpg
import nats
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks
from schemathesis.checks import FailureGroup
from test_api_support import PASSWORD, TEST_SECRETS, api_config

from engine.api import openapi
from engine.api.service import build_app
from engine.api.store import create_operator, migrate
from engine.billing.store import migrate as migrate_billing
from engine.ledger.store import migrate as migrate_ledger
from engine.runtime.natsserver import EmbeddedNats

EXAMPLES = 12
#: No 5xx, and every answer as the document says: status, content type, headers, body.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


class ServedApi:
    """The app on a loop of its own thread, so synchronous clients can call it."""

    def __init__(self, database_url: str, nats_url: str) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ServedApi:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await migrate_ledger(self.database_url)  # the ledger's read views
        await migrate(self.database_url)
        await migrate_billing(self.database_url)  # plans and checkouts read and write billing's
        await create_operator(self.database_url, "ops@example.com", PASSWORD)
        pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)
        nc = await nats.connect(self.nats_url)
        runner = web.AppRunner(build_app(api_config(), pool, nc, secrets=TEST_SECRETS))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await nc.close()
            await pool.close()


@pytest.fixture
def served(database_url: str, tmp_path: Any) -> Iterator[ServedApi]:
    server = EmbeddedNats(store_dir=tmp_path / "jetstream")
    asyncio.run(server.start())
    try:
        with ServedApi(database_url, server.url) as api:
            yield api
    finally:
        asyncio.run(server.stop())


def _login(base: str, identifier: str) -> dict[str, str]:
    answer = requests.post(
        f"{base}/v1/auth/login", json={"identifier": identifier, "password": PASSWORD}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def _header(headers: Any, name: str) -> str:
    """schemathesis' responses keep headers as lists under lower-case names."""
    value = headers.get(name) or headers.get(name.title()) or ""
    return value[0] if isinstance(value, list) else value


def _fuzz(operation: Any, base: str, headers: dict[str, str], failures: list[str]) -> Any:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), database=None,
    )  # fmt: skip
    def run(case: Any) -> None:
        response = case.call(base_url=base, headers=headers, timeout=10)
        where = f"{case.method} {case.formatted_path} -> {response.status_code}"
        if response.status_code >= 400:
            content_type = _header(response.headers, "content-type")
            if not content_type.startswith("application/problem+json"):
                failures.append(f"{where}: not a problem detail ({content_type})")
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            failures.extend(f"{where}: {failure}" for failure in group.exceptions)

    return run


def test_generated_requests_never_get_a_server_error(served: ServedApi) -> None:
    base = served.base_url
    operator = _login(base, "ops@example.com")
    tenant = {"tenant_id": "fuzz", "name": "Fuzz", "provider_email": "p@fuzz.example.com",
              "provider_password": PASSWORD}  # fmt: skip
    assert requests.post(f"{base}/v1/tenants", json=tenant, headers=operator, timeout=10).ok
    provider = _login(base, "p@fuzz.example.com")
    schema = schemathesis.openapi.from_dict(json.loads(openapi.OPENAPI_FILE.read_text()))
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in schema.raw_schema["paths"].values())
    for operation in operations:
        if operation.path == "/v1/stream":  # a live stream never ends: tests/test_api_stream.py
            continue
        for headers in (provider, operator):
            _fuzz(operation, base, headers, failures)()
    assert failures == [], "\n".join(
        sorted(set(f.splitlines()[0] + " | " + " ".join(f.splitlines()[1:4]) for f in failures))
    )


def _stateful_machine(
    schema: Any, base: str, headers: dict[str, str], seeds: dict[str, str]
) -> Any:
    """Chains calls along the document's links (create an account, then read, change and
    delete it; create a link between real accounts, then pause, resume, replace, delete it),
    checking every answer as the stateless run does."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base, "headers": headers, "timeout": 10}

        def before_call(self, case: Any) -> None:
            # Aim generated links at accounts that exist, so the chain gets past creation.
            if case.path == "/v1/links" and case.method == "POST" and isinstance(case.body, dict):
                case.body = {**case.body, **seeds}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    return Workflow


def test_chained_requests_along_the_links_never_fail(served: ServedApi) -> None:
    base = served.base_url
    operator = _login(base, "ops@example.com")
    tenant = {"tenant_id": "chain", "name": "Chain", "provider_email": "p@chain.example.com",
              "provider_password": PASSWORD}  # fmt: skip
    assert requests.post(f"{base}/v1/tenants", json=tenant, headers=operator, timeout=10).ok
    provider = _login(base, "p@chain.example.com")
    seeds = {}
    for role in ("master", "follower"):
        body = {"name": role, "platform": "paper", "role": role,
                "credentials": {"login": "1", "password": "x", "server": "paper"}}  # fmt: skip
        created = requests.post(f"{base}/v1/accounts", json=body, headers=provider, timeout=10)
        assert created.status_code == 201, created.text
        seeds[role] = created.json()["account_id"]
    schema = schemathesis.openapi.from_dict(json.loads(openapi.OPENAPI_FILE.read_text()))
    linked = [
        (path, method)
        for path, item in schema.raw_schema["paths"].items()
        for method, op in item.items()
        if any("links" in answer for answer in op["responses"].values())
    ]
    assert ("/v1/links", "post") in linked and ("/v1/accounts", "post") in linked, linked
    workflow = _stateful_machine(schema, base, provider, seeds)
    workflow.run(
        settings=settings(
            max_examples=25,
            stateful_step_count=6,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
