"""TradingView alerts through the API: a paper master driven by webhooks, copied by a real
replicator onto two followers, with retried alerts trading once; and the webhook's refusals
(wrong secret, address, malformed message), each answered and written to the source's log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from test_api_support import Api, Person, api_config, running_api, serve

from engine.api.signals import TRADINGVIEW_ADDRESSES
from engine.ledger import store as ledger_store
from engine.ledger.config import LedgerConfig
from engine.ledger.service import Ledger, wait_for_ledger
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.processes import spawn_replicator, stop_process, wait_for_replicator
from schemas import subjects
from schemas.common import Side
from schemas.streams import FOLLOWER_ORDERS_STREAM

BAR = "2026-02-16T02:{minute:02d}:00Z"
CONNECTOR = "paper-signals"


def _alert(secret: str, action: str, minute: int, **more: Any) -> dict[str, Any]:
    return {"secret": secret, "ticker": "XAUUSD", "exchange": "OANDA",
            "time": BAR.format(minute=minute), "action": action, **more}  # fmt: skip


async def _paper_account(api: Api, who: Person, role: str, owner: Person | None = None) -> str:
    credentials = {"login": "1", "password": "p", "server": "paper"}
    payload: dict[str, Any] = {"name": f"paper-{role}", "platform": "paper", "role": role,
                               "credentials": credentials}  # fmt: skip
    if owner is not None:
        payload["owner_user_id"] = owner.user_id
    status, body = await api.call("POST", "/v1/accounts", who, json=payload)
    assert status == 201, body
    return str(body["account_id"])


async def _source(api: Api, who: Person, master: str, **more: Any) -> tuple[str, str]:
    status, body = await api.call("POST", "/v1/signal-sources", who, json={
        "name": "gold strategy", "master_account_id": master,
        "symbol_map": {"OANDA:XAUUSD": "XAUUSD"}, **more})  # fmt: skip
    assert status == 201, body
    return body["source"]["source_id"], body["secret"]


async def _log(api: Api, who: Person, source_id: str) -> list[dict[str, Any]]:
    status, body = await api.call("GET", f"/v1/signal-sources/{source_id}/log", who)
    assert status == 200, body
    return list(body["items"])


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    await ledger_store.migrate(database_url)  # the master's position is read from the ledger
    await ensure_streams(js)
    await ensure_buckets(js)
    async with running_api(database_url, nc, js) as running:
        yield running


# ------------------------------------------------------------------ master and copies


@dataclass
class Desk:
    api: Api
    provider: Person
    master: str
    followers: list[str]
    venue: Any
    source_id: str
    secret: str

    def net(self, account: str) -> float:
        return sum(p.volume if p.side is Side.BUY else -p.volume
                   for p in self.venue.positions(account))  # fmt: skip

    def counts(self) -> list[int]:
        return [len(self.venue.positions(a)) for a in (self.master, *self.followers)]

    async def post(self, alert: dict[str, Any]) -> tuple[int, Any, float]:
        started = time.perf_counter()
        status, body = await self.api.call(
            "POST", f"/v1/signals/tradingview/{self.source_id}", json=alert
        )
        return status, body, time.perf_counter() - started

    async def ledger_sees(self, net: float) -> None:
        """The master's position as the API reads it (the ledger) before the next alert."""

        async def seen() -> bool:
            status, body = await self.api.call(
                "GET", f"/v1/accounts/{self.master}/positions", self.provider
            )
            assert status == 200, body
            total = sum(p["volume"] if p["side"] == "buy" else -p["volume"]
                        for p in body["items"] if p["kind"] == "position")  # fmt: skip
            return abs(total - net) < 1e-9

        await wait_until(seen, f"the ledger records the master at {net}")


