"""Live updates: the caller's decisions, reports, positions and account states over SSE.

``GET /v1/stream`` (``text/event-stream``; providers and followers, by token or API key)
sends, for exactly the accounts the caller may see (a provider: its tenant's; a follower: its
own), every copy decision (``TC_DECISIONS``), execution report (``TC_EXECUTION_REPORTS``) and
account state (``KV_tc_accounts``: balance, equity, open positions) published after the stream
opened, each as ``event: decision|report|account_state`` and ``data:`` the message as JSON.

Each stream reads JetStream with one ordered consumer (ephemeral, no acks, memory) per stream,
filtered to the caller's account subjects. The first event is ``event: open`` (``data``: the
accounts followed); it is sent once every consumer is in place, so whatever is published after
it reaches the client. Every event's ``id`` is the last sequence of each stream the client has
been sent (``d:<decisions>.r:<reports>.a:<account states>``): a client that reconnects with
``Last-Event-ID`` (browsers' ``EventSource`` does so by itself) continues every stream exactly
after what it saw — nothing missed, nothing twice, as long as the streams still hold it
(account states: the accounts bucket keeps the latest per account, so a resumed stream gets
each account's current state rather than every one it missed). A malformed ``Last-Event-ID``
answers 400.

The accounts are read once, when the stream opens: an account created (or given to the
follower) later is followed after a reconnect. A comment line every ``sse_keepalive_s``
(15 s) keeps proxies from closing an idle stream.

Backpressure: each stream holds at most ``sse_queue_max`` unsent events and waits at most
``sse_write_timeout_s`` for a write; a client that falls further behind is dropped
(``tradecopy_api_streams_dropped_total{reason}``, log ``api_stream_dropped``) and its
consumers are removed, so no client can stall NATS, the service or another client; it may
reconnect with its last event id. One user holds at most ``sse_streams_per_caller`` streams
(429 beyond). On shutdown every stream ends cleanly (``: closing``, then the end of the body).

Latency measurement (``tradecopy bench api``): ``decision_latencies`` opens ``/v1/stream`` as a
follower (``X-API-Key`` or ``Authorization`` header), publishes ``CopyDecision`` messages on
``schemas.subjects.decisions(follower, link_id)`` through JetStream and times each until its
``event: decision`` arrives; ``read_events`` parses any SSE body for other uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from aiohttp import web
from nats.js.api import ConsumerConfig, DeliverPolicy

from engine.api import metrics
from engine.api.errors import ApiError, BadRequest, Unavailable
from engine.api.handling import SECURITY_HEADERS, TENANT_USERS, Context, Route
from engine.api.store import Scope
from schemas import codec, subjects
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.streams import DECISIONS_STREAM, EXECUTION_REPORTS_STREAM

log = structlog.get_logger("tradecopy.api.stream")

ACCOUNTS_STREAM = f"KV_{subjects.KV_ACCOUNTS}"
#: How long the server keeps a stream's consumer after its client is gone.
_CONSUMER_INACTIVE_S = 2.0
#: ``Last-Event-ID`` as this API writes it; sequences are uint64 in JetStream.
_EVENT_ID = re.compile(r"^d:([0-9]{1,20})\.r:([0-9]{1,20})\.a:([0-9]{1,20})\Z")
_MAX_SEQ = 2**64 - 1


class TooManyStreams(ApiError):
    status, slug, title = 429, "too-many-streams", "Too many open streams"


class StreamOpened(msgspec.Struct, frozen=True, kw_only=True):
    """The first event of a live stream: what it follows."""

    accounts: list[str]
    """Every account whose account states the stream carries."""
    followers: list[str]
    """The follower accounts whose decisions and reports it carries."""


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One server-sent event as the OpenAPI document describes the stream: ``event:`` is
    ``open``, ``decision``, ``report`` or ``account_state``; ``id:`` resumes every stream;
    ``data:`` is the JSON of a ``StreamOpened``, ``CopyDecision``, ``ExecutionReport`` or
    ``AccountState``."""

    event: str
    id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Source:
    key: str
    """The letter of this stream in an event id."""
    stream: str
    event: str
    decoder: Any
    subject_of: Callable[[str], str]
    followers_only: bool
    account_token: int
    """Which token of a message's subject names its account (checked on every message)."""


_SOURCES = (
    _Source("d", DECISIONS_STREAM, "decision", codec.decision_decoder,
            lambda a: subjects.decisions(a, "*"), True, 3),
    _Source("r", EXECUTION_REPORTS_STREAM, "report", codec.execution_report_decoder,
            subjects.execution_reports, True, 3),
    _Source("a", ACCOUNTS_STREAM, "account_state", codec.account_state_decoder,
            lambda a: f"$KV.{subjects.KV_ACCOUNTS}.{a}", False, 2),
)  # fmt: skip


def encode_position(position: dict[str, int]) -> str:
    return ".".join(f"{s.key}:{position[s.key]}" for s in _SOURCES)


