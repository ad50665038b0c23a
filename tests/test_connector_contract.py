"""The connector contract (connectors/contract.py) over a private nats-server, with the paper
terminal as the Terminal: account state and specs in KV, master events with dedup ids and
trace stamps, the outbox, bad and foreign follower orders, and batched orders."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest
import structlog
from conftest import wait_until
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from connectors.contract import ConnectorRuntime, report_id, reports_at_receipt
from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import Quote, bar_to_ticks, load_bars
from connectors.reports import (
    EXPIRED_REASON,
    RETCODE_EXPIRED,
    RETCODE_PRICE_DEVIATION,
    OrderReports,
)
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.publishing import NotStored
from schemas import codec, subjects
from schemas.account import AccountState
from schemas.common import Side
from schemas.master import MasterEvent
from schemas.orders import (
    DeviationPolicy,
    FollowerClose,
    FollowerModify,
    FollowerOpen,
    FollowerOrder,
    FollowerOrderBatch,
)
from schemas.reports import ExecutionReport, OrderDone, OrderFilled, OrderRejected
from schemas.streams import (
    EXECUTION_REPORTS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    MASTER_EVENTS_STREAM,
)

SYMBOL = "XAUUSD"
CONNECTOR = "c1"
MSG_ID = "Nats-Msg-Id"
QUOTES = bar_to_ticks(load_bars()[0], SYMBOL)

Account = tuple[str, str, float, int, str]
M1: Account = ("m1", "USD", 10_000.0, 100, "master")
F1: Account = ("f1", "USD", 10_000.0, 100, "follower")
F2: Account = ("f2", "USD", 10_000.0, 100, "follower")
ACCOUNTS = [M1, F1, F2]


def live(quote: Quote) -> Quote:
    return msgspec.structs.replace(quote, ts_ns=time.time_ns())


class Rig:
    """A paper terminal behind a ConnectorRuntime, and the execution reports it publishes."""

    def __init__(self, nc: Client, js: JetStreamContext, tmp: Path) -> None:
        self.nc = nc
        self.js = js
        self.path = tmp / "paper.state"
        self.runtimes: list[ConnectorRuntime] = []
        self.reports: list[ExecutionReport] = []
        self.report_ids: list[str] = []
        self.buckets: dict[str, Any] = {}

    async def setup(self) -> None:
        await ensure_streams(self.js)
        self.buckets = await ensure_buckets(self.js)

        async def on_report(msg: Any) -> None:
            self.reports.append(codec.execution_report_decoder.decode(msg.data))
            self.report_ids.append((msg.headers or {}).get(MSG_ID, ""))

        await self.js.subscribe(
            subjects.EXECUTION_REPORTS,
            stream=EXECUTION_REPORTS_STREAM,
            cb=on_report,
            ordered_consumer=True,
        )

    def terminal(self, accounts: Sequence[Account] = ACCOUNTS) -> PaperTerminal:
        terminal = PaperTerminal.open(self.path, accounts)
        if terminal.venue.quote(SYMBOL) is None:
            terminal.on_quote(live(QUOTES[0]))
        return terminal

    async def start(self, terminal: PaperTerminal, **kwargs: Any) -> ConnectorRuntime:
        runtime = ConnectorRuntime(self.nc, CONNECTOR, terminal, **kwargs)
        await runtime.start()
        self.runtimes.append(runtime)
        return runtime

    async def stop(self, runtime: ConnectorRuntime) -> None:
        self.runtimes.remove(runtime)
        await runtime.stop()

    async def send(
        self, order: FollowerOrder, subject: str | None = None, msg_id: str | None = None
    ) -> None:
        await self.js.publish(
            subject or subjects.follower_orders(order.follower),
            codec.encode(order),
            headers={MSG_ID: msg_id or order.order_id},
        )

    def state_files(self) -> list[Path]:
        """The paper terminal's files (its state, and any journal beside it)."""
        return sorted(self.path.parent.glob(f"{self.path.name}*"))

    def keep_state(self, into: Path) -> None:
        into.mkdir()
        for path in self.state_files():
            shutil.copy(path, into / path.name)

    def restore_state(self, kept: Path) -> None:
        for path in self.state_files():
            path.unlink()
        for path in kept.iterdir():
            shutil.copy(path, self.path.parent / path.name)

    def reports_for(self, oid: str) -> list[ExecutionReport]:
        return [r for r in self.reports if r.order_id == oid]

    async def report(self, oid: str) -> ExecutionReport:
        await wait_until(
            lambda: self.reports_for(oid),
            f"the execution report of {oid}",
            details=lambda: [(type(r).__name__, r.order_id) for r in self.reports],
        )
        return self.reports_for(oid)[0]

    async def account_state(self, account: str) -> AccountState:
        entry = await self.buckets[subjects.KV_ACCOUNTS].get(account)
        return codec.account_state_decoder.decode(entry.value)

    async def consumer_idle(self) -> bool:
        try:
            info = await self.js.consumer_info(FOLLOWER_ORDERS_STREAM, f"connector-{CONNECTOR}")
        except nats.js.errors.NotFoundError:  # being re-created after a failed batch
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def master_events(self) -> list[Any]:
        """Every stored master event message, in stream order."""
        state = (await self.js.stream_info(MASTER_EVENTS_STREAM)).state
        if state.messages == 0:
            return []
        return [
            await self.js.get_msg(MASTER_EVENTS_STREAM, seq)
            for seq in range(state.first_seq, state.last_seq + 1)
        ]


