"""Trading from the web against a real nats-server, PostgreSQL and an in-process paper connector:
manual orders fill and are marked manual, a retried request trades once; a protection pause is
lifted by resume; risk templates (validated, applied to links) and order templates (per user)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest
from conftest import wait_until
from test_api_support import Api, running_api

from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import bar_to_ticks, load_bars
from connectors.reports import RETCODE_NO_SUCH_POSITION
from engine.replicator.state import LinkState, link_state_decoder, link_state_encoder
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.links import resume_link
from schemas import codec, subjects
from schemas.common import Side
from schemas.orders import MANUAL_LINK_ID, FollowerOpen, manual_order_id
from schemas.reports import ExecutionReport, OrderDone, OrderFilled, OrderRejected
from schemas.streams import EXECUTION_REPORTS_STREAM, FOLLOWER_ORDERS_STREAM

SYMBOL = "XAUUSD"


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    await ensure_streams(js)
    await ensure_buckets(js)
    async with running_api(database_url, nc, js) as running:
        yield running


class Desk:
    """A provider, its follower with one follower account served by a paper connector, and
    every execution report and follower order the stream holds."""

    def __init__(self, api: Api, nc: Any) -> None:
        self.api = api
        self.nc = nc
        self.reports: list[ExecutionReport] = []
        self.orders: list[Any] = []
        self.connector: PaperConnector | None = None

    async def start(self, tmp: Path) -> None:
        api = self.api
        self.alpha = await api.provider("alpha")
        self.fiona = await api.follower(self.alpha, "fiona")
        self.master = (await api.account(self.alpha, "master"))["account_id"]
        self.account = (await api.account(self.alpha, "follower", owner=self.fiona))["account_id"]
        terminal = PaperTerminal.open(
            tmp / "paper.state", [(self.account, "USD", 10_000.0, 100, "follower")]
        )
        for quote in bar_to_ticks(load_bars()[0], SYMBOL):
            terminal.on_quote(quote)
        self.connector = PaperConnector(self.nc, "web-desk", terminal, None)
        await self.connector.start()

        async def on_report(msg: Any) -> None:
            self.reports.append(codec.execution_report_decoder.decode(msg.data))

        async def on_order(msg: Any) -> None:
            self.orders.append(codec.follower_order_decoder.decode(msg.data))

        await api.js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                               cb=on_report, ordered_consumer=True)  # fmt: skip
        await api.js.subscribe(subjects.FOLLOWER_ORDERS, stream=FOLLOWER_ORDERS_STREAM,
                               cb=on_order, ordered_consumer=True)  # fmt: skip
        symbols = await api.js.key_value(subjects.KV_SYMBOLS)

        async def spec_published() -> bool:
            try:
                return bool(await symbols.get(subjects.symbol_key(self.account, SYMBOL)))
            except nats.js.errors.KeyNotFoundError:
                return False

        await wait_until(spec_published, "the connector's symbol spec in KV")

    @property
    def venue(self) -> Any:
        assert self.connector is not None
        return self.connector.terminal.venue

    async def report(self, order_id: str) -> ExecutionReport:
        await wait_until(lambda: [r for r in self.reports if r.order_id == order_id],
                         f"the report of {order_id}",
                         details=lambda: [r.order_id for r in self.reports])  # fmt: skip
        return next(r for r in self.reports if r.order_id == order_id)

    async def stop(self) -> None:
        if self.connector is not None:
            await self.connector.stop()


@pytest.fixture
async def desk(api: Api, nc: Any, tmp_path: Path) -> AsyncIterator[Desk]:
    running = Desk(api, nc)
    await running.start(tmp_path)
    try:
        yield running
    finally:
        await running.stop()


def orders_path(account: str) -> str:
    return f"/v1/accounts/{account}/orders"


# ------------------------------------------------------------------------- manual orders


async def test_a_manual_order_fills_marked_manual_and_a_retry_trades_once(
    api: Api, desk: Desk
) -> None:
    body = {"symbol": SYMBOL, "side": "buy", "volume": 0.1, "client_order_id": "web-1"}
    status, accepted = await api.call("POST", orders_path(desk.account), desk.fiona, json=body)
    assert status == 202, accepted
    assert accepted["order_id"] == manual_order_id(desk.account, "web-1")
    assert accepted["type"] == "open" and accepted["duplicate"] is False
    report = await desk.report(accepted["order_id"])
    assert isinstance(report, OrderFilled), report
    assert report.link_id == MANUAL_LINK_ID and report.volume == 0.1
    sent = [o for o in desk.orders if o.order_id == accepted["order_id"]]
    assert len(sent) == 1 and isinstance(sent[0], FollowerOpen)
    assert sent[0].manual is True and sent[0].master == desk.account
    # The same request again (a retry after a lost answer): the same order, no second trade.
    status, again = await api.call("POST", orders_path(desk.account), desk.fiona, json=body)
    assert status == 202 and again["order_id"] == accepted["order_id"]
    assert again["duplicate"] is True
    status, _ = await api.call("POST", orders_path(desk.account), desk.alpha,
                               json={**body, "volume": 0.2})  # fmt: skip
    assert status == 202  # the provider may trade the account too; same key, same order
    await api.call("POST", orders_path(desk.account), desk.fiona,
                   json={**body, "client_order_id": "web-2"})  # fmt: skip
    await desk.report(manual_order_id(desk.account, "web-2"))
    assert len(desk.venue.positions(desk.account)) == 2
    assert len([o for o in desk.orders if o.order_id == accepted["order_id"]]) == 1
    assert len([r for r in desk.reports if r.order_id == accepted["order_id"]]) == 1
    status, audit = await api.call("GET", "/v1/audit", desk.alpha)
    placed = [e for e in audit["items"] if e["entity"] == "manual_order"]
    assert len(placed) == 2, placed


async def test_a_manual_position_is_modified_and_closed_in_parts(api: Api, desk: Desk) -> None:
    body = {"symbol": SYMBOL, "side": "buy", "volume": 0.2}
    status, opened = await api.call("POST", orders_path(desk.account), desk.fiona, json=body)
    assert status == 202, opened
    fill = await desk.report(opened["order_id"])
    assert isinstance(fill, OrderFilled)
    position = f"/v1/accounts/{desk.account}/positions/{fill.position_id}"
    sl, tp = round(fill.price - 20, 2), round(fill.price + 20, 2)
    status, modified = await api.call("PATCH", position, desk.fiona, json={"sl": sl, "tp": tp})
    assert status == 202 and modified["type"] == "modify", modified
    done = await desk.report(modified["order_id"])
    assert isinstance(done, OrderDone), done
    held = desk.venue.position(desk.account, fill.position_id)
    assert (held.sl, held.tp) == (sl, tp)
    status, half = await api.call("POST", f"{position}/close", desk.fiona, json={"ratio": 0.5})
    assert status == 202 and half["type"] == "close", half
    closed = await desk.report(half["order_id"])
    assert isinstance(closed, OrderFilled) and closed.volume == 0.1, closed
    assert desk.venue.position(desk.account, fill.position_id).volume == 0.1
    status, rest = await api.call("POST", f"{position}/close", desk.fiona, json={})
    assert status == 202
    assert isinstance(await desk.report(rest["order_id"]), OrderFilled)
    assert desk.venue.position(desk.account, fill.position_id) is None


async def test_a_copied_position_is_closed_manually_by_its_own_id(api: Api, desk: Desk) -> None:
    """A manual order names the follower's position, whatever master position it copies."""
    result = desk.venue.market_order(desk.account, SYMBOL, Side.BUY, 0.1, master_ref="m1:77")
    assert result.ok, result
    copy_id = result.position_id
    status, accepted = await api.call(
        "POST", f"/v1/accounts/{desk.account}/positions/{copy_id}/close", desk.fiona, json={}
    )
    assert status == 202
    assert isinstance(await desk.report(accepted["order_id"]), OrderFilled)
    assert desk.venue.position(desk.account, copy_id) is None


