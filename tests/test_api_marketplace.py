"""The marketplace through the API: published profiles with statistics and equity from the
ledger (facts written by the ledger's own store), the leaderboard in each sort order, follow on
paper (a paper account and its link, in NATS), and the walls: nothing unpublished, and nothing of
another tenant's beyond a published profile's public fields."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
from test_api_support import Api, Person, running_api

from engine.core.book import fold_account
from engine.core.performance import account_stats
from engine.ledger import store as ledger_store
from engine.ledger.records import Kind, rows_of
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.account import AccountState
from schemas.common import Side
from schemas.master import PositionClosed, PositionOpened

S = 1_000_000_000
T0 = 1_780_000_000 * S
SOURCE = "def strategy(candles, params):\n    return {'action': 'hold'}\n"


def master_life(master: str, profits: list[float]) -> list[object]:
    """A master's trades one after another, each closed at ``profit``, with its balance (and
    equity) stated before the first and after each."""
    balance = 10_000.0
    facts: list[object] = [AccountState(account=master, ts_ns=T0, balance=balance,
                                        equity=balance, currency="USD")]  # fmt: skip
    for n, profit in enumerate(profits):
        t = T0 + (n + 1) * 100 * S
        position = f"p{n}-{master}"
        facts.append(PositionOpened(
            event_id=f"o{n}-{master}", master=master, symbol="XAUUSD", ts_ns=t,
            position_id=position, side=Side.BUY, volume=1.0, price=2000.0,
        ))  # fmt: skip
        facts.append(PositionClosed(
            event_id=f"c{n}-{master}", master=master, symbol="XAUUSD", ts_ns=t + 10 * S,
            position_id=position, side=Side.BUY, volume=1.0, price=2001.0, profit=profit,
        ))  # fmt: skip
        balance += profit
        facts.append(AccountState(account=master, ts_ns=t + 20 * S, balance=balance,
                                  equity=balance, currency="USD"))  # fmt: skip
    return facts


async def store_facts(database_url: str, facts: list[object]) -> None:
    """Through the ledger's own store: the rows exactly as its consumers write them."""
    conn = await ledger_store.connect(database_url)
    try:
        for seq, fact in enumerate(facts, start=1):
            kind = Kind.ACCOUNT_STATE if isinstance(fact, AccountState) else Kind.MASTER_EVENT
            rows = rows_of(kind, "tc.v1.master.x.events", codec.encode(fact), seq)
            await ledger_store.insert_batch(conn, {kind: rows}, "default")
    finally:
        await conn.close()


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    await ledger_store.migrate(database_url)
    await ensure_streams(js)
    await ensure_buckets(js)
    async with running_api(database_url, nc, js) as running:
        yield running


async def _account(api: Api, who: Person, role: str, owner: Person | None = None) -> str:
    return str((await api.account(who, role, owner=owner, name=f"{role}-acc"))["account_id"])


async def _publish(api: Api, who: Person, slug: str, master: str, **more: Any) -> dict[str, Any]:
    body = {"slug": slug, "description": f"{slug} trades gold", "master_account_id": master,
            "published": True, **more}  # fmt: skip
    status, answer = await api.call("PUT", "/v1/marketplace/profile", who, json=body)
    assert status == 200, answer
    return dict(answer)


async def _provider_with_record(
    api: Api, tenant: str, profits: list[float], followers: int = 0
) -> tuple[Person, str]:
    provider = await api.provider(tenant)
    master = await _account(api, provider, "master")
    await store_facts(api.database_url, master_life(master, profits))
    for n in range(followers):
        person = await api.follower(provider, f"f{n}")
        await api.link(provider, master, await _account(api, provider, "follower", person))
    await _publish(api, provider, tenant, master)
    return provider, master


async def _get(api: Api, path: str, who: Person, **params: Any) -> Any:
    status, body = await api.call("GET", path, who, params=params)
    assert status == 200, (path, body)
    return body


# --------------------------------------------------------------------------- profiles