@pytest.fixture
async def desk(
    api: Api, nats_server: Any, nc: Any, js: Any, database_url: str, tmp_path: Path
) -> AsyncIterator[Desk]:
    from connectors.paper.connector import PaperConnector, PaperTerminal
    from connectors.paper.model import XAUUSD
    from connectors.paper.prices import PriceReplay, load_bars

    provider = await api.provider("tenant-signals")
    master = await _paper_account(api, provider, "master")
    followers = []
    for name in ("fay", "finn"):
        person = await api.follower(provider, name)
        follower = await _paper_account(api, provider, "follower", owner=person)
        await api.link(provider, master, follower)
        followers.append(follower)
    accounts = [(master, "USD", 10_000.0, 100, "master")]
    accounts += [(f, "USD", 10_000.0, 100, "follower") for f in followers]
    terminal = PaperTerminal.open(tmp_path / "paper.state", accounts, (XAUUSD,), {})
    replay = PriceReplay(load_bars(), start=420, speed=60.0, stamp_wall_clock=True)
    connector = PaperConnector(nc, CONNECTOR, terminal, replay)
    ledger = Ledger(LedgerConfig(nats_url=nats_server.url, database_url=database_url),
                    database_url)  # fmt: skip
    replicator = spawn_replicator(nats_server.url, instance="signals")
    await connector.start()
    await ledger.start()
    try:
        await wait_for_replicator(js)
        await wait_for_ledger(js)
        symbols = await js.key_value(subjects.KV_SYMBOLS)

        async def priced() -> bool:
            try:
                return connector.quotes > 0 and bool(
                    await symbols.get(subjects.symbol_key(master, "XAUUSD"))
                )
            except Exception:
                return False

        deadline = time.monotonic() + 30
        while not await priced():
            assert time.monotonic() < deadline, "no prices or symbol specs from the paper venue"
            await asyncio.sleep(0.05)
        source_id, secret = await _source(api, provider, master, allowed_ips=[])
        yield Desk(api, provider, master, followers, terminal.venue, source_id, secret)
    finally:
        stop_process(replicator)
        await ledger.stop()
        await connector.stop()


async def _orders_on(js: Any, account: str) -> int:
    """How many follower orders the stream holds on the account's subject."""
    info = await js.stream_info(
        FOLLOWER_ORDERS_STREAM, subjects_filter=subjects.follower_orders(account)
    )
    return sum((info.state.subjects or {}).values())


async def test_the_same_alert_posted_five_times_at_once_trades_the_master_and_each_copy_once(
    desk: Desk, js: Any
) -> None:
    alert = _alert(desk.secret, "buy", 15, contracts=0.1, timenow="2026-02-16T02:15:03Z")
    retries = [dict(alert, timenow=f"2026-02-16T02:15:0{i + 3}Z") for i in range(5)]
    answers = await asyncio.gather(*(desk.post(a) for a in retries))
    for status, body, _ in answers:
        assert status == 202, body
    print("webhook answers (s):", [round(took, 3) for *_, took in answers])
    bodies = [body for _, body, _ in answers]
    assert len({b["alert_id"] for b in bodies}) == 1
    assert len({tuple(b["order_ids"]) for b in bodies}) == 1
    assert sorted(b["duplicate"] for b in bodies) == [False, True, True, True, True]
    assert bodies[0]["intent"] == "open" and len(bodies[0]["order_ids"]) == 1

    await wait_until(lambda: desk.counts() == [1, 1, 1], "the master trade and its two copies")
    await asyncio.sleep(1.0)  # any second trade would have landed by now
    assert desk.counts() == [1, 1, 1]
    assert desk.net(desk.master) == pytest.approx(0.1)
    assert await _orders_on(js, desk.master) == 1
    for follower in desk.followers:
        assert desk.net(follower) > 0
        assert await _orders_on(js, follower) == 1
    log = await _log(desk.api, desk.provider, desk.source_id)
    assert [e["outcome"] for e in log] == ["accepted"]

    # The same alert again later (its answer lost, TradingView retried): still one trade.
    status, body, _ = await desk.post(alert)
    assert status == 202 and body["duplicate"] is True
    await desk.ledger_sees(0.1)
    status, body, _ = await desk.post(alert)
    assert status == 202 and body["duplicate"] is True, body
    await asyncio.sleep(0.5)
    assert desk.counts() == [1, 1, 1]


async def test_a_close_alert_closes_the_master_and_every_copy(desk: Desk) -> None:
    status, body, _ = await desk.post(_alert(desk.secret, "buy", 15, contracts=0.2))
    assert status == 202, body
    await wait_until(lambda: desk.counts() == [1, 1, 1], "the open and its copies")
    await desk.ledger_sees(0.2)
    close = _alert(desk.secret, "close", 16)
    answers = await asyncio.gather(*(desk.post(close) for _ in range(3)))
    assert [a[0] for a in answers] == [202, 202, 202]
    assert {a[1]["intent"] for a in answers} == {"close"}
    await wait_until(lambda: desk.counts() == [0, 0, 0], "the master and its copies flat")
    log = await _log(desk.api, desk.provider, desk.source_id)
    assert [e["outcome"] for e in log] == ["accepted", "accepted"]


