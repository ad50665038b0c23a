"""The bridge connector against paper terminals on real ZeroMQ sockets and a real NATS.

The rig runs CURVE, as production does: each connector has its key pair (the secret from the
environment variable its config names), each terminal its own, listed in the config."""

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
import structlog
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from connectors.bridge.auth import LOG_BURST, LogLimiter
from connectors.bridge.config import (
    DEFAULT_SECRET_KEY_ENV,
    BridgeConfig,
    BridgeKeyError,
    BridgeTerminalConfig,
    server_secret_key,
)
from connectors.bridge.connector import BridgeConnector, BridgeState
from connectors.bridge.paper_terminal import BridgeDenied, PaperBridgeTerminal
from connectors.journal import MAGIC
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from connectors.reports import (
    EXPIRED_REASON,
    NO_SUCH_POSITION,
    RETCODE_EXPIRED,
    RETCODE_NO_SUCH_POSITION,
)
from engine.core.comments import copy_comment
from engine.replicator.config import ReplicatorConfig
from engine.replicator.service import Replicator
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.bridge import PROTOCOL_VERSION, EventKind, Hello, TradeEvent, frame_encoder
from schemas.common import Side
from schemas.links import CopyLink
from schemas.master import PositionOpened
from schemas.orders import (
    MANUAL_LINK_ID,
    FollowerClose,
    FollowerModify,
    FollowerOpen,
    manual_order_id,
)
from schemas.reports import ExecutionReport, OrderDone, OrderFilled, OrderRejected, OrderUnknown
from schemas.streams import (
    DUPLICATE_WINDOW_S,
    EXECUTION_REPORTS_STREAM,
    MASTER_EVENTS_STREAM,
    follower_orders_stream,
)

TOKEN_M = "master-token-0123456789"
TOKEN_F = "follower-token-0123456789"
TOKEN_M2 = "second-master-token-0123"
QUOTES = [q for bar in load_bars()[:60] for q in bar_to_ticks(bar, "XAUUSD")]


def quote(i: int) -> Quote:
    return msgspec.structs.replace(QUOTES[i % len(QUOTES)], ts_ns=time.time_ns())


@dataclass(frozen=True)
class KeyPair:
    public: str
    secret: str


def key_pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def bad_frames(reason: str) -> float:
    return REGISTRY.get_sample_value("tradecopy_bridge_bad_frames_total", {"reason": reason}) or 0


def frames_in(kind: str) -> float:
    labels = {"direction": "in", "type": kind}
    return REGISTRY.get_sample_value("tradecopy_bridge_frames_total", labels) or 0.0