async def test_a_published_profile_shows_ledger_statistics_equity_and_followers(
    api: Api,
) -> None:
    provider, master = await _provider_with_record(api, "alpha", [200.0, 100.0, -50.0], 2)
    status, made = await api.call("POST", "/v1/strategies", provider,
                                  json={"name": "gold trend", "source": SOURCE})  # fmt: skip
    assert status == 201, made
    await _publish(api, provider, "alpha", master, strategy_id=made["strategy"]["strategy_id"])
    stranger = await api.provider("outsider")
    outside_follower = await api.follower(stranger, "olga")
    expected = account_stats(fold_account(master, master_life(master, [200.0, 100.0, -50.0])))
    for who in (stranger, outside_follower, provider, await api.as_operator()):
        page = await _get(api, "/v1/marketplace/providers/alpha", who)
        assert page["strategy"] == {"name": "gold trend",
                                    "version_id": made["version"]["version_id"]}  # fmt: skip
        assert page["followers"] == 2
        stats = page["statistics"]
        assert (stats["trades"], stats["wins"], stats["losses"]) == (3, 2, 1)
        assert stats["net_profit"] == 25_000 and stats["currency"] == "USD"
        assert stats["gain"] == pytest.approx(expected.gain)
        assert stats["max_drawdown_ratio"] == pytest.approx(expected.max_drawdown_ratio)
        assert stats["win_rate"] == pytest.approx(2 / 3)
        assert stats["profit_factor"] == pytest.approx(6.0)
        assert [p["equity"] for p in page["equity"]] == [1_000_000, 1_020_000, 1_030_000,
                                                         1_025_000]  # fmt: skip
        # public fields only: neither the master account nor the tenant
        assert master not in str(page) and "alpha.example.com" not in str(page)
    chart = await _get(api, "/v1/marketplace/providers/alpha", stranger, points=2)
    assert [p["equity"] for p in chart["equity"]] == [1_000_000, 1_025_000]
    status, problem = await api.call("GET", "/v1/marketplace/providers/alpha", stranger,
                                     params={"points": "1"})  # fmt: skip
    assert status == 422 and problem["errors"][0]["field"] == "points", problem


async def test_an_unpublished_profile_is_not_found_and_not_listed(api: Api) -> None:
    provider, master = await _provider_with_record(api, "alpha", [100.0])
    await _publish(api, provider, "alpha", master, published=False)
    stranger = await api.provider("outsider")
    own_follower = await api.follower(provider, "fay")
    for who in (stranger, own_follower, provider):
        status, problem = await api.call("GET", "/v1/marketplace/providers/alpha", who)
        assert status == 404, problem
        board = await _get(api, "/v1/marketplace/leaderboard", who)
        assert board["items"] == []
    status, problem = await api.call(
        "POST", "/v1/marketplace/providers/alpha/follow-on-paper", own_follower, json={}
    )
    assert status == 404, problem
    own = await _get(api, "/v1/marketplace/profile", provider)
    assert own["published"] is False and own["master_account_id"] == master
    status, _ = await api.call("GET", "/v1/marketplace/profile", stranger)
    assert status == 404


async def test_a_slug_is_unique_on_the_platform_and_a_profile_names_own_accounts(
    api: Api,
) -> None:
    provider, master = await _provider_with_record(api, "alpha", [100.0])
    rival = await api.provider("bravo")
    rival_master = await _account(api, rival, "master")
    status, problem = await api.call("PUT", "/v1/marketplace/profile", rival, json={
        "slug": "alpha", "master_account_id": rival_master})  # fmt: skip
    assert status == 409, problem
    status, problem = await api.call("PUT", "/v1/marketplace/profile", rival, json={
        "slug": "bravo", "master_account_id": master, "strategy_id": "stg-0"})  # fmt: skip
    assert status == 422, problem
    assert sorted(e["field"] for e in problem["errors"]) == ["master_account_id", "strategy_id"]
    status, problem = await api.call("PUT", "/v1/marketplace/profile", rival, json={
        "slug": "Not A Slug", "master_account_id": rival_master})  # fmt: skip
    assert status == 422 and problem["errors"][0]["field"] == "slug", problem
    # renaming one's own profile frees the old slug
    await _publish(api, provider, "alpha-gold", master)
    await _publish(api, rival, "alpha", rival_master)


# -------------------------------------------------------------------------- leaderboard


