"""Batched fan-outs encoded by splicing: one template per order shape, cut where links differ.

A fan-out's orders of one shape (``fanout.SymbolFanOut``) are equal but for five fields: the
order id, the link id, the follower, the follower's symbol and (new copies) the volume. The
template, the first such order, is encoded once by msgspec with a sentinel in each of those
fields and cut at the sentinels; every other link's order is then the template's pieces with
its own fields put in, as bytes prepared when the links were compiled (``LinkProgram``). No
order object is built and msgspec encodes no order but the template.

The bytes are msgspec's own: a cut is used only when putting the template's own fields back
gives exactly ``codec.encode(template)``, and ``tests/test_fast_path.py`` compares whole
fan-outs, spliced and encoded by msgspec, on random links, events and views.

A connector's batch (``FollowerOrderBatch``) is the envelope msgspec encodes with no orders,
its empty array swapped for the array of spliced orders. Orders that are still objects when
planned — the reference's, and those a daily trade limit may yet withdraw — keep their place
in the batch as a hole, filled when the fan-out is published.
"""

from __future__ import annotations

from typing import Any

from msgspec.structs import replace

from schemas import codec, subjects
from schemas.orders import FollowerOrderBatch

_encode = codec.encode

#: The fields a spliced order takes from its link, in the order msgspec writes them (an order
#: type's own fields first, then those of the base all orders share).
NEW_COPY_FIELDS = ("volume", "order_id", "link_id", "follower", "symbol")
FOLLOW_UP_FIELDS = ("order_id", "link_id", "follower", "symbol")
_SENTINELS: dict[str, Any] = {
    "order_id": "\x00tc-splice:order_id\x00",
    "link_id": "\x00tc-splice:link_id\x00",
    "follower": "\x00tc-splice:follower\x00",
    "symbol": "\x00tc-splice:symbol\x00",
    "volume": -1.2345678901234567e-300,
}


def str_header(n: int) -> bytes:
    """The msgpack header of a string of ``n`` UTF-8 bytes (the smallest form, as msgspec)."""
    if n < 32:
        return bytes((0xA0 | n,))
    if n < 256:
        return b"\xd9" + n.to_bytes(1, "big")
    if n < 65536:
        return b"\xda" + n.to_bytes(2, "big")
    return b"\xdb" + n.to_bytes(4, "big")


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items (the smallest form, as msgspec)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _batch_envelope_ok() -> bool:
    """``orders`` is the batch's last field, written last, as an array: the envelope's empty
    array is then its last byte."""
    probe = FollowerOrderBatch(
        batch_id="b", connector="c", master="m", master_event_id="e", ts_ns=0, orders=[]
    )
    return FollowerOrderBatch.__struct_fields__[-1] == "orders" and _encode(probe).endswith(b"\x90")


#: False if the batch envelope is ever written otherwise: fan-outs are then encoded by
#: msgspec order by order, as without batching.
AVAILABLE = _batch_envelope_ok()


_LINK_KEY = _encode("link_id")
_FOLLOWER_KEY = _encode("follower")


class Cut:
    """A template order's bytes cut at its per-link fields: ``head(volume)`` (all before the
    order id's bytes; new copies' volume is written before the base fields),
    ``id_prefix(link_len)`` (the order id's header and ``<event id>:``), the link's ``ident``
    (its id, ending the order id, then ``link_id`` and ``follower`` keyed), ``middle``, the
    link's ``symbol`` and ``tail``. A link's order is three pieces: ``prefix`` (the first two,
    memoised per volume and link id length), the link's ``ident``, and ``rest`` (the last
    three, memoised per symbol). Few pieces per order: joining a batch costs per piece."""

    __slots__ = (
        "_after_volume",
        "_first",
        "eid_colon",
        "fixed_head",
        "middle",
        "prefixes",
        "rests",
        "tag",
        "tail",
    )

    def __init__(self, pieces: list[bytes], event_id: str, tag: str, volume: bool) -> None:
        self._first = self.fixed_head = pieces[0]
        """``fixed_head``: the head of an order without a volume (a follow-up)."""
        self._after_volume = pieces[1] if volume else b""
        self.middle, self.tail = pieces[-2], pieces[-1]
        self.eid_colon = event_id.encode() + b":"
        self.tag = tag
        #: Memos, per event: a fan-out has few distinct volumes, link id lengths and symbols.
        #: ``prefixes[link_len][volume]``: ``head(volume) + id_prefix(link_len)``;
        #: ``rests[symbol]``: ``middle + symbol + tail``. A spliced order is then three pieces:
        #: its prefix, the link's ``ident`` and its rest.
        self.prefixes: dict[int, dict[Any, bytes]] = {}
        self.rests: dict[bytes, bytes] = {}

    def head(self, volume: bytes = b"") -> bytes:
        """Everything before the order id's bytes, with ``volume`` (msgpack) in place."""
        return self._first + volume + self._after_volume if volume else self._first

    def id_prefix(self, link_len: int) -> bytes:
        """The order id's msgpack header and its ``<event id>:``, for a link id of
        ``link_len`` bytes."""
        return str_header(len(self.eid_colon) + link_len) + self.eid_colon

    def prefixes_for(self, link_len: int) -> dict[Any, bytes]:
        """The memo of prefixes by volume (new copies) for link ids of ``link_len`` bytes."""
        memo = self.prefixes.get(link_len)
        if memo is None:
            memo = self.prefixes[link_len] = {}
        return memo

    def prefix(self, link_len: int, volume: bytes = b"") -> bytes:
        """All of an order before its link's ``ident``: ``head(volume)`` and the order id's
        header and ``<event id>:``."""
        return self.head(volume) + self.id_prefix(link_len)

    def rest(self, symbol: bytes) -> bytes:
        """All of an order after its link's ``ident``, for the (encoded) ``symbol``."""
        rest = self.rests.get(symbol)
        if rest is None:
            rest = self.rests[symbol] = self.middle + symbol + self.tail
        return rest


