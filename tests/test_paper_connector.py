"""The paper connector end to end on a private nats-server: a master action on a PaperTerminal
goes through a real replicator to a follower PaperTerminal, for every kind of action, and
survives follower restarts without duplicate or missed executions."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import WAIT_S, wait_until
from nats.aio.client import Client
from nats.js import JetStreamContext

from connectors.contract import reports_at_receipt
from connectors.journal import MAGIC, OrderMemoryConfig
from connectors.paper.connector import PaperConnector, PaperConnectorState, PaperTerminal
from connectors.paper.model import Result
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.paper.venue import PaperVenue
from connectors.reports import OrderReports
from engine.replicator.config import ReplicatorConfig
from engine.replicator.service import Replicator
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsserver import EmbeddedNats
from schemas import codec, subjects
from schemas.common import OrderType, Side
from schemas.links import CopyLink, FixedLot, Multiplier
from schemas.master import (
    MasterEvent,
    PendingOrderTriggered,
    PositionClosed,
)
from schemas.orders import DeviationPolicy, FollowerClose, FollowerOpen, FollowerOrder
from schemas.reports import ExecutionReport, OrderDone, OrderFilled
from schemas.streams import (
    DUPLICATE_WINDOW_S,
    EXECUTION_REPORTS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    follower_orders_stream,
)

SYMBOL = "XAUUSD"
BARS = load_bars()

Account = tuple[str, str, float, int, str]
M1: Account = ("m1", "USD", 10_000.0, 100, "master")
F1: Account = ("f1", "USD", 10_000.0, 100, "follower")
F2: Account = ("f2", "USD", 10_000.0, 100, "follower")


# --- helpers --------------------------------------------------------------------------------


def ticks(start_bar: int = 0) -> Iterator[Quote]:
    """The real quote path through the shipped bars from ``start_bar`` on (historical stamps)."""
    for bar in BARS[start_bar:]:
        yield from bar_to_ticks(bar, SYMBOL)


def order_id(event: MasterEvent, link_id: str) -> str:
    return f"{event.event_id}:{link_id}"


def ref(master_position_id: str) -> str:
    return f"m1:{master_position_id}"


def link(link_id: str, follower: str, **fields: Any) -> CopyLink:
    return CopyLink(link_id=link_id, master="m1", follower=follower, **fields)


def refs(venue: PaperVenue, account: str) -> Counter[str | None]:
    return Counter(p.master_ref for p in venue.positions(account))


class Chain:
    """A replicator, any number of paper connectors and the execution reports they publish.

    Prices are driven by the test: ``feed`` restamps a real quote to wall-clock time (so
    signal-age rules see live events), hands it to every running terminal and publishes the
    master events it set off, as ``PaperConnector``'s own feed does.
    """

    def __init__(self, server: EmbeddedNats, nc: Client, js: JetStreamContext, tmp: Path):
        self.server = server
        self.nc = nc
        self.js = js
        self.tmp = tmp
        self.replicator: Replicator | None = None
        self.connectors: dict[str, PaperConnector] = {}
        self.reports: list[ExecutionReport] = []
        self.report_headers: list[dict[str, str]] = []
        self.quote: Quote | None = None

    async def start(self, links: Sequence[CopyLink]) -> None:
        await ensure_streams(self.js)
        buckets = await ensure_buckets(self.js)
        for copy_link in links:
            await buckets[subjects.KV_LINKS].put(copy_link.link_id, codec.encode(copy_link))
        self.replicator = Replicator(
            ReplicatorConfig(nats_url=self.server.url, metrics_port=None, instance="test")
        )
        await self.replicator.start()

        async def on_report(msg: Any) -> None:
            self.reports.append(codec.execution_report_decoder.decode(msg.data))
            self.report_headers.append(dict(msg.headers or {}))

        await self.js.subscribe(
            subjects.EXECUTION_REPORTS,
            stream=EXECUTION_REPORTS_STREAM,
            cb=on_report,
            ordered_consumer=True,
        )

    def state_path(self, connector_id: str) -> Path:
        return self.tmp / f"{connector_id}.paper"

    async def connect(
        self, connector_id: str, accounts: Sequence[Account], quote: Quote | None = None
    ) -> PaperConnector:
        """Open (or reopen) a terminal from its state file and start its connector."""
        terminal = PaperTerminal.open(self.state_path(connector_id), accounts)
        quote = quote or self.quote
        if quote is not None and terminal.venue.quote(SYMBOL) is None:
            terminal.on_quote(quote)
        connector = PaperConnector(self.nc, connector_id, terminal, None)
        await connector.start()
        self.connectors[connector_id] = connector
        assert self.replicator is not None and self.replicator.live is not None
        view = self.replicator.live.view
        for account, *_ in accounts:
            await wait_until(
                lambda a=account: a in view.accounts and (a, SYMBOL) in view.symbols,
                f"the replicator to see {account}'s state and {SYMBOL} spec",
            )
        return connector

    async def disconnect(self, connector_id: str) -> PaperTerminal:
        connector = self.connectors.pop(connector_id)
        await connector.stop()
        return connector.terminal

    async def feed(self, quote: Quote, only: Sequence[str] | None = None) -> list[MasterEvent]:
        """One quote to the running terminals (or ``only`` these); publish what it set off."""
        quote = msgspec.structs.replace(quote, ts_ns=time.time_ns())
        if only is None:
            self.quote = quote
        published: list[MasterEvent] = []
        for connector_id, connector in list(self.connectors.items()):
            if only is not None and connector_id not in only:
                continue
            events = connector.terminal.on_quote(quote)
            if events:
                connector.terminal.save()
                await connector.runtime.publish_master_events(events)
                published.extend(events)
        return published

    async def feed_until(
        self, quotes: Iterator[Quote], done: Callable[[list[MasterEvent]], bool], limit: int = 2000
    ) -> list[MasterEvent]:
        """Feed quotes until the master events of one quote satisfy ``done``."""
        for _ in range(limit):
            events = await self.feed(next(quotes))
            if done(events):
                return events
        pytest.fail(f"{limit} quotes did not set off the expected master event")

    async def master(
        self, connector: PaperConnector, action: Callable[[PaperVenue], Result]
    ) -> Result:
        result = await connector.trade(action)
        assert result.ok, result
        return result

    def reports_for(self, oid: str) -> list[ExecutionReport]:
        return [r for r in self.reports if r.order_id == oid]

    async def report(self, oid: str, timeout: float = WAIT_S) -> ExecutionReport:
        await wait_until(
            lambda: self.reports_for(oid),
            f"the execution report of {oid}",
            timeout,
            details=lambda: [(type(r).__name__, r.order_id) for r in self.reports],
        )
        return self.reports_for(oid)[0]

    async def close(self) -> None:
        for connector_id in list(self.connectors):
            await self.disconnect(connector_id)
        if self.replicator is not None:
            await self.replicator.stop()


@pytest.fixture
async def chain(
    nats_server: EmbeddedNats, nc: Client, js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[Chain]:
    c = Chain(nats_server, nc, js, tmp_path)
    try:
        yield c
    finally:
        await c.close()


def assert_hops_in_order(report: ExecutionReport) -> None:
    t = report.trace
    hops = [
        ("terminal_ns", t.terminal_ns),
        ("connector_ns", t.connector_ns),
        ("replicator_in_ns", t.replicator_in_ns),
        ("replicator_out_ns", t.replicator_out_ns),
        ("follower_connector_ns", t.follower_connector_ns),
        ("follower_terminal_ns", t.follower_terminal_ns),
        ("report_ns", t.report_ns),
    ]
    assert all(stamp > 0 for _, stamp in hops), hops
    stamps = [stamp for _, stamp in hops]
    assert stamps == sorted(stamps), hops


# --- 1. market opens ------------------------------------------------------------------------


async def test_market_open_buy_and_sell_copied_with_sizing_slippage_and_trace(
    chain: Chain,
) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    quotes = ticks(1)
    q0, q1 = next(quotes), next(quotes)
    assert (q0.bid, q0.ask) != (q1.bid, q1.ask)
    # Master and follower on separate terminals: the follower fills at its own later price.
    master = await chain.connect("pm", [M1], q0)
    follower = await chain.connect("pf", [F1], q1)

    buy = await chain.master(master, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    sell = await chain.master(master, lambda v: v.market_order("m1", SYMBOL, Side.SELL, 0.05))
    assert (buy.price, sell.price) == (q0.ask, q0.bid)

    filled_buy = await chain.report(order_id(buy.transactions[0], "l1"))
    filled_sell = await chain.report(order_id(sell.transactions[0], "l1"))

    venue = follower.terminal.venue
    positions = {p.master_ref: p for p in venue.positions("f1")}
    assert set(positions) == {ref(buy.position_id), ref(sell.position_id)}
    copy_buy, copy_sell = positions[ref(buy.position_id)], positions[ref(sell.position_id)]
    assert (copy_buy.side, copy_buy.volume, copy_buy.open_price) == (Side.BUY, 0.2, q1.ask)
    assert (copy_sell.side, copy_sell.volume, copy_sell.open_price) == (Side.SELL, 0.1, q1.bid)

    for report, position, master_price, slippage in (
        (filled_buy, copy_buy, q0.ask, q1.ask - q0.ask),
        (filled_sell, copy_sell, q0.bid, q0.bid - q1.bid),
    ):
        assert isinstance(report, OrderFilled), report
        assert report.follower == "f1" and report.link_id == "l1"
        assert report.position_id == position.position_id
        assert (report.side, report.volume, report.price) == (
            position.side,
            position.volume,
            position.open_price,
        )
        assert report.master_price == master_price
        assert slippage != 0
        assert report.slippage == pytest.approx(slippage, abs=1e-9)
        assert_hops_in_order(report)
    assert [p.volume for p in master.terminal.venue.positions("m1")] == [0.1, 0.05]


async def test_market_open_on_one_terminal_report_carries_msg_id(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    connector = await chain.connect("paper1", [M1, F1])
    await chain.feed(next(ticks(0)))
    opened = await chain.master(connector, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    oid = order_id(opened.transactions[0], "l1")
    report = await chain.report(oid)
    assert isinstance(report, OrderFilled)
    assert report.slippage == 0.0 and report.price == opened.price
    assert chain.report_headers[chain.reports.index(report)]["Nats-Msg-Id"] == f"report:{oid}"
    [copy] = connector.terminal.venue.positions("f1")
    assert (copy.master_ref, copy.volume, copy.client_order_id) == (
        ref(opened.position_id),
        0.2,
        oid,
    )
    assert_hops_in_order(report)


# --- 2. SL/TP modifications -----------------------------------------------------------------


async def test_modify_sl_tp_copied_and_swapped_on_reverse_link(chain: Chain) -> None:
    await chain.start([link("l1", "f1"), link("l2", "f2", reverse=True)])
    connector = await chain.connect("paper1", [M1, F1, F2])
    q = next(ticks(0))
    await chain.feed(q)
    sl, tp = round(q.bid - 20, 2), round(q.ask + 20, 2)
    opened = await chain.master(
        connector, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1, sl=sl, tp=tp)
    )
    await chain.report(order_id(opened.transactions[0], "l1"))
    await chain.report(order_id(opened.transactions[0], "l2"))
    venue = connector.terminal.venue
    [plain] = venue.positions("f1")
    [reverse] = venue.positions("f2")
    assert (plain.side, plain.sl, plain.tp) == (Side.BUY, sl, tp)
    assert (reverse.side, reverse.sl, reverse.tp) == (Side.SELL, tp, sl)

    new_sl, new_tp = round(q.bid - 10, 2), round(q.ask + 30, 2)
    modified = await chain.master(
        connector, lambda v: v.modify_position("m1", opened.position_id, new_sl, new_tp)
    )
    for link_id in ("l1", "l2"):
        report = await chain.report(order_id(modified.transactions[0], link_id))
        assert isinstance(report, OrderDone), report
    [plain] = venue.positions("f1")
    [reverse] = venue.positions("f2")
    assert (plain.sl, plain.tp) == (new_sl, new_tp)
    assert (reverse.sl, reverse.tp) == (new_tp, new_sl)


# --- 3. partial and full close --------------------------------------------------------------


async def test_partial_close_rounds_down_then_close_leaves_follower_flat(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=FixedLot(lots=0.33))])
    connector = await chain.connect("paper1", [M1, F1])
    quotes = ticks(2)
    await chain.feed(next(quotes))
    opened = await chain.master(connector, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    await chain.report(order_id(opened.transactions[0], "l1"))
    venue = connector.terminal.venue
    assert [p.volume for p in venue.positions("f1")] == [0.33]

    await chain.feed(next(quotes))
    reduced = await chain.master(
        connector, lambda v: v.close_position("m1", opened.position_id, 0.04)
    )
    report = await chain.report(order_id(reduced.transactions[0], "l1"))
    # 40 % of 0.33 is 0.132: rounded down to the 0.01 step.
    assert isinstance(report, OrderFilled), report
    assert (report.side, report.volume, report.price) == (Side.SELL, 0.13, reduced.price)
    [copy] = venue.positions("f1")
    assert (copy.volume, copy.master_ref) == (0.2, ref(opened.position_id))

    await chain.feed(next(quotes))
    closed = await chain.master(connector, lambda v: v.close_position("m1", opened.position_id))
    report = await chain.report(order_id(closed.transactions[0], "l1"))
    assert isinstance(report, OrderFilled), report
    assert report.volume == 0.2
    assert venue.positions("f1") == [] and venue.positions("m1") == []


# --- 4. close-by ----------------------------------------------------------------------------


async def test_close_by_closes_the_two_copies_by_each_other(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    connector = await chain.connect("paper1", [M1, F1])
    quotes = ticks(3)
    await chain.feed(next(quotes))
    buy = await chain.master(connector, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    await chain.feed(next(quotes))
    sell = await chain.master(connector, lambda v: v.market_order("m1", SYMBOL, Side.SELL, 0.05))
    for opened in (buy, sell):
        await chain.report(order_id(opened.transactions[0], "l1"))
    venue = connector.terminal.venue
    copies = {p.master_ref: p for p in venue.positions("f1")}
    copy_buy = copies[ref(buy.position_id)]
    copy_sell = copies[ref(sell.position_id)]
    assert (copy_buy.volume, copy_sell.volume) == (0.2, 0.1)
    balance_before = venue.account_state("f1").balance

    closed_by = await chain.master(
        connector, lambda v: v.close_by("m1", buy.position_id, sell.position_id)
    )
    report = await chain.report(order_id(closed_by.transactions[0], "l1"))
    assert isinstance(report, OrderDone), report
    assert report.position_ids == [copy_buy.position_id, copy_sell.position_id]
    # Both lose the smaller volume; the larger keeps the rest under its own id and reference.
    [rest] = venue.positions("f1")
    assert (rest.position_id, rest.master_ref, rest.volume) == (
        copy_buy.position_id,
        ref(buy.position_id),
        0.1,
    )
    # MT5 close-by: 0.1 lot of the buy closed at the sell's open price.
    expected = round((copy_sell.open_price - copy_buy.open_price) * 100 * 0.1, 2)
    assert venue.account_state("f1").balance == pytest.approx(balance_before + expected)
    [master_rest] = venue.positions("m1")
    assert master_rest.volume == 0.05


# --- 5. pending orders ----------------------------------------------------------------------


async def test_pending_place_modify_cancel_copied(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    connector = await chain.connect("paper1", [M1, F1])
    q = next(ticks(4))
    await chain.feed(q)
    venue = connector.terminal.venue
    price = round(q.ask - 5, 2)
    sl, tp = round(price - 5, 2), round(price + 10, 2)
    placed = await chain.master(
        connector,
        lambda v: v.place_pending("m1", SYMBOL, OrderType.BUY_LIMIT, 0.1, price, sl=sl, tp=tp),
    )
    report = await chain.report(order_id(placed.transactions[0], "l1"))
    assert isinstance(report, OrderDone), report
    [pending] = venue.pending_orders("f1")
    assert (pending.order_type, pending.volume, pending.price, pending.sl, pending.tp) == (
        OrderType.BUY_LIMIT,
        0.2,
        price,
        sl,
        tp,
    )
    assert pending.master_ref == ref(placed.order_id)
    assert report.position_ids == [pending.order_id]

    new_price = round(price - 1, 2)
    modified = await chain.master(
        connector,
        lambda v: v.modify_pending("m1", placed.order_id, new_price, sl=sl, tp=tp),
    )
    report = await chain.report(order_id(modified.transactions[0], "l1"))
    assert isinstance(report, OrderDone), report
    [moved] = venue.pending_orders("f1")
    assert (moved.order_id, moved.price, moved.sl, moved.tp) == (
        pending.order_id,
        new_price,
        sl,
        tp,
    )

    cancelled = await chain.master(connector, lambda v: v.cancel_pending("m1", placed.order_id))
    report = await chain.report(order_id(cancelled.transactions[0], "l1"))
    assert isinstance(report, OrderDone), report
    assert venue.pending_orders("f1") == [] and venue.pending_orders("m1") == []
    assert venue.positions("f1") == []


def _triggered(events: list[MasterEvent]) -> bool:
    return any(isinstance(e, PendingOrderTriggered) for e in events)


async def test_pending_trigger_follower_copy_triggered_too_one_position(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    connector = await chain.connect("paper1", [M1, F1])
    quotes = ticks(10)
    q = next(quotes)
    await chain.feed(q)
    placed = await chain.master(
        connector,
        lambda v: v.place_pending("m1", SYMBOL, OrderType.BUY_LIMIT, 0.1, round(q.ask - 1, 2)),
    )
    await chain.report(order_id(placed.transactions[0], "l1"))
    venue = connector.terminal.venue
    [follower_pending] = venue.pending_orders("f1")

    events = await chain.feed_until(quotes, _triggered)
    [trigger] = [e for e in events if isinstance(e, PendingOrderTriggered)]
    report = await chain.report(order_id(trigger, "l1"))
    assert isinstance(report, OrderFilled), report
    # Same venue, same quote: the follower's own copy triggered; it is re-keyed, not doubled.
    [position] = venue.positions("f1")
    assert position.position_id == follower_pending.order_id
    assert position.master_ref == ref(trigger.position_id)
    assert position.volume == 0.2
    assert report.position_id == position.position_id
    assert venue.pending_orders("f1") == []


async def test_pending_trigger_follower_copy_not_triggered_gets_market_open(
    chain: Chain,
) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    quotes = ticks(10)
    q = next(quotes)
    master = await chain.connect("pm", [M1], q)
    follower = await chain.connect("pf", [F1], q)
    await chain.feed(q)
    placed = await chain.master(
        master,
        lambda v: v.place_pending("m1", SYMBOL, OrderType.BUY_LIMIT, 0.1, round(q.ask - 1, 2)),
    )
    await chain.report(order_id(placed.transactions[0], "l1"))
    venue = follower.terminal.venue
    assert len(venue.pending_orders("f1")) == 1

    # Only the master's terminal sees the trigger: the follower's copy is still waiting.
    for _ in range(2000):
        events = await chain.feed(next(quotes), only=["pm"])
        if _triggered(events):
            break
    else:
        pytest.fail("the master's buy limit never triggered")
    [trigger] = [e for e in events if isinstance(e, PendingOrderTriggered)]
    report = await chain.report(order_id(trigger, "l1"))
    assert isinstance(report, OrderFilled), report
    [position] = venue.positions("f1")
    assert position.master_ref == ref(trigger.position_id)
    assert venue.pending_orders("f1") == []
    # Later quotes cannot trigger a second position: the waiting copy was cancelled.
    for _ in range(8):
        await chain.feed(next(quotes))
    assert refs(venue, "f1") == {ref(trigger.position_id): 1}


# --- 6. SL hit by price ---------------------------------------------------------------------


async def test_master_sl_hit_by_price_closes_follower_copy(chain: Chain) -> None:
    # SL/TP not copied: the follower's copy can only close because the master's did.
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0), copy_sl_tp=False)])
    connector = await chain.connect("paper1", [M1, F1])
    quotes = ticks(20)
    q = next(quotes)
    await chain.feed(q)
    sl = round(q.bid - 1, 2)
    opened = await chain.master(
        connector, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1, sl=sl)
    )
    await chain.report(order_id(opened.transactions[0], "l1"))
    venue = connector.terminal.venue
    [copy] = venue.positions("f1")
    assert copy.sl is None

    def sl_hit(events: list[MasterEvent]) -> bool:
        return any(isinstance(e, PositionClosed) and e.reason == "sl" for e in events)

    events = await chain.feed_until(quotes, sl_hit)
    [closed] = [e for e in events if isinstance(e, PositionClosed)]
    assert closed.position_id == opened.position_id
    report = await chain.report(order_id(closed, "l1"))
    assert isinstance(report, OrderFilled), report
    assert (report.side, report.volume, report.position_id) == (
        Side.SELL,
        0.2,
        copy.position_id,
    )
    assert venue.positions("f1") == [] and venue.positions("m1") == []


# --- 7. / 8. restarts -----------------------------------------------------------------------


async def follower_consumer_idle(js: JetStreamContext, connector_id: str) -> bool:
    info = await js.consumer_info(FOLLOWER_ORDERS_STREAM, f"connector-{connector_id}")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def stored_orders(js: JetStreamContext) -> int:
    return (await js.stream_info(FOLLOWER_ORDERS_STREAM)).state.messages


async def has_orders(js: JetStreamContext, count: int) -> bool:
    return await stored_orders(js) >= count


def unpublished(report: ExecutionReport) -> ExecutionReport:
    """The report as the terminal stored it: before the runtime stamped ``report_ns``."""
    return msgspec.structs.replace(report, trace=msgspec.structs.replace(report.trace, report_ns=0))


async def stored_order(js: JetStreamContext, oid: str) -> FollowerOpen:
    """The follower order ``oid`` as it sits in the follower-orders stream."""
    info = await js.stream_info(FOLLOWER_ORDERS_STREAM)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(FOLLOWER_ORDERS_STREAM, seq)
        order = codec.follower_order_decoder.decode(msg.data)
        if order.order_id == oid:
            return order
    pytest.fail(f"order {oid} is not in the stream")


async def test_restart_with_orders_queued_no_duplicate_no_missed_close(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    quotes = ticks(30)
    q = next(quotes)
    master = await chain.connect("pm", [M1], q)
    await chain.connect("pf", [F1], q)
    await chain.feed(q)

    def market(side: Side, volume: float) -> Callable[[PaperVenue], Result]:
        return lambda v: v.market_order("m1", SYMBOL, side, volume)

    a = await chain.master(master, market(Side.BUY, 0.1))
    a_open = order_id(a.transactions[0], "l1")
    first = await chain.report(a_open)
    assert isinstance(first, OrderFilled)

    # The follower's connector goes down; the master goes on trading.
    await chain.disconnect("pf")
    orders_before = await stored_orders(chain.js)
    b = await chain.master(master, market(Side.BUY, 0.1))
    c = await chain.master(master, market(Side.SELL, 0.05))
    await chain.feed(next(quotes), only=["pm"])
    a_close = await chain.master(master, lambda v: v.close_position("m1", a.position_id))
    b_part = await chain.master(master, lambda v: v.close_position("m1", b.position_id, 0.04))
    c_close = await chain.master(master, lambda v: v.close_position("m1", c.position_id))
    queued = [order_id(r.transactions[0], "l1") for r in (b, c, a_close, b_part, c_close)]
    await wait_until(lambda: has_orders(chain.js, orders_before + 5), "five follower orders queued")
    assert not any(chain.reports_for(oid) for oid in queued)

    # A new terminal from the same state file and a new connector with the same id.
    follower = await chain.connect("pf", [F1])
    for oid in queued:
        await chain.report(oid)
    await wait_until(lambda: follower_consumer_idle(chain.js, "pf"), "every order acknowledged")

    venue = follower.terminal.venue
    # Each master position copied exactly once, every close followed: only B's rest is left.
    [rest] = venue.positions("f1")
    assert (rest.master_ref, rest.volume) == (ref(b.position_id), 0.12)
    filled = Counter(r.order_id for r in chain.reports if isinstance(r, OrderFilled))
    assert filled == Counter({a_open: 1, **{oid: 1 for oid in queued}})

    # Re-executing an executed order returns the stored report and changes nothing.
    await chain.feed(next(quotes))
    await chain.feed(next(quotes))
    order = await stored_order(chain.js, a_open)
    before = (venue.snapshot(), dict(follower.terminal.reports))
    again = await follower.terminal.execute(order, reports_at_receipt(order, time.time_ns()))
    assert again == unpublished(first)
    assert isinstance(again, OrderFilled) and again.price == first.price
    assert (venue.snapshot(), dict(follower.terminal.reports)) == before


async def shorten_ackwait_until(js: JetStreamContext, connector_id: str, seconds: float) -> None:
    """Redeliver unacknowledged orders after ``seconds`` instead of the runtime's 30 s.

    The runtime keeps an existing consumer whose filters match, so the test's ack wait stays.
    """
    durable = f"connector-{connector_id}"
    config = (await js.consumer_info(FOLLOWER_ORDERS_STREAM, durable)).config
    config.ack_wait = seconds
    await js.add_consumer(FOLLOWER_ORDERS_STREAM, config)


def block_executions(terminal: PaperTerminal) -> asyncio.Event:
    """Make ``terminal`` take orders but never execute them (a connector dying mid-batch)."""
    blocked = asyncio.Event()

    async def never(order: Any, reports: OrderReports) -> ExecutionReport:
        blocked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    terminal.execute = never  # type: ignore[method-assign]
    return blocked


async def crash_with_open_in_flight(chain: Chain) -> tuple[PaperConnector, Result, str]:
    """pm/pf running; the master opens a position whose order pf takes but never executes;
    pf is stopped and restarted from its state file. Returns (master, open result, order id)."""
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    quotes = ticks(40)
    q = next(quotes)
    master = await chain.connect("pm", [M1], q)
    follower = await chain.connect("pf", [F1], q)
    await chain.feed(q)
    await shorten_ackwait_until(chain.js, "pf", 2.0)
    blocked = block_executions(follower.terminal)
    opened = await chain.master(master, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    oid = order_id(opened.transactions[0], "l1")
    await wait_until(blocked.is_set, "the follower connector to take the order")
    await chain.disconnect("pf")
    await chain.connect("pf", [F1])
    return master, opened, oid


async def test_restart_with_order_taken_but_not_executed_executes_it_once(chain: Chain) -> None:
    master, opened, oid = await crash_with_open_in_flight(chain)
    # Redelivered after the ack wait to the new connector, executed once.
    report = await chain.report(oid)
    assert isinstance(report, OrderFilled), report
    venue = chain.connectors["pf"].terminal.venue
    assert refs(venue, "f1") == {ref(opened.position_id): 1}
    closed = await chain.master(master, lambda v: v.close_position("m1", opened.position_id))
    assert isinstance(await chain.report(order_id(closed.transactions[0], "l1")), OrderFilled)
    await wait_until(lambda: follower_consumer_idle(chain.js, "pf"), "every order acknowledged")
    assert venue.positions("f1") == []
    filled = Counter(r.order_id for r in chain.reports if isinstance(r, OrderFilled))
    assert set(filled.values()) == {1}


async def test_restart_close_does_not_overtake_the_redelivered_open(chain: Chain) -> None:
    master, opened, oid = await crash_with_open_in_flight(chain)
    # The master closes at once, while the open still waits for redelivery.
    closed = await chain.master(master, lambda v: v.close_position("m1", opened.position_id))
    close_oid = order_id(closed.transactions[0], "l1")
    await chain.report(oid)
    await chain.report(close_oid)
    await wait_until(lambda: follower_consumer_idle(chain.js, "pf"), "every order acknowledged")
    executed = [r.order_id for r in chain.reports]
    venue = chain.connectors["pf"].terminal.venue
    assert venue.positions("f1") == [], (executed, chain.reports_for(close_oid))
    assert executed.index(oid) < executed.index(close_oid)


async def test_executed_before_ack_then_redelivered_one_position(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    quotes = ticks(50)
    q = next(quotes)
    master = await chain.connect("pm", [M1], q)
    await chain.connect("pf", [F1], q)
    await chain.feed(q)
    await chain.disconnect("pf")

    opened = await chain.master(master, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    oid = order_id(opened.transactions[0], "l1")
    await wait_until(lambda: has_orders(chain.js, 1), "the order queued")
    order = await stored_order(chain.js, oid)

    # The follower executes and persists the order, then dies before reporting and acking.
    crashed = PaperTerminal.open(chain.state_path("pf"), [F1])
    direct = await crashed.execute(order, reports_at_receipt(order, time.time_ns()))
    crashed.commit()
    assert isinstance(direct, OrderFilled)
    assert len(crashed.venue.positions("f1")) == 1
    del crashed

    # Restart: a later price, the same order delivered; the stored outcome is reported.
    await chain.feed(next(quotes), only=["pm"])
    follower = await chain.connect("pf", [F1], next(quotes))
    report = await chain.report(oid)
    await wait_until(lambda: follower_consumer_idle(chain.js, "pf"), "the order acknowledged")
    assert report == msgspec.structs.replace(direct, trace=report.trace)
    assert report.trace.report_ns > 0
    venue = follower.terminal.venue
    [copy] = venue.positions("f1")
    assert (copy.master_ref, copy.position_id, copy.open_price) == (
        ref(opened.position_id),
        direct.position_id,
        direct.price,
    )
    assert len(chain.reports_for(oid)) == 1


# --- 9. persistence -------------------------------------------------------------------------


async def test_paper_state_survives_restart(chain: Chain) -> None:
    await chain.start([link("l1", "f1", sizing=Multiplier(factor=2.0))])
    connector = await chain.connect("paper1", [M1, F1])
    quotes = ticks(60)
    q = next(quotes)
    await chain.feed(q)
    a = await chain.master(connector, lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    b = await chain.master(connector, lambda v: v.market_order("m1", SYMBOL, Side.SELL, 0.2))
    await chain.feed(next(quotes))
    await chain.feed(next(quotes))
    part = await chain.master(connector, lambda v: v.close_position("m1", a.position_id, 0.05))
    pending = await chain.master(
        connector,
        lambda v: v.place_pending("m1", SYMBOL, OrderType.SELL_LIMIT, 0.1, round(q.bid + 30, 2)),
    )
    for result in (a, b, part, pending):
        await chain.report(order_id(result.transactions[0], "l1"))
    # One master event recorded but not yet published: it must survive in the outbox.
    unpublished_trade = connector.terminal.trade(
        lambda v: v.modify_position("m1", b.position_id, None, round(q.bid - 30, 2))
    )
    assert unpublished_trade.ok and connector.terminal.outbox

    old = await chain.disconnect("paper1")
    reopened = PaperTerminal.open(chain.state_path("paper1"), [M1, F1])
    for account in ("m1", "f1"):
        assert reopened.venue.positions(account) == old.venue.positions(account)
        assert reopened.venue.pending_orders(account) == old.venue.pending_orders(account)
        assert reopened.venue.account_state(account, 0) == old.venue.account_state(account, 0)
    assert reopened.venue.account_state("f1", 0).balance != 10_000.0
    assert len(reopened.venue.positions("f1")) == 2
    assert len(reopened.venue.pending_orders("f1")) == 1
    assert reopened.venue.quote(SYMBOL) == old.venue.quote(SYMBOL)
    assert reopened.reports == old.reports and len(reopened.reports) == 4
    assert reopened.outbox == old.outbox and len(reopened.outbox) == 1
    # The venue's own client-order-id memory is not persisted: the order journal is.
    assert reopened.venue.snapshot(with_executed=False) == old.venue.snapshot(with_executed=False)


# --- 10. exactly once beyond the dedup window (the order journal) ---------------------------

S = 1_000_000_000
RETENTION_S = follower_orders_stream().max_age


class WallClock:
    """The terminal's wall clock, moved by the test to age its order memory."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * S)


