"""PaperBridgeTerminal: a paper-venue account that speaks the bridge protocol like the MQL EA.

It is a real protocol peer, not a mock: a ZeroMQ DEALER socket (identity = the account id)
connected to the bridge connector's ROUTER, the frames of :mod:`schemas.bridge`, and a
:class:`~connectors.paper.venue.PaperVenue` account behind it filled at real prices. It serves
paper-copying through the bridge connector, demos, and the conformance suite in
``tests/conformance`` (which every terminal-side implementation, the EA's included, follows).

What it does, as the EA does:

- CURVE, as the EA's inputs: ``server_key`` (the connector's public key, ``InpServerKey``)
  and the terminal's own ``public_key``/``secret_key`` (``InpPublicKey``/``InpSecretKey``),
  40-character Z85 texts. Without a server key it refuses to connect unless ``plaintext``
  (``InpPlaintext``) says so.
- ``start``: connect, send ``hello`` (a fresh random ``session``), wait for ``welcome`` (or
  raise :class:`BridgeDenied` on ``denied``), then send a ``snapshot`` (``corr=""``). A
  connector that refuses the CURVE keys answers nothing: ``start`` times out.
- Master side: :meth:`PaperBridgeTerminal.trade` runs a venue request as a trader would and
  :meth:`PaperBridgeTerminal.on_quote` feeds prices; every resulting transaction goes out as one
  ``event`` frame, then one ``account`` frame.
- Follower side: every ``cmd`` is executed on the venue with ``client_order_id = corr`` and
  answered with exactly one ``result`` (then its events and an ``account`` frame); a repeated
  ``corr`` gets the first result again and trades nothing.
- ``snapshot_req`` gets a ``snapshot`` with the request's ``corr``; ``hb`` with the
  :func:`~connectors.bridge.hashing.state_hash` goes out every ``heartbeat_ms``.
- A frame it cannot read gets an ``error`` frame (``ref_seq`` = its seq when readable); a gap
  in the connector's ``seq`` is logged and counted (the connector owns recovery); a repeated
  ``seq`` is ignored.
- Platform ``"mt4"`` behaves like MT4: a partial close (and the remainder of a close-by)
  renews the position's ticket, reported as ``new_ticket``; later frames use the new ticket.

Sends never block and never drop: frames wait in a local FIFO while the socket's queue is full.
Frames still queued when a session ends are dropped with it; the next session's snapshot and
the connector's re-sent commands (answered from the result memory) make up for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import msgspec
import structlog
import zmq
import zmq.asyncio
from zmq.utils import z85

from connectors.bridge.hashing import state_hash
from connectors.paper.model import PendingOrder, Position, Result, Retcode, Transaction
from connectors.paper.prices import Quote
from connectors.paper.venue import PaperVenue
from schemas.bridge import (
    NO_SESSION,
    PROTOCOL_VERSION,
    AccountUpdate,
    BridgeAccount,
    BridgeOrder,
    BridgePosition,
    BridgeSymbol,
    Command,
    CommandOp,
    CommandResult,
    Denied,
    EventKind,
    Heartbeat,
    Hello,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    TradeEvent,
    Welcome,
    connector_frame_decoder,
    frame_encoder,
)
from schemas.master import (
    PendingOrderCancelled,
    PendingOrderModified,
    PendingOrderPlaced,
    PendingOrderTriggered,
    PositionClosed,
    PositionClosedBy,
    PositionModified,
    PositionOpened,
    PositionReduced,
)

log = structlog.get_logger("tradecopy.bridge.paper_terminal")

Platform = Literal["paper", "mt4"]
EA_VERSION = "tradecopy-paper-terminal/1"
#: MT4 gives the remainder of a partial close a new ticket. Ours come from this range, which the
#: venue's own counter (from 1,000,001) never reaches, below MT4's int32 ticket limit.
RENEWED_TICKET_BASE = 2_000_000_000
#: Results are remembered by corr for repeated commands; the venue remembers them for good
#: (``client_order_id``), this is the fast path and keeps the exact first answer.
_REMEMBERED_RESULTS = 100_000
_REASON_MAX = 200
_COMMENT_MAX = 256
_FLUSH_TIMEOUT_S = 1.0


class BridgeDenied(Exception):
    """The connector answered ``hello`` with ``denied`` (or speaks another protocol version)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_session_id() -> str:
    return secrets.token_hex(8)