async def test_an_opposite_alert_reverses_the_master_and_every_copy(desk: Desk) -> None:
    status, body, _ = await desk.post(_alert(desk.secret, "buy", 15, contracts=0.1))
    assert status == 202, body
    await wait_until(lambda: desk.counts() == [1, 1, 1], "the long and its copies")
    await desk.ledger_sees(0.1)
    status, body, _ = await desk.post(_alert(desk.secret, "sell", 16, contracts=0.3))
    assert status == 202, body
    assert body["intent"] == "reverse" and len(body["order_ids"]) == 2

    def reversed_everywhere() -> bool:
        return desk.counts() == [1, 1, 1] and all(
            desk.net(a) < 0 for a in (desk.master, *desk.followers)
        )

    await wait_until(reversed_everywhere, "the master and its copies short")
    assert desk.net(desk.master) == pytest.approx(-0.3)


# ------------------------------------------------------------------------ refusals


async def _provider_with_source(api: Api, tenant: str, **more: Any) -> tuple[Person, str, str]:
    provider = await api.provider(tenant)
    master = await _paper_account(api, provider, "master")
    source_id, secret = await _source(api, provider, master, **more)
    return provider, source_id, secret


async def test_a_wrong_secret_is_refused_and_logged_without_the_secret(api: Api) -> None:
    provider, source_id, secret = await _provider_with_source(api, "tenant-wrong", allowed_ips=[])
    wrong = _alert("not-the-secret-42", "buy", 15, contracts=0.1)
    status, body = await api.call("POST", f"/v1/signals/tradingview/{source_id}", json=wrong)
    assert status == 401, body
    assert body["type"].endswith("/unauthorized")
    log = await _log(api, provider, source_id)
    assert [(e["outcome"], e["reason"]) for e in log] == [
        ("wrong_secret", "the secret does not match")
    ]
    assert log[0]["remote"] == "127.0.0.1"
    assert "not-the-secret-42" not in str(log) and secret not in str(log)


async def test_a_sender_off_the_allow_list_is_refused_and_logged(api: Api) -> None:
    provider, source_id, secret = await _provider_with_source(api, "tenant-address")
    status, body = await api.call("GET", f"/v1/signal-sources/{source_id}", provider)
    assert status == 200 and body["allowed_ips"] == list(TRADINGVIEW_ADDRESSES)
    status, body = await api.call("POST", f"/v1/signals/tradingview/{source_id}",
                                  json=_alert(secret, "buy", 15, contracts=0.1))  # fmt: skip
    assert status == 403, body
    log = await _log(api, provider, source_id)
    assert [e["outcome"] for e in log] == ["address_not_allowed"]
    assert "127.0.0.1" in log[0]["reason"]


async def test_a_malformed_alert_is_refused_naming_the_field_and_logged(api: Api) -> None:
    provider, source_id, secret = await _provider_with_source(api, "tenant-bad", allowed_ips=[])
    path = f"/v1/signals/tradingview/{source_id}"
    status, body = await api.call("POST", path, json=_alert(secret, "buy", 15))
    assert status == 422, body
    message = "a plain buy message needs the volume to trade"
    assert body["errors"] == [{"field": "contracts", "message": message}]
    # TradingView sends a message that is not JSON as text/plain: named as the body ("$").
    status, body = await api.call(
        "POST", path, data=b"buy XAUUSD now", headers={"Content-Type": "text/plain"}
    )
    assert status == 422, body
    assert body["errors"][0]["field"] == "$"
    log = await _log(api, provider, source_id)
    assert [e["outcome"] for e in log] == ["malformed", "malformed"]
    assert log[1]["reason"].startswith("contracts: ")
    assert secret not in str(log)


