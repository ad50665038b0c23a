"""The bridge connector against paper terminals on real ZeroMQ sockets and a real NATS."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from connectors.bridge.config import BridgeConfig, BridgeTerminalConfig
from connectors.bridge.connector import BridgeConnector
from connectors.bridge.paper_terminal import BridgeDenied, PaperBridgeTerminal
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from connectors.reports import EXPIRED_REASON, RETCODE_EXPIRED
from engine.core.comments import copy_comment
from engine.replicator.config import ReplicatorConfig
from engine.replicator.service import Replicator
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.common import Side
from schemas.links import CopyLink
from schemas.master import PositionOpened
from schemas.orders import FollowerClose, FollowerOpen
from schemas.reports import ExecutionReport, OrderFilled, OrderRejected, OrderUnknown
from schemas.streams import EXECUTION_REPORTS_STREAM, MASTER_EVENTS_STREAM

TOKEN_M = "master-token-0123456789"
TOKEN_F = "follower-token-0123456789"
QUOTES = [q for bar in load_bars()[:60] for q in bar_to_ticks(bar, "XAUUSD")]


def quote(i: int) -> Quote:
    return msgspec.structs.replace(QUOTES[i % len(QUOTES)], ts_ns=time.time_ns())


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Rig:
    nc: Any
    js: Any
    root: Path
    masters: BridgeConnector | None = None
    followers: BridgeConnector | None = None
    term_m: PaperBridgeTerminal | None = None
    term_f: PaperBridgeTerminal | None = None
    venue_m: PaperVenue = field(default_factory=PaperVenue)
    venue_f: PaperVenue = field(default_factory=PaperVenue)
    reports: list[ExecutionReport] = field(default_factory=list)
    master_port: int = 0
    follower_port: int = 0

    def bridge(self, role: str, port: int) -> BridgeConnector:
        account, token = ("bm", TOKEN_M) if role == "master" else ("bf", TOKEN_F)
        config = BridgeConfig(
            connector_id=f"bridge-{role}",
            endpoint=f"tcp://127.0.0.1:{port}",
            terminals=[BridgeTerminalConfig(account=account, token=token, role=role)],
            command_timeout_s=1.0,
            heartbeat_ms=200,
        )
        return BridgeConnector(config, self.root / f"{role}.state")

    def filled(self) -> Counter[str]:
        return Counter(r.order_id for r in self.reports if isinstance(r, OrderFilled))

    async def feed(self, i: int) -> None:
        q = quote(i)
        assert self.term_m is not None and self.term_f is not None
        await self.term_m.on_quote(q)
        await self.term_f.on_quote(q)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def rig(nats_server: Any, nc: Any, js: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    await ensure_streams(js, 4)
    buckets = await ensure_buckets(js)
    link = CopyLink(link_id="bl", master="bm", follower="bf")
    await buckets[subjects.KV_LINKS].put(link.link_id, codec.encode(link))
    replicator = Replicator(ReplicatorConfig(nats_url=nats_server.url, metrics_port=None,
                                             partitions=4, ack_wait_s=2.0))  # fmt: skip
    await replicator.start()
    r = Rig(nc=nc, js=js, root=tmp_path, master_port=free_port(), follower_port=free_port())
    r.venue_m.open_account("bm", "USD", 100_000.0)
    r.venue_f.open_account("bf", "USD", 100_000.0)
    q = quote(0)
    r.venue_m.on_quote(q)
    r.venue_f.on_quote(q)

    async def on_report(msg: Any) -> None:
        r.reports.append(codec.execution_report_decoder.decode(msg.data))

    await js.subscribe(subjects.EXECUTION_REPORTS, stream=EXECUTION_REPORTS_STREAM,
                       cb=on_report, ordered_consumer=True)  # fmt: skip
    r.masters = r.bridge("master", r.master_port)
    r.followers = r.bridge("follower", r.follower_port)
    await r.masters.start(nc)
    await r.followers.start(nc)
    r.term_m = PaperBridgeTerminal(r.masters.endpoint, "bm", TOKEN_M, r.venue_m, heartbeat_ms=200)
    r.term_f = PaperBridgeTerminal(r.followers.endpoint, "bf", TOKEN_F, r.venue_f, heartbeat_ms=200)
    await r.term_m.start()
    await r.term_f.start()
    await until(lambda: r.followers is not None and r.followers.sessions["bf"].ready.is_set(),
                "the follower's snapshot")  # fmt: skip
    try:
        yield r
    finally:
        for part in (r.term_m, r.term_f, r.masters, r.followers):
            if part is not None:
                await part.stop()
        await replicator.stop()


async def test_a_master_trade_on_one_terminal_fills_on_the_follower_terminal(rig: Rig) -> None:
    assert rig.term_m is not None
    opened = await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.2))
    await until(lambda: len(rig.filled()) == 1, "the follower's fill")
    [copy] = rig.venue_f.positions("bf")
    assert (copy.side, copy.volume) == (Side.BUY, 0.2)
    report = next(r for r in rig.reports if isinstance(r, OrderFilled))
    t = report.trace
    assert 0 < t.terminal_ns <= t.connector_ns <= t.replicator_in_ns <= t.follower_connector_ns
    await rig.term_m.trade(lambda v: v.close_position("bm", opened.position_id))
    await until(lambda: not rig.venue_f.positions("bf"), "the follower's close")


async def test_wrong_token_is_denied_and_the_connector_keeps_serving(rig: Rig) -> None:
    assert rig.masters is not None and rig.term_m is not None
    before = REGISTRY.get_sample_value("tradecopy_bridge_bad_frames_total", {"reason": "denied"})
    intruder = PaperBridgeTerminal(rig.masters.endpoint, "bm", "not-the-token-at-all",
                                   PaperVenue(), handshake_timeout_s=3.0)  # fmt: skip
    with pytest.raises(BridgeDenied):
        await intruder.start()
    await intruder.stop()
    after = REGISTRY.get_sample_value("tradecopy_bridge_bad_frames_total", {"reason": "denied"})
    assert (after or 0) - (before or 0) >= 1
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.SELL, 0.1))
    await until(lambda: len(rig.filled()) == 1, "a copy after the intruder")


async def test_malformed_frames_never_stop_the_connector(rig: Rig) -> None:
    assert rig.masters is not None and rig.term_m is not None
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"garbage-sender")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rig.masters.endpoint)
    for payload in (b"\xff\xfe not json", b'{"t":"event","seq":"x"}', b'{"t":"nope","seq":1}',
                    b"[]", b'{"t":"hello","seq":1}'):  # fmt: skip
        await sock.send(payload)
    await sock.send_multipart([b"", b"two frames"])
    await asyncio.sleep(0.3)
    sock.close(0)
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.1))
    await until(lambda: len(rig.filled()) == 1, "a copy after the garbage")


async def test_a_lost_master_event_is_recovered_from_a_snapshot(rig: Rig) -> None:
    """The terminal loses an event frame: the connector sees the gap, asks for a snapshot,
    and the snapshot's difference becomes the missed master event."""
    assert rig.masters is not None and rig.term_m is not None
    await rig.term_m.stop()
    lossy = PaperBridgeTerminal(rig.masters.endpoint, "bm", TOKEN_M, rig.venue_m,
                                heartbeat_ms=200, drop_events={3})  # fmt: skip
    await lossy.start()  # hello=1, snapshot=2: the next event frame (seq 3) is lost
    rig.term_m = lossy
    await lossy.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.1))
    await asyncio.sleep(0.1)
    await lossy.trade(lambda v: v.market_order("bm", "XAUUSD", Side.SELL, 0.1))
    await until(lambda: len(rig.venue_f.positions("bf")) == 2, "both copies", timeout=20)
    sides = sorted(p.side.value for p in rig.venue_f.positions("bf"))
    assert sides == ["buy", "sell"]