class WallClock:
    """The connectors' wall clock, moved by a test to age their order memory."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns

    def advance(self, seconds: float) -> None:
        self.offset_ns += int(seconds * 1e9)


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
    env: pytest.MonkeyPatch
    plaintext: bool = False
    keys: dict[str, KeyPair] = field(
        default_factory=lambda: {name: key_pair() for name in ("master", "follower", "bm",
                                                               "bm2", "bf")})  # fmt: skip
    """The two connectors' key pairs (by role) and the terminals' (by account)."""
    masters: BridgeConnector | None = None
    followers: BridgeConnector | None = None
    term_m: PaperBridgeTerminal | None = None
    term_f: PaperBridgeTerminal | None = None
    venue_m: PaperVenue = field(default_factory=PaperVenue)
    venue_f: PaperVenue = field(default_factory=PaperVenue)
    reports: list[ExecutionReport] = field(default_factory=list)
    master_port: int = 0
    follower_port: int = 0
    clock: WallClock = field(default_factory=WallClock)

    def bridge(self, role: str, port: int, **overrides: Any) -> BridgeConnector:
        accounts = [("bm", TOKEN_M), ("bm2", TOKEN_M2)] if role == "master" else [("bf", TOKEN_F)]
        terminals = [BridgeTerminalConfig(account=account, token=token, role=role,
                                          curve_public_key=self.keys[account].public)
                     for account, token in accounts]  # fmt: skip
        variable = f"TC_TEST_BRIDGE_{role.upper()}_SECRET_KEY"
        self.env.setenv(variable, self.keys[role].secret)
        config = BridgeConfig(
            connector_id=f"bridge-{role}",
            endpoint=f"tcp://127.0.0.1:{port}",
            terminals=terminals,
            command_timeout_s=1.0,
            heartbeat_ms=200,
            plaintext=self.plaintext,
            secret_key_env=variable,
            **overrides,
        )
        return BridgeConnector(config, self.root / f"{role}.state", wall_clock=self.clock)

    def terminal(self, account: str, token: str | None = None, *, key: str | None = None,
                 **options: Any) -> PaperBridgeTerminal:  # fmt: skip
        """A paper terminal for ``account`` with the keys its EA would hold (``key``: the
        account whose key pair it uses instead of its own)."""
        master = account.startswith("bm")
        bridge = self.masters if master else self.followers
        assert bridge is not None
        venue = self.venue_m if master else self.venue_f
        tokens = {"bm": TOKEN_M, "bm2": TOKEN_M2, "bf": TOKEN_F}
        curve: dict[str, Any] = {"plaintext": True}
        if not self.plaintext:
            pair = self.keys[key or account]
            curve = {"server_key": self.keys["master" if master else "follower"].public,
                     "public_key": pair.public, "secret_key": pair.secret}  # fmt: skip
        options.setdefault("heartbeat_ms", 200)
        return PaperBridgeTerminal(bridge.endpoint, account, token or tokens[account], venue,
                                   **curve, **options)  # fmt: skip

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
async def rig(
    nats_server: Any,
    nc: Any,
    js: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Rig]:
    """CURVE unless a test asks for ``plaintext`` (``parametrize("rig", [...], indirect=True)``)."""
    await ensure_streams(js, 4)
    buckets = await ensure_buckets(js)
    link = CopyLink(link_id="bl", master="bm", follower="bf")
    await buckets[subjects.KV_LINKS].put(link.link_id, codec.encode(link))
    replicator = Replicator(ReplicatorConfig(nats_url=nats_server.url, metrics_port=None,
                                             partitions=4, ack_wait_s=2.0))  # fmt: skip
    await replicator.start()
    plaintext = getattr(request, "param", "curve") == "plaintext"
    r = Rig(nc=nc, js=js, root=tmp_path, env=monkeypatch, plaintext=plaintext,
            master_port=free_port(), follower_port=free_port())  # fmt: skip
    r.venue_m.open_account("bm", "USD", 100_000.0)
    r.venue_m.open_account("bm2", "USD", 100_000.0)
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
    r.term_m = r.terminal("bm")
    r.term_f = r.terminal("bf")
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


@pytest.mark.parametrize("rig", ["curve", "plaintext"], indirect=True)
async def test_a_master_trade_on_one_terminal_fills_on_the_follower_terminal(rig: Rig) -> None:
    assert rig.term_m is not None and rig.masters is not None
    assert (rig.masters.public_key is None) == rig.plaintext
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
    intruder = rig.terminal("bm", "not-the-token-at-all", handshake_timeout_s=3.0)
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


# ------------------------------------------------------------------ CURVE and refused peers


def raw_peer(endpoint: str, identity: bytes, curve: tuple[str, str, str] | None) -> Any:
    """A bare DEALER: ``curve`` = (server key, public key, secret key), None for plaintext."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        for option, key in zip((zmq.CURVE_SERVERKEY, zmq.CURVE_PUBLICKEY, zmq.CURVE_SECRETKEY),
                               curve, strict=True):  # fmt: skip
            sock.setsockopt(option, key.encode())
    sock.connect(endpoint)
    return sock


def listed_key(rig: Rig, account: str = "bm2") -> tuple[str, str, str] | None:
    """A terminal key the master connector lists (None on a plaintext rig)."""
    if rig.plaintext:
        return None
    return rig.keys["master"].public, rig.keys[account].public, rig.keys[account].secret


async def test_a_terminal_with_an_unlisted_key_is_refused_and_never_gets_a_session(
    rig: Rig,
) -> None:
    """The right account and token with a key no terminal of the connector has: the
    handshake fails at ZAP, so not even the hello reaches the protocol."""
    assert rig.masters is not None and rig.term_m is not None
    live = rig.masters.sessions["bm"].identity
    refused, hellos = bad_frames("unknown_key"), frames_in("Hello")
    rig.keys["stranger"] = key_pair()
    intruder = rig.terminal("bm", key="stranger", handshake_timeout_s=1.5)
    with pytest.raises(TimeoutError):
        await intruder.start()
    await intruder.stop()
    assert bad_frames("unknown_key") > refused
    assert frames_in("Hello") == hellos
    session = rig.masters.sessions["bm"]
    assert (session.identity, session.connected) == (live, True)
    assert list(rig.masters.by_identity) == [live]
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.1))
    await until(lambda: len(rig.filled()) == 1, "a copy after the refused key")


