"""Links written to the CLI's KV bucket with the CLI's validation; emergency stops."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import nats.js.errors
import pytest
from test_api_support import (
    Api,
    running_api,
    serve,
)

from engine.runtime.jetstream import ensure_buckets
from engine.runtime.operator import read_stops
from schemas import codec, subjects


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    async with running_api(database_url, nc, js) as running:
        yield running


async def _kv_link(api: Api, link_id: str) -> object:
    buckets = await ensure_buckets(api.js)
    entry = await buckets[subjects.KV_LINKS].get(link_id)
    return codec.copy_link_decoder.decode(entry.value)


async def _setup(api: Api) -> tuple[object, object, str, str]:
    provider = await api.provider("alpha")
    follower = await api.follower(provider, "fiona")
    master = (await api.account(provider, "master"))["account_id"]
    copy = (await api.account(provider, "follower", owner=follower))["account_id"]
    return provider, follower, master, copy


async def test_created_link_is_in_the_links_bucket_as_the_replicator_reads_it(api: Api) -> None:
    provider, _, master, copy = await _setup(api)
    link = await api.link(
        provider, master, copy, sizing={"mode": "fixed_lot", "lots": 0.1},
        symbols_include=["XAUUSD"],
    )  # fmt: skip
    assert link["link_id"].startswith("lnk-") and link["enabled"] is True
    stored = await _kv_link(api, link["link_id"])
    assert stored.master == master and stored.follower == copy
    assert stored.sizing.lots == 0.1 and stored.symbols_include == ["XAUUSD"]


async def test_every_invalid_field_of_a_link_is_named(api: Api) -> None:
    provider, _, master, copy = await _setup(api)
    status, body = await api.call(
        "POST", "/v1/links", provider,
        json={"master": master, "follower": copy, "sizing": {"mode": "multiplier", "factor": -1},
              "max_lot": "big", "bogus": 1, "trading_hours": {"start": "25:00", "end": "10:00"}},
    )  # fmt: skip
    assert status == 422, body
    fields = {e["field"] for e in body["errors"]}
    assert fields == {"sizing.factor", "max_lot", "bogus", "trading_hours.start"}, body
    status, body = await api.call(
        "POST", "/v1/links", provider, json={"master": master, "follower": master}
    )
    assert status == 422 and {e["field"] for e in body["errors"]} >= {"follower"}
    # Counts are int64 on the wire: a wider one is the caller's error, never a 500.
    link = await api.link(provider, master, copy)
    for field in ("daily_trade_limit", "max_open_positions"):
        status, body = await api.call(
            "PUT", f"/v1/links/{link['link_id']}", provider,
            json={"master": master, "follower": copy, field: 2**64},
        )  # fmt: skip
        assert status == 422 and body["errors"][0]["field"] == field, body


async def test_link_accounts_must_be_a_master_and_a_follower_of_the_tenant(api: Api) -> None:
    provider, _, master, copy = await _setup(api)
    beta = await api.provider("beta")
    foreign = (await api.account(beta, "follower"))["account_id"]
    for body, field in (
        ({"master": copy, "follower": master}, {"master", "follower"}),
        ({"master": master, "follower": foreign}, {"follower"}),
        ({"master": master, "follower": "acc-nobody"}, {"follower"}),
    ):
        status, answer = await api.call("POST", "/v1/links", provider, json=body)
        assert status == 422 and {e["field"] for e in answer["errors"]} == field, answer
    buckets = await ensure_buckets(api.js)
    with pytest.raises(nats.js.errors.NoKeysError):
        await buckets[subjects.KV_LINKS].keys()


async def test_update_pause_resume_and_delete_reach_the_bucket(api: Api) -> None:
    provider, follower, master, copy = await _setup(api)
    link = await api.link(provider, master, copy)
    path = f"/v1/links/{link['link_id']}"
    status, body = await api.call(
        "PUT", path, provider,
        json={"master": master, "follower": copy, "sizing": {"mode": "multiplier", "factor": 2}},
    )  # fmt: skip
    assert status == 200 and body["link"]["sizing"]["factor"] == 2
    assert (await _kv_link(api, link["link_id"])).sizing.factor == 2
    status, body = await api.call("PUT", path, provider, json={"master": master, "follower": copy,
                                                              "link_id": "other"})  # fmt: skip
    assert status == 422 and body["errors"][0]["field"] == "link_id"
    # The follower owning the follower account may pause and resume it.
    status, body = await api.call("POST", f"{path}/pause", follower)
    assert status == 200 and body["link"]["enabled"] is False
    assert (await _kv_link(api, link["link_id"])).enabled is False
    status, body = await api.call("POST", f"{path}/resume", follower)
    assert status == 200, body
    assert (await _kv_link(api, link["link_id"])).enabled is True
    status, _ = await api.call("PUT", path, follower, json={"master": master, "follower": copy})
    assert status == 403
    status, audit = await api.call("GET", "/v1/audit", provider)
    assert status == 200, audit
    actions = [e["action"] for e in audit["items"] if e["entity"] == "link"]
    assert actions == ["resume", "pause", "update", "create"]
    pause = next(e for e in audit["items"] if e["action"] == "pause")
    assert pause["before"] == {"enabled": True} and pause["after"] == {"enabled": False}
    assert pause["actor_user_id"] == follower.user_id
    status, _ = await api.call("DELETE", path, provider)
    assert status == 204
    buckets = await ensure_buckets(api.js)
    with pytest.raises((nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)):
        await buckets[subjects.KV_LINKS].get(link["link_id"])
    assert (await api.call("GET", path, provider))[0] == 404


async def test_follower_sees_only_links_into_its_accounts(api: Api) -> None:
    provider, follower, master, copy = await _setup(api)
    other = await api.follower(provider, "otto")
    other_copy = (await api.account(provider, "follower", owner=other))["account_id"]
    mine = await api.link(provider, master, copy)
    theirs = await api.link(provider, master, other_copy)
    status, page = await api.call("GET", "/v1/links", follower)
    assert status == 200, page
    assert [v["link"]["link_id"] for v in page["items"]] == [mine["link_id"]]
    status, page = await api.call("GET", "/v1/links", provider)
    assert status == 200, page
    assert {v["link"]["link_id"] for v in page["items"]} == {mine["link_id"], theirs["link_id"]}
    assert (await api.call("GET", f"/v1/links/{theirs['link_id']}", follower))[0] == 404
    assert (await api.call("POST", f"/v1/links/{theirs['link_id']}/pause", follower))[0] == 404
    # Cancelling a subscription: a follower deletes its own link, never another's.
    assert (await api.call("DELETE", f"/v1/links/{theirs['link_id']}", follower))[0] == 404
    assert (await api.call("DELETE", f"/v1/links/{mine['link_id']}", follower))[0] == 204
    buckets = await ensure_buckets(api.js)
    with pytest.raises((nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)):
        await buckets[subjects.KV_LINKS].get(mine["link_id"])
    assert (await buckets[subjects.KV_LINKS].get(theirs["link_id"])).value


async def test_emergency_stops_are_operator_only_and_checked_like_the_cli(api: Api) -> None:
    provider, _, master, copy = await _setup(api)
    link = await api.link(provider, master, copy)
    operator = await api.as_operator()
    stop = {"scope": "link", "target": link["link_id"], "reason": "broker outage"}
    assert (await api.call("POST", "/v1/stops", provider, json=stop))[0] == 403
    assert (await api.call("GET", "/v1/stops", provider))[0] == 403
    status, body = await api.call("POST", "/v1/stops", operator, json=stop)
    assert status == 200 and body["active"] is True
    [active] = await read_stops(api.js)
    assert active.key == f"link.{link['link_id']}" and active.reason == "broker outage"
    status, body = await api.call(
        "POST", "/v1/stops", operator, json={"scope": "account", "target": "acc-unknown"}
    )
    assert status == 422 and "unknown account" in body["errors"][0]["message"]
    status, _ = await api.call(
        "POST",
        "/v1/stops",
        operator,
        json={"scope": "account", "target": "acc-unknown", "force": True},
    )
    assert status == 200
    for bad in (
        {"scope": "global", "target": "x"},
        {"scope": "link"},
        {"scope": "link", "target": "a.b"},
    ):
        status, body = await api.call("POST", "/v1/stops", operator, json=bad)
        assert status == 422 and body["errors"][0]["field"] == "target", bad
    status, _ = await api.call("POST", "/v1/stops", operator, json={**stop, "active": False})
    assert status == 200, _
    assert [s.key for s in await read_stops(api.js)] == ["account.acc-unknown"]
    status, page = await api.call("GET", "/v1/stops", operator)
    assert status == 200, page
    assert {s["target"]: s["active"] for s in page["items"]} == {
        link["link_id"]: False, "acc-unknown": True,
    }  # fmt: skip
    status, audit = await api.call("GET", "/v1/audit", operator)
    assert status == 200, audit
    assert sum(e["entity"] == "emergency_stop" for e in audit["items"]) == 3


async def test_an_own_link_cannot_be_pointed_at_another_tenants_accounts(api: Api) -> None:
    provider, _, master, copy = await _setup(api)
    link = await api.link(provider, master, copy)
    beta = await api.provider("beta")
    foreign_master = (await api.account(beta, "master"))["account_id"]
    foreign_copy = (await api.account(beta, "follower"))["account_id"]
    for body in ({"master": master, "follower": foreign_copy},
                 {"master": foreign_master, "follower": copy}):  # fmt: skip
        status, answer = await api.call("PUT", f"/v1/links/{link['link_id']}", provider, json=body)
        assert status == 422, answer
    stored = await _kv_link(api, link["link_id"])
    assert (stored.master, stored.follower) == (master, copy)


async def test_without_nats_link_writes_answer_503_and_status_is_unknown(api: Api) -> None:
    provider, _, master, copy = await _setup(api)
    client, pool = await serve(api.database_url, None)
    offline = Api(client=client, pool=pool, database_url=api.database_url, js=None)
    try:
        status, body = await offline.call(
            "POST", "/v1/links", provider, json={"master": master, "follower": copy}
        )
        assert status == 503 and body["type"].endswith("/unavailable"), body
        status, body = await offline.call("GET", f"/v1/accounts/{master}", provider)
        assert status == 200 and body["status"]["state"] == "unknown"
    finally:
        await client.close()
        await pool.close()
    status, page = await api.call("GET", "/v1/links", provider)
    assert status == 200 and page["items"] == []  # nothing half-written