async def test_killing_the_follower_bridge_mid_burst_loses_and_repeats_nothing(rig: Rig) -> None:
    assert rig.term_m is not None and rig.followers is not None
    opens = []
    for i in range(12):
        await rig.feed(i)
        volume = round(0.01 * (i + 1), 2)
        opens.append(await rig.term_m.trade(
            lambda v, volume=volume: v.market_order("bm", "XAUUSD", Side.BUY, volume)))  # fmt: skip
        if i == 4:
            await rig.followers.stop()  # mid-burst: orders keep arriving in JetStream
    rig.followers = rig.bridge("follower", rig.follower_port)
    await rig.followers.start(rig.nc)
    await until(lambda: len(rig.venue_f.positions("bf")) == 12, "every copy", timeout=30)
    for i, opened in enumerate(opens):
        if i % 3 == 0:
            await rig.term_m.trade(lambda v, p=opened.position_id: v.close_position("bm", p))
    await until(lambda: len(rig.venue_f.positions("bf")) == 8, "the closes", timeout=30)
    fills = rig.filled()
    assert all(n == 1 for n in fills.values()), fills
    volumes = sorted(round(p.volume, 2) for p in rig.venue_f.positions("bf"))
    assert volumes == sorted(round(0.01 * (i + 1), 2) for i in range(12) if i % 3)