def direct_open(account: str, position: str, **fields: Any) -> FollowerOpen:
    return FollowerOpen(order_id=f"m1-{position}-opened:l1", link_id="l1", follower=account,
                        master="m1", master_event_id=f"m1-{position}-opened", symbol=SYMBOL,
                        ts_ns=time.time_ns(), master_position_id=position, side=Side.BUY,
                        volume=0.1, **fields)  # fmt: skip


def direct_close(account: str, position: str) -> FollowerClose:
    return FollowerClose(order_id=f"m1-{position}-closed:l1", link_id="l1", follower=account,
                         master="m1", master_event_id=f"m1-{position}-closed", symbol=SYMBOL,
                         ts_ns=time.time_ns(), master_position_id=position)  # fmt: skip


async def execute(terminal: PaperTerminal, order: FollowerOrder) -> ExecutionReport:
    return await terminal.execute(order, reports_at_receipt(order, time.time_ns()))


def follower_terminal(path: Path, clock: WallClock, **memory: Any) -> PaperTerminal:
    terminal = PaperTerminal.open(path, [F1, F2], order_memory=OrderMemoryConfig(**memory),
                                  wall_clock=clock)  # fmt: skip
    quotes = ticks(5)
    if terminal.venue.quote(SYMBOL) is None:
        terminal.on_quote(next(quotes))
    return terminal