def parse_position(text: str) -> dict[str, int]:
    """A ``Last-Event-ID`` as stream sequences; 400 for anything this API did not write."""
    found = _EVENT_ID.match(text.strip())
    if found is None or any(int(g) > _MAX_SEQ for g in found.groups()):
        raise BadRequest(
            "Last-Event-ID must be an event id of this stream (d:<seq>.r:<seq>.a:<seq>)"
        )
    return {s.key: int(g) for s, g in zip(_SOURCES, found.groups(), strict=True)}


# ---------------------------------------------------------------------- open streams


class _Wake:
    """Queued after the events to wake a waiting writer (shutdown)."""


_WAKE = _Wake()


@dataclass(eq=False)
class _LiveStream:
    caller: str
    queue_max: int
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    dropped: str = ""
    """Why the server ends this stream ("": it does not)."""
    closing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, item: Any) -> None:
        """From a NATS callback: never blocks, never grows past ``queue_max``."""
        if self.dropped or self.closing:
            return
        if self.queue.qsize() >= self.queue_max:
            self.dropped = "queue_full"
            self.queue.put_nowait(_WAKE)
            return
        self.queue.put_nowait(item)

    def close(self) -> None:
        self.closing = True
        self.queue.put_nowait(_WAKE)


class OpenStreams:
    """Every live stream of one app: the per-caller limit, the gauge, and shutdown."""

    def __init__(self) -> None:
        self.streams: set[_LiveStream] = set()

    def count(self, caller: str) -> int:
        return sum(1 for s in self.streams if s.caller == caller)

    def add(self, stream: _LiveStream, limit: int) -> None:
        if self.count(stream.caller) >= limit:
            raise TooManyStreams(f"at most {limit} live streams per user; close one first")
        self.streams.add(stream)
        metrics.STREAMS_OPEN.inc()

    def remove(self, stream: _LiveStream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            metrics.STREAMS_OPEN.dec()
        stream.done.set()

    async def close_all(self, app: web.Application | None = None, timeout: float = 5.0) -> None:
        """End every stream (``app.on_shutdown``): each says so and ends its body."""
        streams = list(self.streams)
        for stream in streams:
            stream.close()
        if streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in streams)), timeout)


STREAMS_KEY: web.AppKey[OpenStreams] = web.AppKey("tradecopy_api_streams", OpenStreams)


# --------------------------------------------------------------------------- handler


async def _positions_now(js: Any) -> dict[str, int]:
    position = {}
    for source in _SOURCES:
        try:
            info = await js.stream_info(source.stream)
        except nats.js.errors.NotFoundError:
            raise Unavailable(f"the stream {source.stream} does not exist yet") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"NATS: {exc}") from None
        position[source.key] = int(info.state.last_seq)
    return position


async def _subscribe(
    js: Any, source: _Source, accounts: list[str], start: int, live: _LiveStream
) -> Any:
    allowed = frozenset(accounts)
    filters = [source.subject_of(a) for a in accounts]

    async def arrived(msg: Any) -> None:
        # Second check behind the filter: a message of another account never goes out.
        tokens = msg.subject.split(".")
        account = tokens[source.account_token] if len(tokens) > source.account_token else ""
        live.offer((source, msg.metadata.sequence.stream, msg.data, account in allowed))

    config = ConsumerConfig(
        filter_subjects=filters,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        inactive_threshold=_CONSUMER_INACTIVE_S,
    )
    return await js.subscribe(
        filters[0], stream=source.stream, cb=arrived, ordered_consumer=True, config=config
    )


def _frame(event: str, event_id: str, data: bytes) -> bytes:
    return b"event: %s\nid: %s\ndata: %s\n\n" % (event.encode(), event_id.encode(), data)


async def open_stream(ctx: Context) -> tuple[int, Any]:
    """The caller's decisions, reports and account states, live (server-sent events)."""
    caller, state, request = ctx.who, ctx.state, ctx.request
    config = state.config
    last_id = request.headers.get("Last-Event-ID")
    resume = None if last_id is None else parse_position(last_id)
    if state.js is None or state.nc is None or not state.nc.is_connected:
        raise Unavailable("NATS is not reachable")
    async with state.store.tx(Scope.of(caller)) as conn:
        rows = await state.store.stream_accounts(conn, Scope.of(caller))
    accounts = sorted(r["account_id"] for r in rows)
    followers = sorted(r["account_id"] for r in rows if r["role"] == "follower")
    registry: OpenStreams = request.app[STREAMS_KEY]
    live = _LiveStream(caller=str(caller.user_id), queue_max=config.sse_queue_max)
    registry.add(live, config.sse_streams_per_caller)
    subscriptions: list[Any] = []
    try:
        position = resume if resume is not None else await _positions_now(state.js)
        for source in _SOURCES:
            mine = followers if source.followers_only else accounts
            if not mine:  # no filter at all would mean every account's messages
                continue
            start = min(position[source.key] + 1, _MAX_SEQ)
            try:
                subscriptions.append(await _subscribe(state.js, source, mine, start, live))
            except (nats.errors.Error, TimeoutError) as exc:
                raise Unavailable(f"NATS: {exc}") from None
        response = _event_stream_response(request, state)
        await response.prepare(request)
        opened = msgspec.json.encode(StreamOpened(accounts=accounts, followers=followers))
        await _write(response, _frame("open", encode_position(position), opened), config)
        reason = await _pump(response, live, position, config)
        if reason:
            live.dropped = reason
        if live.dropped:
            metrics.STREAMS_DROPPED.labels(live.dropped).inc()
            log.warning("api_stream_dropped", user_id=live.caller, reason=live.dropped,
                        queued=live.queue.qsize(), position=encode_position(position))  # fmt: skip
            if request.transport is not None:
                # Its socket is full: a graceful end would wait on it as the events did.
                request.transport.abort()
        elif live.closing:
            with contextlib.suppress(ConnectionError, TimeoutError, RuntimeError):
                await _write(response, b": closing\n\n", config)
                await asyncio.wait_for(response.write_eof(), config.sse_write_timeout_s)
        return 200, response
    finally:
        for sub in subscriptions:
            with contextlib.suppress(Exception):  # the connection may be gone: cleanup only
                await sub.unsubscribe()
        registry.remove(live)


