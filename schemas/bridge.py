"""The bridge protocol: a terminal-side bridge (the MQL EA, the paper terminal) and the bridge
connector over ZeroMQ — DEALER in the terminal, ROUTER in the connector.

Frames are one JSON object per ZeroMQ message (UTF-8), tagged by ``"t"``: MQL4/5 write JSON
reliably with their string functions, and msgspec reads it at C speed. Rules:

- **Sequence.** Every frame carries ``seq``, a counter per sender and session that starts at 1
  and grows by exactly 1. A receiver that sees a gap knows frames were lost (it asks for a
  snapshot); a repeated ``seq`` is a duplicate and is ignored.
- **Session.** A terminal connects with ZeroMQ identity ``<account>.<session>.<n>`` (fresh
  per connection, so no one can take over its connection) and opens with ``hello`` (account, token,
  the random ``session``);
  the connector answers ``welcome`` or ``denied``. A new ``session`` resets both counters.
  A connector that has no session for a terminal (it restarted) answers any other frame with
  ``error`` reason ``"no session: say hello"``, whatever its ``seq`` (it is outside any
  session's numbering); the terminal then opens a new session.
- **Commands.** Each ``cmd`` has a correlation id ``corr`` (the follower order id) and gets
  exactly one ``result`` with the same ``corr`` — also when it arrives twice: the terminal
  answers a repeated ``corr`` with the first result and does not trade again.
- **Heartbeats** both ways every ``heartbeat_ms``; a terminal's heartbeat carries
  ``state_hash`` over its positions and orders, so a connector whose mirror disagrees asks
  for a snapshot (the backstop for any event that was missed).
- **Snapshots** (account, symbols in use, positions and pending orders with their comments,
  which carry the master reference) on every connect and on ``snapshot_req``.
- Times are UTC nanoseconds; volumes are lots; prices are the symbol's price units.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from schemas.common import Comment, Id, OrderType, Side, Symbol

PROTOCOL_VERSION = 1
#: ``error`` reason for a frame outside any session: the terminal answers with a new ``hello``.
NO_SESSION = "no session: say hello"
Seq = Annotated[int, msgspec.Meta(ge=1)]
Ticket = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


class _Frame(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", omit_defaults=True):
    seq: Seq
    ts: int = 0
    """The sender's clock when it sent the frame (UTC ns)."""


# ---------------------------------------------------------------- shared pieces


class BridgeAccount(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    currency: str
    balance: float
    equity: float
    margin: float = 0.0
    free_margin: float = 0.0
    leverage: int = 100


class BridgeSymbol(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    symbol: Symbol
    contract_size: float
    tick_size: float
    tick_value: float
    digits: int
    volume_min: float
    volume_max: float
    volume_step: float
    trade_mode: str = "full"
    filling: str = "ioc"
    """The filling mode the terminal uses for market orders on this symbol (fok/ioc/return)."""


class BridgePosition(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    ticket: Ticket
    symbol: Symbol
    side: Side
    volume: float
    price: float
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: Comment = ""
    time: int = 0


class BridgeOrder(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    ticket: Ticket
    symbol: Symbol
    order_type: OrderType
    volume: float
    price: float
    sl: float | None = None
    tp: float | None = None
    expiration: int = 0
    magic: int = 0
    comment: Comment = ""


class EventKind(enum.StrEnum):
    OPENED = "opened"
    MODIFIED = "modified"
    REDUCED = "reduced"
    CLOSED = "closed"
    CLOSED_BY = "closed_by"
    PENDING_PLACED = "pending_placed"
    PENDING_MODIFIED = "pending_modified"
    PENDING_CANCELLED = "pending_cancelled"
    PENDING_TRIGGERED = "pending_triggered"


class CommandOp(enum.StrEnum):
    OPEN = "open"
    CLOSE = "close"
    MODIFY = "modify"
    CLOSE_BY = "close_by"
    PENDING_PLACE = "pending_place"
    PENDING_MODIFY = "pending_modify"
    PENDING_CANCEL = "pending_cancel"


# ------------------------------------------------------------- terminal → connector


class Hello(_Frame, tag="hello", kw_only=True):
    version: int
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    token: Annotated[str, msgspec.Meta(max_length=256)]
    platform: Annotated[str, msgspec.Meta(pattern=r"^(mt4|mt5|paper)$")]
    session: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ea_version: str = ""


class Snapshot(_Frame, tag="snapshot", kw_only=True):
    corr: str = ""
    """The ``snapshot_req`` it answers; empty for the one sent after ``welcome``."""
    account: BridgeAccount
    symbols: list[BridgeSymbol] = []
    positions: list[BridgePosition] = []
    orders: list[BridgeOrder] = []


class TradeEvent(_Frame, tag="event", kw_only=True):
    """One trade transaction, as the terminal saw it (OnTradeTransaction / MT4 order scan)."""

    kind: EventKind
    ticket: Ticket
    """The position's ticket (pending kinds: the order's ticket)."""
    symbol: Symbol
    side: Side | None = None
    order_type: OrderType | None = None
    volume: float = 0.0
    volume_before: float = 0.0
    volume_after: float = 0.0
    price: float = 0.0
    sl: float | None = None
    tp: float | None = None
    magic: int = 0
    comment: Comment = ""
    new_ticket: str = ""
    """MT4 partial close: the remainder's new ticket."""
    opposite_ticket: str = ""
    position_ticket: str = ""
    """Pending triggered: the position it became."""
    reason: str = ""
    expiration: int = 0
    time: int = 0
    """When the terminal executed it (UTC ns)."""


class AccountUpdate(_Frame, tag="account", kw_only=True):
    account: BridgeAccount
    positions: int = 0


class CommandResult(_Frame, tag="result", kw_only=True):
    corr: Id
    ok: bool
    retcode: int = 0
    reason: str = ""
    ticket: str = ""
    price: float = 0.0
    volume: float = 0.0
    time: int = 0


class Heartbeat(_Frame, tag="hb", kw_only=True):
    state_hash: str = ""


class ProtocolError(_Frame, tag="error", kw_only=True):
    reason: str
    ref_seq: int = 0


# ------------------------------------------------------------- connector → terminal


class Welcome(_Frame, tag="welcome", kw_only=True):
    version: int = PROTOCOL_VERSION
    heartbeat_ms: int = 1000


class Denied(_Frame, tag="denied", kw_only=True):
    reason: str


class Command(_Frame, tag="cmd", kw_only=True):
    corr: Id
    op: CommandOp
    symbol: Symbol
    side: Side | None = None
    order_type: OrderType | None = None
    volume: float = 0.0
    price: float = 0.0
    sl: float | None = None
    tp: float | None = None
    deviation_points: int = 0
    magic: int = 0
    comment: Comment = ""
    ticket: str = ""
    opposite_ticket: str = ""
    expiration: int = 0


class SnapshotRequest(_Frame, tag="snapshot_req", kw_only=True):
    corr: str


TerminalFrame = (
    Hello | Snapshot | TradeEvent | AccountUpdate | CommandResult | Heartbeat | ProtocolError
)
ConnectorFrame = Welcome | Denied | Command | SnapshotRequest | Heartbeat | ProtocolError

terminal_frame_decoder = msgspec.json.Decoder(TerminalFrame)
connector_frame_decoder = msgspec.json.Decoder(ConnectorFrame)
frame_encoder = msgspec.json.Encoder()
