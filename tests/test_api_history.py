"""The ledger's read models through the API: positions with the copy map, closed trades,
statistics, the equity series and copy decisions, from rows the ledger's own store wrote; and
another tenant's ledger rows stay out of reach, with or without the application's scoping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_api_support import Api, Person, api_config, running_api, serve

from engine.core.book import fold_account
from engine.core.performance import account_stats
from engine.ledger import store as ledger_store
from engine.ledger.records import Kind, rows_of
from schemas import codec
from schemas.account import AccountState
from schemas.common import Side
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.master import PositionOpened
from schemas.orders import FollowerClose, FollowerOpen
from schemas.reports import OrderFilled

S = 1_000_000_000
T0 = 1_780_000_000 * S  # 2026-05-28

_KIND_OF = {
    AccountState: Kind.ACCOUNT_STATE,
    CopyDecision: Kind.DECISION,
    FollowerOpen: Kind.FOLLOWER_ORDER,
    FollowerClose: Kind.FOLLOWER_ORDER,
    OrderFilled: Kind.EXECUTION_REPORT,
    PositionOpened: Kind.MASTER_EVENT,
}


def copy_facts(follower: str, master: str, link: str, tag: str = "") -> list[object]:
    """A follower account's life: a deposit, a copy opened and closed at a profit, a second
    copy still open, a losing copy, and a copy the link skipped; plus the master's open."""
    usd = {"currency": "USD"}

    def state(ts: int, balance: float, equity: float) -> AccountState:
        return AccountState(account=follower, ts_ns=ts, balance=balance, equity=equity, **usd)

    def opening(n: int, ts: int, side: Side, symbol: str) -> list[object]:
        order = FollowerOpen(
            order_id=f"o{n}{tag}", link_id=link, follower=follower, master=master,
            master_event_id=f"e{n}{tag}", symbol=symbol, ts_ns=ts,
            master_position_id=f"mp{n}{tag}", side=side, volume=0.1,
        )  # fmt: skip
        fill = OrderFilled(
            order_id=f"o{n}{tag}", link_id=link, follower=follower, ts_ns=ts + 1,
            symbol=symbol, position_id=f"fp{n}{tag}", side=side, volume=0.1, price=1.1,
        )  # fmt: skip
        return [order, fill]

    def closing(n: int, ts: int, side: Side, symbol: str, profit: float) -> list[object]:
        order = FollowerClose(
            order_id=f"c{n}{tag}", link_id=link, follower=follower, master=master,
            master_event_id=f"x{n}{tag}", symbol=symbol, ts_ns=ts,
            master_position_id=f"mp{n}{tag}",
        )  # fmt: skip
        fill = OrderFilled(
            order_id=f"c{n}{tag}", link_id=link, follower=follower, ts_ns=ts + 1,
            symbol=symbol, position_id=f"fp{n}{tag}", side=side, volume=0.1, price=1.11,
            profit=profit, commission=-0.5,
        )  # fmt: skip
        return [order, fill]

    skipped = CopyDecision(
        decision_id=f"d1{tag}", link_id=link, master=master, follower=follower,
        outcome=DecisionOutcome.SKIPPED, rule=DecisionRule.MAX_LOT,
        message=f"skipped{tag}: 5 lots is above the link's max lot 1", ts_ns=T0 + 60 * S,
        master_event_id=f"e9{tag}", numbers={"volume": 5.0, "max_lot": 1.0},
    )  # fmt: skip
    master_open = PositionOpened(
        event_id=f"e1{tag}", master=master, symbol="EURUSD", ts_ns=T0 + 9 * S,
        position_id=f"mp1{tag}", side=Side.BUY, volume=1.0, price=1.1,
    )  # fmt: skip
    return [
        state(T0, 10_000.0, 10_000.0),
        master_open,
        *opening(1, T0 + 10 * S, Side.BUY, "EURUSD"),
        *closing(1, T0 + 20 * S, Side.SELL, "EURUSD", 100.0),
        state(T0 + 25 * S, 10_099.5, 10_099.5),
        *opening(2, T0 + 30 * S, Side.SELL, "XAUUSD"),
        *opening(3, T0 + 40 * S, Side.BUY, "GBPUSD"),
        *closing(3, T0 + 50 * S, Side.SELL, "GBPUSD", -40.0),
        state(T0 + 55 * S, 10_059.0, 10_020.0),
        skipped,
    ]