def cut(template: Any, event_id: str, fields: tuple[str, ...]) -> Cut | None:
    """``template`` cut at ``fields``; None where it cannot be cut exactly (a sentinel that is
    not found once, in order; keys other than ``link_id`` and ``follower`` between the
    order id, the link id and the follower; or a splice of the template's own fields that
    differs from msgspec's encoding of it)."""
    probe = _encode(replace(template, **{name: _SENTINELS[name] for name in fields}))
    pieces: list[bytes] = []
    at = 0
    for name in fields:
        mark = _encode(_SENTINELS[name])
        found = probe.find(mark, at)
        if found < 0 or probe.find(mark, found + 1) >= 0:
            return None
        pieces.append(probe[at:found])
        at = found + len(mark)
    pieces.append(probe[at:])
    if template.order_id != f"{event_id}:{template.link_id}":
        return None
    volume = fields[0] == "volume"
    keys = pieces[2:4] if volume else pieces[1:3]
    if keys != [_LINK_KEY, _FOLLOWER_KEY]:
        return None
    result = Cut(pieces, event_id, template.__struct_config__.tag, volume)
    link = LinkBytes(template.link_id, template.follower, template.symbol)
    spliced = b"".join((
        result.head(_encode(template.volume)) if volume else result.head(),
        result.id_prefix(link.link_len), link.ident, result.middle, link.symbol, result.tail,
    ))  # fmt: skip
    return result if spliced == _encode(template) else None


#: Encoded symbols, one object per symbol: links of one symbol share it, so a fan-out finds
#: the last symbol's rest again by identity.
_SYMBOLS: dict[str, bytes] = {}


class LinkBytes:
    """A link's fields as a spliced order carries them, encoded once per compiled link."""

    __slots__ = ("ident", "link_len", "symbol")

    def __init__(self, link_id: str, follower: str, symbol: str) -> None:
        raw = link_id.encode()
        self.link_len = len(raw)
        self.ident = raw + _LINK_KEY + _encode(link_id) + _FOLLOWER_KEY + _encode(follower)
        encoded = _SYMBOLS.get(symbol)
        if encoded is None:
            encoded = _SYMBOLS[symbol] = _encode(symbol)
        self.symbol = encoded


#: Pieces per spliced order: prefix, ident, rest.
WIDTH = 3


class Batches:
    """One batched fan-out by connector, in link order: the pieces of spliced orders (``WIDTH``
    pieces each), and a hole (one empty piece) where an order is still an object."""

    __slots__ = ("chunks", "holes", "placed", "tag")

    def __init__(self) -> None:
        self.chunks: dict[str, list[bytes]] = {}
        self.holes: list[tuple[str, int, Any]] = []
        self.placed: set[int] = set()
        self.tag = ""
        """The spliced orders' type (one per event)."""

    def hold(self, connector: str, plan: Any) -> None:
        """Keep ``plan``'s order's place in ``connector``'s batch (``plan.order`` is read when
        the fan-out is published: a daily limit may have withdrawn it by then)."""
        chunks = self.chunks.get(connector)
        if chunks is None:
            chunks = self.chunks[connector] = []
        self.holes.append((connector, len(chunks), plan))
        chunks.append(b"")
        self.placed.add(id(plan))

    def messages(
        self, event_id: str, master: str, batch_suffix: str, now_ns: int, counted: dict[str, int]
    ) -> list[tuple[str, bytes, str]]:
        """Every connector's batch, holes filled, in the order the connectors first appeared;
        ``counted`` gets the spliced orders (the held ones are counted with the plans)."""
        holes: dict[str, int] = {}
        held: dict[str, int] = {}
        for connector, index, plan in self.holes:
            holes[connector] = holes.get(connector, 0) + 1
            order = plan.order
            if order is None:
                self.chunks[connector][index] = b""
            else:
                self.chunks[connector][index] = _encode(order)
                held[connector] = held.get(connector, 0) + 1
        messages = []
        spliced_total = 0
        for connector, chunks in self.chunks.items():
            spliced = (len(chunks) - holes.get(connector, 0)) // WIDTH
            spliced_total += spliced
            n = spliced + held.get(connector, 0)
            if not n:
                continue
            batch_id = f"{event_id}@{connector}{batch_suffix}"
            envelope = _encode(FollowerOrderBatch(
                batch_id=batch_id, connector=connector, master=master,
                master_event_id=event_id, ts_ns=now_ns, orders=[],
            ))  # fmt: skip
            parts = [envelope[:-1], array_header(n)]
            parts += chunks  # one join: the payload's bytes are copied once
            payload = b"".join(parts)
            messages.append((subjects.connector_orders(connector), payload, batch_id))
        if spliced_total:
            counted[self.tag] = counted.get(self.tag, 0) + spliced_total
        return messages


__all__ = [
    "AVAILABLE",
    "FOLLOW_UP_FIELDS",
    "NEW_COPY_FIELDS",
    "WIDTH",
    "Batches",
    "Cut",
    "LinkBytes",
    "array_header",
    "cut",
    "str_header",
]