async def test_a_listed_key_claiming_another_account_is_denied(rig: Rig) -> None:
    """bm2's key with bm's account and bm's own token: only the key is wrong, and that is
    enough. The same key speaks for bm2."""
    assert rig.masters is not None and rig.term_m is not None
    live = rig.masters.sessions["bm"].identity
    mismatched = bad_frames("key_mismatch")
    impostor = rig.terminal("bm", key="bm2", handshake_timeout_s=3.0)
    with pytest.raises(BridgeDenied, match="not this account's"):
        await impostor.start()
    await impostor.stop()
    assert bad_frames("key_mismatch") == mismatched + 1
    assert rig.masters.sessions["bm"].identity == live
    assert not rig.masters.sessions["bm2"].connected
    own = rig.terminal("bm2")
    await own.start()
    assert rig.masters.sessions["bm2"].connected
    await own.stop()
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.SELL, 0.1))
    await until(lambda: len(rig.filled()) == 1, "a copy after the impostor")


async def test_a_listed_key_cannot_speak_in_another_accounts_session(rig: Rig) -> None:
    """bm's connection is gone but its session not yet timed out; a terminal with bm2's key
    presents bm's session identity: its frames are refused, nothing is copied."""
    assert rig.masters is not None and rig.term_m is not None
    session = rig.masters.sessions["bm"]
    identity, seq_in = session.identity, session.seq_in
    await rig.term_m.stop()
    mismatched = bad_frames("key_mismatch")
    sock = raw_peer(rig.masters.endpoint, identity, listed_key(rig, "bm2"))
    seq = seq_in
    try:
        # libzmq refuses the identity while bm's old connection is still being torn down.
        deadline = time.monotonic() + 10
        while bad_frames("key_mismatch") == mismatched and session.seq_in == seq_in:
            assert time.monotonic() < deadline, "the impostor's frames never arrived"
            seq += 1
            event = TradeEvent(seq=seq, kind=EventKind.OPENED, ticket=str(900 + seq),
                               symbol="XAUUSD", side=Side.BUY, volume=0.1, price=2.0)  # fmt: skip
            await sock.send(frame_encoder.encode(event))
            await asyncio.sleep(0.1)
    finally:
        sock.close(0)
    await asyncio.sleep(0.5)
    assert session.seq_in == seq_in, "a frame of the impostor was taken as bm's"
    assert rig.venue_f.positions("bf") == [] and rig.filled() == Counter()


async def test_a_plaintext_client_against_a_curve_connector_gets_nothing(rig: Rig) -> None:
    """No CURVE, or CURVE with another server key: the handshake fails, no frame is read
    and none is answered; each failure is counted."""
    assert rig.masters is not None
    failed, hellos = bad_frames("handshake_failed"), frames_in("Hello")
    hello = frame_encoder.encode(Hello(seq=1, version=PROTOCOL_VERSION, account="bm",
                                       token=TOKEN_M, platform="paper", session="s"))  # fmt: skip
    wrong_server = (rig.keys["follower"].public, rig.keys["bm"].public, rig.keys["bm"].secret)
    for curve in (None, wrong_server):
        sock = raw_peer(rig.masters.endpoint, b"bm.s.1", curve)
        try:
            await sock.send(hello)
            assert await sock.poll(800) == 0, "a refused client must hear nothing"
        finally:
            sock.close(0)
    await until(lambda: bad_frames("handshake_failed") >= failed + 2, "both handshakes counted")
    assert frames_in("Hello") == hellos
    clear = PaperBridgeTerminal(rig.masters.endpoint, "bm", TOKEN_M, rig.venue_m,
                                plaintext=True, handshake_timeout_s=1.0)  # fmt: skip
    with pytest.raises(TimeoutError):
        await clear.start()
    await clear.stop()
    assert rig.masters.sessions["bm"].connected