def _curve_key(name: str, value: str) -> bytes:
    """A Z85 key as the EA takes it: 40 characters that decode (surrounding blanks ignored)."""
    key = value.strip()
    try:
        if len(key) != 40 or len(z85.decode(key)) != 32:
            raise ValueError(key)
    except (ValueError, KeyError):  # z85.decode: KeyError for a character outside Z85
        raise ValueError(f"{name} must be a 40-character Z85 CURVE key") from None
    return key.encode("ascii")


class PaperBridgeTerminal:
    """One paper account on the bridge protocol, over a real ZeroMQ DEALER socket.

    ``heartbeat_ms`` is the heartbeat interval until the connector's ``welcome`` names its own
    (``welcome.heartbeat_ms`` governs the session). ``session`` fixes the first session id
    (default: random); :meth:`reconnect` picks a fresh one unless told to resume.

    Fault injection for the conformance suite — behaviour a real, misbehaving terminal or a
    lossy link also shows, so the connector's recovery can be tested against it:

    - ``drop_events``: frame seqs whose ``event`` frame is lost: the seq is used up but the
      frame never leaves (the connector sees a gap).
    - ``drop_results``: corrs whose first ``result`` is lost: the command was executed but the
      answer never left (a crash or link drop between OrderSend and the reply). A repeated
      corr is answered normally.
    - ``late_close_by_opposite``: the first close-by is reported with ``opposite_ticket`` "0",
      as the MT5 EA did when the close-by order was not yet in history at DEAL_ADD time (the
      connector must refuse it; the heartbeat's state hash then brings a snapshot).
    """

    def __init__(
        self,
        endpoint: str,
        account: str,
        token: str,
        venue: PaperVenue,
        *,
        platform: Platform = "paper",
        heartbeat_ms: int = 1000,
        session: str | None = None,
        handshake_timeout_s: float = 10.0,
        context: zmq.asyncio.Context | None = None,
        server_key: str = "",
        public_key: str = "",
        secret_key: str = "",
        plaintext: bool = False,
        drop_events: Iterable[int] = (),
        drop_results: Iterable[str] = (),
        late_close_by_opposite: bool = False,
    ) -> None:
        self._curve: tuple[bytes, bytes, bytes] | None = None
        if server_key.strip():
            self._curve = (_curve_key("server_key", server_key),
                           _curve_key("public_key", public_key),
                           _curve_key("secret_key", secret_key))  # fmt: skip
            if self._curve[0] == self._curve[1]:
                raise ValueError("public_key is the connector's key: a terminal needs its own pair")
        elif not plaintext:
            raise ValueError(
                "no CURVE server key: give server_key, public_key and secret_key (`tradecopy "
                "bridge keys`), or plaintext=True on a trusted loopback only"
            )
        if platform not in ("paper", "mt4"):
            raise ValueError(f"platform must be 'paper' or 'mt4', not {platform!r}")
        if heartbeat_ms <= 0:
            raise ValueError("heartbeat_ms must be positive")
        self.endpoint = endpoint
        self.account = account
        self.token = token
        self.venue = venue
        self.platform: Platform = platform
        self.heartbeat_ms = heartbeat_ms
        self.session = session or new_session_id()
        self.handshake_timeout_s = handshake_timeout_s
        self._context = context
        self._drop_events = frozenset(drop_events)
        self._drop_results = set(drop_results)
        self._late_close_by_opposite = late_close_by_opposite

        self._sock: zmq.asyncio.Socket | None = None
        self._connects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: deque[bytes] = deque()
        self._outbox_ready = asyncio.Event()
        self._seq = 0
        """The last seq this terminal sent in the current session."""
        self._peer_seq = 0
        """The last seq received from the connector in the current session."""
        self._results: OrderedDict[str, CommandResult] = OrderedDict()
        self._closing: asyncio.Task[None] | None = None

        # MT4 ticket renewal: venue position id <-> the ticket the terminal shows.
        self._ticket_by_venue_id: dict[str, str] = {}
        self._venue_id_by_ticket: dict[str, str] = {}
        self._retired_tickets: set[str] = set()
        self._renewed = 0

        self.gaps = 0
        """Gaps seen in the connector's seq (logged; the connector owns recovery)."""
        self.duplicates = 0
        """Connector frames ignored for a repeated seq."""
        self.malformed = 0
        """Frames from the connector that could not be read (each answered with ``error``)."""
        self.errors_received: list[ProtocolError] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Connect, ``hello``, wait for ``welcome``, send the snapshot, start heartbeats.

        Raises :class:`BridgeDenied` on ``denied`` and :class:`TimeoutError` when no answer comes
        within ``handshake_timeout_s``; either way the terminal is stopped again.
        """
        await self._connect(resume=False)

    async def _connect(self, *, resume: bool) -> None:
        if self._sock is not None:
            raise RuntimeError("the terminal is already started")
        context = self._context or zmq.asyncio.Context.instance()
        sock = context.socket(zmq.DEALER)
        # Per-session identity: a peer that knows only the account id cannot take over this
        # connection; the connector binds identity to account at an authenticated hello.
        self._connects += 1
        identity = f"{self.account}.{self.session}.{self._connects}"
        sock.setsockopt(zmq.IDENTITY, identity.encode()[:255])
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            # Before connect, as the EA: the link is encrypted, the connector must hold the
            # server key's secret, and our key pair says which terminal this is.
            server, public, secret = self._curve
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(self.endpoint)
        self._sock = sock
        if not resume:
            self._seq = 0
        self._peer_seq = 0
        self._outbox.clear()
        self._tasks = [asyncio.create_task(self._send_loop(sock), name="bridge-send")]
        self._send(
            Hello,
            version=PROTOCOL_VERSION,
            account=self.account,
            token=self.token,
            platform=self.platform,
            session=self.session,
            ea_version=EA_VERSION,
        )
        try:
            answer = await asyncio.wait_for(self._handshake(sock), self.handshake_timeout_s)
            if isinstance(answer, Denied):
                raise BridgeDenied(answer.reason)
            if answer.version != PROTOCOL_VERSION:
                raise BridgeDenied(
                    f"the connector speaks bridge protocol {answer.version},"
                    f" this terminal {PROTOCOL_VERSION}"
                )
        except BaseException as exc:
            log.warning("bridge_handshake_failed", account=self.account, error=str(exc))
            await self._close(flush=False)
            raise
        self._peer_seq = answer.seq
        self.heartbeat_ms = answer.heartbeat_ms
        log.info("bridge_welcomed", account=self.account, session=self.session,
                 curve=self._curve is not None)  # fmt: skip
        self._send_snapshot("")
        self._tasks.append(asyncio.create_task(self._receive_loop(sock), name="bridge-recv"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="bridge-hb"))

    async def stop(self) -> None:
        """Send what is queued (for up to a second), then close the socket."""
        await self._close(flush=True)

    async def reconnect(self, new_session: bool = True) -> None:
        """Drop the connection and connect again: ``hello``, ``welcome``, snapshot.

        ``new_session`` (what a restarted EA does) resets both seq counters. ``False`` (a link
        drop the EA survived) resumes: same session id, and this terminal's seq goes on from
        where it was, so frames lost with the old connection show up as a gap. Either way the
        connector's seq is taken from its ``welcome``, and commands answered before stay
        answered: the result memory lives on.
        """
        await self._close(flush=False)
        if new_session:
            self.session = new_session_id()
        await self._connect(resume=not new_session)

    async def _close(self, *, flush: bool) -> None:
        sock = self._sock
        if sock is None:
            return
        if flush and self._outbox:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_TIMEOUT_S):
                    while self._outbox:
                        await asyncio.sleep(0.005)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock = None
        self._outbox.clear()
        sock.close(linger=100 if flush else 0)

    async def _handshake(self, sock: zmq.asyncio.Socket) -> Welcome | Denied:
        while True:
            parts = await sock.recv_multipart()
            frame = self._decode(parts)
            if isinstance(frame, Welcome | Denied):
                return frame
            if frame is not None and not isinstance(frame, Heartbeat):
                self._send(
                    ProtocolError,
                    reason=f"{type(frame).__name__} before welcome",
                    ref_seq=frame.seq,
                )

    # ------------------------------------------------------------------ sending

    def _send(self, frame_type: Callable[..., Any], /, **fields: Any) -> None:
        """Number a frame, and queue it unless fault injection says the link loses it."""
        self._seq += 1
        frame = frame_type(seq=self._seq, ts=time.time_ns(), **fields)
        if self._lost(frame):
            log.info("bridge_frame_dropped_on_purpose", account=self.account, seq=frame.seq)
            return
        self._outbox.append(frame_encoder.encode(frame))
        self._outbox_ready.set()

    def _lost(self, frame: Any) -> bool:
        if isinstance(frame, TradeEvent):
            return frame.seq in self._drop_events
        if isinstance(frame, CommandResult) and frame.corr in self._drop_results:
            self._drop_results.discard(frame.corr)
            return True
        return False

    async def _send_loop(self, sock: zmq.asyncio.Socket) -> None:
        """Drain the FIFO in order; a full socket queue waits for room, nothing is dropped."""
        outbox = self._outbox
        while True:
            if not outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            try:
                await sock.send(outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                await sock.poll(100, zmq.POLLOUT)
                continue
            outbox.popleft()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_ms / 1000)
            self._send(Heartbeat, state_hash=self.state_hash())

    # ------------------------------------------------------------------ receiving

    async def _receive_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart()
            frame = self._decode(parts)
            if frame is not None:
                self._on_frame(frame)

    def _decode(self, parts: Sequence[bytes]) -> Any:
        """The connector frame in ``parts``, or None after answering ``error`` for it."""
        if len(parts) != 1:
            self._malformed(f"expected one ZeroMQ frame per message, got {len(parts)}", 0)
            return None
        raw = parts[0]
        try:
            return connector_frame_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            self._malformed(f"undecodable frame: {exc}", _readable_seq(raw))
            return None

    def _malformed(self, reason: str, ref_seq: int) -> None:
        self.malformed += 1
        log.warning("bridge_malformed_frame", account=self.account, reason=reason)
        self._send(ProtocolError, reason=reason[:_REASON_MAX], ref_seq=ref_seq)

    def _on_frame(self, frame: Any) -> None:
        if isinstance(frame, ProtocolError) and frame.reason == NO_SESSION:
            # Outside any session, so outside its numbering: a restarted connector's frames
            # start again at 1. Open a new session whatever the seq says.
            self.errors_received.append(frame)
            if self._closing is None:
                self._closing = asyncio.get_running_loop().create_task(self._rehello())
            return
        if frame.seq <= self._peer_seq:
            self.duplicates += 1
            log.info("bridge_duplicate_seq", account=self.account, seq=frame.seq)
            return
        if frame.seq != self._peer_seq + 1:
            self.gaps += 1
            log.warning(
                "bridge_seq_gap", account=self.account, expected=self._peer_seq + 1, got=frame.seq
            )
        self._peer_seq = frame.seq
        if isinstance(frame, Command):
            self._execute(frame)
        elif isinstance(frame, SnapshotRequest):
            self._send_snapshot(frame.corr)
        elif isinstance(frame, ProtocolError):
            self.errors_received.append(frame)
            log.warning("bridge_peer_error", account=self.account, reason=frame.reason)
        elif isinstance(frame, Denied):
            # Mid-session: the connector revoked the account; stop answering.
            log.warning("bridge_denied_in_session", account=self.account, reason=frame.reason)
            self._closing = asyncio.get_running_loop().create_task(self._close(flush=False))
        # Heartbeats only prove the connector is alive; a late welcome changes nothing.

    async def _rehello(self) -> None:
        try:
            await self.reconnect(new_session=True)
        finally:
            self._closing = None

    # ------------------------------------------------------------------ state

    def ticket_of(self, venue_id: str) -> str:
        """The ticket the terminal shows for a venue position or order id."""
        return self._ticket_by_venue_id.get(venue_id, venue_id)

    def venue_id_of(self, ticket: str) -> str | None:
        """The venue id behind a ticket; None for a ticket MT4 renewed (it no longer exists)."""
        if ticket in self._retired_tickets:
            return None
        return self._venue_id_by_ticket.get(ticket, ticket)

    def positions(self) -> list[BridgePosition]:
        return [self._bridge_position(p) for p in self.venue.positions(self.account)]

    def orders(self) -> list[BridgeOrder]:
        return [self._bridge_order(o) for o in self.venue.pending_orders(self.account)]

    def state_hash(self) -> str:
        return state_hash(self.positions(), self.orders())

    def _bridge_account(self) -> BridgeAccount:
        state = self.venue.account_state(self.account)
        return BridgeAccount(
            currency=state.currency,
            balance=state.balance,
            equity=state.equity,
            margin=state.margin,
            free_margin=state.free_margin,
            leverage=state.leverage,
        )

    def _bridge_symbols(self) -> list[BridgeSymbol]:
        symbols = []
        for name in self.venue.symbols:
            spec = self.venue.symbol_spec(self.account, name)
            symbols.append(
                BridgeSymbol(
                    symbol=name,
                    contract_size=spec.contract_size,
                    tick_size=spec.tick_size,
                    tick_value=spec.tick_value,
                    digits=spec.digits,
                    volume_min=spec.volume_min,
                    volume_max=spec.volume_max,
                    volume_step=spec.volume_step,
                    trade_mode=spec.trade_mode.value,
                    filling="ioc",
                )
            )
        return symbols

    def _bridge_position(self, position: Position) -> BridgePosition:
        return BridgePosition(
            ticket=self.ticket_of(position.position_id),
            symbol=position.symbol,
            side=position.side,
            volume=position.volume,
            price=position.open_price,
            sl=position.sl,
            tp=position.tp,
            magic=position.magic,
            comment=position.comment[:_COMMENT_MAX],
            time=position.open_ts_ns,
        )

    def _bridge_order(self, order: PendingOrder) -> BridgeOrder:
        return BridgeOrder(
            ticket=self.ticket_of(order.order_id),
            symbol=order.symbol,
            order_type=order.order_type,
            volume=order.volume,
            price=order.price,
            sl=order.sl,
            tp=order.tp,
            expiration=order.expiration_ns,
            magic=order.magic,
            comment=order.comment[:_COMMENT_MAX],
        )

    def _send_snapshot(self, corr: str) -> None:
        self._send(
            Snapshot,
            corr=corr,
            account=self._bridge_account(),
            symbols=self._bridge_symbols(),
            positions=self.positions(),
            orders=self.orders(),
        )

    def _send_account(self) -> None:
        self._send(
            AccountUpdate,
            account=self._bridge_account(),
            positions=len(self.venue.positions(self.account)),
        )

    # ------------------------------------------------------------------ master side

    async def trade(self, action: Callable[[PaperVenue], Result]) -> Result:
        """Run a trader's venue request and report what it did (events, then ``account``).

        ``action`` uses venue ids (see :meth:`venue_id_of`); a rejection reports nothing.
        """
        result = action(self.venue)
        if not result.duplicate:
            self._report(result.transactions, result.price)
        await asyncio.sleep(0)
        return result

    async def on_quote(self, quote: Quote) -> list[Transaction]:
        """Give the venue a price; report the SL/TP hits, triggers and expiries it set off.

        When several terminals share one venue, call ``venue.on_quote`` once and hand the
        transactions to each terminal's :meth:`report` instead.
        """
        transactions = self.venue.on_quote(quote)
        await self.report(transactions)
        return transactions

    async def report(self, transactions: Iterable[Transaction]) -> None:
        """Send this account's transactions as events (others' are ignored)."""
        self._report(transactions)
        await asyncio.sleep(0)

    def _report(self, transactions: Iterable[Transaction], price: float = 0.0) -> None:
        self._send_events(self._events(transactions, price))

    def _events(self, transactions: Iterable[Transaction], price: float) -> list[dict[str, Any]]:
        return [self._event_fields(t, price) for t in transactions if t.master == self.account]

    def _send_events(self, events: list[dict[str, Any]]) -> None:
        if not events or self._sock is None:
            return
        for fields in events:
            self._send(TradeEvent, **fields)
        self._send_account()

    def _event_fields(self, t: Transaction, price: float) -> dict[str, Any]:
        """One venue transaction as the TradeEvent fields the EA would send for it."""
        common: dict[str, Any] = {"symbol": t.symbol, "magic": t.magic, "time": t.ts_ns}
        if isinstance(t, PositionOpened):
            return common | {
                "kind": EventKind.OPENED,
                "ticket": self.ticket_of(t.position_id),
                "side": t.side,
                "volume": t.volume,
                "price": t.price,
                "sl": t.sl,
                "tp": t.tp,
                "comment": t.comment[:_COMMENT_MAX],
            }
        if isinstance(t, PositionModified):
            held = self._position(t.position_id)
            return common | {
                "kind": EventKind.MODIFIED,
                "ticket": self.ticket_of(t.position_id),
                "side": t.side,
                "volume": 0.0 if held is None else held.volume,
                "sl": t.sl,
                "tp": t.tp,
            }
        if isinstance(t, PositionReduced):
            ticket = self.ticket_of(t.position_id)
            return common | {
                "kind": EventKind.REDUCED,
                "ticket": ticket,
                "side": t.side,
                "volume": round(t.volume_before - t.volume_after, 8),
                "volume_before": t.volume_before,
                "volume_after": t.volume_after,
                "price": t.price,
                "new_ticket": self._renew(t.position_id),
            }
        if isinstance(t, PositionClosed):
            return common | {
                "kind": EventKind.CLOSED,
                "ticket": self.ticket_of(t.position_id),
                "side": t.side,
                "volume": t.volume,
                "price": t.price,
                "reason": t.reason,
            }
        if isinstance(t, PositionClosedBy):
            ticket = self.ticket_of(t.position_id)
            opposite = self.ticket_of(t.opposite_position_id)
            if self._late_close_by_opposite:
                # Once only: the EA's history lookup failed for this deal, not for good.
                self._late_close_by_opposite = False
                opposite = "0"
            survivor = next(
                (
                    i
                    for i in (t.position_id, t.opposite_position_id)
                    if self._position(i) is not None
                ),
                None,
            )
            return common | {
                "kind": EventKind.CLOSED_BY,
                "ticket": ticket,
                "opposite_ticket": opposite,
                "side": t.side,
                "volume": t.volume,
                "price": price,
                "new_ticket": "" if survivor is None else self._renew(survivor),
            }
        if isinstance(t, PendingOrderPlaced):
            return common | {
                "kind": EventKind.PENDING_PLACED,
                "ticket": self.ticket_of(t.order_id),
                "side": t.order_type.side,
                "order_type": t.order_type,
                "volume": t.volume,
                "price": t.price,
                "sl": t.sl,
                "tp": t.tp,
                "expiration": t.expiration_ns,
                "comment": t.comment[:_COMMENT_MAX],
            }
        if isinstance(t, PendingOrderModified):
            order = next(
                (o for o in self.venue.pending_orders(self.account) if o.order_id == t.order_id),
                None,
            )
            return common | {
                "kind": EventKind.PENDING_MODIFIED,
                "ticket": self.ticket_of(t.order_id),
                "side": t.order_type.side,
                "order_type": t.order_type,
                "volume": 0.0 if order is None else order.volume,
                "price": t.price,
                "sl": t.sl,
                "tp": t.tp,
                "expiration": t.expiration_ns,
            }
        if isinstance(t, PendingOrderCancelled):
            return common | {
                "kind": EventKind.PENDING_CANCELLED,
                "ticket": self.ticket_of(t.order_id),
                "side": t.order_type.side,
                "order_type": t.order_type,
            }
        if isinstance(t, PendingOrderTriggered):
            held = self._position(t.position_id)
            return common | {
                "kind": EventKind.PENDING_TRIGGERED,
                "ticket": self.ticket_of(t.order_id),
                "position_ticket": self.ticket_of(t.position_id),
                "side": t.side,
                "order_type": t.order_type,
                "volume": t.volume,
                "price": t.price,
                "sl": t.sl,
                "tp": t.tp,
                "comment": "" if held is None else held.comment[:_COMMENT_MAX],
            }
        raise TypeError(f"no bridge event for {type(t).__name__}")

    def _position(self, venue_id: str) -> Position | None:
        positions = self.venue.positions(self.account)
        return next((p for p in positions if p.position_id == venue_id), None)

    def _renew(self, venue_id: str) -> str:
        """MT4: the remainder gets a new ticket and the old one is gone. Else: no new ticket."""
        if self.platform != "mt4":
            return ""
        self._renewed += 1
        new = str(RENEWED_TICKET_BASE + self._renewed)
        old = self.ticket_of(venue_id)
        self._retired_tickets.add(old)
        self._venue_id_by_ticket.pop(old, None)
        self._ticket_by_venue_id[venue_id] = new
        self._venue_id_by_ticket[new] = venue_id
        return new

    # ------------------------------------------------------------------ follower side

    def _execute(self, cmd: Command) -> None:
        """Answer one command exactly once; synchronous, so a reconnect cannot split it."""
        known = self._results.get(cmd.corr)
        if known is not None:
            log.info("bridge_repeated_command", account=self.account, corr=cmd.corr)
            self._send(CommandResult, **_result_fields(known))
            return
        result = self._run(cmd)
        # Events are built first: building them renews MT4 tickets, which the answer names.
        events = [] if result.duplicate else self._events(result.transactions, result.price)
        answer = self._answer(cmd, result)
        self._results[cmd.corr] = answer
        if len(self._results) > _REMEMBERED_RESULTS:
            self._results.popitem(last=False)
        # OrderSend returns before OnTradeTransaction runs: the EA answers, then reports.
        self._send(CommandResult, **_result_fields(answer))
        self._send_events(events)

    def _answer(self, cmd: Command, result: Result) -> CommandResult:
        if not result.ok:
            ticket = ""
        elif result.position_id is not None:
            ticket = self.ticket_of(result.position_id)
        elif result.order_id is not None:
            ticket = self.ticket_of(result.order_id)
        else:
            ticket = cmd.ticket
        return CommandResult(
            seq=1,
            corr=cmd.corr,
            ok=result.ok,
            retcode=int(result.retcode),
            reason=result.reason[:_REASON_MAX],
            ticket=ticket,
            price=result.price,
            volume=result.volume,
            time=time.time_ns(),
        )

    def _run(self, cmd: Command) -> Result:
        venue, account, corr, op = self.venue, self.account, cmd.corr, cmd.op
        known = venue.executed(account, corr)
        if known is not None:
            # Executed by an earlier incarnation of this terminal: the venue remembers.
            return msgspec.structs.replace(known, duplicate=True)
        if op is CommandOp.OPEN:
            if cmd.side is None or cmd.volume <= 0:
                return _invalid("open needs side and a positive volume")
            cfg = venue.symbols.get(cmd.symbol)
            bounded = cfg is not None and cmd.price > 0 and cmd.deviation_points > 0
            return venue.market_order(
                account,
                cmd.symbol,
                cmd.side,
                cmd.volume,
                sl=cmd.sl,
                tp=cmd.tp,
                magic=cmd.magic,
                comment=cmd.comment,
                client_order_id=corr,
                expected_price=cmd.price if bounded else None,
                max_deviation=cmd.deviation_points * cfg.point if bounded and cfg else None,
            )
        if op is CommandOp.PENDING_PLACE:
            if cmd.order_type is None or cmd.volume <= 0 or cmd.price <= 0:
                return _invalid("pending_place needs order_type, a positive volume and price")
            return venue.place_pending(
                account,
                cmd.symbol,
                cmd.order_type,
                cmd.volume,
                cmd.price,
                sl=cmd.sl,
                tp=cmd.tp,
                expiration_ns=cmd.expiration,
                magic=cmd.magic,
                comment=cmd.comment,
                client_order_id=corr,
            )
        if not cmd.ticket:
            return _invalid(f"{op.value} needs a ticket")
        pending = op in (CommandOp.PENDING_MODIFY, CommandOp.PENDING_CANCEL)
        target = self._resolve(cmd.ticket, cmd.symbol, pending=pending)
        if isinstance(target, Result):
            return target
        if op is CommandOp.CLOSE:
            volume = cmd.volume if cmd.volume > 0 else None
            return venue.close_position(account, target, volume, client_order_id=corr)
        if op is CommandOp.MODIFY:
            return venue.modify_position(account, target, cmd.sl, cmd.tp, client_order_id=corr)
        if op is CommandOp.CLOSE_BY:
            if not cmd.opposite_ticket:
                return _invalid("close_by needs opposite_ticket")
            opposite = self._resolve(cmd.opposite_ticket, cmd.symbol, pending=False)
            if isinstance(opposite, Result):
                return opposite
            return venue.close_by(account, target, opposite, client_order_id=corr)
        if op is CommandOp.PENDING_MODIFY:
            return venue.modify_pending(
                account,
                target,
                cmd.price,
                sl=cmd.sl,
                tp=cmd.tp,
                expiration_ns=cmd.expiration,
                client_order_id=corr,
            )
        return venue.cancel_pending(account, target, client_order_id=corr)

    def _resolve(self, ticket: str, symbol: str, *, pending: bool) -> str | Result:
        """The venue id of an open position (or pending order) ticket, or the rejection."""
        venue_id = self.venue_id_of(ticket)
        if pending:
            held: dict[str, Position | PendingOrder] = {
                o.order_id: o for o in self.venue.pending_orders(self.account)
            }
        else:
            held = {p.position_id: p for p in self.venue.positions(self.account)}
        found = None if venue_id is None else held.get(venue_id)
        if found is None or venue_id is None:
            if pending:
                return Result(
                    ok=False, retcode=Retcode.INVALID, reason=f"no pending order {ticket}"
                )
            return Result(
                ok=False, retcode=Retcode.POSITION_CLOSED, reason=f"no open position {ticket}"
            )
        if found.symbol != symbol:
            return _invalid(f"ticket {ticket} is {found.symbol}, not {symbol}")
        return venue_id


def _invalid(reason: str) -> Result:
    return Result(ok=False, retcode=Retcode.INVALID, reason=reason)


def _result_fields(result: CommandResult) -> dict[str, Any]:
    """A remembered answer's fields, to send again under a new seq and send time."""
    fields = msgspec.structs.asdict(result)
    del fields["seq"], fields["ts"]
    return fields


def _readable_seq(raw: bytes) -> int:
    """The seq of a frame that failed validation, when its JSON still says one (else 0)."""
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return 0
    seq = value.get("seq") if isinstance(value, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else 0
