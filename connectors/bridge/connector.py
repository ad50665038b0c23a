"""The bridge connector: one process, one ROUTER socket, many MetaTrader terminals.

It is the ``Terminal`` of the connector contract for every account whose EA connects here:
terminal events become master events, commands go out correlated by follower order id, and
each terminal's positions and orders are mirrored so that snapshots (on every connect and on a
sequence gap or a heartbeat hash mismatch) recover what a disconnection lost.

The ROUTER is a CURVE server unless the config says ``plaintext``: the link is encrypted, and
the ZAP handler (:class:`TerminalAuthenticator`) admits only the public keys configured for
this connector's terminals, naming the key's account as the connection's User-Id; a ``hello``
must come from the account its key belongs to. Whatever unauthenticated or misbehaving peers
send is counted in full and logged at a bounded rate (:class:`LogLimiter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio
import zmq.utils.z85
from prometheus_client import Counter, Gauge, Histogram
from zmq.utils.monitor import parse_monitor_message

from connectors.bridge.auth import (
    HANDSHAKE_FAILURES,
    PREFIX_MAX,
    LogLimiter,
    TerminalAuthenticator,
    peer_text,
    short_text,
)
from connectors.bridge.config import (
    BridgeConfig,
    BridgeTerminalConfig,
    check_curve_config,
    public_key_of,
    server_secret_key,
)
from connectors.bridge.hashing import state_hash
from connectors.bridge.parsing import master_event, missed_events
from connectors.contract import ConnectorRuntime
from connectors.journal import OrderJournal, OrderMemoryConfig
from connectors.reports import (
    NO_PENDING_COPY,
    NO_POSITION_COPY,
    NO_SUCH_POSITION,
    NOT_BOTH_COPIES,
    RETCODE_NO_SUCH_POSITION,
    RETCODE_NO_SYMBOL_SPEC,
    OrderReports,
)
from engine.core.comments import copy_comment, is_copy, is_copy_of
from engine.core.volume import partial_close_volume
from schemas import codec
from schemas.account import AccountState, SymbolSpec, TerminalStatus, TradeMode
from schemas.bridge import (
    NO_SESSION,
    AccountUpdate,
    BridgeAccount,
    BridgeOrder,
    BridgePosition,
    BridgeSymbol,
    Command,
    CommandOp,
    CommandResult,
    ConnectorFrame,
    Denied,
    Heartbeat,
    Hello,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    TerminalFrame,
    TradeEvent,
    Welcome,
    frame_encoder,
    terminal_frame_decoder,
)
from schemas.master import MasterEvent
from schemas.orders import (
    FollowerClose,
    FollowerCloseAll,
    FollowerCloseBy,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerPendingCancel,
    FollowerPendingModify,
    FollowerPendingPlace,
)
from schemas.reports import ExecutionReport, OrderUnknown

log = structlog.get_logger("tradecopy.bridge")

CONNECTED = Gauge("tradecopy_bridge_terminal_connected", "1 while the terminal is in session",
                  ["account"])  # fmt: skip
FRAMES = Counter("tradecopy_bridge_frames_total", "Frames by direction and type",
                 ["direction", "type"])  # fmt: skip
BAD_FRAMES = Counter("tradecopy_bridge_bad_frames_total",
                     "Frames and connections refused, by reason", ["reason"])  # fmt: skip
COMMAND_LATENCY = Histogram(
    "tradecopy_bridge_command_seconds", "Command sent → result received", ["account"],
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0, 5.0),
)  # fmt: skip
SEQUENCE_GAPS = Counter("tradecopy_bridge_sequence_gaps_total", "Frames lost", ["account"])
#: Why a frame or connection was refused: every reason has a series from the start, so an
#: alert on rate() sees the first one.
BAD_FRAME_REASONS = (
    "no_identity", "handler_error", "malformed", "no_session", "key_mismatch", "duplicate",
    "denied", "bad_event", "unknown_key", "handshake_failed",
)  # fmt: skip
for _reason in BAD_FRAME_REASONS:
    BAD_FRAMES.labels(_reason)
for _direction, _frames in (("in", TerminalFrame), ("out", ConnectorFrame)):
    for _frame in typing.get_args(_frames):
        FRAMES.labels(_direction, _frame.__name__)


#: The reason of an unknown outcome: the command went out and no result came back in time.
NO_RESULT = "no result in time"


class TerminalNotConnected(Exception):
    """No session with the terminal: the order stays unacknowledged and comes back."""


@dataclass
class TerminalSession:
    config: BridgeTerminalConfig
    identity: bytes = b""
    session: str = ""
    seq_in: int = 0
    seq_out: int = 0
    connected: bool = False
    last_seen: float = 0.0
    account: BridgeAccount | None = None
    open_positions: int = 0
    symbols: dict[str, BridgeSymbol] = field(default_factory=dict)
    results: dict[str, asyncio.Future[CommandResult]] = field(default_factory=dict)
    snapshots: dict[str, asyncio.Future[Snapshot]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class BridgeState(msgspec.Struct, kw_only=True):
    """What survives a connector restart besides the order memory: committed in the order
    journal's frames (``connectors.journal``), with the reports of the same commit."""

    positions: dict[str, list[BridgePosition]] = {}
    orders: dict[str, list[BridgeOrder]] = {}
    copies: dict[str, dict[str, str]] = {}
    """Follower account → copy comment (``engine.core.comments``) → the position's ticket."""
    pending_copies: dict[str, dict[str, str]] = {}
    """Follower account → copy comment → the ticket of the pending order that copies it."""
    outbox: list[bytes] = []
    reports: dict[str, bytes] = {}
    """Only in state files from before the order journal: moved into it on open."""
    unsettled: dict[str, bytes] = {}
    """Orders whose outcome is unknown (no result in time), kept until settled."""