async def test_closing_a_position_the_account_does_not_hold_is_rejected_clearly(
    api: Api, desk: Desk
) -> None:
    status, accepted = await api.call(
        "POST", f"/v1/accounts/{desk.account}/positions/no-such-position/close", desk.fiona,
        json={},
    )  # fmt: skip
    assert status == 202, accepted
    report = await desk.report(accepted["order_id"])
    assert isinstance(report, OrderRejected), report
    assert report.code == RETCODE_NO_SUCH_POSITION and "no open position" in report.reason


async def test_a_manual_pending_order_is_placed(api: Api, desk: Desk) -> None:
    price = round(desk.venue.quote(SYMBOL).bid - 50, 2)
    status, accepted = await api.call(
        "POST", orders_path(desk.account), desk.fiona,
        json={"symbol": SYMBOL, "side": "buy", "volume": 0.05, "order_type": "buy_limit",
              "price": price},
    )  # fmt: skip
    assert status == 202 and accepted["type"] == "pending_place", accepted
    assert isinstance(await desk.report(accepted["order_id"]), OrderDone)
    assert [p.price for p in desk.venue.pending_orders(desk.account)] == [price]


async def test_manual_orders_name_every_invalid_field(api: Api, desk: Desk) -> None:
    path = orders_path(desk.account)
    cases = [
        ({"symbol": "NOPE", "side": "buy", "volume": 0.1}, {"symbol"}),
        ({"symbol": SYMBOL, "side": "buy", "volume": 0.015}, {"volume"}),
        ({"symbol": SYMBOL, "side": "buy", "volume": 0.001}, {"volume"}),
        ({"symbol": SYMBOL, "side": "buy", "volume": 0.1, "price": 2000}, {"price"}),
        ({"symbol": SYMBOL, "side": "sell", "volume": 0.1, "order_type": "buy_stop"},
         {"price", "side"}),
        ({"symbol": SYMBOL, "side": "buy", "volume": -1}, {"volume"}),
        ({"symbol": SYMBOL, "side": "long", "volume": 0.1}, {"side"}),
        ({"symbol": SYMBOL, "side": "buy", "volume": 0.1, "client_order_id": "a b"},
         {"client_order_id"}),
    ]  # fmt: skip
    for body, fields in cases:
        status, problem = await api.call("POST", path, desk.fiona, json=body)
        assert status == 422, (body, problem)
        assert {e["field"] for e in problem["errors"]} == fields, (body, problem)
    status, problem = await api.call("POST", path, desk.fiona, json={**cases[0][0], "leverage": 5})
    assert status == 422 and "leverage" in problem["detail"], problem
    status, problem = await api.call(
        "POST", f"/v1/accounts/{desk.account}/positions/x%20y/close", desk.fiona, json={}
    )
    assert status == 422 and problem["errors"][0]["field"] == "position_id"
    body = {"symbol": SYMBOL, "side": "buy", "volume": 0.1}
    status, problem = await api.call("POST", orders_path(desk.master), desk.alpha, json=body)
    assert status == 422 and problem["errors"][0]["field"] == "account_id"
    assert desk.venue.positions(desk.account) == []
    assert desk.orders == []