@pytest.mark.parametrize("rig", ["curve", "plaintext"], indirect=True)
async def test_a_flood_of_unauthenticated_100_kb_frames_is_counted_but_logged_briefly(
    rig: Rig,
) -> None:
    """200 frames of 100 KB from a peer that never said hello (CURVE: a listed key; plaintext:
    anyone): every one counted, a handful of short log lines and a summary of the rest."""
    assert rig.masters is not None
    sock = raw_peer(rig.masters.endpoint, b"flood", listed_key(rig))
    big = "x" * 100_000
    payloads = [
        b"\xff" * 100_000,  # not JSON
        f'{{"t":"event","seq":1,"kind":"{big}"}}'.encode(),  # msgspec quotes the bad value
        f'{{"t":"hb","seq":1,"state_hash":"{big}"}}'.encode(),  # valid, but outside a session
    ]
    reasons = ("malformed", "no_session")
    before = {reason: bad_frames(reason) for reason in reasons}

    def counted() -> float:
        return sum(bad_frames(reason) - before[reason] for reason in reasons)

    try:
        with structlog.testing.capture_logs() as logs:
            for i in range(200):
                await sock.send(payloads[i % 3])
            await until(lambda: counted() >= 200, "every frame counted", timeout=30)
            rig.masters.log_limiter.flush(closing=True)
    finally:
        sock.close(0)
    assert counted() == 200
    lines = [entry for entry in logs if entry["event"].startswith("bridge_")]
    assert len(lines) <= 2 * (LOG_BURST + 1), [entry["event"] for entry in lines]
    assert sum(len(repr(entry)) for entry in logs) < 16_000
    assert not any("x" * 300 in repr(entry) for entry in logs)
    written = [entry for entry in lines if entry["event"] != "bridge_log_suppressed"]
    summaries = [entry for entry in lines if entry["event"] == "bridge_log_suppressed"]
    assert len(written) + sum(entry["suppressed"] for entry in summaries) == 200
    # Per peer where the peer is known (the account of its CURVE key), else per reason.
    expected = None if rig.plaintext else "bm2"
    assert {entry["account"] for entry in lines} == {expected}


async def test_a_frame_over_the_size_cap_is_never_read(rig: Rig) -> None:
    """Over ``max_frame_bytes`` libzmq drops the connection before the frame is read; a frame
    under it, from a new connection, is read (and counted as the garbage it is)."""
    assert rig.masters is not None
    await rig.masters.stop()
    rig.masters = rig.bridge("master", rig.master_port, max_frame_bytes=64 * 1024)
    await rig.masters.start(rig.nc)
    malformed = bad_frames("malformed")
    over = raw_peer(rig.masters.endpoint, b"over", listed_key(rig))
    under = raw_peer(rig.masters.endpoint, b"under", listed_key(rig))
    try:
        await over.send(b"\xff" * 100_000)
        await asyncio.sleep(0.3)
        await under.send(b"\xff" * 60_000)
        await until(lambda: bad_frames("malformed") > malformed, "the frame under the cap")
        await asyncio.sleep(0.5)
    finally:
        over.close(0)
        under.close(0)
    assert bad_frames("malformed") == malformed + 1


def test_log_limiter_writes_a_burst_per_window_then_one_summary() -> None:
    now = [0.0]
    with structlog.testing.capture_logs() as logs:
        limiter = LogLimiter(structlog.get_logger("test"), limit=3, window_s=10.0,
                             clock=lambda: now[0])  # fmt: skip
        allowed = [limiter.allow("malformed") for _ in range(10)]
        assert allowed == [True] * 3 + [False] * 7
        assert limiter.allow("malformed", "acc-1") and limiter.allow("denied")
        limiter.flush()  # the window is still open: nothing to say yet
        assert logs == []
        now[0] = 10.0
        limiter.flush()
        assert limiter.allow("malformed")  # a new window, a new burst
    assert logs == [{"event": "bridge_log_suppressed", "log_level": "warning",
                     "reason": "malformed", "account": None, "suppressed": 7,
                     "window_s": 10.0}]  # fmt: skip


# ------------------------------------------------------------------ keys in the config