def book(terminal: PaperTerminal, account: str = "f1") -> tuple[object, ...]:
    venue = terminal.venue
    return (venue.positions(account), venue.pending_orders(account),
            venue.account_state(account, 0))  # fmt: skip


@pytest.mark.parametrize("age_s", [DUPLICATE_WINDOW_S + 1, 3 * 86_400, RETENTION_S - 60])
async def test_an_order_redelivered_after_the_dedup_window_and_a_restart_trades_nothing(
    tmp_path: Path, age_s: float
) -> None:
    """An open and its close ran; days later both come again (a redo by the replicator, or a
    redelivery from the stream) to a restarted terminal. Each returns its first report; the
    open does not trade again although its copy is gone, the close does not say "no copy"."""
    clock = WallClock()
    path = tmp_path / "pf.paper"
    terminal = follower_terminal(path, clock)
    opened = await execute(terminal, direct_open("f1", "p1"))
    terminal.on_quote(next(ticks(7)))
    closed = await execute(terminal, direct_close("f1", "p1"))
    terminal.commit()
    assert isinstance(opened, OrderFilled) and isinstance(closed, OrderFilled)
    before = book(terminal)
    terminal.close()

    clock.advance(age_s)
    restarted = follower_terminal(path, clock)
    assert book(restarted) == before
    assert await execute(restarted, direct_close("f1", "p1")) == closed
    assert await execute(restarted, direct_open("f1", "p1")) == opened
    restarted.commit()
    assert book(restarted) == before and restarted.venue.positions("f1") == []