async def test_nobody_trades_an_account_that_is_not_theirs(api: Api, desk: Desk) -> None:
    felix = await api.follower(desk.alpha, "felix")
    beta = await api.provider("beta")
    body = {"symbol": SYMBOL, "side": "buy", "volume": 0.1}
    for who in (felix, beta):
        for method, path, payload in (
            ("POST", orders_path(desk.account), body),
            ("PATCH", f"/v1/accounts/{desk.account}/positions/1", {"sl": 1.0}),
            ("POST", f"/v1/accounts/{desk.account}/positions/1/close", {}),
        ):
            status, answer = await api.call(method, path, who, json=payload)
            assert status == 404, (who.email, path, answer)
    assert desk.orders == []


# -------------------------------------------------------------------------------- resume


async def test_resume_lifts_a_protection_pause_and_audits_it(api: Api) -> None:
    alpha = await api.provider("alpha")
    fiona = await api.follower(alpha, "fiona")
    master = (await api.account(alpha, "master"))["account_id"]
    account = (await api.account(alpha, "follower", owner=fiona))["account_id"]
    link = await api.link(alpha, master, account)
    buckets = await ensure_buckets(api.js)
    states = buckets[subjects.KV_LINK_STATE]
    paused = LinkState(day="2026-02-16", opened=["p1"], day_start_equity=9_000.0,
                       peak_equity=12_000.0, paused=True, paused_rule="max_drawdown",
                       paused_ns=5, close_all_pending=True)  # fmt: skip
    await states.put(link["link_id"], link_state_encoder.encode(paused))
    status, body = await api.call("POST", f"/v1/links/{link['link_id']}/resume", fiona)
    assert status == 200 and body["link"]["enabled"] is True, body
    state = link_state_decoder.decode((await states.get(link["link_id"])).value)
    assert state == msgspec.structs.replace(
        paused, paused=False, paused_rule="", paused_day="", close_all_pending=False,
        peak_equity=None,
    )  # fmt: skip
    status, audit = await api.call("GET", "/v1/audit", alpha)
    actions = [e["action"] for e in audit["items"] if e["entity_id"] == link["link_id"]]
    assert actions[:2] == ["resume_protection", "resume"], actions
    # Not paused: resuming again changes nothing in the state and audits no lift.
    revision = (await states.get(link["link_id"])).revision
    status, _ = await api.call("POST", f"/v1/links/{link['link_id']}/resume", fiona)
    assert status == 200
    assert (await states.get(link["link_id"])).revision == revision
    status, audit = await api.call("GET", "/v1/audit", alpha)
    lifts = [e for e in audit["items"] if e["action"] == "resume_protection"]
    assert len(lifts) == 1