def curve_config(**fields: Any) -> BridgeConfig:
    terminals = [BridgeTerminalConfig(account=a, token=TOKEN_F, role="follower",
                                      curve_public_key=key_pair().public)
                 for a in ("f1", "f2")]  # fmt: skip
    return msgspec.structs.replace(
        BridgeConfig(connector_id="farm-1", terminals=terminals), **fields
    )


def test_curve_is_on_by_default_and_a_missing_secret_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DEFAULT_SECRET_KEY_ENV, raising=False)
    config = curve_config()
    assert config.plaintext is False
    with pytest.raises(BridgeKeyError, match=f"\\${DEFAULT_SECRET_KEY_ENV} is not set"):
        BridgeConnector(config)
    pair = key_pair()
    monkeypatch.setenv(DEFAULT_SECRET_KEY_ENV, pair.secret)
    assert BridgeConnector(config).public_key == pair.public
    assert BridgeConnector(curve_config(plaintext=True)).public_key is None


def test_a_curve_config_that_cannot_work_is_refused_at_start() -> None:
    pair = key_pair()
    with pytest.raises(BridgeKeyError, match="not a CURVE secret key"):
        BridgeConnector(curve_config(), secret_key="too-short")
    with pytest.raises(BridgeKeyError, match="does not belong to public_key"):
        BridgeConnector(curve_config(public_key=key_pair().public), secret_key=pair.secret)
    config = curve_config(public_key=pair.public)
    keyless = msgspec.structs.replace(config.terminals[1], curve_public_key=None)
    with pytest.raises(BridgeKeyError, match="f2 have no curve_public_key"):
        BridgeConnector(msgspec.structs.replace(config, terminals=[config.terminals[0], keyless]),
                        secret_key=pair.secret)  # fmt: skip
    first_key = config.terminals[0].curve_public_key
    shared = msgspec.structs.replace(config.terminals[1], curve_public_key=first_key)
    with pytest.raises(BridgeKeyError, match="f1 and f2 share"):
        BridgeConnector(msgspec.structs.replace(config, terminals=[config.terminals[0], shared]),
                        secret_key=pair.secret)  # fmt: skip


def test_the_secret_key_file_must_be_the_owners_alone(tmp_path: Path) -> None:
    pair = key_pair()
    path = tmp_path / "farm-1.key"
    path.write_text(pair.secret + "\n")
    path.chmod(0o644)
    config = curve_config(secret_key_file=str(path))
    with pytest.raises(BridgeKeyError, match="chmod 600"):
        server_secret_key(config, {})
    path.chmod(0o600)
    assert server_secret_key(config, {}) == pair.secret


async def test_a_lost_master_event_is_recovered_from_a_snapshot(rig: Rig) -> None:
    """The terminal loses an event frame: the connector sees the gap, asks for a snapshot,
    and the snapshot's difference becomes the missed master event."""
    assert rig.masters is not None and rig.term_m is not None
    await rig.term_m.stop()
    lossy = rig.terminal("bm", drop_events={3})
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
    forgetful = rig.terminal("bf", drop_results={corr})
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
    for lost in rig.root.glob("follower.state*"):  # the snapshot and its journal
        lost.unlink()
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


def commands_sent() -> float:
    labels = {"direction": "out", "type": "Command"}
    return REGISTRY.get_sample_value("tradecopy_bridge_frames_total", labels) or 0.0


def manual(kind: type[Any], client_order_id: str, **fields: Any) -> Any:
    """A person's order from the platform API: ``master`` is the account itself."""
    order_id = manual_order_id("bf", client_order_id)
    return kind(order_id=order_id, link_id=MANUAL_LINK_ID, follower="bf", master="bf",
                master_event_id=order_id, symbol="XAUUSD", ts_ns=time.time_ns(), manual=True,
                **fields)  # fmt: skip


async def executed(rig: Rig, order: Any, msg_id: str | None = None) -> ExecutionReport:
    await rig.js.publish(subjects.follower_orders("bf"), codec.encode(order),
                         headers={"Nats-Msg-Id": msg_id or order.order_id})  # fmt: skip
    await until(lambda: any(r.order_id == order.order_id for r in rig.reports), order.order_id)
    return next(r for r in rig.reports if r.order_id == order.order_id)


