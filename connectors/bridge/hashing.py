"""The bridge state hash: one SHA-256 over a terminal's open positions and pending orders.

Canonical format — the MQL EA and every bridge implementation MUST build this exact string:

    for each position, in ticket order:  "P:<ticket>:<volume>:<sl>:<tp>;"
    then for each pending order, in ticket order:
                                         "O:<ticket>:<volume>:<price>:<sl>:<tp>;"

    state_hash = lowercase hex of SHA-256 over the concatenation, encoded as ASCII (UTF-8)

- ``<ticket>``: the ticket string exactly as sent on the wire (MT tickets: decimal digits).
- ``<volume>``: C ``printf("%.8g", volume)`` — lots, e.g. ``0.1``, ``1.25``, ``100``.
- ``<price>``, ``<sl>``, ``<tp>``: C ``printf("%.10g", value)`` — e.g. ``5010.69``; a missing
  SL or TP (``null`` on the wire, or MetaTrader's ``0.0``) is written as ``0``.
- Ticket order: shorter ticket first, equal lengths by bytes (ASCII). For decimal tickets
  without leading zeros this is plain ascending numeric order, so MQL can sort its ``ulong``
  tickets numerically. Positions and orders are sorted separately; all ``P:`` items come
  first, then all ``O:`` items. No separators other than ``:`` and ``;``, no trailing newline.
- Nothing else is hashed (not symbol, side, comment, magic or open price): the hash answers
  "do we agree on what is open, how big, and where its stops are".
- No positions and no orders: the empty string, hash
  ``e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855``.

Example: a buy 0.1 lots ticket ``1000002`` with SL 5000.5 and no TP, and a buy-limit order
ticket ``1000010`` for 0.25 lots at 4990 with TP 5050 give

    P:1000002:0.1:5000.5:0;O:1000010:0.25:4990:0:5050;

whose hash is ``9e06a8d69d23dbf1062d228006cab00e1fd1f38a71286ff607da0e015187dfa4``.

MQL5: ``StringFormat("P:%I64u:%.8g:%.10g:%.10g;", ticket, volume, sl, tp)``; the digest from
``CryptEncode(CRYPT_HASH_SHA256, ...)`` on ``StringToCharArray(s, data, 0, StringLen(s))``
(without the terminating NUL), printed as lowercase hex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from schemas.bridge import BridgeOrder, BridgePosition, Snapshot

EMPTY_STATE_HASH = hashlib.sha256(b"").hexdigest()


def _ticket_order(ticket: str) -> tuple[int, str]:
    return len(ticket), ticket


def _level(value: float | None) -> float:
    return 0.0 if value is None else value


def canonical_state(positions: Iterable[BridgePosition], orders: Iterable[BridgeOrder]) -> str:
    """The string :func:`state_hash` digests (see the module docstring for the format)."""
    parts = [
        f"P:{p.ticket}:{p.volume:.8g}:{_level(p.sl):.10g}:{_level(p.tp):.10g};"
        for p in sorted(positions, key=lambda p: _ticket_order(p.ticket))
    ]
    parts.extend(
        f"O:{o.ticket}:{o.volume:.8g}:{o.price:.10g}:{_level(o.sl):.10g}:{_level(o.tp):.10g};"
        for o in sorted(orders, key=lambda o: _ticket_order(o.ticket))
    )
    return "".join(parts)


def state_hash(positions: Iterable[BridgePosition], orders: Iterable[BridgeOrder]) -> str:
    """SHA-256 hex of :func:`canonical_state`: what a terminal's heartbeat carries."""
    return hashlib.sha256(canonical_state(positions, orders).encode()).hexdigest()


def snapshot_state_hash(snapshot: Snapshot) -> str:
    """The state hash of everything a snapshot holds."""
    return state_hash(snapshot.positions, snapshot.orders)
