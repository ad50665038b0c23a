"""Live updates over SSE (``GET /v1/stream``) against a real nats-server and PostgreSQL: each
caller sees exactly its accounts' decisions, reports and account states, resumes without loss
or repeats, a client that stops reading is dropped without slowing anyone else, and the
stream ends cleanly when the server shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from conftest import wait_until
from test_api_support import Api, Person, api_config, running_api, serve

from engine.api import metrics
from engine.api.stream import STREAMS_KEY, SseEvent, decision_latencies, read_events
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.account import AccountState
from schemas.common import Side
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.reports import OrderFilled


@pytest.fixture
async def api(database_url: str, nc: Any, js: Any) -> AsyncIterator[Api]:
    await ensure_streams(js)
    await ensure_buckets(js)
    async with running_api(database_url, nc, js) as running:
        yield running


class World(msgspec.Struct, kw_only=True):
    alpha: Any
    fiona: Any
    felix: Any
    beta: Any
    master: str
    f1: str
    f2: str
    b1: str


async def build(api: Api) -> World:
    alpha = await api.provider("alpha")
    fiona = await api.follower(alpha, "fiona")
    felix = await api.follower(alpha, "felix")
    beta = await api.provider("beta")
    bob = await api.follower(beta, "bob")
    master = (await api.account(alpha, "master"))["account_id"]
    f1 = (await api.account(alpha, "follower", owner=fiona))["account_id"]
    f2 = (await api.account(alpha, "follower", owner=felix))["account_id"]
    b1 = (await api.account(beta, "follower", owner=bob))["account_id"]
    return World(alpha=alpha, fiona=fiona, felix=felix, beta=beta, master=master, f1=f1, f2=f2,
                 b1=b1)  # fmt: skip


def decision(follower: str, marker: str, *, size: int = 0) -> CopyDecision:
    return CopyDecision(
        decision_id=marker, link_id="lnk-test", master="m", follower=follower,
        outcome=DecisionOutcome.SKIPPED, rule=DecisionRule.SYMBOL_EXCLUDED,
        message="x" * size or marker, ts_ns=time.time_ns(),
    )  # fmt: skip


def report(follower: str, marker: str) -> OrderFilled:
    return OrderFilled(
        order_id=marker, link_id="lnk-test", follower=follower, ts_ns=time.time_ns(),
        symbol="XAUUSD", position_id="7", side=Side.BUY, volume=0.1, price=2000.0,
    )  # fmt: skip


def state(account: str, balance: float) -> AccountState:
    return AccountState(account=account, ts_ns=time.time_ns(), currency="USD", balance=balance,
                        equity=balance, open_positions=1)  # fmt: skip


async def publish_decision(js: Any, follower: str, marker: str, size: int = 0) -> None:
    payload = codec.encode(decision(follower, marker, size=size))
    await js.publish(subjects.decisions(follower, "lnk-test"), payload)


async def publish_report(js: Any, follower: str, marker: str) -> None:
    await js.publish(subjects.execution_reports(follower), codec.encode(report(follower, marker)))


async def publish_state(js: Any, account: str, balance: float) -> None:
    kv = await js.key_value(subjects.KV_ACCOUNTS)
    await kv.put(account, codec.encode(state(account, balance)))


class Listener:
    """One open stream, its events collected as they arrive (the ``open`` event first)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[SseEvent] = []
        self.arrived: list[float] = []
        self.ended = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in read_events(self.response.content):
                self.events.append(event)
                self.arrived.append(time.perf_counter())
        except (aiohttp.ClientError, ConnectionError):
            pass
        self.ended = True

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [msgspec.json.decode(e.data) for e in self.events if e.event == kind]

    def markers(self) -> list[str]:
        return [marker for _, marker in self._marked()]

    def id_of(self, marker: str) -> str:
        """The id of the event that carried ``marker``: a place to resume after it."""
        return next(event.id for event, m in self._marked() if m == marker)

    def _marked(self) -> list[tuple[SseEvent, str]]:
        found = []
        for event in self.events:
            data = msgspec.json.decode(event.data)
            if event.event == "decision":
                found.append((event, data["decision_id"]))
            elif event.event == "report":
                found.append((event, data["order_id"]))
            elif event.event == "account_state":
                found.append((event, f"{data['account']}={data['balance']:g}"))
        return found

    async def wait_for(self, marker: str) -> None:
        await wait_until(lambda: marker in self.markers(), f"{marker} on the stream",
                         details=self.markers)  # fmt: skip

    async def close(self) -> None:
        self.response.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def listen(api: Api, who: Person, last_event_id: str | None = None) -> Listener:
    headers = dict(who.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    response = await api.client.get("/v1/stream", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    listener = Listener(response)
    await wait_until(lambda: listener.events, "the stream's open event")
    assert listener.events[0].event == "open"
    return listener


# ------------------------------------------------------------------------------ tests


async def test_a_follower_sees_its_own_events_and_nobody_elses(api: Api) -> None:
    w = await build(api)
    fiona = await listen(api, w.fiona)
    alpha = await listen(api, w.alpha)
    assert msgspec.json.decode(fiona.events[0].data) == {"accounts": [w.f1], "followers": [w.f1]}
    for account in (w.f2, w.b1, w.f1):  # fiona's last: it arrives after the others
        await publish_decision(api.js, account, f"d-{account}")
        await publish_report(api.js, account, f"r-{account}")
        await publish_state(api.js, account, 1000.0)
    await fiona.wait_for(f"{w.f1}=1000")
    await alpha.wait_for(f"{w.f1}=1000")
    assert fiona.markers() == [f"d-{w.f1}", f"r-{w.f1}", f"{w.f1}=1000"]
    assert fiona.of("report")[0]["status"] == "filled"
    assert fiona.of("account_state")[0]["open_positions"] == 1
    assert fiona.of("decision")[0]["rule"] == "symbol_excluded"
    # The provider follows its tenant's followers, never another tenant's.
    assert sorted(alpha.markers()) == sorted(
        [f"d-{w.f2}", f"r-{w.f2}", f"{w.f2}=1000", f"d-{w.f1}", f"r-{w.f1}", f"{w.f1}=1000"]
    )
    assert not [m for m in alpha.markers() if w.b1 in m]
    await fiona.close()
    await alpha.close()


async def test_an_api_key_streams_for_its_provider(api: Api) -> None:
    w = await build(api)
    status, body = await api.call("POST", "/v1/api-keys", w.alpha, json={"name": "backend"})
    assert status == 201, body
    backend = Person(w.alpha.email, "", "", w.alpha.user_id, w.alpha.tenant_id,
                     api_key=body["key"])  # fmt: skip
    stream = await listen(api, backend)
    await publish_decision(api.js, w.b1, "not-mine")
    await publish_decision(api.js, w.f2, "mine")
    await stream.wait_for("mine")
    assert stream.markers() == ["mine"]
    await stream.close()


async def test_a_caller_without_accounts_receives_nothing(api: Api) -> None:
    w = await build(api)
    gamma = await api.provider("gamma")
    empty = await listen(api, gamma)
    fiona = await listen(api, w.fiona)
    await publish_state(api.js, w.f1, 5.0)
    await publish_decision(api.js, w.f1, "for-fiona")
    await publish_report(api.js, w.f1, "report-fiona")
    await fiona.wait_for("report-fiona")
    await asyncio.sleep(0.2)
    assert empty.markers() == []
    await empty.close()
    await fiona.close()


async def test_resuming_from_an_event_id_gets_exactly_the_missed_events(api: Api) -> None:
    w = await build(api)
    first = await listen(api, w.fiona)
    await publish_decision(api.js, w.f1, "d1")
    await publish_state(api.js, w.f1, 1.0)
    await publish_report(api.js, w.f1, "r1")
    await publish_decision(api.js, w.f1, "d2")
    await first.wait_for("d2")
    seen = first.markers()
    # Three streams merge into one: each keeps its own order, not the order across them.
    assert sorted(seen) == sorted(["d1", f"{w.f1}=1", "r1", "d2"])
    assert [m for m in seen if m.startswith("d")] == ["d1", "d2"]
    # Resume after the first state: whatever came after it in this stream is "missed".
    resume_from = first.id_of(f"{w.f1}=1")
    missed = seen[seen.index(f"{w.f1}=1") + 1 :]
    await first.close()
    # While the client is away: one of each, and another follower's that must not appear.
    await publish_report(api.js, w.f1, "r2")
    await publish_state(api.js, w.f1, 2.0)
    await publish_decision(api.js, w.f2, "d-felix")
    await publish_decision(api.js, w.f1, "d3")
    second = await listen(api, w.fiona, last_event_id=resume_from)
    await publish_decision(api.js, w.f1, "d4")  # live again after the replay
    await second.wait_for("d4")
    got = second.markers()
    assert sorted(got) == sorted([*missed, "r2", f"{w.f1}=2", "d3", "d4"]), (missed, got)
    assert len(got) == len(set(got))
    # Per stream, the order of the stream.
    assert [m for m in got if m.startswith("d")] == [
        *(m for m in missed if m.startswith("d")),
        "d3",
        "d4",
    ]
    assert [m for m in got if m.startswith("r")] == [
        *(m for m in missed if m.startswith("r")),
        "r2",
    ]
    # Resuming from the open event of a stream misses nothing published after it opened.
    third = await listen(api, w.fiona, last_event_id=first.events[0].id)
    await third.wait_for("d4")
    # (The accounts bucket keeps the latest state per account: the first is superseded.)
    assert sorted(third.markers()) == sorted(["d1", "r1", "d2", "r2", f"{w.f1}=2", "d3", "d4"])
    await second.close()
    await third.close()


async def test_a_malformed_last_event_id_is_a_bad_request(api: Api) -> None:
    w = await build(api)
    for bad in (
        "nonsense",
        "d:1.r:2",
        "d:1.r:2.a:x",
        "d:-1.r:0.a:0",
        "a:1.r:2.d:3",
        "d:1.r:2.a:3.z:4",
        "d:99999999999999999999.r:0.a:0",
        "d:1\u00a0.r:2.a:3",
        "",
    ):
        status, body = await api.call(
            "GET", "/v1/stream", w.fiona,
            headers={"Last-Event-ID": bad.encode().decode("latin-1")},
        )  # fmt: skip
        assert status == 400, (bad, body)
        assert body["type"].endswith("/bad-request") and "Last-Event-ID" in body["detail"]


async def test_an_operator_may_not_stream(api: Api) -> None:
    operator = await api.as_operator()
    status, body = await api.call("GET", "/v1/stream", operator)
    assert status == 403, body


async def test_a_user_holds_a_bounded_number_of_streams(
    database_url: str, nc: Any, js: Any
) -> None:
    await ensure_streams(js)
    async with running_api(database_url, nc, js) as base:
        w = await build(base)
        client, pool = await serve(database_url, nc, api_config(sse_streams_per_caller=2))
        api = Api(client=client, pool=pool, database_url=database_url, js=js)
        try:
            streams = [await listen(api, w.fiona), await listen(api, w.fiona)]
            status, body = await api.call("GET", "/v1/stream", w.fiona)
            assert status == 429 and body["type"].endswith("/too-many-streams"), body
            other = await listen(api, w.felix)  # another user is not counted against her
            await streams[0].close()
            await wait_until(lambda: len(client.app[STREAMS_KEY].streams) == 2, "a slot freed")
            streams.append(await listen(api, w.fiona))
            for listener in (*streams, other):
                await listener.close()
        finally:
            await client.close()
            await pool.close()


def _stalled_stream(api: Api, who: Person) -> socket.socket:
    """A raw client that asks for the stream and then never reads (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert api.client.port is not None
    sock.connect(("127.0.0.1", api.client.port))
    auth = "".join(f"{k}: {v}\r\n" for k, v in who.headers.items())
    sock.sendall(f"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n".encode())
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Read what the server sent until it closes; False if it keeps the connection open."""
    sock.settimeout(5)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_a_client_that_stops_reading_is_dropped_and_nobody_else_waits(
    database_url: str, nc: Any, js: Any
) -> None:
    await ensure_streams(js)
    async with running_api(database_url, nc, js) as base:
        w = await build(base)
        config = api_config(sse_queue_max=50, sse_write_timeout_s=0.5)
        client, pool = await serve(database_url, nc, config)
        api = Api(client=client, pool=pool, database_url=database_url, js=js)
        registry = client.app[STREAMS_KEY]
        try:
            dropped_before = sum(
                metrics.STREAMS_DROPPED.labels(r)._value.get()
                for r in ("queue_full", "write_timeout")
            )
            sock = _stalled_stream(api, w.fiona)
            await wait_until(lambda: len(registry.streams) == 1, "the stalled stream to open")
            reader = await listen(api, w.fiona)
            count = 400
            for i in range(count):  # about 6 MB: more than any socket buffer holds
                await publish_decision(api.js, w.f1, f"big-{i}", size=16_000)
            await reader.wait_for(f"big-{count - 1}")
            await wait_until(lambda: len(registry.streams) == 1, "the stalled client dropped")
            dropped = sum(
                metrics.STREAMS_DROPPED.labels(r)._value.get()
                for r in ("queue_full", "write_timeout")
            )
            assert dropped == dropped_before + 1
            assert await asyncio.to_thread(_closed_by_server, sock), "the connection stays open"
            # The reader got every event, in order, and the service answers as usual.
            assert reader.markers() == [f"big-{i}" for i in range(count)]
            started = time.perf_counter()
            status, _ = await api.call("GET", "/v1/me", w.fiona)
            assert status == 200 and time.perf_counter() - started < 1.0
            await publish_decision(api.js, w.f1, "after")
            sent = time.perf_counter()
            await reader.wait_for("after")
            assert reader.arrived[-1] - sent < 1.0
            # The dropped stream's consumers are gone from the server.
            await reader.close()
            sock.close()

            async def no_consumers() -> bool:
                infos = [await js.stream_info(s) for s in ("TC_DECISIONS", "TC_EXECUTION_REPORTS",
                                                            "KV_tc_accounts")]  # fmt: skip
                return sum(i.state.consumer_count for i in infos) == 0

            await wait_until(lambda: len(registry.streams) == 0, "every stream closed")
            await wait_until(no_consumers, "the consumers removed")
        finally:
            await client.close()
            await pool.close()


async def test_the_stream_ends_cleanly_when_the_server_shuts_down(
    database_url: str, nc: Any, js: Any
) -> None:
    await ensure_streams(js)
    async with running_api(database_url, nc, js) as base:
        w = await build(base)
        client, pool = await serve(database_url, nc)
        api = Api(client=client, pool=pool, database_url=database_url, js=js)
        try:
            response = await api.client.get("/v1/stream", headers=w.fiona.headers)
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"event: open")
            started = time.perf_counter()
            await client.server.close()  # on_shutdown ends every stream
            rest = await asyncio.wait_for(response.content.read(), 10)
            assert time.perf_counter() - started < 6.0
            assert rest.rstrip().endswith(b": closing"), rest
            assert len(client.app[STREAMS_KEY].streams) == 0
        finally:
            await client.close()
            await pool.close()


async def test_the_benchmark_helper_measures_publish_to_receive(api: Api) -> None:
    w = await build(api)
    async with aiohttp.ClientSession() as session:
        latencies = await decision_latencies(
            session, str(api.client.make_url("/v1/stream")), w.fiona.headers, api.js, w.f1,
            "lnk-bench", samples=50,
        )  # fmt: skip
    assert len(latencies) == 50 and all(0 < s < 1.0 for s in latencies), latencies
    print(f"publish -> event: decision, p50 {sorted(latencies)[25] * 1000:.2f} ms")