async def hand_opened(rig: Rig, side: Side, volume: float) -> str:
    """A position the person opened at the follower's terminal: its ticket, once mirrored."""
    assert rig.term_f is not None and rig.followers is not None
    result = await rig.term_f.trade(lambda v: v.market_order("bf", "XAUUSD", side, volume))
    ticket = rig.term_f.ticket_of(result.position_id or "")
    await until(lambda: rig.followers is not None and ticket in rig.followers.positions["bf"],
                "the hand-opened position in the mirror")  # fmt: skip
    return ticket


@pytest.mark.parametrize("platform", ["paper", "mt4"])
async def test_manual_modify_and_closes_act_on_the_accounts_own_position_by_its_ticket(
    rig: Rig, platform: str
) -> None:
    """By the terminal's own ticket: SL/TP of a hand-opened position, half of a copy (MT4
    renews the remainder's ticket), then all of the hand-opened one; each once. The master's
    close still finds its reduced copy afterwards."""
    assert rig.term_m is not None and rig.term_f is not None and rig.followers is not None
    if platform == "mt4":
        await rig.term_f.stop()
        rig.term_f = rig.terminal("bf", platform="mt4")
        await rig.term_f.start()
        await until(lambda: rig.followers is not None and
                    rig.followers.sessions["bf"].ready.is_set(), "the mt4 snapshot")  # fmt: skip
    opened = await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.2))
    await until(lambda: len(rig.filled()) == 1, "the copy")
    [copy] = rig.venue_f.positions("bf")
    copy_ticket = rig.term_f.ticket_of(copy.position_id)
    own = await hand_opened(rig, Side.SELL, 0.3)

    held = {p.position_id: p for p in rig.venue_f.positions("bf")}
    sl, tp = round(held[rig.term_f.venue_id_of(own) or ""].open_price + 100, 2), 1500.0
    modify = manual(FollowerModify, "web-sl-1", master_position_id=own, sl=sl, tp=tp)
    report = await executed(rig, modify)
    assert isinstance(report, OrderDone), report
    assert report.position_ids == [own]
    held = {p.position_id: p for p in rig.venue_f.positions("bf")}
    mine = held[rig.term_f.venue_id_of(own) or ""]
    assert (mine.sl, mine.tp) == (sl, tp)
    assert (held[copy.position_id].sl, held[copy.position_id].tp) == (None, None)

    partial = manual(FollowerClose, "web-close-1", master_position_id=copy_ticket, ratio=0.5)
    report = await executed(rig, partial)
    assert isinstance(report, OrderFilled), report
    assert (report.position_id, report.side, report.volume) == (copy_ticket, Side.SELL, 0.1)
    sent = commands_sent()
    again = await executed(rig, partial, msg_id="a-retried-request")  # the API asked again
    assert again == report
    await asyncio.sleep(0.2)
    assert commands_sent() == sent
    assert sorted(p.volume for p in rig.venue_f.positions("bf")) == [0.1, 0.3]

    full = manual(FollowerClose, "web-close-2", master_position_id=own)
    report = await executed(rig, full)
    assert isinstance(report, OrderFilled), report
    assert (report.position_id, report.side, report.volume) == (own, Side.BUY, 0.3)
    [left] = rig.venue_f.positions("bf")
    assert (left.position_id, left.volume) == (copy.position_id, 0.1)

    await rig.term_m.trade(lambda v: v.close_position("bm", opened.position_id))
    await until(lambda: not rig.venue_f.positions("bf"), "the master's close of its copy")
    assert rig.filled()[partial.order_id] == rig.filled()[full.order_id] == 1


