"""Fixtures and helpers of the API tests: a migrated database, a real nats-server, the app
served over real HTTP, and the people (operator, providers, followers) tests act as."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import test_utils

from engine.api.config import ApiConfig, ApiSecrets, MasterKey
from engine.api.service import build_app
from engine.api.store import create_operator, migrate

PASSWORD = "correct horse battery staple"
TEST_KEY = MasterKey("test-k1", bytes(range(32)))
TEST_SECRETS = ApiSecrets(jwt_secret=b"j" * 48, master_key=TEST_KEY)
CREDENTIALS = {"login": "5001234", "password": "broker-secret-pw", "server": "Demo-Server"}


@dataclass
class Person:
    email: str
    token: str
    refresh: str
    user_id: str
    tenant_id: str | None
    api_key: str | None = None
    """When set, requests authenticate with this key instead of the access token."""

    @property
    def headers(self) -> dict[str, str]:
        if self.api_key is not None:
            return {"X-API-Key": self.api_key}
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Api:
    client: test_utils.TestClient
    pool: Any
    database_url: str
    js: Any
    operator: Person | None = None
    people: list[Person] = field(default_factory=list)

    async def call(
        self, method: str, path: str, who: Person | None = None, json: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers.update(who.headers)
        resp = await self.client.request(method, path, json=json, headers=headers, **kw)
        body = await resp.read()
        if not body:
            return resp.status, None
        return resp.status, await resp.json(content_type=None)

    async def login(self, identifier: str, password: str = PASSWORD) -> Person:
        status, body = await self.call(
            "POST", "/v1/auth/login", json={"identifier": identifier, "password": password}
        )
        assert status == 200, body
        person = Person(identifier, body["access_token"], body["refresh_token"], "", None)
        status, me = await self.call("GET", "/v1/me", person)
        assert status == 200, me
        person.user_id, person.tenant_id = me["user_id"], me["tenant_id"]
        return person

    async def as_operator(self) -> Person:
        if self.operator is None:
            await create_operator(self.database_url, "ops@example.com", PASSWORD)
            self.operator = await self.login("ops@example.com")
        return self.operator

    async def provider(self, tenant_id: str) -> Person:
        operator = await self.as_operator()
        email = f"owner@{tenant_id}.example.com"
        status, body = await self.call(
            "POST", "/v1/tenants", operator,
            json={"tenant_id": tenant_id, "name": tenant_id.title(), "provider_email": email,
                  "provider_password": PASSWORD},
        )  # fmt: skip
        assert status == 201, body
        return await self.login(email)

    async def follower(self, provider: Person, name: str) -> Person:
        email = f"{name}@{provider.tenant_id}.example.com"
        status, body = await self.call(
            "POST", "/v1/users", provider, json={"email": email, "password": PASSWORD}
        )
        assert status == 201, body
        return await self.login(email)

    async def account(
        self, who: Person, role: str, owner: Person | None = None, name: str = "acc"
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "name": name, "platform": "mt5", "role": role, "credentials": CREDENTIALS,
        }  # fmt: skip
        if owner is not None:
            payload["owner_user_id"] = owner.user_id
        status, body = await self.call("POST", "/v1/accounts", who, json=payload)
        assert status == 201, body
        return body

    async def link(
        self, who: Person, master: str, follower: str, **settings: Any
    ) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/links", who, json={"master": master, "follower": follower, **settings}
        )
        assert status == 201, body
        return body["link"]


def api_config(**overrides: Any) -> ApiConfig:
    values: dict[str, Any] = {"auth_burst": 10_000, "auth_rate_per_minute": 10_000,
                              "metrics_port": None}  # fmt: skip
    values.update(overrides)
    return ApiConfig(**values)


async def serve(
    database_url: str, nc: Any, config: ApiConfig | None = None, **app_options: Any
) -> tuple[test_utils.TestClient, Any]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    app = build_app(config or api_config(), pool, nc, secrets=TEST_SECRETS, **app_options)
    client = test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client, pool


@asynccontextmanager
async def running_api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    """The API's tables in ``database_url`` and the app serving them over HTTP."""
    await migrate(database_url)
    client, pool = await serve(database_url, nc)
    try:
        yield Api(client=client, pool=pool, database_url=database_url, js=js)
    finally:
        await client.close()
        await pool.close()


def new_key(key_id: str) -> MasterKey:
    return MasterKey(key_id, uuid.uuid4().bytes + uuid.uuid4().bytes)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