@pytest.fixture
async def rig(nc: Client, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(nc, js, tmp_path)
    await r.setup()
    try:
        yield r
    finally:
        for runtime in list(r.runtimes):
            await r.stop(runtime)


_counter = iter(range(1, 1_000_000))


def open_order(
    follower: str, position: str, side: Side = Side.BUY, volume: float = 0.1, **fields: Any
) -> FollowerOpen:
    n = next(_counter)
    fields.setdefault("master_price", QUOTES[0].ask if side is Side.BUY else QUOTES[0].bid)
    return FollowerOpen(
        order_id=f"e{n}:l-{follower}",
        link_id=f"l-{follower}",
        follower=follower,
        master="m1",
        master_event_id=f"e{n}",
        symbol=SYMBOL,
        ts_ns=time.time_ns(),
        master_position_id=position,
        side=side,
        volume=volume,
        **fields,
    )


def follow_up(kind: type[Any], follower: str, position: str, **fields: Any) -> Any:
    n = next(_counter)
    return kind(
        order_id=f"e{n}:l-{follower}",
        link_id=f"l-{follower}",
        follower=follower,
        master="m1",
        master_event_id=f"e{n}",
        symbol=SYMBOL,
        ts_ns=time.time_ns(),
        master_position_id=position,
        **fields,
    )


# --- account state and symbol specs ---------------------------------------------------------


async def test_state_and_specs_in_kv_on_start_and_state_republished_after_execution(
    rig: Rig,
) -> None:
    terminal = rig.terminal()
    # No periodic republication during the test: any new state comes from a change.
    await rig.start(terminal, state_interval_s=3600.0)
    for account in ("m1", "f1", "f2"):
        state = await rig.account_state(account)
        assert (state.account, state.connector, state.currency) == (account, CONNECTOR, "USD")
        assert (state.balance, state.equity, state.open_positions) == (10_000.0, 10_000.0, 0)
        entry = await rig.buckets[subjects.KV_SYMBOLS].get(subjects.symbol_key(account, SYMBOL))
        spec = codec.symbol_spec_decoder.decode(entry.value)
        expected = terminal.venue.symbol_spec(account, SYMBOL)
        assert spec == msgspec.structs.replace(expected, ts_ns=spec.ts_ns)
        assert (spec.volume_min, spec.volume_step, spec.contract_size) == (0.01, 0.01, 100.0)
    kv_f1 = rig.buckets[subjects.KV_ACCOUNTS]
    revision = (await kv_f1.get("f1")).revision

    order = open_order("f1", "p1")
    await rig.send(order)
    assert isinstance(await rig.report(order.order_id), OrderFilled)

    async def f1_has_one_position() -> bool:
        return (await rig.account_state("f1")).open_positions == 1

    await wait_until(f1_has_one_position, "f1's state republished with the new position")
    state = await rig.account_state("f1")
    assert state.connector == CONNECTOR and state.margin > 0
    assert (await kv_f1.get("f1")).revision > revision
    # The master's state changes too once its own trade is published.
    result = terminal.trade(lambda v: v.market_order("m1", SYMBOL, Side.SELL, 0.1))
    assert result.ok
    await rig.runtimes[0].publish_master_events(list(terminal.outbox))

    async def m1_has_one_position() -> bool:
        return (await rig.account_state("m1")).open_positions == 1

    await wait_until(m1_has_one_position, "m1's state republished after its trade")


# --- master events --------------------------------------------------------------------------


async def test_master_events_carry_event_id_as_msg_id_are_deduplicated_and_stamped(
    rig: Rig,
) -> None:
    terminal = rig.terminal()
    runtime = await rig.start(terminal)
    opened = terminal.trade(lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    assert opened.ok
    [event] = terminal.outbox
    assert event.trace.terminal_ns > 0 and event.trace.connector_ns == 0
    before = time.time_ns()
    await runtime.publish_master_events([event])
    await runtime.publish_master_events([event])  # again: the stream keeps one
    assert terminal.outbox == []

    [stored] = await rig.master_events()
    assert stored.headers[MSG_ID] == event.event_id == "m1-1"
    assert stored.subject.startswith(f"{subjects.MASTER_PARTITIONED}.")
    assert stored.subject.endswith(".m1")
    decoded: MasterEvent = codec.master_event_decoder.decode(stored.data)
    assert decoded.trace.connector_ns >= before >= decoded.trace.terminal_ns > 0
    assert decoded == msgspec.structs.replace(event, trace=decoded.trace)
    assert decoded.trace == msgspec.structs.replace(
        event.trace, connector_ns=decoded.trace.connector_ns
    )

    # Another event is stored after it, under its own id.
    closed = terminal.trade(lambda v: v.close_position("m1", opened.position_id))
    await runtime.publish_master_events(closed.transactions)
    first, second = await rig.master_events()
    assert [first.headers[MSG_ID], second.headers[MSG_ID]] == ["m1-1", "m1-2"]


async def test_outbox_published_on_start_exactly_once(rig: Rig) -> None:
    terminal = rig.terminal()
    opened = terminal.venue.market_order("m1", SYMBOL, Side.BUY, 0.1)
    closed = terminal.venue.close_position("m1", opened.position_id or "")
    recorded = terminal.record([*opened.transactions, *closed.transactions])
    terminal.save()
    assert [e.event_id for e in recorded] == ["m1-1", "m1-2"]
    assert await rig.master_events() == []
    # The state file as a crash right after publishing would leave it: outbox not yet emptied.
    before_publish = rig.path.parent / "before-publish"
    rig.keep_state(before_publish)

    restarted = rig.terminal()
    assert [e.event_id for e in restarted.outbox] == ["m1-1", "m1-2"]
    runtime = await rig.start(restarted)
    stored = await rig.master_events()
    assert [m.headers[MSG_ID] for m in stored] == ["m1-1", "m1-2"]
    assert [codec.master_event_decoder.decode(m.data).trace.terminal_ns for m in stored] == [
        e.trace.terminal_ns for e in recorded
    ]
    assert restarted.outbox == []
    await rig.stop(runtime)

    rig.restore_state(before_publish)
    again = rig.terminal()
    assert len(again.outbox) == 2
    await rig.start(again)
    assert again.outbox == []
    assert [m.headers[MSG_ID] for m in await rig.master_events()] == ["m1-1", "m1-2"]


async def test_event_left_by_a_failed_publish_goes_out_before_later_events(rig: Rig) -> None:
    terminal = rig.terminal([M1])
    connector = PaperConnector(rig.nc, CONNECTOR, terminal, None)
    await connector.start()
    rig.runtimes.append(connector.runtime)
    # The master-event stream is briefly unavailable: the open cannot be stored.
    stream = (await rig.js.stream_info(MASTER_EVENTS_STREAM)).config
    wanted = list(stream.subjects or [])
    stream.subjects = ["tc.v1.master.nobody.events"]
    await rig.js.update_stream(stream)
    with pytest.raises(Exception):  # noqa: B017 - whichever error the client raises
        await connector.trade(lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    [pending] = terminal.outbox
    assert pending.event_id == "m1-1"
    [position] = terminal.venue.positions("m1")

    stream.subjects = wanted
    await rig.js.update_stream(stream)
    closed = await connector.trade(lambda v: v.close_position("m1", position.position_id))
    assert closed.ok
    stored = [m.headers[MSG_ID] for m in await rig.master_events()]
    assert stored == ["m1-1", "m1-2"], f"stored {stored}, still in the outbox {terminal.outbox}"
    assert terminal.outbox == []


async def test_an_outbox_left_by_a_failed_publish_goes_out_without_a_new_trade(rig: Rig) -> None:
    terminal = rig.terminal([M1])
    runtime = await rig.start(terminal, publish_timeout_s=0.3, publish_attempts=2,
                              stall_after_s=0.5, progress_poll_s=0.1)  # fmt: skip
    stream = (await rig.js.stream_info(MASTER_EVENTS_STREAM)).config
    wanted = list(stream.subjects or [])
    stream.subjects = ["tc.v1.master.nobody.events"]
    await rig.js.update_stream(stream)
    terminal.trade(lambda v: v.market_order("m1", SYMBOL, Side.BUY, 0.1))
    with pytest.raises(NotStored):
        await runtime.flush_outbox()
    [pending] = terminal.outbox
    # The event waits, nothing advances: the connector says so.
    await wait_until(lambda: not runtime.health()["ok"], "health to report the stuck outbox")
    assert runtime.health()["master_events_stall_s"] >= 0.5

    stream.subjects = wanted
    await rig.js.update_stream(stream)
    await wait_until(lambda: terminal.outbox == [], "the outbox retried without a new trade")
    assert [m.headers[MSG_ID] for m in await rig.master_events()] == [pending.event_id]
    await wait_until(lambda: runtime.health()["ok"], "health to recover")


# --- follower orders ------------------------------------------------------------------------


async def test_malformed_order_terminated_logged_and_does_not_block(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    terminated: list[dict[str, Any]] = []

    async def on_advisory(msg: Any) -> None:
        terminated.append(json.loads(msg.data))

    await rig.nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{FOLLOWER_ORDERS_STREAM}.connector-{CONNECTOR}",
        cb=on_advisory,
    )
    valid = open_order("f1", "p1")
    with structlog.testing.capture_logs() as logs:
        garbage = await rig.js.publish(subjects.follower_orders("f1"), b"\xc1 not msgpack")
        wrong_shape = await rig.js.publish(
            subjects.follower_orders("f1"), codec.encode({"type": "open", "volume": "lots"})
        )
        await rig.send(valid)
        report = await rig.report(valid.order_id)
        await wait_until(rig.consumer_idle, "every order settled")
        await wait_until(lambda: len(terminated) == 2, "two termination advisories")
    assert isinstance(report, OrderFilled)
    assert sorted(a["stream_seq"] for a in terminated) == [garbage.seq, wrong_shape.seq]
    invalid = [e for e in logs if e["event"] == "follower_order_invalid"]
    assert [e["subject"] for e in invalid] == [subjects.follower_orders("f1")] * 2
    assert [e["log_level"] for e in invalid] == ["error", "error"]
    # Terminated, not deleted: the bad messages stay in the stream for inspection.
    assert (await rig.js.get_msg(FOLLOWER_ORDERS_STREAM, garbage.seq)).data == b"\xc1 not msgpack"
    assert len(terminal.venue.positions("f1")) == 1
    assert rig.reports == [report]


async def test_order_for_an_account_not_served_is_not_executed(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    # On its own subject: not even delivered. In this connector's batch: delivered, skipped.
    foreign = open_order("f9", "p1")
    smuggled = open_order("f9", "p2")
    valid = open_order("f1", "p3")
    batch = FollowerOrderBatch(
        batch_id=f"e-smuggled@{CONNECTOR}", connector=CONNECTOR, master="m1",
        master_event_id="e-smuggled", ts_ns=time.time_ns(), orders=[smuggled],
    )  # fmt: skip
    before = refused_metric("account_not_served")
    with structlog.testing.capture_logs() as logs:
        await rig.send(foreign)
        await rig.js.publish(subjects.connector_orders(CONNECTOR), codec.encode(batch),
                             headers={MSG_ID: batch.batch_id})  # fmt: skip
        await rig.send(valid)
        await rig.report(valid.order_id)
        await wait_until(rig.consumer_idle, "every order settled")
    assert [r.order_id for r in rig.reports] == [valid.order_id]
    assert "f9" not in terminal.venue.accounts()
    assert smuggled.order_id not in terminal.reports and foreign.order_id not in terminal.reports
    warned = [e for e in logs if e["event"] == "order_for_unknown_account"]
    assert [(e["follower"], e["order"]) for e in warned] == [("f9", smuggled.order_id)]
    assert refused_metric("account_not_served") == before + 1
    assert [p.master_ref for p in terminal.venue.positions("f1")] == ["m1:p3"]


def refused_metric(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("tradecopy_connector_refused_orders_total", {"reason": reason})
        or 0.0
    )


async def terminated_seqs(rig: Rig) -> list[int]:
    """Stream sequences of the orders the connector terminates (filled in as they happen)."""
    seqs: list[int] = []

    async def on_advisory(msg: Any) -> None:
        seqs.append(json.loads(msg.data)["stream_seq"])

    await rig.nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{FOLLOWER_ORDERS_STREAM}.connector-{CONNECTOR}",
        cb=on_advisory,
    )
    return seqs


async def test_an_order_on_another_accounts_subject_is_refused_never_executed(rig: Rig) -> None:
    # Both accounts are this connector's: the order is for one of its own, but whoever
    # published it on f1's subject may only trade f1 (NATS permissions are per subject).
    terminal = rig.terminal()
    await rig.start(terminal)
    terminated = await terminated_seqs(rig)
    before = refused_metric("subject_mismatch")
    forged = open_order("f2", "p1")
    valid = open_order("f1", "p2")
    with structlog.testing.capture_logs() as logs:
        ack = await rig.js.publish(subjects.follower_orders("f1"), codec.encode(forged),
                                   headers={MSG_ID: forged.order_id})  # fmt: skip
        await rig.send(valid)
        await rig.report(valid.order_id)
        await wait_until(rig.consumer_idle, "every order settled")
        await wait_until(lambda: terminated == [ack.seq], "the forged order terminated")
    assert [r.order_id for r in rig.reports] == [valid.order_id]
    assert forged.order_id not in terminal.reports
    assert terminal.venue.positions("f2") == []
    assert refused_metric("subject_mismatch") == before + 1
    [refused] = [e for e in logs if e["event"] == "follower_order_refused"]
    assert (refused["follower"], refused["order"], refused["log_level"]) == (
        "f2", forged.order_id, "error",
    )  # fmt: skip


async def test_a_batch_that_names_another_connector_is_refused_never_executed(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    terminated = await terminated_seqs(rig)
    before = refused_metric("foreign_batch")
    stray = open_order("f1", "p1")
    batch = FollowerOrderBatch(
        batch_id="e-stray@c2", connector="c2", master="m1", master_event_id="e-stray",
        ts_ns=time.time_ns(), orders=[stray],
    )  # fmt: skip
    valid = open_order("f1", "p2")
    with structlog.testing.capture_logs() as logs:
        ack = await rig.js.publish(subjects.connector_orders(CONNECTOR), codec.encode(batch),
                                   headers={MSG_ID: batch.batch_id})  # fmt: skip
        await rig.send(valid)
        await rig.report(valid.order_id)
        await wait_until(rig.consumer_idle, "every order settled")
        await wait_until(lambda: terminated == [ack.seq], "the stray batch terminated")
    assert [r.order_id for r in rig.reports] == [valid.order_id]
    assert stray.order_id not in terminal.reports
    assert [p.master_ref for p in terminal.venue.positions("f1")] == ["m1:p2"]
    assert refused_metric("foreign_batch") == before + 1
    assert [e["connector"] for e in logs if e["event"] == "order_batch_refused"] == ["c2"]


async def test_batched_orders_executed_in_order_each_with_its_own_report(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    venue = terminal.venue
    quote = venue.quote(SYMBOL)
    assert quote is not None
    # A single order first, then a batch that depends on it: one stream, one order.
    first = open_order("f2", "p0", Side.SELL, 0.1)
    await rig.send(first)
    orders: list[FollowerOrder] = [
        open_order("f1", "p1", Side.BUY, 0.1),
        open_order("f2", "p2", Side.SELL, 0.2),
        follow_up(
            FollowerModify, "f1", "p1", sl=round(quote.bid - 10, 2), tp=round(quote.bid + 10, 2)
        ),
        follow_up(FollowerClose, "f2", "p2", ratio=0.5),
        open_order("f9", "p9"),  # not served here: skipped, the rest goes on
        follow_up(FollowerClose, "f1", "p1"),
        follow_up(FollowerClose, "f2", "p0"),
    ]
    batch = FollowerOrderBatch(
        batch_id=f"e-batch@{CONNECTOR}",
        connector=CONNECTOR,
        master="m1",
        master_event_id="e-batch",
        ts_ns=time.time_ns(),
        orders=orders,
    )
    await rig.js.publish(
        subjects.connector_orders(CONNECTOR), codec.encode(batch), headers={MSG_ID: batch.batch_id}
    )
    served = [first, *(o for o in orders if o.follower != "f9")]
    for order in served:
        await rig.report(order.order_id)
    await wait_until(rig.consumer_idle, "the batch acknowledged")

    # Each account's orders run and are reported in stream order; accounts side by side.
    for follower in ("f1", "f2"):
        assert [r.order_id for r in rig.reports if r.follower == follower] == [
            o.order_id for o in served if o.follower == follower
        ]
    assert sorted(rig.report_ids) == sorted(f"report:{o.order_id}" for o in served)
    by_id = {r.order_id: r for r in rig.reports}
    assert len(by_id) == len(rig.reports) == len(served)
    assert {oid: type(r) for oid, r in by_id.items()} == {
        o.order_id: OrderDone if o is orders[2] else OrderFilled for o in served
    }
    partial = by_id[orders[3].order_id]
    assert isinstance(partial, OrderFilled)
    assert (partial.side, partial.volume, partial.follower) == (Side.BUY, 0.1, "f2")
    modified = by_id[orders[2].order_id]
    assert isinstance(modified, OrderDone) and modified.follower == "f1"
    assert venue.positions("f1") == []
    [rest] = venue.positions("f2")
    assert (rest.master_ref, rest.volume, rest.side) == ("m1:p2", 0.1, Side.SELL)
    assert all(r.trace.report_ns >= r.trace.follower_connector_ns > 0 for r in rig.reports)


async def test_an_account_waiting_for_its_price_holds_up_no_other_account(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    # f1's open waits up to 3 s for a price within 0.01 of a master fill 50 below the ask
    # (no quote comes), then is rejected; f1's close must wait its turn behind it.
    wait_s = 3.0
    waiting = open_order(
        "f1", "p1", master_price=QUOTES[0].ask - 50, max_price_deviation=0.01,
        deviation_policy=DeviationPolicy.WAIT, deviation_wait_ms=int(wait_s * 1000),
    )  # fmt: skip
    behind = follow_up(FollowerClose, "f1", "p1")
    other = open_order("f2", "p2")
    await rig.send(waiting)
    await asyncio.sleep(0.2)  # taken on its own, its wait under way
    sent = time.monotonic()
    await rig.send(behind)
    await rig.send(other)
    report = await rig.report(other.order_id)
    took = time.monotonic() - sent
    assert isinstance(report, OrderFilled), report
    assert took < wait_s / 3, f"f2 waited {took:.2f}s behind f1's deviation wait"
    assert rig.reports_for(waiting.order_id) == rig.reports_for(behind.order_id) == []

    rejected = await rig.report(waiting.order_id)
    assert isinstance(rejected, OrderRejected) and rejected.code == RETCODE_PRICE_DEVIATION, (
        rejected
    )
    closed = await rig.report(behind.order_id)
    assert isinstance(closed, OrderDone)  # nothing to close: the open never filled
    assert [r.order_id for r in rig.reports if r.follower == "f1"] == [
        waiting.order_id, behind.order_id,
    ]  # fmt: skip
    await wait_until(rig.consumer_idle, "every order acknowledged")
    assert terminal.venue.positions("f1") == []
    [copy] = terminal.venue.positions("f2")
    assert copy.master_ref == "m1:p2"


async def test_order_acknowledged_only_after_its_report_is_stored(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    # f1's reports have nowhere to go: the report stream stops taking its subject.
    stream = (await rig.js.stream_info(EXECUTION_REPORTS_STREAM)).config
    stream.subjects = [subjects.execution_reports("f2")]
    await rig.js.update_stream(stream)

    order = open_order("f1", "p1")
    with structlog.testing.capture_logs() as logs:
        await rig.send(order)
        await wait_until(lambda: order.order_id in terminal.reports, "the order executed")

        # The failed report fails the batch: the runtime resumes at the ack floor (the
        # consumer is re-created), so the order comes back.
        await wait_until(
            lambda: sum(e["event"] == "orders_failed" for e in logs) >= 2,
            "the unreported order taken again and failing again",
        )
        assert not await rig.consumer_idle()
        stream.subjects = [subjects.EXECUTION_REPORTS]
        await rig.js.update_stream(stream)
        report = await rig.report(order.order_id)
        await wait_until(rig.consumer_idle, "the order acknowledged after its report")
    assert any(e["log_level"] == "error" for e in logs)
    # Executed once: the redelivery got the stored outcome.
    assert isinstance(report, OrderFilled)
    assert [p.master_ref for p in terminal.venue.positions("f1")] == ["m1:p1"]
    assert rig.reports == [report]


async def test_a_report_whose_ack_never_comes_is_sent_again_and_its_order_comes_back(
    rig: Rig,
) -> None:
    terminal = rig.terminal()
    runtime = await rig.start(terminal, publish_timeout_s=0.3, publish_attempts=2,
                              stall_after_s=1.0, progress_poll_s=0.1)  # fmt: skip
    assert runtime.health()["ok"] is True
    # f1's reports have no stream and a listener that never answers: publish acks never come
    # (what a restarted server does to the acks in flight).
    stream = (await rig.js.stream_info(EXECUTION_REPORTS_STREAM)).config
    stream.subjects = [subjects.execution_reports("f2")]
    await rig.js.update_stream(stream)
    silenced: list[str] = []

    async def swallow(msg: Any) -> None:
        silenced.append((msg.headers or {}).get(MSG_ID, ""))

    sub = await rig.nc.subscribe(subjects.execution_reports("f1"), cb=swallow)
    order = open_order("f1", "p1")
    await rig.send(order)
    # Each wait is bounded: the same report again (same dedup id), then the order comes
    # back from the ack floor, again and again, never stuck on one wait.
    await wait_until(lambda: len(silenced) >= 4, "the report sent on every attempt")
    assert set(silenced) == {report_id(order.order_id)}
    await wait_until(lambda: not runtime.health()["ok"], "health to report the stall")
    assert runtime.health()["orders_stall_s"] >= 1.0
    assert runtime.health()["nats_connected"] is True

    await sub.unsubscribe()
    stream.subjects = [subjects.EXECUTION_REPORTS]
    await rig.js.update_stream(stream)
    report = await rig.report(order.order_id)
    await wait_until(rig.consumer_idle, "the order acknowledged")
    await wait_until(lambda: runtime.health()["ok"], "health to recover")
    assert isinstance(report, OrderFilled)
    assert [p.master_ref for p in terminal.venue.positions("f1")] == ["m1:p1"]  # executed once
    assert rig.reports == [report]


# --- signal age -----------------------------------------------------------------------------


def record_outcomes(terminal: PaperTerminal) -> list[tuple[OrderReports, ExecutionReport]]:
    """Every (builder, report) the terminal is handed and returns, also for an order whose
    report JetStream drops as a duplicate."""
    outcomes: list[tuple[OrderReports, ExecutionReport]] = []
    execute = terminal.execute

    async def recording(order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        report = await execute(order, reports)
        outcomes.append((reports, report))
        return report

    terminal.execute = recording  # type: ignore[method-assign]
    return outcomes


def test_the_receipt_stamps_the_trace_and_judges_only_an_open_past_its_expiry() -> None:
    received = time.time_ns()
    stale = open_order("f1", "p1", expires_ns=received - 1)
    reports = reports_at_receipt(stale, received)
    assert reports.signal_expired and reports.order is stale
    assert reports.trace == msgspec.structs.replace(stale.trace, follower_connector_ns=received)
    on_time = open_order("f1", "p2", expires_ns=received)
    assert not reports_at_receipt(on_time, received).signal_expired
    assert not reports_at_receipt(open_order("f1", "p3"), received).signal_expired  # no limit
    close = follow_up(FollowerClose, "f1", "p1")
    assert not reports_at_receipt(close, received).signal_expired


async def test_an_open_received_past_its_signal_age_is_rejected_and_not_traded(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    stale = open_order("f1", "p1", expires_ns=time.time_ns() - 1_000_000)
    await rig.send(stale)
    report = await rig.report(stale.order_id)
    assert isinstance(report, OrderRejected), report
    assert (report.code, report.reason) == (RETCODE_EXPIRED, EXPIRED_REASON)
    assert report.trace.follower_connector_ns > stale.expires_ns
    await wait_until(rig.consumer_idle, "the rejected order acknowledged")
    assert terminal.venue.positions("f1") == []


async def test_an_open_redelivered_after_its_signal_expired_reports_its_fill(rig: Rig) -> None:
    terminal = rig.terminal()
    outcomes = record_outcomes(terminal)
    await rig.start(terminal)
    order = open_order("f1", "p1", expires_ns=time.time_ns() + 500_000_000)
    await rig.send(order)
    filled = await rig.report(order.order_id)
    assert isinstance(filled, OrderFilled), filled
    while time.time_ns() <= order.expires_ns:
        await asyncio.sleep(0.05)

    # The same order again (a crash before its ack), now past its signal age; then once more
    # after the report memory is gone, so only the copy it made tells that it ran.
    await rig.send(order, msg_id=f"{order.order_id}:redelivered")
    await wait_until(lambda: len(outcomes) == 2, "the redelivery executed")
    terminal.reports.clear()
    await rig.send(order, msg_id=f"{order.order_id}:redelivered-again")
    await wait_until(lambda: len(outcomes) == 3, "the second redelivery executed")
    for reports, report in outcomes[1:]:
        assert reports.signal_expired
        assert isinstance(report, OrderFilled), report
        assert (report.position_id, report.volume, report.price) == (
            filled.position_id, filled.volume, filled.price,
        )  # fmt: skip
    [copy] = terminal.venue.positions("f1")
    assert copy.position_id == filled.position_id


async def test_the_signal_age_is_judged_at_receipt_not_when_the_terminal_gets_to_it(
    rig: Rig,
) -> None:
    terminal = rig.terminal()
    execute = terminal.execute

    async def busy(order: FollowerOrder, reports: OrderReports) -> ExecutionReport:
        # The terminal is slow to take the order: its signal expires meanwhile.
        assert isinstance(order, FollowerOpen)
        while time.time_ns() <= order.expires_ns:
            await asyncio.sleep(0.01)
        return await execute(order, reports)

    terminal.execute = busy  # type: ignore[method-assign]
    await rig.start(terminal)
    order = open_order("f1", "p1", expires_ns=time.time_ns() + 1_000_000_000)
    await rig.send(order)
    report = await rig.report(order.order_id)
    assert isinstance(report, OrderFilled), report
    assert report.trace.follower_connector_ns < order.expires_ns < report.trace.follower_terminal_ns


# --- metrics --------------------------------------------------------------------------------


def connector_metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"connector": CONNECTOR, **labels})


async def test_orders_are_counted_by_outcome_and_timed_from_receipt_to_report(rig: Rig) -> None:
    terminal = rig.terminal()
    await rig.start(terminal)
    # Every outcome and every configured account has its series from the start.
    before = {o: connector_metric("tradecopy_connector_orders_total", outcome=o)
              for o in ("filled", "rejected", "done", "unknown")}  # fmt: skip
    assert None not in before.values()
    timed = connector_metric("tradecopy_connector_order_seconds_count") or 0.0
    for account, role in (("m1", "master"), ("f1", "follower")):
        value = connector_metric("tradecopy_connector_terminal_connected", account=account,
                                 role=role)  # fmt: skip
        assert value == 1, account
    assert connector_metric("tradecopy_connector_nats_connected") == 1

    filled = open_order("f1", "p1")
    stale = open_order("f1", "p2", expires_ns=time.time_ns() - 1_000_000)
    await rig.send(filled)
    await rig.send(stale)
    await rig.report(filled.order_id)
    await rig.report(stale.order_id)
    await wait_until(rig.consumer_idle, "both orders settled")
    assert connector_metric("tradecopy_connector_orders_total", outcome="filled") == (
        before["filled"] + 1
    )
    assert connector_metric("tradecopy_connector_orders_total", outcome="rejected") == (
        before["rejected"] + 1
    )
    assert connector_metric("tradecopy_connector_order_seconds_count") == timed + 2

    await rig.stop(rig.runtimes[0])
    # A stopped connector is connected to nothing.
    assert connector_metric("tradecopy_connector_nats_connected") == 0
    assert connector_metric("tradecopy_connector_terminal_connected", account="f1",
                            role="follower") == 0  # fmt: skip