async def test_a_manual_order_for_a_position_the_account_does_not_hold_is_rejected(
    rig: Rig,
) -> None:
    assert rig.term_m is not None and rig.term_f is not None
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.2))
    await until(lambda: len(rig.filled()) == 1, "the copy")
    [copy] = rig.venue_f.positions("bf")
    sent = commands_sent()
    for order in (
        # The copy's comment is no ticket: a manual order never looks a copy up by its master.
        manual(FollowerClose, "web-close-9", master_position_id=copy.comment),
        manual(FollowerClose, "web-close-8", master_position_id="424242", ratio=0.5),
        manual(FollowerModify, "web-sl-9", master_position_id="424242", sl=1990.0),
    ):
        report = await executed(rig, order)
        assert isinstance(report, OrderRejected), report
        assert (report.code, report.reason) == (RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
    assert commands_sent() == sent
    assert [p.volume for p in rig.venue_f.positions("bf")] == [0.2]


@pytest.mark.parametrize("age_s", [DUPLICATE_WINDOW_S + 1, follower_orders_stream().max_age - 60])
async def test_an_order_redone_after_the_dedup_window_and_a_restart_sends_no_command(
    rig: Rig, age_s: float
) -> None:
    """An open and its close ran; long after JetStream's duplicate window both come again
    (the replicator redid them: new messages, the same order ids) to a restarted connector.
    Each gets its first report back and no command reaches the terminal: the close does not
    turn into "no copy", the open does not trade a second copy."""
    assert rig.term_f is not None
    common = {"link_id": "redo", "follower": "bf", "master": "mr", "symbol": "XAUUSD",
              "ts_ns": time.time_ns()}  # fmt: skip
    opened = FollowerOpen(**common, order_id="redo-open", master_event_id="e-open",
                          master_position_id="7", side=Side.BUY, volume=0.3)  # fmt: skip
    closed = FollowerClose(**common, order_id="redo-close", master_event_id="e-close",
                           master_position_id="7")  # fmt: skip

    async def send(order: Any, msg_id: str) -> ExecutionReport:
        await rig.js.publish(subjects.follower_orders("bf"), codec.encode(order),
                             headers={"Nats-Msg-Id": msg_id})  # fmt: skip
        await until(lambda: any(r.order_id == order.order_id for r in rig.reports),
                    order.order_id)  # fmt: skip
        return next(r for r in rig.reports if r.order_id == order.order_id)

    first_open = await send(opened, opened.order_id)
    await rig.feed(3)
    first_close = await send(closed, closed.order_id)
    assert isinstance(first_open, OrderFilled) and isinstance(first_close, OrderFilled)
    assert rig.venue_f.positions("bf") == []

    assert rig.followers is not None
    await rig.followers.stop()
    rig.clock.advance(age_s)
    rig.followers = restarted = rig.bridge("follower", rig.follower_port)
    # What the connector answers (JetStream would drop a second report within its window).
    outcomes: list[ExecutionReport] = []
    execute = restarted.execute

    async def recording(order: Any, reports: Any) -> ExecutionReport:
        outcomes.append(await execute(order, reports))
        return outcomes[-1]

    restarted.execute = recording  # type: ignore[method-assign]
    await restarted.start(rig.nc)
    await until(lambda: restarted.sessions["bf"].ready.is_set(), "the snapshot after the restart",
                timeout=20)  # fmt: skip
    sent = commands_sent()
    for order in (closed, opened):
        await rig.js.publish(subjects.follower_orders("bf"), codec.encode(order),
                             headers={"Nats-Msg-Id": f"{order.order_id}:redo"})  # fmt: skip
    await until(lambda: len(outcomes) == 2, "both redone orders answered")
    assert outcomes == [unpublished(first_close), unpublished(first_open)]
    assert commands_sent() == sent
    assert rig.venue_f.positions("bf") == []


def unpublished(report: ExecutionReport) -> ExecutionReport:
    """The report as the connector stored it: before the runtime stamped ``report_ns``."""
    return msgspec.structs.replace(report, trace=msgspec.structs.replace(report.trace, report_ns=0))


def test_an_old_format_state_file_loads_into_the_journal(tmp_path: Path) -> None:
    """A state file written before the journal: one msgpack object, reports inside."""
    path = tmp_path / "farm.state"
    filled = OrderFilled(
        order_id="o-1",
        link_id="l",
        follower="bf",
        ts_ns=1,
        symbol="XAUUSD",
        position_id="1000001",
        side=Side.BUY,
        volume=0.1,
        price=2000.0,
    )
    old = BridgeState(copies={"bf": {copy_comment("bm", "5"): "1000001"}},
                      reports={"o-1": codec.encode(filled)})  # fmt: skip
    path.write_bytes(msgspec.msgpack.encode(old))
    terminal = BridgeTerminalConfig(account="bf", token=TOKEN_F, role="follower",
                                    curve_public_key=key_pair().public)  # fmt: skip
    config = BridgeConfig(connector_id="b", endpoint="tcp://127.0.0.1:0", terminals=[terminal])
    secret = key_pair().secret
    upgraded = BridgeConnector(config, path, secret_key=secret)
    assert path.read_bytes().startswith(MAGIC)
    assert dict(upgraded.reports) == {"o-1": codec.encode(filled)}
    assert upgraded.copies == old.copies
    again = BridgeConnector(config, path, secret_key=secret)
    assert dict(again.reports) == {"o-1": codec.encode(filled)} and again.copies == old.copies


async def close_by_reported_late(rig: Rig) -> None:
    """Two copied master positions closed by each other on a terminal whose first close-by
    frame says ``opposite_ticket`` "0" (the old MT5 EA, before the close-by order reached
    history); returns once the connector refused that frame."""
    assert rig.term_m is not None
    await rig.term_m.stop()
    late = rig.terminal("bm", late_close_by_opposite=True)
    await late.start()
    rig.term_m = late
    buy = await late.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.1))
    await asyncio.sleep(0.1)
    sell = await late.trade(lambda v: v.market_order("bm", "XAUUSD", Side.SELL, 0.1))
    await until(lambda: len(rig.venue_f.positions("bf")) == 2, "both copies", timeout=20)
    buy_id, sell_id = buy.position_id or "", sell.position_id or ""
    await late.trade(lambda v: v.close_by("bm", buy_id, sell_id))
    await until(lambda: any("needs opposite_ticket" in e.reason for e in late.errors_received),
                "the connector's refusal of the close-by frame")  # fmt: skip


