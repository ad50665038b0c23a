"""Strategy uploads and deployments through the API: versions named by their content, bad
uploads refused naming the field, deployments in the signal workers' bucket (and gone when
deleted), nothing half-written when NATS is down, and another tenant's strategies out of reach."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from test_api_support import Api, Person, running_api, serve

from engine.core.strategy_versions import source_sha256, version_id_of
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import subjects
from schemas.signals import StrategyDeployment

SOURCE = """\
def strategy(candles, params):
    return {"action": "hold"}
"""
OTHER_SOURCE = SOURCE + "\n# a second revision\n"
PAPER = {"login": "1", "password": "p", "server": "paper"}


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    await ensure_streams(js)
    await ensure_buckets(js)
    async with running_api(database_url, nc, js) as running:
        yield running


async def _upload(api: Api, who: Person, name: str = "gold sma", **more: Any) -> dict[str, Any]:
    body = {"name": name, "source": SOURCE, "parameters": {"fast": 10, "slow": 30}, **more}
    status, answer = await api.call("POST", "/v1/strategies", who, json=body)
    assert status == 201, answer
    return dict(answer)


async def _paper_master(api: Api, who: Person, platform: str = "paper") -> str:
    status, body = await api.call("POST", "/v1/accounts", who, json={
        "name": "strategy master", "platform": platform, "role": "master",
        "credentials": PAPER})  # fmt: skip
    assert status == 201, body
    return str(body["account_id"])


async def _deployments_kv(api: Api) -> Any:
    return (await ensure_buckets(api.js))[subjects.KV_SIGNAL_DEPLOYMENTS]


# ------------------------------------------------------------------------------ uploads


async def test_an_upload_is_a_version_named_by_its_source_and_parameters(api: Api) -> None:
    provider = await api.provider("tenant-quant")
    made = await _upload(api, provider, description="SMA cross on gold")
    version = made["version"]
    code = hashlib.sha256(SOURCE.encode()).hexdigest()
    assert version["code_sha256"] == code
    assert version["version_id"] == version_id_of(code, {"fast": 10, "slow": 30})
    assert version["author"] == provider.user_id
    assert version["source"] == SOURCE
    assert made["strategy"]["current_version_id"] == version["version_id"]
    strategy_id = made["strategy"]["strategy_id"]

    # the identical upload answers what the first made, ids unchanged
    status, again = await api.call("POST", "/v1/strategies", provider, json={
        "name": "gold sma", "source": SOURCE, "parameters": {"slow": 30, "fast": 10}})  # fmt: skip
    assert status == 200, again
    assert again["duplicate"] is True
    assert again["strategy"]["strategy_id"] == strategy_id
    assert again["version"]["version_id"] == version["version_id"]
    assert again["version"]["created_ns"] == version["created_ns"]
    versions = f"/v1/strategies/{strategy_id}/versions"
    same_upload = {"source": SOURCE, "parameters": {"fast": 10, "slow": 30}}
    status, same = await api.call("POST", versions, provider, json=same_upload)
    assert status == 200 and same["duplicate"] is True, same
    assert same["version"]["version_id"] == version["version_id"]

    # the same name with other code is a new version's job, not a second strategy
    status, problem = await api.call("POST", "/v1/strategies", provider, json={
        "name": "gold sma", "source": OTHER_SOURCE})  # fmt: skip
    assert status == 409, problem
    assert f"/v1/strategies/{strategy_id}/versions" in problem["detail"]

    second_upload = {"source": OTHER_SOURCE, "parameters": {"fast": 5}}
    status, second = await api.call("POST", versions, provider, json=second_upload)
    assert status == 201, second
    second_id = second["version"]["version_id"]
    assert second_id == version_id_of(source_sha256(OTHER_SOURCE), {"fast": 5})
    assert second_id != version["version_id"]

    status, page = await api.call("GET", f"/v1/strategies/{strategy_id}/versions", provider,
                                  params={"limit": 1})  # fmt: skip
    assert status == 200, page
    assert [v["version_id"] for v in page["items"]] == [version["version_id"]]
    status, rest = await api.call("GET", f"/v1/strategies/{strategy_id}/versions", provider,
                                  params={"cursor": page["next_cursor"]})  # fmt: skip
    assert [v["version_id"] for v in rest["items"]] == [second_id]
    assert rest["next_cursor"] is None
    status, strategy = await api.call("GET", f"/v1/strategies/{strategy_id}", provider)
    assert status == 200 and strategy["current_version_id"] == second_id, strategy
    assert strategy["description"] == "SMA cross on gold"
    status, listed = await api.call("GET", "/v1/strategies", provider)
    assert [s["strategy_id"] for s in listed["items"]] == [strategy_id]


@pytest.mark.parametrize(
    ("upload", "field"),
    [
        ({"source": "def strategy(candles, params)\n    return 1\n"}, "source"),
        ({"source": "def other(candles, params):\n    return 1\n"}, "source"),
        ({"source": SOURCE + "#" * (48 * 1024)}, "source"),
        ({"source": SOURCE, "parameters": {"fast": [1, 2]}}, "parameters"),
        ({"source": SOURCE, "parameters": {"9lives": 1}}, "parameters"),
        ({"source": SOURCE, "parameters": {"note": "x" * 300}}, "parameters.note"),
        ({"source": ""}, "source"),
    ],
    ids=["syntax error", "no strategy function", "too large", "a list parameter",
         "a bad parameter name", "a long text parameter", "empty"],
)  # fmt: skip
async def test_a_bad_upload_is_refused_naming_the_field(
    api: Api, upload: dict[str, Any], field: str
) -> None:
    provider = await api.provider("tenant-quant")
    status, problem = await api.call(
        "POST", "/v1/strategies", provider, json={"name": "broken", **upload}
    )
    assert status == 422, problem
    assert [e["field"].split("[")[0] for e in problem["errors"]] == [field], problem
    status, listed = await api.call("GET", "/v1/strategies", provider)
    assert listed["items"] == []  # nothing was made
    made = await _upload(api, provider)
    status, problem = await api.call(
        "POST", f"/v1/strategies/{made['strategy']['strategy_id']}/versions", provider,
        json=upload,
    )  # fmt: skip
    assert status == 422, problem
    assert [e["field"].split("[")[0] for e in problem["errors"]] == [field], problem


async def test_followers_and_other_tenants_cannot_reach_a_providers_strategies(api: Api) -> None:
    provider = await api.provider("tenant-quant")
    other = await api.provider("tenant-rival")
    follower = await api.follower(provider, "fred")
    made = await _upload(api, provider)
    strategy_id = made["strategy"]["strategy_id"]
    status, _ = await api.call("GET", "/v1/strategies", follower)
    assert status == 403
    for method, path, body in (
        ("GET", f"/v1/strategies/{strategy_id}", None),
        ("GET", f"/v1/strategies/{strategy_id}/versions", None),
        ("GET", f"/v1/strategies/{strategy_id}/deployments", None),
        ("POST", f"/v1/strategies/{strategy_id}/versions", {"source": OTHER_SOURCE}),
    ):
        status, answer = await api.call(method, path, other, json=body)
        assert status == 404, (path, answer)
    status, listed = await api.call("GET", "/v1/strategies", other)
    assert listed["items"] == []
    # the rival's own strategy cannot deploy the provider's version
    rival = await _upload(api, other, source=OTHER_SOURCE)
    master = await _paper_master(api, other)
    status, problem = await api.call(
        "POST", f"/v1/strategies/{rival['strategy']['strategy_id']}/deployments", other,
        json={"version_id": made["version"]["version_id"], "master_account_id": master,
              "symbol": "XAUUSD", "timeframe": "1h"},
    )  # fmt: skip
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["version_id"]


# -------------------------------------------------------------------------- deployments


async def test_a_deployment_is_in_the_workers_bucket_until_it_is_deleted(api: Api) -> None:
    provider = await api.provider("tenant-quant")
    made = await _upload(api, provider)
    strategy_id, version = made["strategy"]["strategy_id"], made["version"]
    master = await _paper_master(api, provider)
    status, deployed = await api.call(
        "POST", f"/v1/strategies/{strategy_id}/deployments", provider,
        json={"version_id": version["version_id"], "master_account_id": master,
              "symbol": "XAUUSD", "timeframe": "15m", "volume": 0.2},
    )  # fmt: skip
    assert status == 201, deployed
    key = subjects.deployment_key(version["version_id"], "XAUUSD", "15m")
    assert deployed["key"] == key
    kv = await _deployments_kv(api)
    running = msgspec.json.decode((await kv.get(key)).value, type=StrategyDeployment)
    assert running.master == master
    assert (running.symbol, str(running.timeframe), running.volume) == ("XAUUSD", "15m", 0.2)
    assert running.version.version_id == version["version_id"]
    assert running.version.source == SOURCE
    assert running.version.created_ns == version["created_ns"]

    status, listed = await api.call("GET", f"/v1/strategies/{strategy_id}/deployments", provider)
    assert [d["deployment_id"] for d in listed["items"]] == [deployed["deployment_id"]]
    # one deployment per version, symbol and timeframe: the bucket has one key for it
    status, problem = await api.call(
        "POST", f"/v1/strategies/{strategy_id}/deployments", provider,
        json={"version_id": version["version_id"], "master_account_id": master,
              "symbol": "XAUUSD", "timeframe": "15m"},
    )  # fmt: skip
    assert status == 409, problem

    path = f"/v1/strategies/{strategy_id}/deployments/{deployed['deployment_id']}"
    other = await api.provider("tenant-rival")
    status, _ = await api.call("DELETE", path, other)
    assert status == 404
    assert (await kv.get(key)).value  # still running
    status, _ = await api.call("DELETE", path, provider)
    assert status == 204
    with pytest.raises((nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)):
        await kv.get(key)
    status, listed = await api.call("GET", f"/v1/strategies/{strategy_id}/deployments", provider)
    assert listed["items"] == []
    status, _ = await api.call("DELETE", path, provider)
    assert status == 404


async def test_a_deployment_needs_a_paper_master_of_the_provider_and_a_version(api: Api) -> None:
    provider = await api.provider("tenant-quant")
    made = await _upload(api, provider)
    strategy_id = made["strategy"]["strategy_id"]
    mt5_master = await _paper_master(api, provider, platform="mt5")
    status, problem = await api.call(
        "POST", f"/v1/strategies/{strategy_id}/deployments", provider,
        json={"version_id": "sv-" + "0" * 24, "master_account_id": mt5_master,
              "symbol": "XAUUSD", "timeframe": "1h"},
    )  # fmt: skip
    assert status == 422, problem
    assert sorted(e["field"] for e in problem["errors"]) == ["master_account_id", "version_id"]
    status, problem = await api.call(
        "POST", f"/v1/strategies/{strategy_id}/deployments", provider,
        json={"version_id": made["version"]["version_id"], "master_account_id": mt5_master,
              "symbol": "XAUUSD", "timeframe": "2h"},
    )  # fmt: skip
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["timeframe"]


async def test_without_nats_a_deployment_is_refused_and_nothing_is_recorded(
    api: Api, nats_server: Any, database_url: str
) -> None:
    provider = await api.provider("tenant-quant")
    made = await _upload(api, provider)
    strategy_id = made["strategy"]["strategy_id"]
    master = await _paper_master(api, provider)
    down = await nats.connect(nats_server.url)
    await down.close()
    client, pool = await serve(database_url, down)
    offline = Api(client=client, pool=pool, database_url=database_url, js=api.js)
    try:
        status, problem = await offline.call(
            "POST", f"/v1/strategies/{strategy_id}/deployments", provider,
            json={"version_id": made["version"]["version_id"], "master_account_id": master,
                  "symbol": "XAUUSD", "timeframe": "1h"},
        )  # fmt: skip
        assert status == 503, problem
    finally:
        await client.close()
        await pool.close()
    status, listed = await api.call("GET", f"/v1/strategies/{strategy_id}/deployments", provider)
    assert listed["items"] == []
    kv = await _deployments_kv(api)
    with pytest.raises((nats.js.errors.KeyNotFoundError, nats.js.errors.NoKeysError)):
        await kv.get(subjects.deployment_key(made["version"]["version_id"], "XAUUSD", "1h"))


async def test_a_refused_bucket_write_leaves_no_deployment_row(api: Api) -> None:
    """The row and the KV write share one transaction: the bucket gone under a running API
    (its writes refused), a deployment answers 503 and is not recorded."""
    provider = await api.provider("tenant-quant")
    made = await _upload(api, provider)
    strategy_id = made["strategy"]["strategy_id"]
    master = await _paper_master(api, provider)
    path = f"/v1/strategies/{strategy_id}/deployments"
    body = {"version_id": made["version"]["version_id"], "master_account_id": master,
            "symbol": "XAUUSD", "timeframe": "1h"}  # fmt: skip
    status, first = await api.call("POST", path, provider, json=body)
    assert status == 201, first
    await api.js.delete_key_value(subjects.KV_SIGNAL_DEPLOYMENTS)
    status, problem = await api.call("POST", path, provider, json={**body, "timeframe": "4h"})
    assert status == 503, problem
    status, listed = await api.call("GET", path, provider)
    assert [d["deployment_id"] for d in listed["items"]] == [first["deployment_id"]]