async def test_master_trades_while_its_bridge_is_down_are_recovered(rig: Rig) -> None:
    assert rig.term_m is not None and rig.masters is not None
    await rig.masters.stop()
    # The terminal trades on; its frames find no connector (the DEALER queues them).
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.3))
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.SELL, 0.2))
    rig.masters = rig.bridge("master", rig.master_port)
    await rig.masters.start(rig.nc)
    await until(lambda: len(rig.venue_f.positions("bf")) == 2, "both copies", timeout=30)
    info = await rig.js.stream_info(MASTER_EVENTS_STREAM)
    opened = 0
    sub = await rig.js.pull_subscribe(">", stream=MASTER_EVENTS_STREAM)
    for msg in await sub.fetch(info.state.messages, timeout=5):
        opened += isinstance(codec.master_event_decoder.decode(msg.data), PositionOpened)
    assert opened == 2  # each trade copied once, whichever way it arrived


async def test_an_unknown_outcome_is_settled_without_trading_twice(rig: Rig) -> None:
    """The follower's terminal executes but its answer is lost: the report says unknown,
    never rejected; asking again with the same corr settles it from the terminal's memory."""
    assert rig.term_m is not None and rig.term_f is not None and rig.followers is not None
    # The order id of the copy of the master's next event: <account>:<session>:<seq>:<link>.
    corr = f"bm:{rig.term_m.session}:{rig.term_m._seq + 1}:bl"
    await rig.term_f.stop()
    forgetful = PaperBridgeTerminal(rig.followers.endpoint, "bf", TOKEN_F, rig.venue_f,
                                    heartbeat_ms=200, drop_results={corr})  # fmt: skip
    await forgetful.start()
    rig.term_f = forgetful
    await until(lambda: rig.followers is not None and rig.followers.sessions["bf"].ready.is_set(),
                "the follower's new snapshot")  # fmt: skip
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.4))
    await until(lambda: any(r.order_id == corr for r in rig.reports), "the first report")
    first = next(r for r in rig.reports if r.order_id == corr)
    assert isinstance(first, OrderUnknown), first
    await until(lambda: rig.filled()[corr] == 1, "the settled report", timeout=20)
    assert len(rig.venue_f.positions("bf")) == 1  # executed once, reported twice
    await asyncio.sleep(0.6)  # further settle rounds must not trade again
    assert len(rig.venue_f.positions("bf")) == 1
    assert rig.filled()[corr] == 1