async def test_the_leaderboard_ranks_by_each_sort_key_and_pages(api: Api) -> None:
    # alpha: gain ~2.5 %, drawdown ~0.5 %, wins 2/3, no followers
    # bravo: gain ~1 %,   drawdown ~3.8 %, wins 1/2, 2 followers
    # carol: gain 0.5 %,  drawdown 0,      wins 1/1, 1 follower
    viewer, _ = await _provider_with_record(api, "alpha", [200.0, 100.0, -50.0], 0)
    await _provider_with_record(api, "bravo", [500.0, -400.0], 2)
    await _provider_with_record(api, "carol", [50.0], 1)
    expected = {
        "gain": ["alpha", "bravo", "carol"],
        "drawdown": ["carol", "alpha", "bravo"],
        "win_rate": ["carol", "alpha", "bravo"],
        "followers": ["bravo", "carol", "alpha"],
    }
    for sort, order in expected.items():
        board = await _get(api, "/v1/marketplace/leaderboard", viewer, sort=sort)
        assert [e["slug"] for e in board["items"]] == order, sort
        assert [e["rank"] for e in board["items"]] == [1, 2, 3]
        slugs, cursor = [], None
        while True:
            params: dict[str, Any] = {"sort": sort, "limit": 1}
            if cursor is not None:
                params["cursor"] = cursor
            page = await _get(api, "/v1/marketplace/leaderboard", viewer, **params)
            slugs += [e["slug"] for e in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert slugs == order, sort
    gains = await _get(api, "/v1/marketplace/leaderboard", viewer, sort="gain")
    assert gains["items"][0]["statistics"]["gain"] > gains["items"][1]["statistics"]["gain"]
    status, problem = await api.call("GET", "/v1/marketplace/leaderboard", viewer,
                                     params={"sort": "luck"})  # fmt: skip
    assert status == 422 and problem["errors"][0]["field"] == "sort", problem
    page = await _get(api, "/v1/marketplace/leaderboard", viewer, sort="gain", limit=1)
    status, problem = await api.call("GET", "/v1/marketplace/leaderboard", viewer,
                                     params={"sort": "drawdown",
                                             "cursor": page["next_cursor"]})  # fmt: skip
    assert status == 422 and problem["errors"][0]["field"] == "cursor", problem


async def test_new_ledger_facts_change_the_statistics_the_leaderboard_shows(api: Api) -> None:
    viewer, master = await _provider_with_record(api, "alpha", [100.0])
    first = await _get(api, "/v1/marketplace/providers/alpha", viewer)
    assert first["statistics"]["trades"] == 1
    later = [
        f for f in master_life(master, [100.0, -30.0]) if f not in master_life(master, [100.0])
    ]
    await store_facts(api.database_url, later)
    board = await _get(api, "/v1/marketplace/leaderboard", viewer)
    assert board["items"][0]["statistics"]["trades"] == 2
    assert board["items"][0]["statistics"]["losses"] == 1


# ------------------------------------------------------------------- follow on paper


async def test_follow_on_paper_makes_a_paper_account_and_a_link_in_nats(api: Api) -> None:
    provider, master = await _provider_with_record(api, "alpha", [100.0])
    follower = await api.follower(provider, "fay")
    status, followed = await api.call(
        "POST", "/v1/marketplace/providers/alpha/follow-on-paper", follower,
        json={"sizing": {"mode": "fixed_lot", "lots": 0.05}},
    )  # fmt: skip
    assert status == 201, followed
    account, link = followed["account"], followed["link"]["link"]
    assert (account["platform"], account["role"]) == ("paper", "follower")
    assert account["owner_user_id"] == follower.user_id
    assert (link["master"], link["follower"]) == (master, account["account_id"])
    buckets = await ensure_buckets(api.js)
    stored = codec.copy_link_decoder.decode(
        (await buckets[subjects.KV_LINKS].get(link["link_id"])).value
    )
    assert stored.master == master and stored.follower == account["account_id"]
    assert msgspec.to_builtins(stored.sizing) == {"mode": "fixed_lot", "lots": 0.05}
    # the follower's own account and link, through the existing routes
    mine = await _get(api, "/v1/links", follower)
    assert [item["link"]["link_id"] for item in mine["items"]] == [link["link_id"]]
    status, paused = await api.call("POST", f"/v1/links/{link['link_id']}/pause", follower)
    assert status == 200 and paused["link"]["enabled"] is False, paused
    page = await _get(api, "/v1/marketplace/providers/alpha", follower)
    assert page["followers"] == 1
    status, problem = await api.call(
        "POST", "/v1/marketplace/providers/alpha/follow-on-paper", follower,
        json={"sizing": {"mode": "fixed_lot", "lots": -1}},
    )  # fmt: skip
    assert status == 422, problem
    status, _ = await api.call(
        "POST", "/v1/marketplace/providers/alpha/follow-on-paper", provider, json={}
    )
    assert status == 403  # followers follow; the provider links its own accounts


async def test_a_follower_of_one_tenant_cannot_follow_or_change_another_tenants_rows(
    api: Api,
) -> None:
    victim, victim_master = await _provider_with_record(api, "bravo", [100.0])
    status, made = await api.call("POST", "/v1/strategies", victim,
                                  json={"name": "bravo gold", "source": SOURCE})  # fmt: skip
    assert status == 201, made
    strategy_id = made["strategy"]["strategy_id"]
    attacker_provider = await api.provider("alpha")
    attacker = await api.follower(attacker_provider, "mallory")
    before = await _tenant_rows(api.database_url, "bravo")

    status, problem = await api.call(
        "POST", "/v1/marketplace/providers/bravo/follow-on-paper", attacker, json={}
    )
    assert status == 403, problem
    assert victim_master not in str(problem) and "bravo" not in problem["detail"]
    for method, path, body in (
        ("GET", f"/v1/strategies/{strategy_id}", None),
        ("GET", f"/v1/strategies/{strategy_id}/versions", None),
        ("POST", f"/v1/strategies/{strategy_id}/versions", {"source": SOURCE + "#"}),
        ("POST", f"/v1/strategies/{strategy_id}/deployments",
         {"version_id": made["version"]["version_id"], "master_account_id": victim_master,
          "symbol": "XAUUSD", "timeframe": "1h"}),
        ("PUT", "/v1/marketplace/profile", {"slug": "bravo", "master_account_id": victim_master}),
        ("GET", "/v1/marketplace/profile", None),
    ):  # fmt: skip
        for who in (attacker, attacker_provider):
            status, answer = await api.call(method, path, who, json=body)
            assert status in (403, 404, 409, 422), (who.email, method, path, status, answer)
            assert victim_master not in str(answer) and SOURCE not in str(answer)
    assert await _tenant_rows(api.database_url, "bravo") == before
    # what the attacker's own tenant sees of the victim: its published profile's public fields
    page = await _get(api, "/v1/marketplace/providers/bravo", attacker)
    assert victim_master not in str(page)


async def _tenant_rows(url: str, tenant: str) -> dict[str, list[str]]:
    """Every row of the tenant in the API's tables this module writes, past every wall."""
    conn = await asyncpg.connect(url)
    try:
        found = {}
        for table in ("api_accounts", "api_links", "api_strategies", "api_strategy_versions",
                      "api_strategy_deployments", "api_marketplace_profiles"):  # fmt: skip
            rows = await conn.fetch(
                f"SELECT to_jsonb(t)::text FROM {table} t WHERE tenant_id = $1 ORDER BY 1", tenant
            )
            found[table] = [r[0] for r in rows]
        return found
    finally:
        await conn.close()


async def test_row_level_security_shows_only_the_callers_tenant_and_public_functions_restore_scope(
    api: Api,
) -> None:
    alpha, _ = await _provider_with_record(api, "alpha", [100.0])
    bravo, _ = await _provider_with_record(api, "bravo", [50.0])
    for who in (alpha, bravo):
        status, _ = await api.call("POST", "/v1/strategies", who,
                                   json={"name": "s", "source": SOURCE})  # fmt: skip
        assert status == 201
    conn = await asyncpg.connect(api.database_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE tradecopy_api")
            await conn.execute("SELECT set_config('tradecopy.tenant', 'alpha', true),"
                               " set_config('tradecopy.follower', '', true)")  # fmt: skip
            for table in ("api_strategies", "api_strategy_versions", "api_marketplace_profiles"):
                tenants = {r[0] for r in await conn.fetch(f"SELECT tenant_id FROM {table}")}
                assert tenants == {"alpha"}, table
            listed = await conn.fetch("SELECT * FROM api_marketplace_listing(NULL)")
            assert [r["slug"] for r in listed] == ["alpha", "bravo"]
            assert set(listed[0].keys()) == {  # public fields and the facts' version only
                "slug", "description", "strategy_name", "strategy_version_id", "followers",
                "profile_updated", "facts", "latest", "seqs",
            }  # fmt: skip
            # the function's wider scope ended with it
            assert await conn.fetchval("SELECT current_setting('tradecopy.tenant')") == "alpha"
            tenants = {r[0] for r in await conn.fetch("SELECT tenant_id FROM api_strategies")}
            assert tenants == {"alpha"}
            updated = await conn.execute(
                "UPDATE api_marketplace_profiles SET published = false WHERE slug = 'bravo'"
            )
            assert updated == "UPDATE 0"
    finally:
        await conn.close()