async def test_an_unknown_source_and_another_tenants_source_answer_404(api: Api) -> None:
    alfa, alfa_source, _ = await _provider_with_source(api, "tenant-alfa", allowed_ips=[])
    bravo, bravo_source, _ = await _provider_with_source(api, "tenant-bravo", allowed_ips=[])
    status, body = await api.call("POST", "/v1/signals/tradingview/sig-0000000000000000",
                                  json=_alert("x", "close", 15))  # fmt: skip
    assert status == 404, body
    for path in (f"/v1/signal-sources/{bravo_source}", f"/v1/signal-sources/{bravo_source}/log"):
        status, missing = await api.call("GET", path, alfa)
        assert status == 404, missing
        assert (await api.call("GET", path, bravo))[0] == 200
    assert (await api.call("DELETE", f"/v1/signal-sources/{bravo_source}", alfa))[0] == 404
    status, listed = await api.call("GET", "/v1/signal-sources", alfa)
    assert [s["source_id"] for s in listed["items"]] == [alfa_source]


async def test_a_source_drives_only_a_paper_master_of_its_tenant(api: Api) -> None:
    provider = await api.provider("tenant-platforms")
    live = (await api.account(provider, "master"))["account_id"]  # an MT5 master
    paper_follower = await _paper_account(api, provider, "follower")
    for account in (live, paper_follower, "acc-0000000000000000"):
        status, body = await api.call("POST", "/v1/signal-sources", provider, json={
            "name": "x", "master_account_id": account, "symbol_map": {"XAUUSD": "X"}})  # fmt: skip
        assert status == 422, body
        assert body["errors"][0]["field"] == "master_account_id"


async def test_a_deleted_source_stops_answering_and_its_secret_is_shown_once(api: Api) -> None:
    provider, source_id, secret = await _provider_with_source(api, "tenant-delete")
    status, body = await api.call("GET", "/v1/signal-sources", provider)
    assert secret not in str(body)
    assert (await api.call("DELETE", f"/v1/signal-sources/{source_id}", provider))[0] == 204
    status, _ = await api.call("POST", f"/v1/signals/tradingview/{source_id}",
                               json=_alert(secret, "close", 15))  # fmt: skip
    assert status == 404


async def test_an_oversized_or_foreign_body_is_refused_before_anything_is_read(api: Api) -> None:
    provider, source_id, _ = await _provider_with_source(api, "tenant-big", allowed_ips=[])
    path = f"/v1/signals/tradingview/{source_id}"
    status, body = await api.call(
        "POST", path, data=b"x" * 20_000, headers={"Content-Type": "text/plain"}
    )
    assert status == 413, body
    status, body = await api.call(
        "POST", path, data=b"<alert/>", headers={"Content-Type": "application/xml"}
    )
    assert status == 415, body
    assert await _log(api, provider, source_id) == []


async def test_behind_a_proxy_the_sender_is_the_last_forwarded_address(
    api: Api, nc: Any, js: Any
) -> None:
    provider, source_id, secret = await _provider_with_source(api, "tenant-proxy")
    config = api_config(signal_client_ip_header="X-Forwarded-For")
    client, pool = await serve(api.database_url, nc, config)
    proxied = Api(client=client, pool=pool, database_url=api.database_url, js=js)
    path = f"/v1/signals/tradingview/{source_id}"
    wrong = _alert("wrong-secret", "close", 15)
    try:
        # The proxy appends the peer it saw: what a client wrote before it counts for nothing.
        spoofed = {"X-Forwarded-For": f"{TRADINGVIEW_ADDRESSES[0]}, 203.0.113.9"}
        status, body = await proxied.call("POST", path, json=wrong, headers=spoofed)
        assert status == 403, body
        forwarded = {"X-Forwarded-For": f"203.0.113.9, {TRADINGVIEW_ADDRESSES[0]}"}
        status, body = await proxied.call("POST", path, json=wrong, headers=forwarded)
        assert status == 401, body  # past the address check, stopped by the secret
        # Without the setting the header is ignored: the peer (127.0.0.1) is not TradingView.
        status, body = await api.call("POST", path, json=wrong, headers=forwarded)
        assert status == 403, body
    finally:
        await client.close()
        await pool.close()
    log = await _log(api, provider, source_id)
    assert [(e["outcome"], e["remote"]) for e in log] == [
        ("address_not_allowed", "127.0.0.1"),
        ("wrong_secret", TRADINGVIEW_ADDRESSES[0]),
        ("address_not_allowed", "203.0.113.9"),
    ]
    assert secret not in str(log)