async def test_long_ids_keep_their_copies_apart_through_a_lost_state_file(rig: Rig) -> None:
    """Two master refs share their first 31 characters and the master id is 64 long: each
    copy gets its own comment, and after the state file is lost the copies are rebuilt from
    the terminal's comments through the same codec, so a close hits exactly its own copy."""
    assert rig.followers is not None and rig.term_f is not None
    master = "m" * 64
    first, second = "4" * 31 + "1", "4" * 31 + "2"
    sent = 0

    async def send(order: Any) -> None:
        nonlocal sent
        await rig.js.publish(subjects.follower_orders("bf"), codec.encode(order),
                             headers={"Nats-Msg-Id": order.order_id})  # fmt: skip
        sent += 1
        await until(lambda: len({r.order_id for r in rig.reports}) >= sent, order.order_id)

    common = {"link_id": "long", "follower": "bf", "master": master, "symbol": "XAUUSD",
              "ts_ns": time.time_ns()}  # fmt: skip
    for ref, side, volume in ((first, Side.BUY, 0.1), (second, Side.SELL, 0.2)):
        await send(FollowerOpen(**common, order_id=f"open-{ref}", master_event_id=f"e-{ref}",
                                master_position_id=ref, side=side, volume=volume))  # fmt: skip
    assert len(rig.venue_f.positions("bf")) == 2
    comments = {p.comment for p in rig.venue_f.positions("bf")}
    assert comments == {copy_comment(master, first), copy_comment(master, second)}

    await rig.followers.stop()
    (rig.root / "follower.state").unlink()
    rig.followers = rig.bridge("follower", rig.follower_port)
    await rig.followers.start(rig.nc)
    await until(lambda: rig.followers is not None and rig.followers.sessions["bf"].ready.is_set(),
                "the snapshot after the restart", timeout=20)  # fmt: skip

    # A redelivered open of the second trade is recognised, not traded again.
    await send(FollowerOpen(**common, order_id=f"again-{second}", master_event_id="e-again",
                            master_position_id=second, side=Side.SELL, volume=0.2))  # fmt: skip
    assert len(rig.venue_f.positions("bf")) == 2
    await send(FollowerClose(**common, order_id=f"close-{first}", master_event_id="e-close",
                             master_position_id=first))  # fmt: skip
    [left] = rig.venue_f.positions("bf")
    assert (left.side, left.volume, left.comment) == (Side.SELL, 0.2, copy_comment(master, second))


async def test_an_expired_open_never_trades_but_a_copy_made_before_is_reported(rig: Rig) -> None:
    """Past its signal age an open is rejected without a command to the terminal, unless its
    copy exists already (it ran before: a redelivery, a lost state file): then that copy."""
    common = {"link_id": "age", "follower": "bf", "master": "mx", "symbol": "XAUUSD",
              "ts_ns": time.time_ns(), "side": Side.BUY, "volume": 0.1}  # fmt: skip

    async def report(order: FollowerOpen) -> ExecutionReport:
        await rig.js.publish(subjects.follower_orders("bf"), codec.encode(order),
                             headers={"Nats-Msg-Id": order.order_id})  # fmt: skip
        await until(lambda: any(r.order_id == order.order_id for r in rig.reports), order.order_id)
        return next(r for r in rig.reports if r.order_id == order.order_id)

    copied = await report(FollowerOpen(**common, order_id="age-1", master_event_id="e-1",
        master_position_id="1", expires_ns=time.time_ns() + 60_000_000_000))  # fmt: skip
    assert isinstance(copied, OrderFilled), copied
    expired = time.time_ns() - 1
    again = await report(FollowerOpen(**common, order_id="age-1-again", master_event_id="e-1b",
                                      master_position_id="1", expires_ns=expired))  # fmt: skip
    assert isinstance(again, OrderFilled), again
    assert (again.position_id, again.volume, again.price) == (
        copied.position_id, copied.volume, copied.price,
    )  # fmt: skip
    stale = await report(FollowerOpen(**common, order_id="age-2", master_event_id="e-2",
                                      master_position_id="2", expires_ns=expired))  # fmt: skip
    assert isinstance(stale, OrderRejected), stale
    assert (stale.code, stale.reason) == (RETCODE_EXPIRED, EXPIRED_REASON)
    assert [p.position_id for p in rig.venue_f.positions("bf")] == [copied.position_id]
