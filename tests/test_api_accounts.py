"""Accounts: who may add which, connection status from NATS, terminal tokens, pagination,
the audit log, and the HTTP surface (problems, headers, CORS, body limits)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_api_support import (
    CREDENTIALS,
    Api,
    api_config,
    running_api,
    serve,
)

from engine.api.auth import Role, token_hash
from engine.api.store import migrate
from engine.runtime.jetstream import ensure_buckets
from schemas import codec, subjects
from schemas.account import AccountState, TerminalStatus

#: A strategy the API stores and versions (it is parsed, never run, on upload).
STRATEGY_SOURCE = "def strategy(candles, params):\n    return {'action': 'hold'}\n"


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as running:
        yield running


@pytest.fixture
async def migrated_url(database_url: str) -> str:
    await migrate(database_url)
    return database_url


async def test_provider_adds_master_and_follower_accounts_of_its_followers(api: Api) -> None:
    provider = await api.provider("alpha")
    follower = await api.follower(provider, "fiona")
    master = await api.account(provider, "master", name="Gold master")
    copy = await api.account(provider, "follower", owner=follower)
    assert master["account_id"].startswith("acc-") and master["platform"] == "mt5"
    assert copy["owner_user_id"] == follower.user_id
    status, page = await api.call("GET", "/v1/accounts", provider)
    assert status == 200, page
    assert {a["account_id"] for a in page["items"]} == {master["account_id"], copy["account_id"]}
    status, page = await api.call("GET", "/v1/accounts", follower)
    assert status == 200, page
    assert [a["account_id"] for a in page["items"]] == [copy["account_id"]]


async def test_follower_adds_only_its_own_follower_accounts(api: Api) -> None:
    provider = await api.provider("alpha")
    follower = await api.follower(provider, "fiona")
    status, body = await api.call(
        "POST", "/v1/accounts", follower,
        json={"name": "x", "platform": "mt4", "role": "master", "credentials": CREDENTIALS},
    )  # fmt: skip
    assert status == 422 and body["errors"][0]["field"] == "role"
    own = await api.account(follower, "follower")
    assert own["owner_user_id"] == follower.user_id


async def test_provider_cannot_assign_an_account_to_a_user_outside_its_followers(api: Api) -> None:
    alpha = await api.provider("alpha")
    beta = await api.provider("beta")
    stranger = await api.follower(beta, "sam")
    for owner in (stranger.user_id, alpha.user_id, "not-a-uuid"):
        status, body = await api.call(
            "POST", "/v1/accounts", alpha,
            json={"name": "x", "platform": "paper", "role": "follower",
                  "credentials": CREDENTIALS, "owner_user_id": owner},
        )  # fmt: skip
        assert status == 422 and body["errors"][0]["field"] == "owner_user_id", body


async def test_invalid_account_body_names_the_field(api: Api) -> None:
    provider = await api.provider("alpha")
    status, body = await api.call(
        "POST", "/v1/accounts", provider,
        json={"name": "x", "platform": "mt9", "role": "master", "credentials": CREDENTIALS},
    )  # fmt: skip
    assert status == 422 and body["errors"][0]["field"] == "platform"
    status, body = await api.call(
        "POST", "/v1/accounts", provider,
        json={"name": "x", "platform": "mt5", "role": "master",
              "credentials": {"login": "1", "password": "p"}},
    )  # fmt: skip
    assert status == 422 and body["errors"][0]["field"] == "credentials"


async def _publish_state(api: Api, account: str, *, age_s: float, connected: bool | None) -> None:
    buckets = await ensure_buckets(api.js)
    terminal = None if connected is None else TerminalStatus(connected=connected, reason="x")
    state = AccountState(
        account=account, ts_ns=time.time_ns() - int(age_s * 1e9), currency="USD",
        balance=1000.0, equity=1010.5, terminal=terminal,
    )  # fmt: skip
    await buckets[subjects.KV_ACCOUNTS].put(account, codec.encode(state))


async def test_connection_status_comes_from_the_latest_account_state(api: Api) -> None:
    provider = await api.provider("alpha")
    ids = [(await api.account(provider, "master"))["account_id"] for _ in range(4)]
    await _publish_state(api, ids[0], age_s=0, connected=True)
    await _publish_state(api, ids[1], age_s=0, connected=False)
    await _publish_state(api, ids[2], age_s=60, connected=None)
    expected = {ids[0]: "connected", ids[1]: "disconnected", ids[2]: "silent", ids[3]: "unknown"}
    for account_id, state in expected.items():
        status, body = await api.call("GET", f"/v1/accounts/{account_id}", provider)
        assert status == 200 and body["status"]["state"] == state, body
    status, body = await api.call("GET", f"/v1/accounts/{ids[0]}", provider)
    assert body["status"]["equity"] == 1010.5 and body["status"]["terminal"]["connected"]
    status, page = await api.call("GET", "/v1/accounts", provider)
    assert {a["account_id"]: a["status"]["state"] for a in page["items"]} == expected


async def test_terminal_token_is_shown_once_and_stored_hashed(api: Api) -> None:
    provider = await api.provider("alpha")
    account = await api.account(provider, "follower")
    path = f"/v1/accounts/{account['account_id']}/terminal-token"
    status, first = await api.call("POST", path, provider)
    assert status == 201 and first["token"].startswith("tct_")
    status, second = await api.call("POST", path, provider)
    assert status == 201, second
    assert second["token"] != first["token"]
    conn = await asyncpg.connect(api.database_url)
    try:
        stored = bytes(
            await conn.fetchval(
                "SELECT terminal_token_hash FROM api_accounts WHERE account_id = $1",
                account["account_id"],
            )
        )
    finally:
        await conn.close()
    assert stored == token_hash(second["token"]) != token_hash(first["token"])
    status, body = await api.call("GET", f"/v1/accounts/{account['account_id']}", provider)
    assert status == 200, body
    assert body["has_terminal_token"] is True and "token" not in body


async def test_updates_are_audited_without_credentials(api: Api) -> None:
    provider = await api.provider("alpha")
    account = await api.account(provider, "master", name="old")
    path = f"/v1/accounts/{account['account_id']}"
    status, body = await api.call(
        "PATCH", path, provider,
        json={"name": "new", "credentials": {**CREDENTIALS, "password": "rotated-pw-1"}},
    )  # fmt: skip
    assert status == 200 and body["name"] == "new"
    status, audit = await api.call("GET", "/v1/audit", provider)
    assert status == 200, audit
    update = next(e for e in audit["items"] if e["action"] == "update")
    assert update["before"]["name"] == "old" and update["after"]["name"] == "new"
    assert (
        update["actor_user_id"] == provider.user_id and update["entity_id"] == account["account_id"]
    )
    assert update["after"]["credentials"] == "replaced"
    text = str(audit)
    assert CREDENTIALS["password"] not in text and "rotated-pw-1" not in text


async def test_lists_page_with_an_opaque_cursor(api: Api) -> None:
    provider = await api.provider("alpha")
    created = {(await api.account(provider, "master"))["account_id"] for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        status, page = await api.call("GET", "/v1/accounts", provider, params=query)
        assert status == 200 and len(page["items"]) <= 2
        seen += [a["account_id"] for a in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(created)
    for bad in ({"cursor": "!!!"}, {"limit": "0"}, {"limit": "x"}):
        status, body = await api.call("GET", "/v1/accounts", provider, params=bad)
        assert status == 422 and body["errors"][0]["field"] in {"cursor", "limit"}


async def test_responses_carry_security_headers_and_problems(api: Api) -> None:
    resp = await api.client.get("/v1/nowhere")
    assert resp.status == 404 and resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert body["status"] == 404 and body["instance"] == "/v1/nowhere"
    for header in ("X-Content-Type-Options", "X-Frame-Options", "Content-Security-Policy",
                   "Referrer-Policy", "Cache-Control"):  # fmt: skip
        assert header in resp.headers
    resp = await api.client.get("/v1/accounts")
    assert resp.status == 401 and "WWW-Authenticate" in resp.headers
    resp = await api.client.delete("/v1/accounts")
    assert resp.status == 405 and resp.content_type == "application/problem+json"
    resp = await api.client.post(
        "/v1/auth/login", data=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 415
    resp = await api.client.post(
        "/v1/auth/login", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400


async def test_bodies_over_the_limit_are_refused(api: Api) -> None:
    resp = await api.client.post(
        "/v1/auth/login", data=b"{" + b" " * (70 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert resp.status == 413 and resp.content_type == "application/problem+json"


async def test_cors_answers_only_allowed_origins(migrated_url: str, nc: object) -> None:
    client, pool = await serve(migrated_url, nc, api_config(cors_origins=["https://app.example"]))
    try:
        preflight = {"Access-Control-Request-Method": "GET"}
        resp = await client.options(
            "/v1/me", headers={"Origin": "https://app.example", **preflight}
        )
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        resp = await client.options(
            "/v1/me", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "Access-Control-Allow-Origin" not in resp.headers
        resp = await client.get("/v1/me", headers={"Origin": "https://app.example"})
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        resp = await client.get("/v1/me", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers
    finally:
        await client.close()
        await pool.close()


async def test_nul_characters_are_refused_before_the_database(api: Api) -> None:
    provider = await api.provider("alpha")
    status, body = await api.call(
        "POST", "/v1/users", provider, json={"email": "a\x00@b.example.com", "password": "x" * 12}
    )
    assert status == 422, body
    status, body = await api.call(
        "POST", "/v1/auth/login", json={"identifier": "a\x00b", "password": "x"}
    )
    assert status == 422, body
    status, body = await api.call("GET", "/v1/accounts/acc%00x", provider)
    assert status == 400, body
    status, body = await api.call("GET", "/v1/accounts", provider, params={"cursor": "Ilx1MDAwMCI"})
    assert status == 422, body  # the cursor "\x00"


async def test_an_account_is_deleted_only_once_no_link_names_it(api: Api) -> None:
    provider = await api.provider("alpha")
    master = (await api.account(provider, "master"))["account_id"]
    copy = (await api.account(provider, "follower"))["account_id"]
    link = await api.link(provider, master, copy)
    status, body = await api.call("DELETE", f"/v1/accounts/{copy}", provider)
    assert status == 409, body
    assert (await api.call("DELETE", f"/v1/links/{link['link_id']}", provider))[0] == 204
    assert (await api.call("DELETE", f"/v1/accounts/{copy}", provider))[0] == 204
    assert (await api.call("GET", f"/v1/accounts/{copy}", provider))[0] == 404
    status, audit = await api.call("GET", "/v1/audit", provider)
    assert status == 200
    deleted = next(
        e for e in audit["items"] if e["entity"] == "account" and e["action"] == "delete"
    )
    assert deleted["entity_id"] == copy and deleted["before"]["role"] == "follower"


async def test_every_list_pages_through_all_its_items(api: Api) -> None:
    """Generated over every route that takes a cursor: limit=1 pages add up to the whole."""
    from engine.api.routes import ROUTES
    from engine.billing import store as billing
    from engine.ledger.store import migrate as migrate_ledger

    await billing.migrate(api.database_url)  # the plans' lists read billing's views
    await migrate_ledger(api.database_url)  # the leaderboard reads the ledger's views
    operator = await api.as_operator()
    provider = await api.provider("alpha")
    others = [await api.provider("beta"), await api.provider("gamma")]
    sources: list[str] = []
    strategies: list[str] = []
    followers = []
    for n in range(3):
        followers.append(await api.follower(provider, f"f{n}"))
        master = (await api.account(provider, "master"))["account_id"]
        copy = (await api.account(provider, "follower"))["account_id"]
        await api.link(provider, master, copy)
        await api.call("POST", "/v1/api-keys", provider, json={"name": f"k{n}"})
        await api.call("POST", "/v1/api-keys", operator, json={"name": f"k{n}"})
        await api.call("POST", "/v1/stops", operator, json={"scope": "account", "target": copy})
        await api.call("POST", "/v1/invites", provider,
                       json={"email": f"invitee{n}@example.com", "role": "follower"})  # fmt: skip
        status, ops = await api.call("POST", "/v1/operator-plans", operator, json={
            "name": f"ops-{n}", "currency": "EUR", "platform_fee_percent": "10",
            "account_pool_limit": 100, "modules": ["subscription"]})  # fmt: skip
        await api.call("PUT", "/v1/tenants/alpha/operator-plan", operator,
                       json={"plan_id": ops["plan_id"]})  # fmt: skip
        await api.call("POST", "/v1/plans", provider, json={
            "name": f"plan-{n}", "currency": "EUR", "modules": ["subscription"],
            "subscription_price_minor": 900, "subscription_period": "monthly"})  # fmt: skip
        await api.call("POST", "/v1/risk-templates", provider,
                       json={"name": f"risk-{n}", "settings": {"max_lot": 1.0}})  # fmt: skip
        await api.call("POST", "/v1/order-templates", provider,
                       json={"name": f"preset-{n}", "symbol": "XAUUSD", "side": "buy",
                             "volume": 0.1})  # fmt: skip
        status, paper = await api.call("POST", "/v1/accounts", provider, json={
            "name": f"paper-{n}", "platform": "paper", "role": "master",
            "credentials": CREDENTIALS})  # fmt: skip
        status, source = await api.call("POST", "/v1/signal-sources", provider, json={
            "name": f"signals-{n}", "master_account_id": paper["account_id"],
            "symbol_map": {"XAUUSD": "XAUUSD"}, "allowed_ips": []})  # fmt: skip
        assert status == 201, source
        # three strategies; the first gets three versions, each deployed on the paper master
        status, made = await api.call("POST", "/v1/strategies", provider, json={
            "name": f"strategy-{n}", "source": STRATEGY_SOURCE,
            "parameters": {"n": n}})  # fmt: skip
        assert status == 201, made
        strategies.append(made["strategy"]["strategy_id"])
        status, version = await api.call(
            "POST", f"/v1/strategies/{strategies[0]}/versions", provider,
            json={"source": STRATEGY_SOURCE, "parameters": {"n": 10 + n}})  # fmt: skip
        assert status in (200, 201), version
        status, deployed = await api.call(
            "POST", f"/v1/strategies/{strategies[0]}/deployments", provider, json={
                "version_id": version["version"]["version_id"],
                "master_account_id": paper["account_id"],
                "symbol": "XAUUSD", "timeframe": "15m"})  # fmt: skip
        assert status == 201, deployed
        # every refusal into the first source's log, so it holds 3 entries
        source_id = sources[0] if sources else source["source"]["source_id"]
        sources.append(source_id)
        await api.call("POST", f"/v1/signals/tradingview/{source_id}", json={
            "secret": f"wrong-{n}", "ticker": "XAUUSD", "time": "2026-02-16T02:15:00Z",
            "action": "close"})  # fmt: skip
    # three published profiles on the leaderboard, one per tenant
    for board, who in enumerate((provider, *others)):
        status, paper = await api.call("POST", "/v1/accounts", who, json={
            "name": "board", "platform": "paper", "role": "master",
            "credentials": CREDENTIALS})  # fmt: skip
        assert status == 201, paper
        status, profile = await api.call("PUT", "/v1/marketplace/profile", who, json={
            "slug": f"board-{board}",
            "master_account_id": paper["account_id"], "published": True})  # fmt: skip
        assert status in (200, 201), profile
    # three charges of alpha's, in three months: billing's charge history and revenue lists
    async with api.pool.acquire() as conn:
        for n in range(3):
            key, issued = f"pages:{n}", (1_772_323_200 + n * 2_678_400) * 10**9
            await conn.execute(
                "INSERT INTO billing_invoices (invoice_id, follower, provider, plan_id, window_id,"
                " currency, total_minor, platform_fee_minor, lines, issued_ns)"
                " VALUES ($1, 'f', 'alpha', 'p', $1, 'EUR', 101, 10, '[]'::jsonb, $2)",
                key, issued,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO billing_charges (idempotency_key, invoice_id, module, follower,"
                " provider, plan_id, window_id, currency, amount_minor, platform_fee_minor,"
                " destination, issued_ns) VALUES ($1, $1, 'subscription', 'f', 'alpha', 'p', $1,"
                " 'EUR', 101, 10, 'acct_x', $2)",
                key, issued,
            )  # fmt: skip
    # three plan changes of one follower: three subscriptions of alpha's, each asked to move
    plan_ids = []
    for n in range(4):
        status, plan = await api.call("POST", "/v1/plans", provider, json={
            "name": f"change-{n}", "currency": "EUR", "modules": ["subscription"],
            "subscription_price_minor": 900 + n, "subscription_period": "monthly"})  # fmt: skip
        assert status == 201, plan
        plan_ids.append(plan["plan_id"])
    changer = followers[0]
    for from_plan in plan_ids[:3]:
        async with api.pool.acquire() as conn:
            await billing.subscribe(conn, follower=changer.user_id, plan_id=from_plan, started_ns=1)
        status, body = await api.call(
            "POST", f"/v1/followers/{changer.user_id}/plan-changes", changer,
            json={"from_plan": from_plan, "to_plan": plan_ids[3]},
        )  # fmt: skip
        assert status == 202, body
    # The ledger's lists (an account's positions, history, equity; decisions) page the same
    # way over ledger rows: tests/test_api_history.py fills and pages them.
    listed = [r for r in ROUTES if "cursor" in r.query and r.tag != "history"]
    assert len(listed) >= 7
    for route in listed:
        who = operator if route.roles is not None and route.roles <= {Role.OPERATOR} else provider
        path = route.path.replace("{source_id}", source_id)
        path = path.replace("{strategy_id}", strategies[0])
        path = path.replace("{follower}", changer.user_id)
        status, whole = await api.call("GET", path, who, params={"limit": "200"})
        assert status == 200, (route.path, whole)
        assert len(whole["items"]) >= 3 and whole["next_cursor"] is None, route.path
        paged, cursor = [], None
        while True:
            params = {"limit": "1"} | ({"cursor": cursor} if cursor else {})
            status, page = await api.call("GET", path, who, params=params)
            assert status == 200 and len(page["items"]) <= 1, (route.path, page)
            paged += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert paged == whole["items"], route.path


# ------------------------------------------------------------------- the account pool


async def _on_operator_plan(url: str, tenant: str, pool: int) -> None:
    """Billing's own tables, written by billing's own store: the provider on a plan."""
    from engine.billing import store as billing

    await billing.migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await billing.upsert_operator_plan(
            conn, plan_id=f"pool-{pool}", currency="EUR", platform_fee_percent="10",
            account_pool_limit=pool, modules=["subscription"],
        )  # fmt: skip
        await billing.upsert_provider(
            conn, provider=tenant, operator_plan=f"pool-{pool}", stripe_account=None
        )
    finally:
        await conn.close()


async def test_the_operator_plans_account_pool_is_enforced_before_an_account_is_made(
    api: Api,
) -> None:
    provider = await api.provider("alpha")
    follower = await api.follower(provider, "fiona")
    other = await api.provider("beta")  # on no plan: no limit
    await _on_operator_plan(api.database_url, "alpha", pool=2)
    await api.account(provider, "master")
    await api.account(follower, "follower")  # a follower's account counts in its provider's pool
    for who in (provider, follower):
        status, body = await api.call(
            "POST", "/v1/accounts", who,
            json={"name": "x", "platform": "mt5", "role": "follower",
                  "credentials": CREDENTIALS},
        )  # fmt: skip
        assert status == 409, body
        assert "2 of 2 accounts" in body["detail"]
    for _ in range(3):
        await api.account(other, "follower")
    status, page = await api.call("GET", "/v1/accounts", provider)
    assert len(page["items"]) == 2
    # Deleting one frees its place.
    status, _ = await api.call("DELETE", f"/v1/accounts/{page['items'][0]['account_id']}",
                               provider)  # fmt: skip
    assert status == 204
    await api.account(provider, "master")


async def test_concurrent_creations_never_overfill_the_pool(api: Api) -> None:
    import asyncio

    provider = await api.provider("alpha")
    await _on_operator_plan(api.database_url, "alpha", pool=3)
    body = {"name": "x", "platform": "mt5", "role": "master", "credentials": CREDENTIALS}
    answers = await asyncio.gather(
        *(api.call("POST", "/v1/accounts", provider, json=body) for _ in range(8))
    )
    assert sorted(status for status, _ in answers) == [201] * 3 + [409] * 5
    conn = await asyncpg.connect(api.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM api_accounts") == 3
    finally:
        await conn.close()