async def test_resume_link_keeps_what_it_does_not_know_and_refuses_a_stale_write(
    api: Api,
) -> None:
    states = (await ensure_buckets(api.js))[subjects.KV_LINK_STATE]
    raw = {"paused": True, "paused_rule": "equity_stop", "opened": ["a"], "future_field": 3}
    await states.put("l1", msgspec.msgpack.encode(raw))
    assert await resume_link(states, "l1") is True
    kept = msgspec.msgpack.decode((await states.get("l1")).value)
    assert kept == {"opened": ["a"], "future_field": 3}
    assert await resume_link(states, "l1") is False
    assert await resume_link(states, "missing") is False


# ------------------------------------------------------------------------ risk templates


async def test_risk_templates_are_validated_field_by_field_and_paged(api: Api) -> None:
    alpha = await api.provider("alpha")
    status, problem = await api.call(
        "POST", "/v1/risk-templates", alpha,
        json={"name": "bad", "settings": {"sizing": {"mode": "multiplier", "factor": -1},
                                          "max_lot": "big", "symbols_include": ["X"],
                                          "bogus": 1, "max_drawdown_percent": 150}},
    )  # fmt: skip
    assert status == 422, problem
    assert {e["field"] for e in problem["errors"]} == {
        "settings.sizing.factor", "settings.max_lot", "settings.symbols_include",
        "settings.bogus", "settings.max_drawdown_percent",
    }  # fmt: skip
    made = []
    for i in range(3):
        status, body = await api.call(
            "POST", "/v1/risk-templates", alpha,
            json={"name": f"careful-{i}", "settings": {"sizing": {"mode": "fixed_lot",
                                                                  "lots": 0.1 * (i + 1)},
                                                       "max_drawdown_percent": 20}},
        )  # fmt: skip
        assert status == 201, body
        made.append(body["template_id"])
    status, problem = await api.call("POST", "/v1/risk-templates", alpha,
                                     json={"name": "careful-0", "settings": {}})  # fmt: skip
    assert status == 409, problem
    status, page = await api.call("GET", "/v1/risk-templates?limit=2", alpha)
    assert status == 200 and len(page["items"]) == 2 and page["next_cursor"], page
    status, rest = await api.call(
        "GET", f"/v1/risk-templates?limit=2&cursor={page['next_cursor']}", alpha
    )
    assert [t["template_id"] for t in page["items"] + rest["items"]] == sorted(made)
    assert rest["next_cursor"] is None
    first = f"/v1/risk-templates/{made[0]}"
    renamed = {"name": "renamed", "settings": {"max_lot": 1.0}}
    status, body = await api.call("PUT", first, alpha, json=renamed)
    assert status == 200 and body["settings"] == {"max_lot": 1.0}, body
    status, body = await api.call("GET", first, alpha)
    assert body["name"] == "renamed"
    status, _ = await api.call("DELETE", first, alpha)
    assert status == 204
    status, _ = await api.call("GET", first, alpha)
    assert status == 404
    beta = await api.provider("beta")
    status, _ = await api.call("GET", f"/v1/risk-templates/{made[1]}", beta)
    assert status == 404
    fiona = await api.follower(alpha, "fiona")
    status, _ = await api.call("GET", "/v1/risk-templates", fiona)
    assert status == 403