async def test_a_close_by_with_opposite_ticket_0_is_refused_and_a_snapshot_closes_the_opposite(
    rig: Rig,
) -> None:
    """Publishing that frame would ask followers to close a position by "0", which none
    holds; refused, the heartbeat hash disagrees and a snapshot reconciles the opposite."""
    await close_by_reported_late(rig)
    await until(lambda: all(p.side is not Side.SELL for p in rig.venue_f.positions("bf")),
                "the opposite's copy closed by reconciliation", timeout=20)  # fmt: skip


async def test_a_refused_close_by_leaves_both_copies_closed_after_the_snapshot(rig: Rig) -> None:
    await close_by_reported_late(rig)
    await until(lambda: not rig.venue_f.positions("bf"), "both copies closed", timeout=10)


async def test_the_account_state_says_whether_its_terminal_is_connected(rig: Rig) -> None:
    assert rig.followers is not None and rig.term_f is not None
    state = rig.followers.account_state("bf")
    assert state is not None and state.terminal is not None
    assert (state.terminal.connected, state.terminal.synchronised) == (True, True)
    await rig.term_f.stop()
    followers = rig.followers

    def disconnected() -> bool:
        after = followers.account_state("bf")
        return after is not None and after.terminal is not None and not after.terminal.connected

    await until(disconnected, "the terminal seen as disconnected", timeout=10)
    after = followers.account_state("bf")
    assert after is not None and after.terminal is not None
    assert after.terminal.reason == "the terminal is not connected to the bridge"
    rig.term_f = None  # already stopped


async def test_a_copy_partial_close_that_rounds_to_nothing_closes_nothing(rig: Rig) -> None:
    """A close command without a volume closes the whole position: a ratio that rounds to
    nothing on the copy is done with nothing sent, never sent unsized."""
    assert rig.term_m is not None and rig.followers is not None
    await rig.term_m.trade(lambda v: v.market_order("bm", "XAUUSD", Side.BUY, 0.2))
    await until(lambda: len(rig.filled()) == 1, "the copy")
    [copy] = rig.venue_f.positions("bf")
    [(ref, _)] = rig.followers.copies["bf"].items()
    master_position_id = ref.rpartition(".")[2]
    assert copy_comment("bm", master_position_id) == ref
    sent = commands_sent()
    tiny = FollowerClose(
        order_id="close-tiny", link_id="bl", follower="bf", master="bm",
        master_event_id="close-tiny", symbol="XAUUSD", ts_ns=time.time_ns(),
        master_position_id=master_position_id, ratio=0.01,
    )  # fmt: skip
    report = await executed(rig, tiny)
    assert isinstance(report, OrderDone), report
    assert "rounds to nothing" in report.detail
    await asyncio.sleep(0.2)
    assert commands_sent() == sent
    assert [(p.position_id, p.volume) for p in rig.venue_f.positions("bf")] == [
        (copy.position_id, copy.volume)
    ]