async def test_a_redelivered_order_is_remembered_a_full_retention_from_its_latest_arrival(
    tmp_path: Path,
) -> None:
    clock = WallClock()
    path = tmp_path / "pf.paper"
    terminal = follower_terminal(path, clock)
    opened = await execute(terminal, direct_open("f1", "p1"))
    terminal.commit()
    clock.advance(RETENTION_S - 60)
    assert await execute(terminal, direct_open("f1", "p1")) == opened  # a redo, days later
    terminal.commit()
    terminal.close()
    clock.advance(RETENTION_S - 60)  # long past the first run, within the redo's retention
    restarted = follower_terminal(path, clock)
    assert "m1-p1-opened:l1" in restarted.reports
    assert await execute(restarted, direct_open("f1", "p1")) == opened


async def test_past_the_retention_an_order_falls_back_to_the_venues_evidence(
    tmp_path: Path,
) -> None:
    """The documented bound: after the retention only the copy itself tells an open ran."""
    clock = WallClock()
    path = tmp_path / "pf.paper"
    terminal = follower_terminal(path, clock)
    opened = await execute(terminal, direct_open("f1", "p1"))
    terminal.commit()
    terminal.close()
    clock.advance(RETENTION_S + 1)
    restarted = follower_terminal(path, clock)
    assert len(restarted.reports) == 0
    again = await execute(restarted, direct_open("f1", "p1"))
    assert isinstance(again, OrderFilled) and again.position_id == opened.position_id
    assert len(restarted.venue.positions("f1")) == 1