def _event_stream_response(request: web.Request, state: Any) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.content_type = "text/event-stream"
    response.headers.update(SECURITY_HEADERS)
    response.headers["X-Accel-Buffering"] = "no"  # proxies must not hold events back
    origin = request.headers.get("Origin")
    if origin is not None and origin in state.cors_origins:
        # The middleware adds these after the handler: too late for a body already sent.
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response


async def _write(response: web.StreamResponse, data: bytes, config: Any) -> None:
    await asyncio.wait_for(response.write(data), config.sse_write_timeout_s)


async def _pump(
    response: web.StreamResponse, live: _LiveStream, position: dict[str, int], config: Any
) -> str:
    """Write queued events until the client goes, is dropped, or the server closes; the
    reason the server dropped it ("" otherwise)."""
    queue = live.queue
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), config.sse_keepalive_s)
        except TimeoutError:
            item = None
        if live.dropped or live.closing:
            return ""
        try:
            if item is None:
                await _write(response, b": keep-alive\n\n", config)
                continue
            if item is _WAKE:
                continue
            source, seq, data, allowed = item
            if seq <= position[source.key]:
                continue  # an ordered consumer's reset may deliver again what was sent
            position[source.key] = seq
            if not allowed or not data:  # another account's, or a KV delete marker
                continue
            try:
                message = source.decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.warning("api_stream_undecodable", stream=source.stream, seq=seq,
                            error=str(exc))  # fmt: skip
                continue
            frame = _frame(source.event, encode_position(position), msgspec.json.encode(message))
            await _write(response, frame, config)
            metrics.STREAM_EVENTS.labels(source.event).inc()
        except TimeoutError:
            return "write_timeout"
        except (ConnectionError, RuntimeError):
            return ""  # the client went away (RuntimeError: aiohttp's closed transport)


ROUTES = [
    Route("GET", "/v1/stream", open_stream, "Live decisions, reports and account states (SSE)",
          "stream", roles=TENANT_USERS, response=StreamEvent, errors=(400, 429, 503),
          media_type="text/event-stream"),
]  # fmt: skip


# ------------------------------------------------------------ clients and benchmarks


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    id: str
    data: str


async def read_events(lines: AsyncIterator[bytes]) -> AsyncIterator[SseEvent]:
    """Parse an SSE body (e.g. ``response.content`` of aiohttp) into events; comments and
    ``retry:`` lines are skipped."""
    event, event_id, data = "message", "", []
    async for raw in lines:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(event, event_id, "\n".join(data))
            event, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "id":
            event_id = value
        elif name == "data":
            data.append(value)


async def decision_latencies(
    session: Any,
    url: str,
    headers: dict[str, str],
    js: Any,
    follower: str,
    link_id: str,
    samples: int,
) -> list[float]:
    """Seconds from publishing a decision for ``follower`` (JetStream, acknowledged) to its
    ``event: decision`` on ``url`` (the API's ``/v1/stream``), one decision at a time.

    ``session`` is an ``aiohttp.ClientSession``; ``headers`` authenticate as a caller who may
    see ``follower`` (its follower, or its provider)."""
    out: list[float] = []
    async with session.get(url, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {await response.text()}")
        events = read_events(response.content)
        first = await anext(events)
        if first.event != "open":
            raise RuntimeError(f"the stream opened with {first.event!r}, not 'open'")
        for i in range(samples):
            decision = CopyDecision(
                decision_id=f"bench-{time.time_ns()}-{i}", link_id=link_id, master="bench",
                follower=follower, outcome=DecisionOutcome.SKIPPED,
                rule=DecisionRule.LINK_DISABLED, message="latency probe", ts_ns=time.time_ns(),
            )  # fmt: skip
            started = time.perf_counter()
            await js.publish(subjects.decisions(follower, link_id), codec.encode(decision))
            async for event in events:
                if event.event == "decision" and decision.decision_id in event.data:
                    out.append(time.perf_counter() - started)
                    break
    return out