async def test_applying_a_risk_template_merges_it_into_the_link(api: Api) -> None:
    alpha = await api.provider("alpha")
    fiona = await api.follower(alpha, "fiona")
    master = (await api.account(alpha, "master"))["account_id"]
    account = (await api.account(alpha, "follower", owner=fiona))["account_id"]
    link = await api.link(alpha, master, account, symbols_include=["XAUUSD"])
    settings = {"sizing": {"mode": "risk_percent", "percent": 1.5}, "equity_stop": 5000.0,
                "protection_action": "close_all"}  # fmt: skip
    status, template = await api.call("POST", "/v1/risk-templates", alpha,
                                      json={"name": "safe", "settings": settings})  # fmt: skip
    assert status == 201, template
    path = f"/v1/links/{link['link_id']}/apply-template"
    status, body = await api.call("POST", path, alpha,
                                  json={"template_id": template["template_id"]})  # fmt: skip
    assert status == 200, body
    kv = (await ensure_buckets(api.js))[subjects.KV_LINKS]
    stored = codec.copy_link_decoder.decode((await kv.get(link["link_id"])).value)
    assert stored.sizing.percent == 1.5 and stored.equity_stop == 5000.0
    assert stored.protection_action == "close_all" and stored.symbols_include == ["XAUUSD"]
    status, audit = await api.call("GET", "/v1/audit", alpha)
    assert audit["items"][0]["action"] == "apply_template"
    beta = await api.provider("beta")
    status, foreign = await api.call("POST", "/v1/risk-templates", beta,
                                     json={"name": "theirs", "settings": {}})  # fmt: skip
    status, problem = await api.call("POST", path, alpha,
                                     json={"template_id": foreign["template_id"]})  # fmt: skip
    assert status == 422 and problem["errors"][0]["field"] == "template_id"
    status, _ = await api.call("POST", path, beta, json={"template_id": foreign["template_id"]})
    assert status == 404


# ----------------------------------------------------------------------- order templates


async def test_order_templates_belong_to_their_user(api: Api) -> None:
    alpha = await api.provider("alpha")
    fiona = await api.follower(alpha, "fiona")
    felix = await api.follower(alpha, "felix")
    preset = {"name": "gold scalp", "symbol": SYMBOL, "side": "buy", "volume": 0.1,
              "sl_points": 500, "tp_points": 1000}  # fmt: skip
    status, made = await api.call("POST", "/v1/order-templates", fiona, json=preset)
    assert status == 201 and made["sl_points"] == 500, made
    status, _ = await api.call("POST", "/v1/order-templates", fiona, json=preset)
    assert status == 409
    status, _ = await api.call("POST", "/v1/order-templates", felix, json=preset)
    assert status == 201  # another user's name space
    status, problem = await api.call(
        "POST", "/v1/order-templates", fiona,
        json={**preset, "name": "x", "volume": 0, "sl_points": -3, "side": "up"},
    )  # fmt: skip
    assert status == 422, problem
    path = f"/v1/order-templates/{made['template_id']}"
    for who in (felix, alpha, await api.provider("beta")):
        status, _ = await api.call("GET", path, who)
        assert status == 404, who.email
    status, mine = await api.call("GET", "/v1/order-templates", fiona)
    assert [t["template_id"] for t in mine["items"]] == [made["template_id"]]
    status, body = await api.call("PUT", path, fiona, json={**preset, "volume": 0.3})
    assert status == 200 and body["volume"] == 0.3
    status, _ = await api.call("DELETE", path, felix)
    assert status == 404
    status, _ = await api.call("DELETE", path, fiona)
    assert status == 204
    status, _ = await api.call("GET", f"/v1/order-templates/{uuid.uuid4()}", fiona)
    assert status == 404
    status, _ = await api.call("GET", "/v1/order-templates/not-a-uuid", fiona)
    assert status == 404
