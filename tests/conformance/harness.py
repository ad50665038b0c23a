"""The connector side of the bridge protocol, for conformance tests: a real ZeroMQ ROUTER.

:class:`ConnectorPeer` binds a ROUTER on ``tcp://127.0.0.1:<free port>`` and plays the bridge
connector: a CURVE server by default, as the connector is, whose ZAP handler admits only the key
pair it made for the terminal under test (``plaintext=True`` for the opt-out). It answers
``hello`` with ``welcome`` or ``denied``, sends commands, snapshot
requests, heartbeats and malformed frames, and checks that every frame the terminal sends
decodes with ``terminal_frame_decoder`` and that the terminal's ``seq`` starts at 1 with every
session and grows by exactly 1 (gaps are recorded, for the fault-injection cases to inspect).

:class:`Mirror` is what a connector knows from events alone; its state hash must equal the
terminal's after every change, unless frames were lost — then a snapshot sets it right.

An implementation joins the suite by adding an :class:`Implementation` to
:data:`IMPLEMENTATIONS`: a factory for a :class:`TerminalUnderTest` backed by a ``PaperVenue``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.utils import z85

from connectors.bridge.auth import TerminalAuthenticator
from connectors.bridge.hashing import state_hash
from connectors.bridge.paper_terminal import BridgeDenied, PaperBridgeTerminal
from connectors.paper.model import Result, Transaction
from connectors.paper.prices import Quote
from connectors.paper.venue import PaperVenue
from schemas.bridge import (
    PROTOCOL_VERSION,
    BridgeOrder,
    BridgePosition,
    Command,
    CommandResult,
    Denied,
    EventKind,
    Heartbeat,
    Hello,
    Snapshot,
    SnapshotRequest,
    TradeEvent,
    Welcome,
    frame_encoder,
    terminal_frame_decoder,
)

F = TypeVar("F")
DEFAULT_TIMEOUT_S = 5.0
#: The User-Id the peer's ZAP handler gives the terminal under test's key.
TERMINAL_USER = "terminal-under-test"


@dataclass(frozen=True)
class KeyPair:
    public: str
    secret: str

    @classmethod
    def new(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode(), secret.decode())


class TerminalUnderTest(Protocol):
    """What the suite drives: the bridge terminal plus the trader at its keyboard."""

    account: str
    venue: PaperVenue

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def reconnect(self, new_session: bool = True) -> None: ...

    async def trade(self, action: Callable[[PaperVenue], Result]) -> Result: ...

    async def on_quote(self, quote: Quote) -> list[Transaction]: ...

    def ticket_of(self, venue_id: str) -> str: ...

    def venue_id_of(self, ticket: str) -> str | None: ...


class TerminalFactory(Protocol):
    def __call__(
        self,
        endpoint: str,
        account: str,
        token: str,
        venue: PaperVenue,
        *,
        server_key: str = "",
        public_key: str = "",
        secret_key: str = "",
        plaintext: bool = False,
        handshake_timeout_s: float = DEFAULT_TIMEOUT_S,
        drop_events: Iterable[int] = (),
        drop_results: Iterable[str] = (),
    ) -> TerminalUnderTest:
        """CURVE keys as the EA's inputs (``InpServerKey``, ``InpPublicKey``,
        ``InpSecretKey``, ``InpPlaintext``)."""


@dataclass(frozen=True)
class Implementation:
    name: str
    platform: str
    """What its ``hello`` says."""
    renews_tickets: bool
    """MT4: a partial close (or a close-by's remainder) gets a new ticket."""
    make: TerminalFactory
    denied_error: type[Exception]


def _paper_terminal(platform: Any) -> TerminalFactory:
    def make(
        endpoint: str,
        account: str,
        token: str,
        venue: PaperVenue,
        *,
        server_key: str = "",
        public_key: str = "",
        secret_key: str = "",
        plaintext: bool = False,
        handshake_timeout_s: float = DEFAULT_TIMEOUT_S,
        drop_events: Iterable[int] = (),
        drop_results: Iterable[str] = (),
    ) -> TerminalUnderTest:
        return PaperBridgeTerminal(
            endpoint,
            account,
            token,
            venue,
            platform=platform,
            server_key=server_key,
            public_key=public_key,
            secret_key=secret_key,
            plaintext=plaintext,
            handshake_timeout_s=handshake_timeout_s,
            drop_events=drop_events,
            drop_results=drop_results,
        )

    return make


IMPLEMENTATIONS = [
    Implementation("paper", "paper", False, _paper_terminal("paper"), BridgeDenied),
    Implementation("mt4", "mt4", True, _paper_terminal("mt4"), BridgeDenied),
]


@dataclass
class Received:
    identity: bytes
    frame: Any
    raw: bytes
    user_id: str | None
    """Who the peer's ZAP handler said the connection is (None: plaintext)."""


@dataclass
class SeqViolation:
    expected: int
    got: int
    frame: str


class ConnectorPeer:
    """A ROUTER playing the connector for one terminal at a time.

    Unless ``plaintext``: a CURVE server with a key pair of its own (``server``), and a key
    pair made for the terminal (``terminal``) that its ZAP handler admits as
    :data:`TERMINAL_USER`; every other key is refused and recorded in ``refused``."""

    def __init__(self, *, plaintext: bool = False) -> None:
        self._context = zmq.asyncio.Context()
        self.plaintext = plaintext
        self.server = KeyPair.new()
        self.terminal = KeyPair.new()
        self.refused: list[str] = []
        self._authenticator: TerminalAuthenticator | None = None
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if not plaintext:
            self._authenticator = TerminalAuthenticator(
                self._context,
                {z85.decode(self.terminal.public): TERMINAL_USER},
                lambda _address, key: self.refused.append(key),
            )
            self._authenticator.start()
            self._sock.setsockopt(zmq.CURVE_SERVER, 1)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, self.server.secret.encode())
        # A reconnecting terminal takes its identity (= account) back at once.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Sending to a terminal that is not connected is an error, not a silent drop.
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity = b""
        self.hello: Hello | None = None
        self.received: list[Received] = []
        self.gaps: list[SeqViolation] = []
        self.undecodable: list[tuple[bytes, str]] = []
        self._inbox: list[Received] = []
        self._expected_seq = 1
        self._sent_seq = 0
        self._heartbeats: asyncio.Task[None] | None = None

    def terminal_keys(self) -> dict[str, Any]:
        """What the terminal under test is configured with to reach this peer."""
        if self.plaintext:
            return {"plaintext": True}
        return {"server_key": self.server.public, "public_key": self.terminal.public,
                "secret_key": self.terminal.secret}  # fmt: skip

    async def close(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if self._authenticator is not None:
            await self._authenticator.stop()
        self._sock.close(linger=0)
        self._context.term()

    # ------------------------------------------------------------------ receiving

    async def _read(self, timeout: float) -> Received | None:
        if not await self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        parts = await self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
        assert len(parts) == 2, f"a terminal message must be one frame, got {len(parts) - 1}"
        identity, raw = parts[0].bytes, parts[1].bytes
        user_id = None if self.plaintext else str(parts[1].get("User-Id"))
        try:
            frame = terminal_frame_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            self.undecodable.append((raw, str(exc)))
            raise AssertionError(f"terminal sent an undecodable frame {raw!r}: {exc}") from exc
        if isinstance(frame, Hello):
            self.hello, self.identity = frame, identity
            if frame.seq == 1:
                self._expected_seq = 1
                self._sent_seq = 0
        if frame.seq != self._expected_seq:
            self.gaps.append(SeqViolation(self._expected_seq, frame.seq, type(frame).__name__))
        self._expected_seq = frame.seq + 1
        received = Received(identity, frame, raw, user_id)
        self.received.append(received)
        return received

    async def expect(
        self,
        kind: type[F],
        where: Callable[[F], bool] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> F:
        """The first frame of ``kind`` (matching ``where``) not expected before; waits for it."""
        for index, item in enumerate(self._inbox):
            if isinstance(item.frame, kind) and (where is None or where(item.frame)):
                del self._inbox[index]
                return item.frame
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            item = await self._read(left)
            if item is None:
                break
            if isinstance(item.frame, kind) and (where is None or where(item.frame)):
                return item.frame
            self._inbox.append(item)
        raise AssertionError(f"no {kind.__name__} frame within {timeout}s")

    async def expect_nothing(
        self, kind: type[Any], where: Callable[[Any], bool] | None = None, within: float = 0.25
    ) -> None:
        """No frame of ``kind`` (matching ``where``) arrives within ``within`` seconds."""
        try:
            frame = await self.expect(kind, where, timeout=within)
        except AssertionError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def wait_quiet(self, within: float = 0.1) -> None:
        """Read whatever arrives within ``within`` seconds into the inbox."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            item = await self._read(left)
            if item is None:
                return
            self._inbox.append(item)

    def pending(self, kind: type[F]) -> list[F]:
        """Frames of ``kind`` received but not expected yet, oldest first."""
        return [i.frame for i in self._inbox if isinstance(i.frame, kind)]

    # ------------------------------------------------------------------ sending

    def frame(self, frame_type: Callable[..., F], /, **fields: Any) -> F:
        """A connector frame numbered with the next seq of this session (not sent)."""
        self._sent_seq += 1
        return frame_type(seq=self._sent_seq, ts=time.time_ns(), **fields)

    def send(self, frame_type: Callable[..., F], /, **fields: Any) -> F:
        """Send a connector frame with the next seq of this session."""
        frame = self.frame(frame_type, **fields)
        self.send_raw(frame_encoder.encode(frame))
        return frame

    def send_raw(self, *parts: bytes) -> None:
        """Send bytes as they are (one message; several parts make a multipart message)."""
        assert self.identity, "no terminal has said hello yet"
        self._sock.send_multipart([self.identity, *parts], zmq.NOBLOCK)

    def skip_seq(self, count: int = 1) -> None:
        """Leave ``count`` seqs out, as if those frames were lost on the way."""
        self._sent_seq += count

    async def handshake(
        self,
        *,
        accept: bool = True,
        reason: str = "bad token",
        heartbeat_ms: int = 60_000,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> Hello:
        """Wait for ``hello`` and answer it; the welcome's seq is 1 for a new session."""
        hello = await self.expect(Hello, timeout=timeout)
        if accept:
            self.send(Welcome, version=PROTOCOL_VERSION, heartbeat_ms=heartbeat_ms)
        else:
            self.send(Denied, reason=reason)
        return hello

    async def command(self, corr: str, **fields: Any) -> CommandResult:
        """Send a command and wait for its result."""
        self.send(Command, corr=corr, **fields)
        return await self.expect(CommandResult, lambda r: r.corr == corr)

    async def snapshot(self, corr: str) -> Snapshot:
        self.send(SnapshotRequest, corr=corr)
        return await self.expect(Snapshot, lambda s: s.corr == corr)

    async def event(self, kind: EventKind, timeout: float = DEFAULT_TIMEOUT_S) -> TradeEvent:
        return await self.expect(TradeEvent, lambda e: e.kind is kind, timeout)

    def start_heartbeats(self, interval_s: float) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(interval_s)
                self.send(Heartbeat)

        self._heartbeats = asyncio.get_running_loop().create_task(beat())


@dataclass
class Mirror:
    """A terminal's positions and orders as a connector rebuilds them from frames alone."""

    positions: dict[str, BridgePosition] = field(default_factory=dict)
    orders: dict[str, BridgeOrder] = field(default_factory=dict)

    def state_hash(self) -> str:
        return state_hash(self.positions.values(), self.orders.values())

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        self.positions = {p.ticket: p for p in snapshot.positions}
        self.orders = {o.ticket: o for o in snapshot.orders}

    def apply(self, e: TradeEvent) -> None:
        replace = msgspec.structs.replace
        kind, positions, orders = e.kind, self.positions, self.orders
        if kind is EventKind.OPENED:
            assert e.side is not None
            positions[e.ticket] = BridgePosition(
                ticket=e.ticket,
                symbol=e.symbol,
                side=e.side,
                volume=e.volume,
                price=e.price,
                sl=e.sl,
                tp=e.tp,
                magic=e.magic,
                comment=e.comment,
                time=e.time,
            )
        elif kind is EventKind.MODIFIED:
            positions[e.ticket] = replace(positions[e.ticket], sl=e.sl, tp=e.tp)
        elif kind is EventKind.REDUCED:
            held = positions.pop(e.ticket)
            ticket = e.new_ticket or e.ticket
            positions[ticket] = replace(held, ticket=ticket, volume=e.volume_after)
        elif kind is EventKind.CLOSED:
            del positions[e.ticket]
        elif kind is EventKind.CLOSED_BY:
            for ticket in (e.ticket, e.opposite_ticket):
                held = positions.pop(ticket)
                rest = round(held.volume - e.volume, 8)
                if rest > 0:
                    kept = e.new_ticket or ticket
                    positions[kept] = replace(held, ticket=kept, volume=rest)
        elif kind is EventKind.PENDING_PLACED:
            assert e.order_type is not None
            orders[e.ticket] = BridgeOrder(
                ticket=e.ticket,
                symbol=e.symbol,
                order_type=e.order_type,
                volume=e.volume,
                price=e.price,
                sl=e.sl,
                tp=e.tp,
                expiration=e.expiration,
                magic=e.magic,
                comment=e.comment,
            )
        elif kind is EventKind.PENDING_MODIFIED:
            orders[e.ticket] = replace(
                orders[e.ticket], price=e.price, sl=e.sl, tp=e.tp, expiration=e.expiration
            )
        elif kind is EventKind.PENDING_CANCELLED:
            del orders[e.ticket]
        elif kind is EventKind.PENDING_TRIGGERED:
            order = orders.pop(e.ticket)
            ticket = e.position_ticket or e.ticket
            positions[ticket] = BridgePosition(
                ticket=ticket,
                symbol=order.symbol,
                side=order.order_type.side,
                volume=e.volume,
                price=e.price,
                sl=e.sl,
                tp=e.tp,
                magic=order.magic,
                comment=order.comment,
                time=e.time,
            )


@dataclass
class Rig:
    """One implementation, one connector peer, one venue, and the terminals started on them."""

    impl: Implementation
    peer: ConnectorPeer
    venue: PaperVenue
    account: str
    token: str
    terminals: list[TerminalUnderTest] = field(default_factory=list)

    def make(self, *, token: str | None = None, **options: Any) -> TerminalUnderTest:
        """A terminal configured to reach the peer; ``options``: faults, or other keys."""
        terminal = self.impl.make(
            self.peer.endpoint,
            self.account,
            self.token if token is None else token,
            self.venue,
            **(self.peer.terminal_keys() | options),
        )
        self.terminals.append(terminal)
        return terminal

    async def connect(
        self, *, heartbeat_ms: int = 60_000, **faults: Any
    ) -> tuple[TerminalUnderTest, Hello, Snapshot]:
        """Start a terminal, welcome it, and take its first snapshot."""
        terminal = self.make(**faults)
        hello, snapshot = await self.welcome(terminal.start(), heartbeat_ms=heartbeat_ms)
        return terminal, hello, snapshot

    async def welcome(self, starting: Any, *, heartbeat_ms: int = 60_000) -> tuple[Hello, Snapshot]:
        """Run a terminal's start (or reconnect) against the peer's welcome."""
        task = asyncio.ensure_future(starting)
        try:
            hello = await self.peer.handshake(heartbeat_ms=heartbeat_ms)
            await asyncio.wait_for(task, DEFAULT_TIMEOUT_S)
        finally:
            if not task.done():
                task.cancel()
        snapshot = await self.peer.expect(Snapshot, lambda s: s.corr == "")
        return hello, snapshot

    async def close(self) -> None:
        for terminal in self.terminals:
            await terminal.stop()
        await self.peer.close()
