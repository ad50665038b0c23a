"""Bridge conformance: every terminal-side implementation, over real ZeroMQ sockets, CURVE
encrypted unless a case is about the plaintext opt-out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from connectors.bridge.hashing import EMPTY_STATE_HASH, snapshot_state_hash
from connectors.paper.model import Retcode, Transaction
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from schemas.bridge import (
    PROTOCOL_VERSION,
    AccountUpdate,
    Command,
    CommandOp,
    CommandResult,
    EventKind,
    Heartbeat,
    ProtocolError,
    TradeEvent,
    frame_encoder,
)
from schemas.common import OrderType, Side

from .harness import (
    IMPLEMENTATIONS,
    TERMINAL_USER,
    ConnectorPeer,
    KeyPair,
    Mirror,
    Rig,
    TerminalUnderTest,
)

ACCOUNT = "acct-1"
TOKEN = "a-long-enough-terminal-token"
SYMBOL = "XAUUSD"

#: Real XAUUSD quotes: the first shipped bars walked open → extremes → close.
QUOTES: list[Quote] = [q for bar in load_bars()[:1500] for q in bar_to_ticks(bar, SYMBOL)]
FIRST = QUOTES[0]


def fresh_venue() -> PaperVenue:
    venue = PaperVenue()
    venue.open_account(ACCOUNT, balance=100_000.0)
    venue.on_quote(FIRST)
    return venue


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda impl: impl.name)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    rig = Rig(request.param, ConnectorPeer(), fresh_venue(), ACCOUNT, TOKEN)
    try:
        yield rig
        assert rig.peer.gaps == [], "the terminal's seq must grow by exactly 1"
    finally:
        await rig.close()
    assert rig.peer.undecodable == []


def result_fields(result: CommandResult) -> dict[str, Any]:
    fields = msgspec.structs.asdict(result)
    del fields["seq"], fields["ts"]
    return fields


def open_cmd(**fields: Any) -> dict[str, Any]:
    return {"op": CommandOp.OPEN, "symbol": SYMBOL, "side": Side.BUY, "volume": 0.10} | fields


async def feed_until_transactions(
    terminal: TerminalUnderTest, start: int = 1
) -> tuple[int, list[Transaction]]:
    for index in range(start, len(QUOTES)):
        transactions = await terminal.on_quote(QUOTES[index])
        if transactions:
            return index, transactions
    raise AssertionError("the real quotes never set anything off")


# ------------------------------------------------------------------ session


async def test_hello_carries_version_account_token_session_and_seq_starts_at_1(rig: Rig) -> None:
    terminal, hello, snapshot = await rig.connect()
    assert (hello.version, hello.account, hello.token) == (PROTOCOL_VERSION, ACCOUNT, TOKEN)
    assert hello.platform == rig.impl.platform
    assert hello.session
    # A fresh identity per connection (<account>.<session>.<n>): nobody who merely knows the
    # account id can take over the terminal's connection.
    account, session, connection = rig.peer.identity.decode().split(".")
    assert (account, session) == (ACCOUNT, hello.session)
    assert int(connection) >= 1
    assert (hello.seq, snapshot.seq, snapshot.corr) == (1, 2, "")

    again, _ = await rig.welcome(terminal.reconnect(new_session=True))
    assert again.seq == 1, "a new session starts its seq at 1 again"
    assert again.session != hello.session
    assert terminal.running


async def test_wrong_token_is_denied_and_the_terminal_stops(rig: Rig) -> None:
    terminal = rig.make(token="not-the-token")
    starting = asyncio.ensure_future(terminal.start())
    hello = await rig.peer.handshake(accept=False, reason="bad token")
    assert hello.token == "not-the-token"
    with pytest.raises(rig.impl.denied_error, match="bad token"):
        await asyncio.wait_for(starting, 5)
    assert not terminal.running
    await rig.peer.expect_nothing(object)


async def test_snapshot_after_welcome_matches_the_venue(rig: Rig) -> None:
    venue = rig.venue
    buy = venue.market_order(
        ACCOUNT, SYMBOL, Side.BUY, 0.10, sl=FIRST.bid - 20, magic=7, comment="copy:m1:42"
    )
    venue.market_order(ACCOUNT, SYMBOL, Side.SELL, 0.25, tp=FIRST.bid - 30)
    venue.place_pending(
        ACCOUNT,
        SYMBOL,
        OrderType.BUY_LIMIT,
        0.05,
        FIRST.bid - 10,
        tp=FIRST.bid + 10,
        magic=9,
        comment="copy:m1:43",
    )
    assert buy.ok

    terminal, _, snapshot = await rig.connect()

    state = venue.account_state(ACCOUNT)
    assert (snapshot.account.currency, snapshot.account.balance) == ("USD", state.balance)
    assert (snapshot.account.equity, snapshot.account.margin) == (state.equity, state.margin)
    assert snapshot.account.leverage == state.leverage
    [xau] = [s for s in snapshot.symbols if s.symbol == SYMBOL]
    cfg = venue.symbols[SYMBOL]
    assert (xau.contract_size, xau.digits, xau.volume_step) == (
        cfg.contract_size,
        cfg.digits,
        cfg.volume_step,
    )
    assert [
        (p.ticket, p.side, p.volume, p.price, p.sl, p.tp, p.magic, p.comment, p.time)
        for p in snapshot.positions
    ] == [
        (
            terminal.ticket_of(p.position_id),
            p.side,
            p.volume,
            p.open_price,
            p.sl,
            p.tp,
            p.magic,
            p.comment,
            p.open_ts_ns,
        )
        for p in venue.positions(ACCOUNT)
    ]
    assert [
        (o.ticket, o.order_type, o.volume, o.price, o.sl, o.tp, o.magic, o.comment)
        for o in snapshot.orders
    ] == [
        (
            terminal.ticket_of(o.order_id),
            o.order_type,
            o.volume,
            o.price,
            o.sl,
            o.tp,
            o.magic,
            o.comment,
        )
        for o in venue.pending_orders(ACCOUNT)
    ]
    requested = await rig.peer.snapshot("snap-1")
    assert requested.corr == "snap-1"
    assert (requested.account, requested.symbols) == (snapshot.account, snapshot.symbols)
    assert (requested.positions, requested.orders) == (snapshot.positions, snapshot.orders)


# ------------------------------------------------------------------ master side


async def test_each_master_position_action_is_one_event_in_order(rig: Rig) -> None:
    peer = rig.peer
    terminal, _, snapshot = await rig.connect()
    mirror = Mirror()
    mirror.apply_snapshot(snapshot)
    events: list[TradeEvent] = []

    async def event(kind: EventKind) -> TradeEvent:
        frame = await peer.event(kind)
        account = await peer.expect(AccountUpdate)
        assert account.seq > frame.seq
        assert account.positions == len(rig.venue.positions(ACCOUNT))
        mirror.apply(frame)
        events.append(frame)
        return frame

    sl = round(FIRST.bid - 20, 2)
    opened = await terminal.trade(
        lambda v: v.market_order(ACCOUNT, SYMBOL, Side.BUY, 0.10, sl=sl, magic=7, comment="manual")
    )
    assert opened.position_id is not None
    e = await event(EventKind.OPENED)
    ticket = e.ticket
    assert ticket == terminal.ticket_of(opened.position_id)
    assert (e.symbol, e.side, e.volume, e.price) == (SYMBOL, Side.BUY, 0.10, FIRST.ask)
    assert (e.sl, e.tp, e.magic, e.comment, e.time) == (sl, None, 7, "manual", FIRST.ts_ns)

    tp = round(FIRST.bid + 30, 2)
    await terminal.trade(lambda v: v.modify_position(ACCOUNT, opened.position_id or "", sl, tp))
    e = await event(EventKind.MODIFIED)
    assert (e.ticket, e.side, e.sl, e.tp) == (ticket, Side.BUY, sl, tp)

    await terminal.trade(lambda v: v.close_position(ACCOUNT, opened.position_id or "", 0.04))
    e = await event(EventKind.REDUCED)
    assert (e.ticket, e.volume, e.volume_before, e.volume_after) == (ticket, 0.04, 0.10, 0.06)
    assert e.price == FIRST.bid
    if rig.impl.renews_tickets:
        assert e.new_ticket and e.new_ticket != ticket
        ticket = e.new_ticket
    else:
        assert e.new_ticket == ""
    after_reduce = await peer.snapshot("after-reduce")
    assert [(p.ticket, p.volume) for p in after_reduce.positions] == [(ticket, 0.06)]
    assert snapshot_state_hash(after_reduce) == mirror.state_hash()

    venue_id = terminal.venue_id_of(ticket)
    assert venue_id is not None
    await terminal.trade(lambda v: v.modify_position(ACCOUNT, venue_id, None, tp))
    e = await event(EventKind.MODIFIED)
    assert (e.ticket, e.sl, e.tp) == (ticket, None, tp), "later events use the renewed ticket"

    await terminal.trade(lambda v: v.close_position(ACCOUNT, venue_id))
    e = await event(EventKind.CLOSED)
    assert (e.ticket, e.volume, e.price, e.reason) == (ticket, 0.06, FIRST.bid, "client")

    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    final = await peer.snapshot("final")
    assert final.positions == [] and mirror.positions == {}
    assert snapshot_state_hash(final) == mirror.state_hash() == EMPTY_STATE_HASH


async def test_close_by_is_one_closed_by_event(rig: Rig) -> None:
    terminal, _, snapshot = await rig.connect()
    mirror = Mirror()
    mirror.apply_snapshot(snapshot)
    buy = await terminal.trade(lambda v: v.market_order(ACCOUNT, SYMBOL, Side.BUY, 0.10))
    sell = await terminal.trade(lambda v: v.market_order(ACCOUNT, SYMBOL, Side.SELL, 0.30))
    for _ in range(2):
        mirror.apply(await rig.peer.event(EventKind.OPENED))
    buy_id, sell_id = buy.position_id or "", sell.position_id or ""

    await terminal.trade(lambda v: v.close_by(ACCOUNT, buy_id, sell_id))
    e = await rig.peer.event(EventKind.CLOSED_BY)
    mirror.apply(e)
    assert (e.ticket, e.opposite_ticket) == (terminal.ticket_of(buy_id), sell_id)
    assert (e.side, e.volume) == (Side.BUY, 0.10)
    remainder = sell_id
    if rig.impl.renews_tickets:
        assert e.new_ticket not in ("", buy_id, sell_id)
        remainder = e.new_ticket
    else:
        assert e.new_ticket == ""
    after = await rig.peer.snapshot("after-close-by")
    assert [(p.ticket, p.side, p.volume) for p in after.positions] == [(remainder, Side.SELL, 0.20)]
    assert snapshot_state_hash(after) == mirror.state_hash()


async def test_pending_place_modify_cancel_are_events(rig: Rig) -> None:
    terminal, _, _ = await rig.connect()
    price, sl, tp = round(FIRST.bid - 5, 2), round(FIRST.bid - 15, 2), round(FIRST.bid + 5, 2)
    placed = await terminal.trade(
        lambda v: v.place_pending(
            ACCOUNT, SYMBOL, OrderType.BUY_LIMIT, 0.05, price, sl=sl, tp=tp, magic=3, comment="p1"
        )
    )
    e = await rig.peer.event(EventKind.PENDING_PLACED)
    order_id = placed.order_id or ""
    assert (e.ticket, e.order_type, e.volume, e.price) == (
        terminal.ticket_of(order_id),
        OrderType.BUY_LIMIT,
        0.05,
        price,
    )
    assert (e.sl, e.tp, e.magic, e.comment) == (sl, tp, 3, "p1")

    moved = round(price - 1, 2)
    await terminal.trade(lambda v: v.modify_pending(ACCOUNT, order_id, moved, sl=sl, tp=tp))
    e = await rig.peer.event(EventKind.PENDING_MODIFIED)
    assert (e.ticket, e.order_type, e.price, e.sl, e.tp) == (
        order_id,
        OrderType.BUY_LIMIT,
        moved,
        sl,
        tp,
    )

    await terminal.trade(lambda v: v.cancel_pending(ACCOUNT, order_id))
    e = await rig.peer.event(EventKind.PENDING_CANCELLED)
    assert (e.ticket, e.order_type) == (order_id, OrderType.BUY_LIMIT)
    assert (await rig.peer.snapshot("s")).orders == []


async def test_pending_trigger_on_real_quotes_is_pending_triggered(rig: Rig) -> None:
    terminal, _, _ = await rig.connect()
    trigger = round(FIRST.ask + 0.50, 2)
    placed = await terminal.trade(
        lambda v: v.place_pending(
            ACCOUNT, SYMBOL, OrderType.BUY_STOP, 0.10, trigger, comment="stop-entry"
        )
    )
    await rig.peer.event(EventKind.PENDING_PLACED)

    index, _ = await feed_until_transactions(terminal)
    e = await rig.peer.event(EventKind.PENDING_TRIGGERED)
    ticket = terminal.ticket_of(placed.order_id or "")
    assert (e.ticket, e.position_ticket, e.order_type, e.side) == (
        ticket,
        ticket,
        OrderType.BUY_STOP,
        Side.BUY,
    )
    assert (e.volume, e.price, e.time) == (0.10, QUOTES[index].ask, QUOTES[index].ts_ns)
    assert e.price >= trigger
    await rig.peer.expect_nothing(TradeEvent, lambda f: f.kind is EventKind.OPENED)
    after = await rig.peer.snapshot("after-trigger")
    assert [(p.ticket, p.comment) for p in after.positions] == [(ticket, "stop-entry")]


async def test_an_expired_pending_order_is_pending_cancelled(rig: Rig) -> None:
    terminal, _, _ = await rig.connect()
    expiry = FIRST.ts_ns + 2 * 60_000_000_000
    placed = await terminal.trade(
        lambda v: v.place_pending(
            ACCOUNT,
            SYMBOL,
            OrderType.SELL_LIMIT,
            0.10,
            round(FIRST.bid + 400, 2),
            expiration_ns=expiry,
        )
    )
    e = await rig.peer.event(EventKind.PENDING_PLACED)
    assert e.expiration == expiry

    index, _ = await feed_until_transactions(terminal)
    e = await rig.peer.event(EventKind.PENDING_CANCELLED)
    assert (e.ticket, e.order_type) == (
        terminal.ticket_of(placed.order_id or ""),
        OrderType.SELL_LIMIT,
    )
    assert e.time == QUOTES[index].ts_ns >= expiry


async def test_stop_loss_hit_on_real_quotes_is_closed_with_reason_sl(rig: Rig) -> None:
    terminal, _, _ = await rig.connect()
    sl = round(FIRST.bid - 0.50, 2)
    opened = await terminal.trade(lambda v: v.market_order(ACCOUNT, SYMBOL, Side.BUY, 0.10, sl=sl))
    await rig.peer.event(EventKind.OPENED)

    index, _ = await feed_until_transactions(terminal)
    e = await rig.peer.event(EventKind.CLOSED)
    assert (e.ticket, e.reason, e.volume) == (
        terminal.ticket_of(opened.position_id or ""),
        "sl",
        0.10,
    )
    assert e.price == QUOTES[index].bid <= sl
    account = await rig.peer.expect(AccountUpdate, lambda a: a.seq > e.seq)
    assert account.positions == 0
    assert account.account.balance == rig.venue.account_state(ACCOUNT).balance


# ------------------------------------------------------------------ follower side


async def test_follower_commands_execute_with_one_result_each(rig: Rig) -> None:
    peer = rig.peer
    terminal, _, snapshot = await rig.connect()
    mirror = Mirror()
    mirror.apply_snapshot(snapshot)

    async def command(corr: str, **fields: Any) -> CommandResult:
        result = await peer.command(corr, **fields)
        await peer.wait_quiet(0.05)
        for event in peer.pending(TradeEvent):
            mirror.apply(await peer.expect(TradeEvent, lambda e, seq=event.seq: e.seq == seq))
        return result

    sl = round(FIRST.bid - 20, 2)
    opened = await command("f-1", **open_cmd(sl=sl, magic=5, comment="copy:m1:1001"))
    assert (opened.ok, opened.retcode, opened.price, opened.volume) == (
        True,
        Retcode.DONE,
        FIRST.ask,
        0.10,
    )
    ticket = opened.ticket
    [position] = rig.venue.positions(ACCOUNT)
    assert terminal.ticket_of(position.position_id) == ticket
    assert (position.comment, position.magic, position.sl) == ("copy:m1:1001", 5, sl)
    assert rig.venue.executed(ACCOUNT, "f-1") is not None, "corr is the client order id"

    tp = round(FIRST.bid + 20, 2)
    modified = await command("f-2", op=CommandOp.MODIFY, symbol=SYMBOL, ticket=ticket, sl=sl, tp=tp)
    assert (modified.ok, modified.ticket) == (True, ticket)

    reduced = await command("f-3", op=CommandOp.CLOSE, symbol=SYMBOL, ticket=ticket, volume=0.04)
    assert (reduced.ok, reduced.volume, reduced.price) == (True, 0.04, FIRST.bid)
    if rig.impl.renews_tickets:
        assert reduced.ticket != ticket, "MT4: the remainder has a new ticket"
        stale = await command("f-3b", op=CommandOp.CLOSE, symbol=SYMBOL, ticket=ticket)
        assert (stale.ok, stale.retcode) == (False, Retcode.POSITION_CLOSED)
    else:
        assert reduced.ticket == ticket
    ticket = reduced.ticket
    assert [(p.ticket, p.volume) for p in mirror.positions.values()] == [(ticket, 0.06)]

    closed = await command("f-4", op=CommandOp.CLOSE, symbol=SYMBOL, ticket=ticket)
    assert (closed.ok, closed.volume) == (True, 0.06)
    assert rig.venue.positions(ACCOUNT) == []

    price = round(FIRST.bid - 5, 2)
    placed = await command(
        "f-5",
        op=CommandOp.PENDING_PLACE,
        symbol=SYMBOL,
        order_type=OrderType.SELL_STOP,
        volume=0.02,
        price=price,
        comment="copy:m1:1002",
    )
    assert (placed.ok, placed.retcode) == (True, Retcode.PLACED)
    moved = await command(
        "f-6",
        op=CommandOp.PENDING_MODIFY,
        symbol=SYMBOL,
        ticket=placed.ticket,
        price=round(price - 1, 2),
    )
    assert (moved.ok, moved.ticket, moved.price) == (True, placed.ticket, round(price - 1, 2))
    cancelled = await command(
        "f-7", op=CommandOp.PENDING_CANCEL, symbol=SYMBOL, ticket=placed.ticket
    )
    assert cancelled.ok and rig.venue.pending_orders(ACCOUNT) == []

    a = await command("f-8", **open_cmd(volume=0.20))
    b = await command("f-9", **open_cmd(side=Side.SELL, volume=0.05))
    by = await command(
        "f-10", op=CommandOp.CLOSE_BY, symbol=SYMBOL, ticket=a.ticket, opposite_ticket=b.ticket
    )
    assert (by.ok, by.volume) == (True, 0.05)
    [rest] = rig.venue.positions(ACCOUNT)
    assert rest.volume == 0.15

    unknown = await command("f-11", op=CommandOp.CLOSE, symbol=SYMBOL, ticket="999999")
    assert (unknown.ok, unknown.retcode) == (False, Retcode.POSITION_CLOSED)
    no_side = await command("f-12", op=CommandOp.OPEN, symbol=SYMBOL, volume=0.1)
    assert not no_side.ok and no_side.reason

    final = await peer.snapshot("final")
    assert snapshot_state_hash(final) == mirror.state_hash(), "events alone track the state"


async def test_commands_by_ticket_act_on_a_position_opened_by_hand(rig: Rig) -> None:
    """What a person's modify and close from the platform send: the ticket of a position the
    trader opened at the terminal, without a copy comment. Each command trades once and is
    told by one event; a ticket the account does not hold is refused as closed."""
    peer = rig.peer
    terminal, _, snapshot = await rig.connect()
    mirror = Mirror()
    mirror.apply_snapshot(snapshot)
    opened = await terminal.trade(lambda v: v.market_order(ACCOUNT, SYMBOL, Side.SELL, 0.10))
    assert opened.position_id is not None
    mirror.apply(await peer.event(EventKind.OPENED))
    ticket = terminal.ticket_of(opened.position_id)

    async def command(corr: str, kind: EventKind, **fields: Any) -> CommandResult:
        result = await peer.command(corr, symbol=SYMBOL, ticket=ticket, **fields)
        mirror.apply(await peer.event(kind))
        await peer.wait_quiet(0.05)
        assert peer.pending(TradeEvent) == [], "one event per command"
        return result

    sl, tp = round(FIRST.ask + 20, 2), round(FIRST.ask - 30, 2)
    modified = await command("m-1", EventKind.MODIFIED, op=CommandOp.MODIFY, sl=sl, tp=tp)
    assert (modified.ok, modified.ticket) == (True, ticket)
    [held] = rig.venue.positions(ACCOUNT)
    assert (held.sl, held.tp, held.comment) == (sl, tp, "")

    reduced = await command("m-2", EventKind.REDUCED, op=CommandOp.CLOSE, volume=0.04)
    assert (reduced.ok, reduced.volume, reduced.price) == (True, 0.04, FIRST.ask)
    assert (reduced.ticket != ticket) == rig.impl.renews_tickets
    ticket = reduced.ticket
    closed = await command("m-3", EventKind.CLOSED, op=CommandOp.CLOSE)
    assert (closed.ok, closed.volume) == (True, 0.06)
    assert rig.venue.positions(ACCOUNT) == []

    for corr, op in (("m-4", CommandOp.CLOSE), ("m-5", CommandOp.MODIFY)):
        gone = await peer.command(corr, op=op, symbol=SYMBOL, ticket=ticket, sl=sl)
        assert (gone.ok, gone.retcode) == (False, Retcode.POSITION_CLOSED)
    await peer.expect_nothing(TradeEvent)
    final = await peer.snapshot("final")
    assert snapshot_state_hash(final) == mirror.state_hash() == EMPTY_STATE_HASH


async def test_a_repeated_corr_gets_the_identical_result_and_trades_once(rig: Rig) -> None:
    await rig.connect()
    first = rig.peer.send(Command, corr="dup-1", **open_cmd(comment="copy:m1:7"))
    second = rig.peer.send(Command, corr="dup-1", **open_cmd(comment="copy:m1:7"))
    assert second.seq == first.seq + 1
    results = [await rig.peer.expect(CommandResult, lambda r: r.corr == "dup-1") for _ in range(2)]
    assert results[0].ok and results[0].seq != results[1].seq
    assert result_fields(results[0]) == result_fields(results[1])
    await rig.peer.event(EventKind.OPENED)
    await rig.peer.expect_nothing(TradeEvent)
    assert len(rig.venue.positions(ACCOUNT)) == 1


async def test_a_repeated_connector_seq_is_ignored(rig: Rig) -> None:
    await rig.connect()
    raw = frame_encoder.encode(rig.peer.frame(Command, corr="seq-1", **open_cmd()))
    rig.peer.send_raw(raw)
    rig.peer.send_raw(raw)
    result = await rig.peer.expect(CommandResult)
    assert (result.corr, result.ok) == ("seq-1", True)
    await rig.peer.expect_nothing(CommandResult)
    assert len(rig.venue.positions(ACCOUNT)) == 1


@pytest.mark.parametrize("lost", ["answer", "command"])
async def test_a_command_resent_after_a_reconnect_trades_once(rig: Rig, lost: str) -> None:
    terminal, hello, _ = await rig.connect(drop_results={"lost-1"} if lost == "answer" else ())
    rig.peer.send(Command, corr="lost-1", **open_cmd(comment="copy:m1:77"))
    if lost == "answer":
        # Executed, but the answer never left: the connector saw no result (and a gap).
        opened = await rig.peer.event(EventKind.OPENED)
        await rig.peer.expect_nothing(CommandResult)
        assert [g.frame for g in rig.peer.gaps] == ["TradeEvent"]
        rig.peer.gaps.clear()
    # "command": the link drops right after the command went out, before any answer.

    again, snapshot = await rig.welcome(terminal.reconnect(new_session=True))
    assert again.session != hello.session
    result = await rig.peer.command("lost-1", **open_cmd(comment="copy:m1:77"))
    assert result.ok
    [position] = rig.venue.positions(ACCOUNT)
    assert terminal.ticket_of(position.position_id) == result.ticket
    if lost == "answer":
        assert result.ticket == opened.ticket
        assert [(p.ticket, p.comment) for p in snapshot.positions] == [
            (opened.ticket, "copy:m1:77")
        ]
        await rig.peer.expect_nothing(TradeEvent)
    elif not snapshot.positions:
        # The link dropped before the terminal read the command: it trades on the re-send.
        await rig.peer.event(EventKind.OPENED)
    again_result = await rig.peer.command("lost-1", **open_cmd(comment="copy:m1:77"))
    assert result_fields(again_result) == result_fields(result)
    assert len(rig.venue.positions(ACCOUNT)) == 1


# ------------------------------------------------------------------ bad input, gaps, heartbeats

MALFORMED: list[tuple[str, tuple[bytes, ...], int]] = [
    ("garbage bytes", (b"\x00\xff\xfe garbage",), 0),
    ("not json", (b"hello there",), 0),
    ("json array", (b"[1, 2, 3]",), 0),
    ("missing fields", (b'{"t": "cmd", "seq": 41}',), 41),
    ("unknown tag", (b'{"t": "launch", "seq": 42}',), 42),
    ("wrong types", (b'{"t": "cmd", "seq": 43, "corr": 5, "op": "open", "symbol": "X"}',), 43),
    ("seq zero", (b'{"t": "hb", "seq": 0}',), 0),
    ("bad utf-8 in a string", (b'{"t": "snapshot_req", "seq": 44, "corr": "\xff"}',), 0),
    (
        "oversized corr",
        (
            b'{"t": "cmd", "seq": 45, "op": "open", "symbol": "XAUUSD", "corr": "'
            + b"x" * 129
            + b'"}',
        ),
        45,
    ),
    ("two-part message", (b"{}", b"{}"), 0),
]


async def test_malformed_frames_get_error_frames_and_the_terminal_keeps_working(rig: Rig) -> None:
    await rig.connect()
    for name, parts, seq in MALFORMED:
        rig.peer.send_raw(*parts)
        error = await rig.peer.expect(ProtocolError)
        assert error.reason, name
        assert error.ref_seq in (0, seq), name
    result = await rig.peer.command("after-garbage", **open_cmd())
    assert result.ok
    snapshot = await rig.peer.snapshot("after-garbage")
    assert len(snapshot.positions) == 1


async def test_a_gap_in_the_connector_seq_does_not_stop_the_terminal(rig: Rig) -> None:
    await rig.connect()
    rig.peer.skip_seq(3)
    assert (await rig.peer.command("after-gap", **open_cmd())).ok
    await rig.peer.expect_nothing(ProtocolError)


async def test_a_lost_event_shows_as_a_gap_and_a_snapshot_reconciles_it(rig: Rig) -> None:
    # hello is 1, the snapshot after welcome 2: the first event is 3, and it gets lost.
    terminal, _, snapshot = await rig.connect(drop_events={3})
    mirror = Mirror()
    mirror.apply_snapshot(snapshot)
    opened = await terminal.trade(lambda v: v.market_order(ACCOUNT, SYMBOL, Side.BUY, 0.10))
    await terminal.trade(
        lambda v: v.place_pending(
            ACCOUNT, SYMBOL, OrderType.BUY_LIMIT, 0.05, round(FIRST.bid - 5, 2)
        )
    )
    placed = await rig.peer.event(EventKind.PENDING_PLACED)
    mirror.apply(placed)
    assert [(g.expected, g.got) for g in rig.peer.gaps] == [(3, 4)]
    rig.peer.gaps.clear()

    # The connector's answer to a gap: a snapshot, which carries what the lost event said.
    reconciled = await rig.peer.snapshot("gap-1")
    assert [p.ticket for p in reconciled.positions] == [
        terminal.ticket_of(opened.position_id or "")
    ]
    assert mirror.state_hash() != snapshot_state_hash(reconciled)
    mirror.apply_snapshot(reconciled)
    assert mirror.state_hash() == snapshot_state_hash(reconciled)


async def test_heartbeats_carry_the_state_hash_of_the_snapshot(rig: Rig) -> None:
    terminal, _, snapshot = await rig.connect(heartbeat_ms=40)
    hb = await rig.peer.expect(Heartbeat)
    assert hb.state_hash == snapshot_state_hash(snapshot) == EMPTY_STATE_HASH
    rig.peer.start_heartbeats(0.02)

    await terminal.trade(
        lambda v: v.market_order(ACCOUNT, SYMBOL, Side.SELL, 0.30, sl=round(FIRST.ask + 9, 2))
    )
    await terminal.trade(
        lambda v: v.place_pending(
            ACCOUNT, SYMBOL, OrderType.SELL_LIMIT, 0.07, round(FIRST.ask + 5, 2), tp=FIRST.bid
        )
    )
    current = await rig.peer.snapshot("hb")
    hb = await rig.peer.expect(Heartbeat, lambda h: h.seq > current.seq)
    assert hb.state_hash == snapshot_state_hash(current) != EMPTY_STATE_HASH
    assert len(current.positions) == len(current.orders) == 1
    # The connector's own heartbeats were taken in silence all along.
    await rig.peer.expect_nothing(ProtocolError, within=0.1)


# ------------------------------------------------------------------ CURVE


async def test_the_terminal_speaks_curve_with_its_own_key(rig: Rig) -> None:
    """Every frame arrives over a connection the peer's ZAP handler admitted for the terminal's
    key pair: the link is encrypted and the key says which terminal it is."""
    terminal, _, _ = await rig.connect()
    assert (await rig.peer.command("curve-1", **open_cmd())).ok
    assert rig.peer.received and {r.user_id for r in rig.peer.received} == {TERMINAL_USER}
    assert rig.peer.refused == []
    assert terminal.running


async def test_without_a_server_key_the_terminal_connects_only_when_told_plaintext(
    rig: Rig,
) -> None:
    with pytest.raises(ValueError, match="server key"):
        rig.impl.make(rig.peer.endpoint, ACCOUNT, TOKEN, fresh_venue())
    clear = Rig(rig.impl, ConnectorPeer(plaintext=True), fresh_venue(), ACCOUNT, TOKEN)
    try:
        _, hello, _ = await clear.connect()
        assert hello.account == ACCOUNT
        assert {r.user_id for r in clear.peer.received} == {None}
    finally:
        await clear.close()


@pytest.mark.parametrize("wrong", ["terminal key", "server key"])
async def test_wrong_curve_keys_get_no_answer_and_nothing_leaves_in_clear(
    rig: Rig, wrong: str
) -> None:
    """A terminal key the connector does not list is refused by ZAP; another server key fails
    the handshake. Either way no frame reaches the connector, and the terminal gives up."""
    other = KeyPair.new()
    keys = {"public_key": other.public, "secret_key": other.secret}
    if wrong == "server key":
        keys = {"server_key": other.public}
    terminal = rig.make(handshake_timeout_s=1.0, **keys)
    with pytest.raises(TimeoutError):
        await terminal.start()
    assert not terminal.running
    await rig.peer.wait_quiet(0.2)
    assert rig.peer.received == []
    assert set(rig.peer.refused) == ({other.public} if wrong == "terminal key" else set())