async def store_facts(database_url: str, facts: list[object]) -> None:
    """Through the ledger's own store: the rows exactly as its consumers write them."""
    conn = await ledger_store.connect(database_url)
    try:
        for seq, fact in enumerate(facts, start=1):
            kind = _KIND_OF[type(fact)]
            rows = rows_of(kind, "tc.v1.follower.x.orders", codec.encode(fact), seq)
            await ledger_store.insert_batch(conn, {kind: rows}, "default")
    finally:
        await conn.close()


@pytest.fixture(params=["ledger first", "api first"])
async def api(request: Any, database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    # Either component may be migrated first; the API reads the ledger's views either way.
    if request.param == "ledger first":
        await ledger_store.migrate(database_url)
    async with running_api(database_url, nc, js) as running:
        if request.param == "api first":
            await ledger_store.migrate(database_url)
        yield running


async def _copying(api: Api, tenant: str, tag: str = "") -> dict[str, Any]:
    provider = await api.provider(tenant)
    follower = await api.follower(provider, "fiona")
    master = (await api.account(provider, "master", name="master"))["account_id"]
    account = (await api.account(provider, "follower", owner=follower))["account_id"]
    link = (await api.link(provider, master, account))["link_id"]
    await store_facts(api.database_url, copy_facts(account, master, link, tag))
    return {"provider": provider, "follower": follower, "master": master, "account": account,
            "link": link}  # fmt: skip


async def _get(api: Api, path: str, who: Person, **params: Any) -> Any:
    status, body = await api.call("GET", path, who, params=params)
    assert status == 200, (path, body)
    return body


async def test_positions_show_open_copies_with_the_master_position_and_link(api: Api) -> None:
    world = await _copying(api, "alpha")
    account, link, master = world["account"], world["link"], world["master"]
    for who in (world["follower"], world["provider"]):
        body = await _get(api, f"/v1/accounts/{account}/positions", who)
        assert body["next_cursor"] is None
        [position] = body["items"]
        assert position["kind"] == "position" and position["id"] == "fp2"
        assert position["symbol"] == "XAUUSD" and position["side"] == "sell"
        assert position["copy_of"] == {
            "link_id": link,
            "master": master,
            "master_position_id": "mp2",
            "open_order_id": "o2",
        }
    master_book = await _get(api, f"/v1/accounts/{master}/positions", world["provider"])
    [own] = master_book["items"]
    assert own["id"] == "mp1" and own["copy_of"] is None


async def test_history_lists_closes_newest_first_with_pnl_in_minor_units(api: Api) -> None:
    world = await _copying(api, "alpha")
    path = f"/v1/accounts/{world['account']}/history"
    first = await _get(api, path, world["follower"], limit=1)
    [latest] = first["items"]
    assert latest["position_id"] == "fp3" and latest["currency"] == "USD"
    assert (latest["profit"], latest["commission"], latest["net"]) == (-4000, -50, -4050)
    assert latest["reason"] == "master_close" and latest["copy_of"]["link_id"] == world["link"]
    second = await _get(api, path, world["follower"], limit=1, cursor=first["next_cursor"])
    [earlier] = second["items"]
    assert earlier["position_id"] == "fp1" and earlier["net"] == 9950
    assert second["next_cursor"] is None


async def test_statistics_are_the_ledger_fold_of_the_same_facts(api: Api) -> None:
    world = await _copying(api, "alpha")
    account, link = world["account"], world["link"]
    body = await _get(api, f"/v1/accounts/{account}/statistics", world["follower"])
    expected = account_stats(
        fold_account(account, copy_facts(account, world["master"], link)), None
    )
    assert body["trades"] == 2 and body["wins"] == 1 and body["win_rate"] == 0.5
    assert body["profit_factor"] == pytest.approx(9950 / 4050)
    assert body["net_profit"] == 5900 and body["currency"] == "USD"
    assert body["gain"] == pytest.approx(expected.gain)
    assert body["max_drawdown"] == expected.max_drawdown == 7950
    assert body["monthly_pnl"]["2026-05"] == 5900 and len(body["monthly_pnl"]) == 24
    assert "sqrt(252)" in body["sharpe_basis"]
    of_link = await _get(api, f"/v1/accounts/{account}/statistics", world["provider"],
                         link_id=link)  # fmt: skip
    assert of_link["link_id"] == link and of_link["trades"] == 2
    other = await _get(api, f"/v1/accounts/{account}/statistics", world["provider"],
                       link_id="lnk-other")  # fmt: skip
    assert other["trades"] == 0


async def test_equity_series_pages_oldest_first(api: Api) -> None:
    world = await _copying(api, "alpha")
    path = f"/v1/accounts/{world['account']}/equity"
    page = await _get(api, path, world["follower"], limit=2)
    assert [s["balance"] for s in page["items"]] == [1_000_000, 1_009_950]
    rest = await _get(api, path, world["follower"], limit=2, cursor=page["next_cursor"])
    assert rest["items"] == [{"ts_ns": T0 + 55 * S, "currency": "USD", "balance": 1_005_900,
                              "equity": 1_002_000}]  # fmt: skip
    assert rest["next_cursor"] is None
    empty = await _get(api, f"/v1/accounts/{world['master']}/equity", world["provider"])
    assert empty == {"items": [], "next_cursor": None}


async def test_decisions_say_why_in_words_and_narrow_by_account_and_link(api: Api) -> None:
    world = await _copying(api, "alpha")
    body = await _get(api, "/v1/decisions", world["follower"])
    [decision] = body["items"]
    assert decision["rule"] == "max_lot" and decision["outcome"] == "skipped"
    assert decision["message"] == "skipped: 5 lots is above the link's max lot 1"
    assert decision["account_id"] == world["account"] and decision["numbers"]["max_lot"] == 1.0
    narrowed = await _get(api, "/v1/decisions", world["provider"], link_id=world["link"],
                          account_id=world["account"])  # fmt: skip
    assert [d["decision_id"] for d in narrowed["items"]] == ["d1"]
    none = await _get(api, "/v1/decisions", world["provider"], link_id="lnk-nothing")
    assert none["items"] == []


async def test_decisions_page_newest_first(api: Api) -> None:
    world = await _copying(api, "alpha")
    account, link, master = world["account"], world["link"], world["master"]
    more = [
        CopyDecision(
            decision_id=f"dd{i}",
            link_id=link,
            master=master,
            follower=account,
            outcome=DecisionOutcome.SKIPPED,
            rule=DecisionRule.DIRECTION,
            message=f"n{i}",
            ts_ns=T0 + (100 + i) * S,
        )
        for i in range(5)
    ]
    await store_facts(api.database_url, more)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        page = await _get(api, "/v1/decisions", world["follower"], **params)
        seen += [d["decision_id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["dd4", "dd3", "dd2", "dd1", "dd0", "d1"]


READS = ("positions", "history", "statistics", "equity")


async def _reach(api: Api, me: Person, victim: dict[str, Any]) -> list[str]:
    """What ``me`` got of the victim's ledger rows; empty when nothing leaked."""
    leaks = []
    for read in READS:
        for account in (victim["account"], victim["master"]):
            status, body = await api.call("GET", f"/v1/accounts/{account}/{read}", me)
            if status != 404 or "bravo" in str(body):
                leaks.append(f"{read} of {account}: {status} {body}")
    for params in ({}, {"account_id": victim["account"]}, {"link_id": victim["link"]}):
        status, body = await api.call("GET", "/v1/decisions", me, params=params)
        if status != 200 or "bravo" in str(body):
            leaks.append(f"decisions {params}: {status} {body}")
    return leaks


@pytest.mark.parametrize("walls", ["both walls", "row-level security alone"])
async def test_another_tenants_ledger_rows_answer_404_like_missing_ones(
    api: Api, nc: Any, walls: str
) -> None:
    alpha = await _copying(api, "alpha")
    bravo = await _copying(api, "bravo", tag="-bravo")
    client, pool = await serve(api.database_url, nc, api_config(),
                               app_scoping=walls == "both walls")  # fmt: skip
    scoped = Api(client=client, pool=pool, database_url=api.database_url, js=api.js)
    try:
        # the victim reads first: its folded books are in this app's cache
        for read in READS:
            for account in (bravo["account"], bravo["master"]):
                await _get(scoped, f"/v1/accounts/{account}/{read}", bravo["provider"])
        for me in (alpha["provider"], alpha["follower"]):
            assert await _reach(scoped, me, bravo) == []
        status, body = await scoped.call("GET", "/v1/accounts/acc-missing/positions",
                                         alpha["provider"])  # fmt: skip
        assert status == 404 and body["detail"] == "no account 'acc-missing'"
        # the same caller still reads its own
        own = await _get(scoped, f"/v1/accounts/{alpha['account']}/positions", alpha["follower"])
        assert [p["id"] for p in own["items"]] == ["fp2"]
        mine = await _get(scoped, "/v1/decisions", alpha["provider"])
        assert [d["decision_id"] for d in mine["items"]] == ["d1"]
    finally:
        await client.close()
        await pool.close()


async def test_without_either_wall_the_probe_finds_the_other_tenants_rows(
    api: Api, nc: Any
) -> None:
    """The probe above can fail: as a role that bypasses RLS and without scoping, it must."""
    alpha = await _copying(api, "alpha")
    bravo = await _copying(api, "bravo", tag="-bravo")
    client, pool = await serve(api.database_url, nc, api_config(database_role=None),
                               app_scoping=False)  # fmt: skip
    bare = Api(client=client, pool=pool, database_url=api.database_url, js=api.js)
    try:
        leaks = await _reach(bare, alpha["follower"], bravo)
    finally:
        await client.close()
        await pool.close()
    assert any(leak.startswith("positions of") for leak in leaks), leaks
    assert any(leak.startswith("decisions {}") for leak in leaks), leaks


async def test_the_api_role_reads_the_ledger_only_through_its_views(api: Api) -> None:
    await _copying(api, "alpha")
    conn = await asyncpg.connect(api.database_url)
    try:
        await conn.execute("SET ROLE tradecopy_api")
        await conn.execute("SELECT set_config('tradecopy.tenant', '*', false)")
        assert await conn.fetchval("SELECT count(*) FROM ledger_copy_decisions") == 1
        for table in ("ledger_decisions", "ledger_master_events", "account_tenants"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f"SELECT count(*) FROM {table}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM ledger_account_balances")
    finally:
        await conn.close()


async def test_the_one_round_trip_version_check_holds_row_level_security_alone(
    api: Api,
) -> None:
    alpha = await _copying(api, "alpha")
    bravo = await _copying(api, "bravo", tag="-bravo")
    conn = await asyncpg.connect(api.database_url)
    try:
        check = "SELECT * FROM api_ledger_facts_version($1, $2, $3, $4, NULL, NULL)"
        mine = await conn.fetch(check, "alpha", "", "tradecopy_api", alpha["account"])
        assert [r["facts"] for r in mine] == [len(copy_facts("a", "m", "l")) - 1]
        assert await conn.fetch(check, "alpha", "", "tradecopy_api", bravo["account"]) == []
        follower = alpha["follower"].user_id
        assert await conn.fetch(check, "alpha", follower, "tradecopy_api", alpha["master"]) == []
        # the settings and the role end with the statement's own transaction
        assert await conn.fetchval("SELECT current_user") != "tradecopy_api"
        assert await conn.fetchval("SELECT current_setting('tradecopy.tenant', true)") in ("", None)
    finally:
        await conn.close()


async def test_operators_and_anonymous_callers_are_refused(api: Api) -> None:
    world = await _copying(api, "alpha")
    operator = await api.as_operator()
    status, _ = await api.call("GET", f"/v1/accounts/{world['account']}/positions", operator)
    assert status == 403
    status, _ = await api.call("GET", "/v1/decisions")
    assert status == 401
    status, body = await api.call("GET", "/v1/decisions", world["follower"],
                                  params={"cursor": "bm90LWEtY3Vyc29y"})  # fmt: skip
    assert status == 422, body


async def test_a_read_after_new_ledger_rows_folds_them_in(api: Api) -> None:
    """The folded book is kept between requests only while the account's facts are unchanged."""
    world = await _copying(api, "alpha")
    account, link, master = world["account"], world["link"], world["master"]
    path = f"/v1/accounts/{account}/positions"
    before = await _get(api, path, world["follower"])
    assert [p["id"] for p in before["items"]] == ["fp2"]
    assert (await _get(api, path, world["follower"])) == before  # unchanged: the same answer
    close = [
        FollowerClose(
            order_id="c2", link_id=link, follower=account, master=master, master_event_id="x2",
            symbol="XAUUSD", ts_ns=T0 + 70 * S, master_position_id="mp2",
        ),
        OrderFilled(
            order_id="c2", link_id=link, follower=account, ts_ns=T0 + 70 * S + 1,
            symbol="XAUUSD", position_id="fp2", side=Side.BUY, volume=0.1, price=1.0,
            profit=5.0,
        ),
    ]  # fmt: skip
    await store_facts(api.database_url, close)
    after = await _get(api, path, world["follower"])
    assert after["items"] == []
    history = await _get(api, f"/v1/accounts/{account}/history", world["provider"])
    assert [t["position_id"] for t in history["items"]] == ["fp2", "fp3", "fp1"]