async def test_a_crash_between_execute_and_commit_re_executes_once_from_the_last_commit(
    tmp_path: Path,
) -> None:
    clock = WallClock()
    path = tmp_path / "pf.paper"
    terminal = follower_terminal(path, clock)
    await execute(terminal, direct_open("f1", "p0"))
    terminal.commit()
    committed = book(terminal)
    await execute(terminal, direct_open("f1", "p1"))  # executed, never committed: the crash
    del terminal

    restarted = follower_terminal(path, clock)
    assert book(restarted) == committed  # venue and journal agree: neither has p1
    assert "m1-p1-opened:l1" not in restarted.reports
    first = await execute(restarted, direct_open("f1", "p1"))
    restarted.commit()
    restarted.close()
    again = follower_terminal(path, clock)
    assert await execute(again, direct_open("f1", "p1")) == first
    assert sorted(p.master_ref or "" for p in again.venue.positions("f1")) == ["m1:p0", "m1:p1"]


async def test_a_commit_torn_by_a_crash_loses_the_venues_change_and_its_report_together(
    tmp_path: Path,
) -> None:
    clock = WallClock()
    path = tmp_path / "pf.paper"
    terminal = follower_terminal(path, clock)
    await execute(terminal, direct_open("f1", "p0"))
    terminal.commit()
    committed = book(terminal)
    journal = path.with_name(path.name + ".journal")
    size = journal.stat().st_size
    await execute(terminal, direct_open("f1", "p1"))
    terminal.commit()
    terminal.close()
    with open(journal, "r+b") as handle:  # the power went during the append
        handle.truncate(size + (journal.stat().st_size - size) // 2)

    restarted = follower_terminal(path, clock)
    assert book(restarted) == committed and "m1-p1-opened:l1" not in restarted.reports
    await execute(restarted, direct_open("f1", "p1"))
    assert len(restarted.venue.positions("f1")) == 2


async def test_concurrent_orders_of_two_accounts_commit_consistently(tmp_path: Path) -> None:
    """f2's open waits for a better price while f1's batch executes and commits: the commit
    holds f1's trade and report, not f2's half-done order; a crash then re-executes f2 only."""
    clock = WallClock()
    path = tmp_path / "pf.paper"
    terminal = follower_terminal(path, clock)
    quote = terminal.venue.quote(SYMBOL)
    assert quote is not None
    waiting = direct_open("f2", "p2", master_price=round(quote.ask - 50, 2),
                          max_price_deviation=0.01, deviation_policy=DeviationPolicy.WAIT,
                          deviation_wait_ms=60_000)  # fmt: skip
    f2 = asyncio.create_task(execute(terminal, waiting))
    await asyncio.sleep(0.01)
    filled = await execute(terminal, direct_open("f1", "p1"))
    terminal.commit()
    assert not f2.done()
    f2.cancel()  # the crash
    del terminal

    restarted = follower_terminal(path, clock)
    assert await execute(restarted, direct_open("f1", "p1")) == filled
    assert restarted.venue.positions("f2") == [] and waiting.order_id not in restarted.reports
    assert len(restarted.venue.positions("f1")) == 1


async def test_the_per_batch_write_does_not_grow_with_history(tmp_path: Path) -> None:
    clock = WallClock()
    terminal = follower_terminal(tmp_path / "pf.paper", clock)
    sizes = []
    for i in range(300):
        await execute(terminal, direct_open("f1", f"p{i}"))
        await execute(terminal, direct_close("f1", f"p{i}"))
        terminal.commit()
        assert terminal.journal.state is not None
        sizes.append(len(terminal.journal.state))
    assert len(terminal.reports) == 600
    # The venue without its order memory: flat, but for a few digits more in tickets.
    assert sizes[-1] - sizes[0] <= 8


async def test_an_old_format_state_file_loads_and_keeps_recognising_its_orders(
    tmp_path: Path,
) -> None:
    """A state file written before the journal: one msgpack object with the venue (its
    client-order-id memory inside, without ages) and the reports of the last 10 minutes."""
    # The old terminal's venue remembered every client order id itself.
    memoryless = PaperTerminal(PaperVenue(), [], ["f1", "f2"])
    for account, currency, balance, leverage, _ in (F1, F2):
        memoryless.venue.open_account(account, currency, balance, leverage)
    memoryless.on_quote(next(ticks(5)))
    opened = await execute(memoryless, direct_open("f1", "p1"))
    closed = await execute(memoryless, direct_close("f1", "p1"))
    kept = await execute(memoryless, direct_open("f1", "p2"))
    venue = msgspec.msgpack.decode(memoryless.venue.snapshot())
    for account in venue["accounts"]:
        del account["executed_ns"]  # the old format had no ages
    # The open of p1 ran more than 10 minutes ago: the old format had dropped its report.
    reports = {o.order_id: codec.encode(r) for o, r in
               ((direct_close("f1", "p1"), closed), (direct_open("f1", "p2"), kept))}  # fmt: skip
    legacy = PaperConnectorState(venue=msgspec.msgpack.encode(venue), reports=reports)
    path = tmp_path / "old.paper"
    path.write_bytes(msgspec.msgpack.encode(legacy))

    upgraded = follower_terminal(path, WallClock())
    assert path.read_bytes().startswith(MAGIC)
    assert book(upgraded) == book(memoryless)
    assert await execute(upgraded, direct_close("f1", "p1")) == closed
    assert await execute(upgraded, direct_open("f1", "p2")) == kept
    again = await execute(upgraded, direct_open("f1", "p1"))  # known to the old venue only
    assert isinstance(again, OrderFilled) and isinstance(opened, OrderFilled)
    assert (again.position_id, again.price, again.volume) == (
        opened.position_id, opened.price, opened.volume,
    )  # fmt: skip
    assert [p.master_ref for p in upgraded.venue.positions("f1")] == ["m1:p2"]


async def test_a_follower_close_report_carries_the_money_the_venue_booked(
    tmp_path: Path,
) -> None:
    clock = WallClock()
    terminal = follower_terminal(tmp_path / "pf.paper", clock)
    opened = await execute(terminal, direct_open("f1", "p1"))
    terminal.on_quote(next(ticks(7)))
    closed = await execute(terminal, direct_close("f1", "p1"))
    assert isinstance(opened, OrderFilled) and isinstance(closed, OrderFilled)
    # An open closes nothing: it says no profit at all.
    assert (opened.profit, opened.commission, opened.swap) == (None, None, None)
    # 0.1 lot of XAUUSD: price move x 100 oz x 0.1, in cents, as the balance moved.
    expected = round((closed.price - opened.price) * 10, 2)
    assert (closed.profit, closed.commission, closed.swap) == (expected, 0.0, 0.0)
    assert terminal.venue.account_state("f1").balance == round(10_000.0 + expected, 2)
    terminal.close()