def upgrade_state_file(data: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """An old whole-file state → (the journal's state, the reports it remembered)."""
    state = msgspec.msgpack.decode(data, type=BridgeState)
    reports, state.reports = state.reports, {}
    return msgspec.msgpack.encode(state), list(reports.items())


def _upgrade_copies(state: BridgeState) -> None:
    """Keys of state files written before the comment codec (``master:ref``, ``order:…``)."""
    for account, copies in state.copies.items():
        for key in [k for k in copies if not is_copy(k)]:
            ticket = copies.pop(key)
            pending = key.startswith("order:")
            master, _, ref = key.removeprefix("order:").partition(":")
            target = state.pending_copies.setdefault(account, {}) if pending else copies
            target.setdefault(copy_comment(master, ref), ticket)


class BridgeConnector:
    def __init__(
        self,
        config: BridgeConfig,
        state_path: Path | None = None,
        *,
        order_memory: OrderMemoryConfig | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        secret_key: str | None = None,
    ) -> None:
        """``secret_key``: the connector's CURVE secret (Z85); by default it comes from the
        environment or key file the config names (``BridgeKeyError`` when it is missing)."""
        self.config = config
        self.public_key: str | None = None
        """The connector's CURVE public key: every EA's ``InpServerKey`` (None: plaintext)."""
        self._secret_key: bytes | None = None
        self._accounts_by_key: dict[bytes, str] = {}
        if not config.plaintext:
            if secret_key is None:
                secret_key = server_secret_key(config)
            else:
                check_curve_config(config, secret_key)
            self._secret_key = secret_key.encode("ascii")
            self.public_key = public_key_of(secret_key)
            self._accounts_by_key = {
                zmq.utils.z85.decode(t.curve_public_key): t.account
                for t in config.terminals
                if t.curve_public_key is not None
            }
        self.log_limiter = LogLimiter(log)
        """Bounds the log lines of refused and misbehaving peers (metrics count them all)."""
        self.state_path = state_path
        self.sessions = {t.account: TerminalSession(t) for t in config.terminals}
        for account in self.sessions:
            # Every configured terminal has its series before it ever connects.
            CONNECTED.labels(account).set(0)
            SEQUENCE_GAPS.labels(account)
            COMMAND_LATENCY.labels(account)
        self.by_identity: dict[bytes, TerminalSession] = {}
        self.journal = OrderJournal(state_path, order_memory, legacy=upgrade_state_file,
                                    clock=wall_clock)  # fmt: skip
        """Executed order ids → reports, and this connector's state (``connectors.journal``)."""
        state = BridgeState()
        if self.journal.state is not None:
            state = msgspec.msgpack.decode(self.journal.state, type=BridgeState)
        self.positions = {a: {p.ticket: p for p in ps} for a, ps in state.positions.items()}
        self.orders = {a: {o.ticket: o for o in os_} for a, os_ in state.orders.items()}
        _upgrade_copies(state)
        self.copies = state.copies
        self.pending_copies = state.pending_copies
        self.outbox: list[MasterEvent] = [
            codec.master_event_decoder.decode(e) for e in state.outbox
        ]
        self.unsettled: dict[str, FollowerOrder] = {
            order_id: codec.follower_order_decoder.decode(data)
            for order_id, data in state.unsettled.items()
        }
        self.runtime: ConnectorRuntime | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._router: Any = None
        self._monitor: Any = None
        self._authenticator: TerminalAuthenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.endpoint = config.endpoint

    # ------------------------------------------------------------------ lifecycle

    async def start(self, nc: Any) -> None:
        # A context of its own: ZAP is one handler per context, and each connector in a process
        # (a farm's masters and followers, a benchmark) admits only its own terminals' keys.
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # Bounds what any peer, authenticated or not, can make this process read at once.
        self._router.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
        # No ROUTER_HANDOVER: terminals use a fresh identity per session, so nobody can take
        # over a live terminal's connection by presenting its identity.
        if self._secret_key is not None:
            self._authenticator = TerminalAuthenticator(self._ctx, self._accounts_by_key,
                                                        self._key_refused)  # fmt: skip
            self._authenticator.start()
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
            self._monitor = self._router.get_monitor_socket(HANDSHAKE_FAILURES)
            self._tasks.append(asyncio.create_task(self._handshake_failures()))
        else:
            log.warning("bridge_plaintext", connector=self.config.connector_id,
                        endpoint=self.endpoint, detail="no CURVE: frames and tokens travel in "
                        "clear and any peer may connect; a trusted loopback only")  # fmt: skip
        if self.endpoint.endswith(":0"):
            port = self._router.bind_to_random_port(self.endpoint.rsplit(":", 1)[0])
            self.endpoint = f"{self.endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            await self._bind(self.endpoint)
        self.runtime = ConnectorRuntime(nc, self.config.connector_id, self)
        await self.runtime.start()
        self._tasks.append(asyncio.create_task(self._receive()))
        self._tasks.append(asyncio.create_task(self._heartbeats()))
        log.info("bridge_listening", endpoint=self.endpoint, terminals=len(self.sessions),
                 curve=self.public_key is not None, public_key=self.public_key,
                 max_frame_bytes=self.config.max_frame_bytes)  # fmt: skip

    async def _bind(self, endpoint: str, attempts: int = 50) -> None:
        """Bind, retrying briefly: a connector restarted onto its own endpoint may find the
        previous listener still being released (ZeroMQ closes it asynchronously)."""
        for attempt in range(attempts):
            try:
                self._router.bind(endpoint)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        try:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)
            if self.runtime is not None:
                await asyncio.wait_for(self.runtime.stop(), 10)
            self.commit()
        finally:
            for account in self.sessions:
                CONNECTED.labels(account).set(0)  # nobody is in session with a stopped bridge
            self.log_limiter.flush(closing=True)
            # Always: an open socket would block the ZeroMQ context (and the process) at exit.
            if self._authenticator is not None:
                await self._authenticator.stop()
                self._authenticator = None
            if self._router is not None:
                if self._monitor is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        self._router.disable_monitor()
                    self._monitor.close(0)
                    self._monitor = None
                self._router.close(0)
                self._router = None
            if self._ctx is not None:
                self._ctx.destroy(linger=0)
                self._ctx = None

    def health(self) -> dict[str, object]:
        """The runtime's health (NATS connected, orders and master events moving) and each
        terminal's session. A terminal that is away does not make the connector unhealthy:
        restarting the connector cannot bring it back (its alert and gauge say so)."""
        runtime: dict[str, object] = (
            {"ok": False, "reason": "not started"} if self.runtime is None
            else self.runtime.health()
        )  # fmt: skip
        return {
            **runtime,
            "curve": self.public_key is not None,
            "terminals": {a: {"connected": s.connected, "session": s.session,
                              "seq_in": s.seq_in} for a, s in self.sessions.items()},
        }  # fmt: skip

    # ----------------------------------------------------------------- persistence

    @property
    def reports(self) -> OrderJournal:
        """Encoded execution reports by order id (the journal, read as a mapping)."""
        return self.journal

    def save(self) -> None:
        """Append the mirrors, copies and outbox (and reports not yet committed) to the
        journal, without fsync: it survives a crash of the process."""
        self._write(durable=False)

    def _write(self, durable: bool | None) -> None:
        state = None
        if self.journal.persistent:
            state = msgspec.msgpack.encode(BridgeState(
                positions={a: list(p.values()) for a, p in self.positions.items()},
                orders={a: list(o.values()) for a, o in self.orders.items()},
                copies=self.copies,
                pending_copies=self.pending_copies,
                outbox=[codec.encode(e) for e in self.outbox],
                unsettled={k: codec.encode(v) for k, v in self.unsettled.items()},
            ))  # fmt: skip
        self.journal.commit(state, durable=durable)

    # --------------------------------------------------------------- Terminal protocol

    def master_accounts(self) -> list[str]:
        return [a for a, s in self.sessions.items() if s.config.role == "master"]

    def follower_accounts(self) -> list[str]:
        return [a for a, s in self.sessions.items() if s.config.role == "follower"]

    def account_state(self, account: str) -> AccountState | None:
        session = self.sessions[account]
        if session.account is None:
            return None
        a = session.account
        terminal = TerminalStatus(
            connected=session.connected, synchronised=session.ready.is_set(),
            reason="" if session.connected else "the terminal is not connected to the bridge",
        )  # fmt: skip
        return AccountState(account=account, ts_ns=time.time_ns(), currency=a.currency,
                            balance=a.balance, equity=a.equity, margin=a.margin,
                            free_margin=a.free_margin, leverage=max(a.leverage, 1),
                            open_positions=session.open_positions,
                            terminal=terminal)  # fmt: skip

    def symbol_specs(self, account: str) -> list[SymbolSpec]:
        specs = []
        for s in self.sessions[account].symbols.values():
            try:
                mode = TradeMode(s.trade_mode)
            except ValueError:
                mode = TradeMode.DISABLED
            specs.append(SymbolSpec(account=account, symbol=s.symbol, contract_size=s.contract_size,
                tick_size=s.tick_size, tick_value=s.tick_value, digits=s.digits,
                volume_min=s.volume_min, volume_max=s.volume_max, volume_step=s.volume_step,
                trade_mode=mode))  # fmt: skip
        return specs

    def unpublished_events(self) -> list[MasterEvent]:
        return list(self.outbox)

    def published(self, events: list[MasterEvent]) -> None:
        done = {e.event_id for e in events}
        self.outbox = [e for e in self.outbox if e.event_id not in done]

    def commit(self) -> None:
        """Make the executed orders durable: their reports and the copies they changed, in
        one journal frame, fsynced (see ConnectorRuntime)."""
        self._write(durable=None)

    # --------------------------------------------------------------- frames in

    async def _receive(self) -> None:
        while True:
            try:
                # Not copied: the frame object carries the connection's User-Id (the account
                # whose CURVE key the ZAP handler admitted), read at hello.
                parts = await self._router.recv_multipart(copy=False)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            if len(parts) < 2:
                BAD_FRAMES.labels("no_identity").inc()
                continue
            identity, message = parts[0].bytes, parts[-1]
            try:
                await self._handle(identity, message)
            except Exception as exc:  # one terminal's bad frame must never stop the others
                BAD_FRAMES.labels("handler_error").inc()
                if self.log_limiter.allow("handler_error"):
                    log.error("bridge_frame_failed", error=short_text(repr(exc)))

    async def _handle(self, identity: bytes, message: zmq.Frame) -> None:
        payload = message.buffer
        try:
            frame = terminal_frame_decoder.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            BAD_FRAMES.labels("malformed").inc()
            session = self.by_identity.get(identity)
            if session is not None and self._user_id(message) not in (None, session.config.account):
                session = None  # another key's connection: it gets no error in the session
            account = self._peer_account(session, message)
            # msgspec quotes the offending value: a 100 KB string would be a 100 KB log line.
            error = short_text(str(exc))
            if self.log_limiter.allow("malformed", account):
                log.warning("bridge_frame_malformed", identity=peer_text(identity[:64]),
                            account=account or None, bytes=len(payload),
                            prefix=peer_text(bytes(payload[:PREFIX_MAX])), error=error)  # fmt: skip
            if session is not None:
                await self._send(session, ProtocolError, reason=f"malformed frame: {error}")
            return
        FRAMES.labels("in", type(frame).__name__).inc()
        if isinstance(frame, Hello):
            await self._hello(identity, frame, self._user_id(message))
            return
        session = self.by_identity.get(identity)
        if session is None or not session.connected:
            # E.g. this connector restarted under a live terminal: the terminal must open a
            # new session (hello → welcome → snapshot), and the snapshot recovers the rest.
            BAD_FRAMES.labels("no_session").inc()
            account = self._peer_account(None, message)
            if self.log_limiter.allow("no_session", account):
                log.info("bridge_no_session", identity=peer_text(identity[:64]),
                         account=account or None, frame=type(frame).__name__)  # fmt: skip
            await self._raw_send(identity, ProtocolError(seq=1, reason=NO_SESSION))
            return
        key_account = self._user_id(message)
        if key_account is not None and key_account != session.config.account:
            # Another connection presenting a session's identity (libzmq refuses a duplicate
            # while the first is up): only the key the session was opened with speaks for it.
            BAD_FRAMES.labels("key_mismatch").inc()
            if self.log_limiter.allow("key_mismatch", key_account):
                log.warning("bridge_key_mismatch", key_account=key_account or None,
                            claimed=session.config.account)  # fmt: skip
            return
        session.last_seen = time.monotonic()
        if frame.seq <= session.seq_in:
            BAD_FRAMES.labels("duplicate").inc()
            return
        account = session.config.account
        if frame.seq != session.seq_in + 1:
            SEQUENCE_GAPS.labels(account).inc(frame.seq - session.seq_in - 1)
            if self.log_limiter.allow("sequence_gap", account):
                log.warning("bridge_sequence_gap", account=account,
                            expected=session.seq_in + 1, got=frame.seq)  # fmt: skip
            self._request_snapshot(session)
        # Past the cap the terminal is cut off on every snapshot: say so while it still fits.
        if (isinstance(frame, Snapshot) and len(payload) > self.config.max_frame_bytes // 2
                and self.log_limiter.allow("snapshot_near_cap", account)):  # fmt: skip
            log.warning("bridge_snapshot_near_frame_cap", account=account, bytes=len(payload),
                        max_frame_bytes=self.config.max_frame_bytes)  # fmt: skip
        session.seq_in = frame.seq
        if isinstance(frame, TradeEvent):
            await self._trade_event(session, frame)
        elif isinstance(frame, Snapshot):
            await self._snapshot(session, frame)
        elif isinstance(frame, CommandResult):
            waiter = session.results.pop(frame.corr, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
        elif isinstance(frame, AccountUpdate):
            session.account, session.open_positions = frame.account, frame.positions
            self._state_changed(session)
        elif isinstance(frame, Heartbeat):
            mine = state_hash(self.positions.get(account, {}).values(),
                              self.orders.get(account, {}).values())  # fmt: skip
            if frame.state_hash and frame.state_hash != mine:
                if self.log_limiter.allow("state_hash_mismatch", account):
                    log.warning("bridge_state_hash_mismatch", account=account)
                self._request_snapshot(session)
        elif isinstance(frame, ProtocolError) and self.log_limiter.allow("terminal_error", account):
            log.warning("bridge_terminal_error", account=account, reason=short_text(frame.reason),
                        ref_seq=frame.ref_seq)  # fmt: skip

    async def _hello(self, identity: bytes, hello: Hello, key_account: str | None) -> None:
        """``key_account``: the account whose CURVE key authenticated the connection (None
        in plaintext mode, "" if no ZAP handler answered: refused, fail closed)."""
        if key_account is not None and key_account != hello.account:
            # Before the token: a terminal's key must not let it test another account's token.
            BAD_FRAMES.labels("key_mismatch").inc()
            if self.log_limiter.allow("key_mismatch", key_account):
                log.warning("bridge_key_mismatch", key_account=key_account or None,
                            claimed=peer_text(hello.account.encode()))  # fmt: skip
            await self._raw_send(identity, Denied(seq=1, reason="this CURVE key is not this "
                                                  "account's"))  # fmt: skip
            return
        session = self.sessions.get(hello.account)
        if session is None or not hmac.compare_digest(
            hello.token.encode(), session.config.token.encode()
        ):
            BAD_FRAMES.labels("denied").inc()
            if self.log_limiter.allow("denied", key_account or ""):
                log.warning("bridge_denied", account=peer_text(hello.account.encode()))
            await self._raw_send(identity, Denied(seq=1, reason="unknown account or wrong token"))
            return
        if session.identity and session.identity != identity:
            self.by_identity.pop(session.identity, None)
        session.identity, session.session = identity, hello.session
        session.seq_in, session.seq_out = hello.seq, 0
        session.connected, session.last_seen = True, time.monotonic()
        session.ready.clear()
        self.by_identity[identity] = session
        CONNECTED.labels(hello.account).set(1)
        await self._send(session, Welcome, heartbeat_ms=self.config.heartbeat_ms)
        log.info("bridge_session", account=hello.account, platform=hello.platform,
                 session=hello.session)  # fmt: skip

    async def _trade_event(self, session: TerminalSession, frame: TradeEvent) -> None:
        account = session.config.account
        if session.config.role != "master":
            self._mirror_event(account, frame)
            return
        try:
            event = master_event(account, session.session, frame)
        except (ValueError, msgspec.ValidationError) as exc:
            # Not mirrored either: the terminal's next heartbeat hash then differs, and the
            # snapshot it brings recovers what the refused frame meant as ordinary events.
            BAD_FRAMES.labels("bad_event").inc()
            await self._send(session, ProtocolError, reason=str(exc), ref_seq=frame.seq)
            return
        self._mirror_event(account, frame)
        self.outbox.append(event)
        assert self.runtime is not None
        await self.runtime.flush_outbox(while_in_flight=self.save)

    def _mirror_event(self, account: str, frame: TradeEvent) -> None:
        """Keep the mirror in step with events, so the heartbeat hash can check it."""
        positions = self.positions.setdefault(account, {})
        orders = self.orders.setdefault(account, {})
        kind = frame.kind.value
        if kind == "opened" and frame.side is not None:
            positions[frame.ticket] = BridgePosition(ticket=frame.ticket, symbol=frame.symbol,
                side=frame.side, volume=frame.volume, price=frame.price, sl=frame.sl,
                tp=frame.tp, magic=frame.magic, comment=frame.comment)  # fmt: skip
        elif kind == "modified" and frame.ticket in positions:
            positions[frame.ticket] = msgspec.structs.replace(positions[frame.ticket],
                                                              sl=frame.sl, tp=frame.tp)  # fmt: skip
        elif kind == "reduced" and frame.ticket in positions:
            remainder = msgspec.structs.replace(positions.pop(frame.ticket),
                                                volume=frame.volume_after)  # fmt: skip
            ticket = frame.new_ticket or frame.ticket
            positions[ticket] = msgspec.structs.replace(remainder, ticket=ticket)
        elif kind == "closed":
            positions.pop(frame.ticket, None)
        elif kind == "closed_by":
            for ticket in (frame.ticket, frame.opposite_ticket):
                old = positions.pop(ticket, None)
                if old is not None and old.volume - frame.volume > 1e-9:
                    positions[ticket] = msgspec.structs.replace(
                        old, volume=old.volume - frame.volume
                    )
        elif kind in ("pending_placed", "pending_modified") and frame.order_type is not None:
            orders[frame.ticket] = BridgeOrder(ticket=frame.ticket, symbol=frame.symbol,
                order_type=frame.order_type, volume=frame.volume, price=frame.price,
                sl=frame.sl, tp=frame.tp, expiration=frame.expiration, magic=frame.magic,
                comment=frame.comment)  # fmt: skip
        elif kind == "pending_cancelled":
            orders.pop(frame.ticket, None)
        elif kind == "pending_triggered":
            order = orders.pop(frame.ticket, None)
            if order is not None:
                ticket = frame.position_ticket or frame.ticket
                positions[ticket] = BridgePosition(ticket=ticket, symbol=frame.symbol,
                    side=order.order_type.side, volume=frame.volume or order.volume,
                    price=frame.price, sl=frame.sl, tp=frame.tp, magic=frame.magic,
                    comment=order.comment)  # fmt: skip

    async def _snapshot(self, session: TerminalSession, snapshot: Snapshot) -> None:
        account = session.config.account
        session.account = snapshot.account
        session.open_positions = len(snapshot.positions)
        session.symbols = {s.symbol: s for s in snapshot.symbols}
        before_p = list(self.positions.get(account, {}).values())
        before_o = list(self.orders.get(account, {}).values())
        self.positions[account] = {p.ticket: p for p in snapshot.positions}
        self.orders[account] = {o.ticket: o for o in snapshot.orders}
        if session.config.role == "master":
            missed = missed_events(account, before_p, before_o, snapshot.positions,
                                   snapshot.orders, time.time_ns())  # fmt: skip
            if missed:
                log.info("bridge_recovered_events", account=account, events=len(missed))
                self.outbox.extend(missed)
        else:
            self._rebuild_copies(account, snapshot.positions, snapshot.orders)
        waiter = session.snapshots.pop(snapshot.corr, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(snapshot)
        session.ready.set()
        self.save()
        assert self.runtime is not None
        if self.outbox:
            await self.runtime.flush_outbox()
        # Specs can only be known once the terminal said which symbols it trades.
        await self.runtime.refresh_account(account)
        if self.unsettled and session.config.role == "follower":
            asyncio.get_running_loop().create_task(self.resolve_unknown_outcomes(account))

    def _rebuild_copies(
        self, account: str, positions: list[BridgePosition], orders: list[BridgeOrder]
    ) -> None:
        """Copy comment → ticket, from the comments the terminal holds (crash-only: a lost state
        file is rebuilt the same way). Known entries win: an MT4 partial close renews a ticket
        whose comment the broker may have rewritten."""
        for held, known in ((positions, self.copies), (orders, self.pending_copies)):
            copies = known.setdefault(account, {})
            alive = {item.ticket for item in held}
            for comment, ticket in list(copies.items()):
                if ticket not in alive:
                    copies.pop(comment)
            for item in held:
                if is_copy(item.comment):
                    copies.setdefault(item.comment, item.ticket)

    # --------------------------------------------------------------- peers refused

    def _user_id(self, message: zmq.Frame) -> str | None:
        """The account whose key the ZAP handler admitted for this message's connection."""
        if self._secret_key is None:
            return None
        try:
            return str(message.get("User-Id"))
        except zmq.ZMQError:
            return ""

    def _peer_account(self, session: TerminalSession | None, message: zmq.Frame) -> str:
        """Whom a log line is about, for its rate limit: a configured account or nobody."""
        if session is not None:
            return session.config.account
        return self._user_id(message) or ""

    def _key_refused(self, address: str, key: str) -> None:
        BAD_FRAMES.labels("unknown_key").inc()
        if self.log_limiter.allow("unknown_key"):
            log.warning("bridge_unknown_key", address=address, public_key=key,
                        detail="no terminal here has this curve_public_key")  # fmt: skip

    async def _handshake_failures(self) -> None:
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except (asyncio.CancelledError, zmq.ContextTerminated, zmq.ZMQError):
                return
            BAD_FRAMES.labels("handshake_failed").inc()
            if self.log_limiter.allow("handshake_failed"):
                log.warning("bridge_handshake_failed", failure=zmq.Event(event["event"]).name,
                            detail="a client without CURVE, or with another server key (the "
                            "EA's InpServerKey must be this connector's public key)")  # fmt: skip

    def _state_changed(self, session: TerminalSession) -> None:
        if self.runtime is not None:
            self.runtime.mark_dirty(session.config.account)

    # --------------------------------------------------------------- frames out

    async def _raw_send(self, identity: bytes, frame: Any) -> None:
        FRAMES.labels("out", type(frame).__name__).inc()
        await self._router.send_multipart([identity, frame_encoder.encode(frame)])

    async def _send(self, session: TerminalSession, frame_type: Any, **fields: Any) -> None:
        session.seq_out += 1
        frame = frame_type(seq=session.seq_out, ts=time.time_ns(), **fields)
        await self._raw_send(session.identity, frame)

    def _request_snapshot(self, session: TerminalSession) -> None:
        corr = uuid.uuid4().hex
        session.snapshots[corr] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().create_task(self._send(session, SnapshotRequest, corr=corr))

    async def _heartbeats(self) -> None:
        interval = self.config.heartbeat_ms / 1000
        while True:
            await asyncio.sleep(interval)
            self.log_limiter.flush()
            now = time.monotonic()
            for session in self.sessions.values():
                if not session.connected:
                    continue
                if now - session.last_seen > self.config.terminal_silence_s:
                    session.connected = False
                    session.ready.clear()
                    CONNECTED.labels(session.config.account).set(0)
                    log.warning("bridge_terminal_silent", account=session.config.account)
                    for waiter in session.results.values():
                        if not waiter.done():
                            waiter.set_exception(TerminalNotConnected("terminal went silent"))
                    continue
                await self._send(session, Heartbeat)
                if self.unsettled and session.config.role == "follower":
                    await self.resolve_unknown_outcomes(session.config.account)

    # --------------------------------------------------------------- commands

    async def execute(self, order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        previous = self.journal.recall(order.order_id)
        if previous is not None:
            return codec.execution_report_decoder.decode(previous)
        session = self.sessions[order.follower]
        try:
            # A terminal reconnecting right now is worth a short wait; a longer absence hands
            # the order back (unacknowledged) and the runtime retries it, in order.
            await asyncio.wait_for(session.ready.wait(), self.config.command_timeout_s)
        except TimeoutError as exc:
            raise TerminalNotConnected(order.follower) from exc
        if not session.connected:
            raise TerminalNotConnected(order.follower)
        report = await self._execute(session, order, reports)
        if isinstance(report, OrderUnknown):
            self.unsettled[order.order_id] = order
        else:
            self.journal.record(order.order_id, codec.encode(report))
        return report

    async def resolve_unknown_outcomes(self, account: str) -> int:
        """Ask again for every unknown outcome of this account: the same ``corr`` makes the
        terminal answer with its first result, so nothing trades twice. Returns how many
        were resolved; each gets a follow-up report (``report:<order id>:settled``)."""
        session = self.sessions[account]
        resolved = 0
        for order_id, order in list(self.unsettled.items()):
            if order.follower != account or not session.connected:
                continue
            # Not expired: the order was sent, so only the terminal knows what became of it.
            report = await self._execute(session, order, OrderReports(order, order.trace))
            if isinstance(report, OrderUnknown):
                continue
            self.unsettled.pop(order_id, None)
            self.journal.record(order_id, codec.encode(report))
            self.commit()  # durable before it is reported
            assert self.runtime is not None
            await self.runtime.publish_report(report, f"report:{order_id}:settled")
            log.info("bridge_outcome_settled", account=account, order=order_id,
                     status=report.__struct_config__.tag)  # fmt: skip
            resolved += 1
        return resolved

    async def _execute(
        self, session: TerminalSession, order: FollowerOrder, reports: OrderReports
    ) -> ExecutionReport:
        account = order.follower
        copies = self.copies.setdefault(account, {})
        ref = copy_comment(order.master, getattr(order, "master_position_id", ""))

        if isinstance(order, FollowerOpen):
            if ref in copies:
                # Executed before (an unknown outcome, a redelivery): report the copy it made.
                position = self.positions.get(account, {}).get(copies[ref])
                if position is None:
                    return reports.done("already copied", [copies[ref]])
                return reports.filled(position.symbol, position.ticket, position.side,
                                      position.volume, position.price)  # fmt: skip
            # Only now: an open that ran before its signal expired reports that copy above.
            if reports.signal_expired:
                return reports.expired()
            spec = session.symbols.get(order.symbol)
            deviation = 0
            if order.max_price_deviation is not None and spec is not None:
                deviation = int(order.max_price_deviation / spec.tick_size)
            result = await self._command(session, order.order_id, CommandOp.OPEN,
                symbol=order.symbol, side=order.side, volume=order.volume, sl=order.sl,
                tp=order.tp, deviation_points=deviation, magic=order.magic,
                comment=ref)  # fmt: skip
            if result is None:
                return reports.unknown(NO_RESULT)
            if result.ok:
                copies[ref] = result.ticket
                return reports.filled(order.symbol, result.ticket, order.side, result.volume,
                                      result.price,
                                      terminal_ns=result.time or time.time_ns())  # fmt: skip
            return reports.rejected(result.retcode, result.reason)
        if isinstance(order, FollowerClose | FollowerModify) and order.manual:
            return await self._manual(session, order, reports)
        if isinstance(order, FollowerClose | FollowerModify):
            ticket = copies.get(ref)
            position = self.positions.get(account, {}).get(ticket or "")
            if ticket is None:
                return reports.done(NO_POSITION_COPY)
            if isinstance(order, FollowerModify):
                result = await self._command(session, order.order_id, CommandOp.MODIFY,
                    symbol=order.symbol, ticket=ticket, sl=order.sl, tp=order.tp)  # fmt: skip
                return _outcome(reports, result, "SL/TP modified", [ticket])
            volume = 0.0  # the whole position
            spec = session.symbols.get(order.symbol)
            if order.ratio < 1.0:
                # A close command without a volume closes everything: a partial close that
                # cannot be sized, or rounds to nothing, must never be sent as one.
                if position is None or spec is None:
                    return reports.rejected(
                        RETCODE_NO_SYMBOL_SPEC,
                        f"cannot size a partial close of {order.symbol}: the terminal has not"
                        " sent the position or the symbol's specification yet",
                    )
                volume = partial_close_volume(position.volume, order.ratio,
                                              self._spec(account, spec))  # fmt: skip
                if volume <= 0:
                    return reports.done("the ratio rounds to nothing on this position")
                if volume >= position.volume:
                    volume = 0.0
            result = await self._command(session, order.order_id, CommandOp.CLOSE,
                symbol=order.symbol, ticket=ticket, volume=volume)  # fmt: skip
            if result is not None and result.ok:
                if volume and position is not None and volume < position.volume:
                    new_ref = copy_comment(order.master, order.new_master_position_id) \
                        if order.new_master_position_id else ref  # fmt: skip
                    copies.pop(ref, None)
                    copies[new_ref] = result.ticket or ticket  # MT4 renews the ticket
                else:
                    copies.pop(ref, None)
            if result is not None and result.ok and position is not None:
                side = position.side.flipped()  # closing a buy is a sell deal
                return reports.filled(order.symbol, ticket, side,
                                      result.volume or position.volume, result.price,
                                      terminal_ns=result.time or time.time_ns())  # fmt: skip
            return _outcome(reports, result, "closed", [ticket])
        if isinstance(order, FollowerCloseBy):
            first = copies.get(ref)
            second = copies.get(copy_comment(order.master, order.master_opposite_position_id))
            if first is None or second is None:
                return reports.done(NOT_BOTH_COPIES)
            result = await self._command(session, order.order_id, CommandOp.CLOSE_BY,
                symbol=order.symbol, ticket=first, opposite_ticket=second)  # fmt: skip
            return _outcome(reports, result, "closed by the opposite copy", [first, second])
        if isinstance(order, FollowerCloseAll):
            closed = []
            for comment, ticket in list(copies.items()):
                if is_copy_of(comment, order.master):
                    result = await self._command(session, f"{order.order_id}:{ticket}",
                        CommandOp.CLOSE, symbol="*", ticket=ticket)  # fmt: skip
                    if result is not None and result.ok:
                        closed.append(ticket)
                        copies.pop(comment, None)
            return reports.done(f"closed {len(closed)} position(s): {order.reason}", closed)
        pendings = self.pending_copies.setdefault(account, {})
        order_ref = copy_comment(order.master, order.master_order_id)  # type: ignore[union-attr]
        if isinstance(order, FollowerPendingPlace):
            result = await self._command(session, order.order_id, CommandOp.PENDING_PLACE,
                symbol=order.symbol, order_type=order.order_type, volume=order.volume,
                price=order.price, sl=order.sl, tp=order.tp, expiration=order.expiration_ns,
                magic=order.magic,
                comment=order_ref)  # fmt: skip
            if result is not None and result.ok:
                pendings[order_ref] = result.ticket
            return _outcome(reports, result, "pending order placed", [])
        ticket = pendings.get(order_ref)
        if ticket is None:
            return reports.done(NO_PENDING_COPY)
        if isinstance(order, FollowerPendingModify):
            result = await self._command(session, order.order_id, CommandOp.PENDING_MODIFY,
                symbol=order.symbol, ticket=ticket, price=order.price, sl=order.sl,
                tp=order.tp, expiration=order.expiration_ns)  # fmt: skip
            return _outcome(reports, result, "pending order modified", [])
        assert isinstance(order, FollowerPendingCancel)
        result = await self._command(session, order.order_id, CommandOp.PENDING_CANCEL,
                                     symbol=order.symbol, ticket=ticket)  # fmt: skip
        if result is not None and result.ok:
            pendings.pop(order_ref, None)
        return _outcome(reports, result, "pending order cancelled", [])

    async def _manual(
        self, session: TerminalSession, order: FollowerClose | FollowerModify,
        reports: OrderReports,
    ) -> ExecutionReport:  # fmt: skip
        """A person's modify or close of the account's own position: ``master_position_id``
        is the terminal's ticket (``schemas.orders``, ``manual``), looked up in the mirror."""
        account, ticket = order.follower, order.master_position_id
        position = self.positions.get(account, {}).get(ticket)
        if position is None and order.order_id in self.unsettled:
            # Sent before and unanswered: the position may be gone by that very command, and
            # only the terminal's first result (the same corr) says so.
            op = CommandOp.MODIFY if isinstance(order, FollowerModify) else CommandOp.CLOSE
            result = await self._command(session, order.order_id, op, symbol=order.symbol,
                                         ticket=ticket)  # fmt: skip
            return _outcome(reports, result, "SL/TP modified" if op is CommandOp.MODIFY
                            else "closed", [ticket])  # fmt: skip
        if position is None:
            return reports.rejected(RETCODE_NO_SUCH_POSITION, NO_SUCH_POSITION)
        if isinstance(order, FollowerModify):
            result = await self._command(session, order.order_id, CommandOp.MODIFY,
                symbol=position.symbol, ticket=ticket, sl=order.sl, tp=order.tp)  # fmt: skip
            return _outcome(reports, result, "SL/TP modified", [ticket])
        volume = 0.0  # the whole position
        symbol = session.symbols.get(position.symbol)
        if order.ratio < 1.0:
            if symbol is None:
                # Unsized, a partial close would close everything: refuse it instead.
                return reports.rejected(
                    RETCODE_NO_SYMBOL_SPEC, f"no symbol specification for {position.symbol}"
                )
            volume = partial_close_volume(position.volume, order.ratio,
                                          self._spec(account, symbol))  # fmt: skip
            if volume <= 0:
                return reports.done("the ratio rounds to nothing on this position")
            if volume >= position.volume:
                volume = 0.0
        result = await self._command(session, order.order_id, CommandOp.CLOSE,
            symbol=position.symbol, ticket=ticket, volume=volume)  # fmt: skip
        if result is None or not result.ok:
            return _outcome(reports, result, "closed", [ticket])
        # A copy closed by hand: the copy's entry follows the position (gone, or the
        # remainder's ticket, which MT4 renews), so the master's own close finds no stale ticket.
        copies = self.copies.setdefault(account, {})
        for comment in [c for c, t in copies.items() if t == ticket]:
            if volume:
                copies[comment] = result.ticket or ticket
            else:
                copies.pop(comment)
        return reports.filled(position.symbol, ticket, position.side.flipped(),
                              result.volume or (volume or position.volume), result.price,
                              terminal_ns=result.time or time.time_ns())  # fmt: skip

    @staticmethod
    def _spec(account: str, s: BridgeSymbol) -> SymbolSpec:
        return SymbolSpec(account=account, symbol=s.symbol, contract_size=s.contract_size,
                          tick_size=s.tick_size, tick_value=s.tick_value, digits=s.digits,
                          volume_min=s.volume_min, volume_max=s.volume_max,
                          volume_step=s.volume_step)  # fmt: skip

    async def _command(
        self, session: TerminalSession, corr: str, op: CommandOp, **fields: Any
    ) -> CommandResult | None:
        """Send one command and wait for its single result; None when none came in time.

        None is *unknown*, never rejected: the terminal may have traded. Sending the same
        ``corr`` again later returns the terminal's first result (settles it).
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[CommandResult] = loop.create_future()
        session.results[corr] = waiter
        started = time.perf_counter()
        await self._send(session, Command, corr=corr, op=op, **fields)
        try:
            result = await asyncio.wait_for(waiter, self.config.command_timeout_s)
        except (TimeoutError, TerminalNotConnected):
            session.results.pop(corr, None)
            log.warning("bridge_command_unknown", account=session.config.account, corr=corr)
            return None
        COMMAND_LATENCY.labels(session.config.account).observe(time.perf_counter() - started)
        return result


def _outcome(
    reports: OrderReports, result: CommandResult | None, detail: str, position_ids: list[str]
) -> ExecutionReport:
    """A command's result without a fill as the order's report: no result is unknown."""
    if result is None:
        return reports.unknown(NO_RESULT)
    if not result.ok:
        return reports.rejected(result.retcode, result.reason)
    return reports.done(detail, position_ids)
