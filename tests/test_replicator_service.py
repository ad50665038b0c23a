"""The replicator service end to end on a private nats-server: fan-out, order, dedup, live
configuration, decisions, link state, protections, batching, bad input, scale-out, restart."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from conftest import WAIT_S, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from engine.replicator.config import ReplicatorConfig
from engine.replicator.service import Replicator
from engine.replicator.state import link_state_decoder
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.account import AccountState, SymbolSpec
from schemas.common import Side
from schemas.control import EmergencyStop, StopScope
from schemas.decisions import CopyDecision, DecisionOutcome, DecisionRule
from schemas.links import (
    BalanceRatio,
    CopyLink,
    FixedLot,
    Multiplier,
    ProtectionAction,
    SymbolMapping,
)
from schemas.master import (
    MasterEvent,
    PositionClosed,
    PositionModified,
    PositionOpened,
    PositionReduced,
)
from schemas.orders import (
    FollowerClose,
    FollowerCloseAll,
    FollowerModify,
    FollowerOpen,
    FollowerOrderBatch,
)
from schemas.rejections import MasterEventRejected, RejectionReason
from schemas.streams import (
    DECISIONS_STREAM,
    FOLLOWER_ORDERS_STREAM,
    MASTER_EVENTS_STREAM,
    REJECTIONS_STREAM,
    replicator_consumer,
)

PARTITIONS = 4
SYMBOL = "EURUSD"
INVALID = RejectionReason.INVALID_PAYLOAD


# --- helpers --------------------------------------------------------------------------------


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def decisions_metric(rule: str, outcome: str) -> float:
    return metric("tradecopy_replicator_decisions_total", rule=rule, outcome=outcome)


def bad_messages_metric(reason: str) -> float:
    return metric("tradecopy_replicator_bad_messages_total", reason=reason)


def link_series(replicator: Replicator) -> dict[tuple[str, str], float]:
    """(link, outcome) → count, as the replicator's ``/metrics`` shows its per-link series."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.labels["link"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(replicator.link_metrics().decode())
        for sample in family.samples
    }


def account(follower: str, **kwargs: Any) -> AccountState:
    fields: dict[str, Any] = {
        "account": follower,
        "ts_ns": time.time_ns(),
        "currency": "USD",
        "balance": 10_000.0,
        "equity": 10_000.0,
    }
    fields.update(kwargs)
    return AccountState(**fields)


def spec(follower: str, symbol: str = SYMBOL) -> SymbolSpec:
    return SymbolSpec(
        account=follower,
        symbol=symbol,
        contract_size=100_000.0,
        tick_size=0.00001,
        tick_value=1.0,
        digits=5,
        volume_min=0.01,
        volume_max=100.0,
        volume_step=0.01,
    )


def opened(
    event_id: str,
    master: str,
    position_id: str,
    volume: float = 1.0,
    symbol: str = SYMBOL,
    price: float = 1.1,
    side: Side = Side.BUY,
) -> PositionOpened:
    return PositionOpened(
        event_id=event_id,
        master=master,
        symbol=symbol,
        ts_ns=time.time_ns(),
        position_id=position_id,
        side=side,
        volume=volume,
        price=price,
    )


def modified(event_id: str, master: str, position_id: str, sl: float, tp: float) -> MasterEvent:
    return PositionModified(
        event_id=event_id,
        master=master,
        symbol=SYMBOL,
        ts_ns=time.time_ns(),
        position_id=position_id,
        side=Side.BUY,
        sl=sl,
        tp=tp,
    )


def reduced(
    event_id: str, master: str, position_id: str, before: float, after: float
) -> MasterEvent:
    return PositionReduced(
        event_id=event_id,
        master=master,
        symbol=SYMBOL,
        ts_ns=time.time_ns(),
        position_id=position_id,
        side=Side.BUY,
        volume_before=before,
        volume_after=after,
        price=1.2,
    )


def closed(event_id: str, master: str, position_id: str, volume: float = 1.0) -> MasterEvent:
    return PositionClosed(
        event_id=event_id,
        master=master,
        symbol=SYMBOL,
        ts_ns=time.time_ns(),
        position_id=position_id,
        side=Side.BUY,
        volume=volume,
        price=1.3,
    )


class Env:
    """One test's JetStream: KV seeding, master-event publishing, collected orders/decisions."""

    def __init__(self, url: str, js: Any, buckets: dict[str, Any]) -> None:
        self.url = url
        self.js = js
        self.buckets = buckets
        self.replicators: list[Replicator] = []
        # (subject, decoded) in stream order
        self.orders: list[tuple[str, Any]] = []
        self.decisions: list[tuple[str, CopyDecision]] = []
        self.rejections: list[tuple[str, MasterEventRejected]] = []
        self.silenced: list[str] = []

    async def collect(self) -> None:
        async def on_order(msg: Any) -> None:
            if msg.subject.startswith(f"{subjects.PREFIX}.connector."):
                self.orders.append(
                    (msg.subject, codec.follower_order_batch_decoder.decode(msg.data))
                )
            else:
                self.orders.append((msg.subject, codec.follower_order_decoder.decode(msg.data)))

        async def on_decision(msg: Any) -> None:
            self.decisions.append((msg.subject, codec.decision_decoder.decode(msg.data)))

        # stream= is required: nats-py binds wildcard subjects to the wrong stream otherwise.
        await self.js.subscribe(
            "tc.v1.*.*.orders", stream=FOLLOWER_ORDERS_STREAM, ordered_consumer=True, cb=on_order
        )
        await self.js.subscribe(
            subjects.DECISIONS, stream=DECISIONS_STREAM, ordered_consumer=True, cb=on_decision
        )

        async def on_rejection(msg: Any) -> None:
            self.rejections.append((msg.subject, codec.rejection_decoder.decode(msg.data)))

        await self.js.subscribe(
            subjects.MASTER_REJECTIONS,
            stream=REJECTIONS_STREAM,
            ordered_consumer=True,
            cb=on_rejection,
        )

    # KV seeding

    async def put_link(self, link: CopyLink) -> None:
        await self.buckets[subjects.KV_LINKS].put(link.link_id, codec.encode(link))

    async def put_account(self, state: AccountState) -> None:
        await self.buckets[subjects.KV_ACCOUNTS].put(state.account, codec.encode(state))

    async def put_spec(self, symbol_spec: SymbolSpec) -> None:
        key = subjects.symbol_key(symbol_spec.account, symbol_spec.symbol)
        await self.buckets[subjects.KV_SYMBOLS].put(key, codec.encode(symbol_spec))

    async def follower(self, link: CopyLink, *symbols: str, **account_fields: Any) -> None:
        """A link plus the follower's account state and symbol specs (default: EURUSD)."""
        await self.put_account(account(link.follower, **account_fields))
        for symbol in symbols or (SYMBOL,):
            await self.put_spec(spec(link.follower, symbol))
        await self.put_link(link)

    async def link_state(self, link_id: str) -> Any:
        entry = await self.buckets[subjects.KV_LINK_STATE].get(link_id)
        return link_state_decoder.decode(entry.value)

    # replicators

    async def start(self, **config: Any) -> Replicator:
        fields: dict[str, Any] = {
            "nats_url": self.url,
            "partitions": PARTITIONS,
            "metrics_port": None,
            "ack_wait_s": 2.0,
            "instance": f"test-{len(self.replicators)}",
        }
        fields.update(config)
        replicator = Replicator(ReplicatorConfig(**fields))
        self.replicators.append(replicator)
        await replicator.start()
        return replicator

    async def stop_all(self) -> None:
        for replicator in self.replicators:
            await replicator.stop()
        self.replicators.clear()

    # master events

    async def publish(self, event: MasterEvent, msg_id: str | None = "") -> None:
        """Publish as a connector does; ``msg_id=None`` leaves out the dedup header."""
        headers = None if msg_id is None else {"Nats-Msg-Id": msg_id or event.event_id}
        await self.js.publish(
            subjects.master_events(event.master), codec.encode(event), headers=headers
        )

    async def publish_raw(self, master: str, payload: bytes) -> None:
        await self.js.publish(subjects.master_events(master), payload)

    # observations

    def summary(self) -> str:
        return (
            f"orders: {self.order_ids()}\n"
            f"decisions: {[(d.decision_id, d.outcome.value) for _, d in self.decisions]}\n"
            f"rejections: {self.rejected()}\n"
            f"replicators: {[r.health() for r in self.replicators]}"
        )

    async def wait(
        self,
        predicate: Callable[[], bool] | Callable[[], Awaitable[bool]],
        what: str,
        timeout: float = WAIT_S,
    ) -> None:
        await wait_until(predicate, what, timeout, self.summary)

    async def stream_messages(self, stream: str) -> int:
        info = await self.js.stream_info(stream)
        return int(info.state.messages)

    async def idle(self) -> None:
        """Every stored master event has been handled and acknowledged."""

        async def all_done() -> bool:
            for partition in range(PARTITIONS):
                info = await self.js.consumer_info(
                    MASTER_EVENTS_STREAM, replicator_consumer(partition)
                )
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await self.wait(all_done, "the replicator to acknowledge every master event")

    def orders_for(self, link_id: str) -> list[Any]:
        return [o for _, o in self.orders if getattr(o, "link_id", None) == link_id]

    def order_ids(self) -> list[str]:
        ids: list[str] = []
        for _, o in self.orders:
            if isinstance(o, FollowerOrderBatch):
                ids.extend(x.order_id for x in o.orders)
            else:
                ids.append(o.order_id)
        return ids

    def rejected(self) -> dict[str, RejectionReason]:
        """Event id (or ``seq:<n>`` when it did not decode) → why it was refused."""
        return {r.event_id or f"seq:{r.stream_seq}": r.reason for _, r in self.rejections}

    async def rejection(self, event_id: str) -> MasterEventRejected:
        await self.wait(
            lambda: any(r.event_id == event_id for _, r in self.rejections),
            f"the rejection of {event_id}",
        )
        return next(r for _, r in self.rejections if r.event_id == event_id)

    def decisions_for(self, link_id: str) -> list[CopyDecision]:
        return [d for _, d in self.decisions if d.link_id == link_id]

    async def order(self, order_id: str) -> Any:
        await self.wait(lambda: order_id in self.order_ids(), f"order {order_id}")
        return next(o for _, o in self.orders if getattr(o, "order_id", None) == order_id)

    async def decision(self, link_id: str, rule: DecisionRule) -> CopyDecision:
        def found() -> bool:
            return any(d.rule is rule for d in self.decisions_for(link_id))

        await self.wait(found, f"a {rule.value} decision for {link_id}")
        return next(d for d in self.decisions_for(link_id) if d.rule is rule)


@pytest.fixture
async def env(nats_server: Any, js: Any) -> AsyncIterator[Env]:
    await ensure_streams(js, PARTITIONS)
    buckets = await ensure_buckets(js)
    environment = Env(nats_server.url, js, buckets)
    await environment.collect()
    try:
        yield environment
    finally:
        await environment.stop_all()


# --- 1. fan-out -----------------------------------------------------------------------------


async def test_position_opened_fans_out_to_every_follower_with_its_own_sizing(env: Env) -> None:
    await env.put_account(account("m1", balance=20_000.0, equity=20_000.0))
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1", sizing=Multiplier(2.0)))
    await env.follower(
        CopyLink(
            link_id="l2",
            master="m1",
            follower="f2",
            sizing=FixedLot(lots=0.3),
            symbol_mapping=SymbolMapping(add_suffix=".pro"),
        ),
        "EURUSD.pro",
    )
    await env.follower(
        CopyLink(
            link_id="l3",
            master="m1",
            follower="f3",
            sizing=BalanceRatio(),
            symbol_mapping=SymbolMapping(pairs={"EURUSD": "EURUSDm"}),
        ),
        "EURUSDm",
        balance=5_000.0,
    )
    await env.start()

    await env.publish(opened("ev-1", "m1", "p1", volume=0.5, side=Side.SELL))
    await env.idle()
    await env.wait(lambda: len(env.orders) >= 3, "three follower orders")

    expected = {  # link: (follower, symbol, volume)
        "l1": ("f1", "EURUSD", 1.0),  # 0.5 × 2
        "l2": ("f2", "EURUSD.pro", 0.3),  # fixed
        "l3": ("f3", "EURUSDm", 0.12),  # 0.5 × 5,000 / 20,000 = 0.125, down to the step
    }
    assert len(env.orders) == 3
    by_link = {o.link_id: (subject, o) for subject, o in env.orders}
    assert set(by_link) == set(expected)
    for link_id, (follower, symbol, volume) in expected.items():
        subject, order = by_link[link_id]
        assert isinstance(order, FollowerOpen)
        assert subject == subjects.follower_orders(follower)
        assert order.order_id == f"ev-1:{link_id}"
        assert order.follower == follower
        assert order.symbol == symbol
        assert order.volume == pytest.approx(volume)
        assert order.side is Side.SELL
        assert order.master_position_id == "p1"
        assert order.master_event_id == "ev-1"
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 3
    assert await env.stream_messages(DECISIONS_STREAM) == 0


# --- 2. order per master --------------------------------------------------------------------


async def test_each_follower_gets_its_masters_events_in_order(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.follower(CopyLink(link_id="l2", master="m2", follower="f2"))
    await env.start()

    positions = 5

    def lifecycle(master: str) -> list[MasterEvent]:
        events: list[MasterEvent] = []
        for n in range(positions):
            pos, e = f"{master}-p{n}", f"{master}-e{n}"
            events += [
                opened(f"{e}-open", master, pos, volume=1.0),
                modified(f"{e}-mod", master, pos, sl=1.0, tp=1.5),
                reduced(f"{e}-red", master, pos, before=1.0, after=0.4),
                closed(f"{e}-close", master, pos, volume=0.4),
            ]
        return events

    m1_events, m2_events = lifecycle("m1"), lifecycle("m2")
    for a, b in zip(m1_events, m2_events, strict=True):  # interleaved
        await env.publish(a)
        await env.publish(b)
    total = len(m1_events) + len(m2_events)
    await env.wait(lambda: len(env.orders) >= total, f"{total} orders")
    await env.idle()

    for link_id, events in (("l1", m1_events), ("l2", m2_events)):
        orders = env.orders_for(link_id)
        assert [o.order_id for o in orders] == [f"{e.event_id}:{link_id}" for e in events]
        for n in range(positions):
            open_, modify, partial, close = orders[4 * n : 4 * n + 4]
            assert isinstance(open_, FollowerOpen)
            assert isinstance(modify, FollowerModify)
            assert (modify.sl, modify.tp) == (1.0, 1.5)
            assert isinstance(partial, FollowerClose)
            assert partial.ratio == pytest.approx(0.6)
            assert isinstance(close, FollowerClose)
            assert close.ratio == 1.0
            assert {o.master_position_id for o in (open_, modify, partial, close)} == {
                f"m{link_id[-1]}-p{n}"
            }
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == total


# --- 3. redelivery and dedup ----------------------------------------------------------------


async def test_a_republished_master_event_yields_each_order_once(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.follower(CopyLink(link_id="l2", master="m1", follower="f2"))
    await env.start()

    # Same Nats-Msg-Id twice: the master stream keeps one.
    event = opened("ev-1", "m1", "p1")
    await env.publish(event)
    await env.publish(event)
    # A connector retry without dedup header: two different messages, one event id.
    first = opened("ev-2", "m1", "p2", price=1.25)
    retry = opened("ev-2", "m1", "p2", price=1.26)
    await env.publish(first, msg_id=None)
    await env.publish(retry, msg_id=None)
    await env.idle()

    assert await env.stream_messages(MASTER_EVENTS_STREAM) == 3
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 4
    await env.wait(lambda: len(env.orders) >= 4, "four orders")
    assert sorted(env.order_ids()) == ["ev-1:l1", "ev-1:l2", "ev-2:l1", "ev-2:l2"]
    # JetStream kept the first copy of each order and dropped the redo.
    assert all(o.master_price == 1.25 for o in env.orders_for("l1") if o.master_event_id == "ev-2")


# --- 4. live configuration ------------------------------------------------------------------


async def test_link_changes_take_effect_without_restart(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.put_account(account("f2"))
    await env.put_spec(spec("f2"))
    replicator = await env.start(lag_poll_s=0.1)
    assert replicator.health()["links"] == 1
    assert {link for link, _ in link_series(replicator)} == {"l1"}

    await env.put_link(CopyLink(link_id="l2", master="m1", follower="f2"))
    await env.wait(lambda: replicator.health()["links"] == 2, "the new link")
    # Its decision series, at 0, by the next lag poll.
    await env.wait(lambda: link_series(replicator).get(("l2", "skipped")) == 0, "l2's series")
    await env.publish(opened("ev-1", "m1", "p1", volume=1.0))
    assert (await env.order("ev-1:l2")).volume == 1.0
    await env.order("ev-1:l1")

    await env.put_link(CopyLink(link_id="l2", master="m1", follower="f2", sizing=FixedLot(0.7)))
    live = replicator.live
    assert live is not None
    await env.wait(lambda: live.links["l2"].link.sizing == FixedLot(0.7), "the sizing change")
    await env.publish(opened("ev-2", "m1", "p2", volume=1.0))
    assert (await env.order("ev-2:l2")).volume == 0.7
    assert (await env.order("ev-2:l1")).volume == 1.0

    await env.buckets[subjects.KV_LINKS].delete("l2")
    await env.wait(lambda: replicator.health()["links"] == 1, "the link deletion")
    await env.wait(lambda: {k for k, _ in link_series(replicator)} == {"l1"}, "l2's series gone")
    await env.publish(opened("ev-3", "m1", "p3"))
    await env.order("ev-3:l1")
    await env.idle()
    assert "ev-3:l2" not in env.order_ids()
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 5


async def test_account_state_changes_take_effect_without_restart(env: Env) -> None:
    await env.follower(
        CopyLink(link_id="l1", master="m1", follower="f1", max_open_positions=2),
        open_positions=1,
    )
    replicator = await env.start()
    await env.publish(opened("ev-1", "m1", "p1"))
    await env.order("ev-1:l1")

    await env.put_account(account("f1", open_positions=2))
    live = replicator.live
    assert live is not None
    await env.wait(lambda: live.view.accounts["f1"].open_positions == 2, "the account state update")
    await env.publish(opened("ev-2", "m1", "p2"))
    decision = await env.decision("l1", DecisionRule.MAX_OPEN_POSITIONS)
    assert decision.master_event_id == "ev-2"
    assert decision.outcome is DecisionOutcome.SKIPPED
    assert decision.numbers == {"open_positions": 2, "limit": 2}
    await env.idle()
    assert "ev-2:l1" not in env.order_ids()


async def test_emergency_stop_and_its_release_take_effect_without_restart(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.follower(CopyLink(link_id="l2", master="m1", follower="f2"))
    replicator = await env.start()
    live = replicator.live
    assert live is not None
    await env.publish(opened("ev-1", "m1", "p1"))
    await env.order("ev-1:l1")

    stop = EmergencyStop(scope=StopScope.ACCOUNT, target="f1", reason="broker outage")
    control = env.buckets[subjects.KV_CONTROL]
    await control.put(stop.key, codec.encode(stop))
    await env.wait(lambda: stop.key in live.view.stops, "the emergency stop")
    await env.publish(opened("ev-2", "m1", "p2"))
    await env.publish(closed("ev-3", "m1", "p1"))  # closes are stopped too
    await env.order("ev-3:l2")
    await env.idle()
    await env.wait(lambda: len(env.decisions_for("l1")) >= 2, "two emergency stop decisions")
    stopped = env.decisions_for("l1")
    assert [(d.master_event_id, d.rule) for d in stopped] == [
        ("ev-2", DecisionRule.EMERGENCY_STOP),
        ("ev-3", DecisionRule.EMERGENCY_STOP),
    ]
    assert "broker outage" in stopped[0].message
    assert not {"ev-2:l1", "ev-3:l1"} & set(env.order_ids())
    assert {"ev-2:l2", "ev-3:l2"} <= set(env.order_ids())  # other accounts keep copying

    released = msgspec.structs.replace(stop, active=False)
    await control.put(released.key, codec.encode(released))
    await env.wait(lambda: not live.view.stops[stop.key].active, "the stop release")
    await env.publish(opened("ev-4", "m1", "p4"))
    assert isinstance(await env.order("ev-4:l1"), FollowerOpen)


# --- 5. decisions ---------------------------------------------------------------------------


async def test_skipped_and_reduced_copies_publish_decisions_and_count_them(env: Env) -> None:
    await env.follower(
        CopyLink(link_id="l1", master="m1", follower="f1", symbols_exclude=["gbpusd"], max_lot=0.5)
    )
    await env.start()
    skipped_before = decisions_metric("symbol_excluded", "skipped")
    reduced_before = decisions_metric("max_lot", "reduced")

    await env.publish(opened("ev-1", "m1", "p1", symbol="GBPUSD"))
    await env.publish(opened("ev-2", "m1", "p2", volume=2.0))
    await env.idle()
    await env.wait(lambda: len(env.decisions) >= 2, "two decisions")

    (subject, skip), (_, reduce) = env.decisions
    assert subject == subjects.decisions("f1", "l1")
    assert skip.decision_id == "ev-1:l1:symbol_excluded"
    assert (skip.rule, skip.outcome) == (DecisionRule.SYMBOL_EXCLUDED, DecisionOutcome.SKIPPED)
    assert (skip.master, skip.follower, skip.master_event_id) == ("m1", "f1", "ev-1")
    assert "GBPUSD" in skip.message
    assert skip.numbers == {"symbol": "GBPUSD"}
    assert (reduce.rule, reduce.outcome) == (DecisionRule.MAX_LOT, DecisionOutcome.REDUCED)
    assert reduce.numbers == {"volume": 2.0, "max_lot": 0.5}
    assert "ev-1:l1" not in env.order_ids()
    assert (await env.order("ev-2:l1")).volume == 0.5
    assert decisions_metric("symbol_excluded", "skipped") == skipped_before + 1
    assert decisions_metric("max_lot", "reduced") == reduced_before + 1
    series = link_series(env.replicators[0])
    assert (series["l1", "skipped"], series["l1", "reduced"], series["l1", "paused"]) == (1, 1, 0)


# --- 6. daily trade limit -------------------------------------------------------------------


async def test_daily_trade_limit_counts_positions_once_across_events(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1", daily_trade_limit=2))
    await env.start()

    await env.publish(opened("ev-1", "m1", "p1"))
    await env.publish(opened("ev-2", "m1", "p2"))
    await env.publish(opened("ev-2", "m1", "p2"), msg_id="ev-2-redelivered")
    await env.publish(opened("ev-3", "m1", "p3"))
    await env.publish(opened("ev-2", "m1", "p2"), msg_id="ev-2-again")  # limit full by now
    await env.idle()
    await env.wait(lambda: env.decisions, "a decision")

    assert sorted(env.order_ids()) == ["ev-1:l1", "ev-2:l1"]
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 2
    [decision] = env.decisions_for("l1")
    assert decision.rule is DecisionRule.DAILY_TRADE_LIMIT
    assert decision.master_event_id == "ev-3"
    assert decision.numbers["trades_today"] == 2
    assert decision.numbers["limit"] == 2
    state = await env.link_state("l1")
    assert state.opened == ["p1", "p2"]


# --- 7. protection monitor ------------------------------------------------------------------


async def test_equity_stop_pauses_the_link_and_closes_everything_once(env: Env) -> None:
    await env.follower(
        CopyLink(
            link_id="l1",
            master="m1",
            follower="f1",
            equity_stop=5_000.0,
            protection_action=ProtectionAction.CLOSE_ALL,
        )
    )
    replicator = await env.start()
    live = replicator.live
    assert live is not None
    metric_before = decisions_metric("equity_stop", "closed_all")
    await env.publish(opened("ev-1", "m1", "p1"))
    await env.order("ev-1:l1")

    await env.put_account(account("f1", equity=4_000.0))
    decision = await env.decision("l1", DecisionRule.EQUITY_STOP)
    assert decision.outcome is DecisionOutcome.CLOSED_ALL
    assert decision.numbers == {"equity": 4_000.0, "equity_stop": 5_000.0}
    await env.wait(
        lambda: any(isinstance(o, FollowerCloseAll) for _, o in env.orders), "the close-all"
    )

    async def close_all_marked_sent() -> bool:
        return not (await env.link_state("l1")).close_all_pending

    await env.wait(close_all_marked_sent, "the close-all marked sent")
    state = await env.link_state("l1")
    assert state.paused
    assert state.paused_rule == "equity_stop"

    # A further drop changes nothing: the link is already paused.
    await env.put_account(account("f1", equity=3_000.0))
    await env.wait(lambda: live.view.accounts["f1"].equity == 3_000.0, "the second update")
    await env.publish(opened("ev-2", "m1", "p2"))
    paused = await env.decision("l1", DecisionRule.LINK_PAUSED)
    assert paused.master_event_id == "ev-2"
    await env.publish(closed("ev-3", "m1", "p1"))
    assert isinstance(await env.order("ev-3:l1"), FollowerClose)
    await env.idle()

    close_alls = [o for _, o in env.orders if isinstance(o, FollowerCloseAll)]
    assert len(close_alls) == 1
    assert close_alls[0].order_id == f"close_all:l1:{state.paused_ns}"
    assert close_alls[0].reason == "equity_stop"
    assert [d.rule for d in env.decisions_for("l1")] == [
        DecisionRule.EQUITY_STOP,
        DecisionRule.LINK_PAUSED,
    ]
    assert "ev-2:l1" not in env.order_ids()
    assert decisions_metric("equity_stop", "closed_all") == metric_before + 1
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 3  # open, close-all, close


# --- 8. batching per connector --------------------------------------------------------------


async def test_batch_mode_groups_orders_per_connector(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"), connector="c1")
    await env.follower(CopyLink(link_id="l2", master="m1", follower="f2"), connector="c1")
    await env.follower(CopyLink(link_id="l3", master="m1", follower="f3"))
    await env.start(batch_by_connector=True)

    await env.publish(opened("ev-1", "m1", "p1"))
    await env.idle()
    await env.wait(lambda: len(env.orders) >= 2, "a batch and a single order")

    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 2
    batches = [(s, o) for s, o in env.orders if isinstance(o, FollowerOrderBatch)]
    singles = [(s, o) for s, o in env.orders if not isinstance(o, FollowerOrderBatch)]
    [(subject, batch)] = batches
    assert subject == subjects.connector_orders("c1")
    assert batch.batch_id == "ev-1@c1"
    assert (batch.connector, batch.master, batch.master_event_id) == ("c1", "m1", "ev-1")
    assert sorted(o.order_id for o in batch.orders) == ["ev-1:l1", "ev-1:l2"]
    assert all(isinstance(o, FollowerOpen) for o in batch.orders)
    [(subject, single)] = singles
    assert subject == subjects.follower_orders("f3")
    assert single.order_id == "ev-1:l3"


# --- 9. malformed input ---------------------------------------------------------------------


async def test_malformed_master_events_are_counted_and_never_block_the_partition(
    env: Env,
) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    replicator = await env.start()
    before = bad_messages_metric("master_event")

    bad_master = opened("ev-bad", "not a valid id!", "p0")
    await env.publish_raw("m1", b"\xc1 definitely not msgpack \xff")
    await env.publish_raw("m1", msgspec.msgpack.encode({"type": "position_opened", "x": [1]}))
    await env.publish_raw("m1", codec.encode(bad_master))
    await env.publish(opened("ev-1", "m1", "p1"))

    await env.order("ev-1:l1")
    await env.idle()
    assert bad_messages_metric("master_event") == before + 3
    assert replicator.health()["ok"] is True
    # Terminated, not deleted: kept for inspection.
    assert await env.stream_messages(MASTER_EVENTS_STREAM) == 4
    assert env.order_ids() == ["ev-1:l1"]
    # And the producer is told, on the subject's master, which stored message it was.
    await env.wait(lambda: len(env.rejections) == 3, "three rejections")
    assert env.rejected() == dict.fromkeys(["seq:1", "seq:2", "seq:3"], INVALID)
    for subject, rejection in env.rejections:
        assert subject == subjects.master_rejections("m1") == "tc.v1.master.m1.rejections"
        assert (rejection.master, rejection.subject) == ("m1", subjects.master_events("m1"))
        assert rejection.rejection_id == f"rejected:{rejection.stream_seq}"
        assert rejection.message.startswith("not a master event")


async def test_malformed_kv_values_are_counted_and_the_last_good_value_kept(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1", sizing=Multiplier(2.0)))
    replicator = await env.start()
    links_before = bad_messages_metric("kv_tc_links")
    accounts_before = bad_messages_metric("kv_tc_accounts")

    await env.buckets[subjects.KV_LINKS].put("l1", b"\x00garbage")
    wrong_key = CopyLink(link_id="other", master="m1", follower="f1", sizing=FixedLot(5.0))
    await env.buckets[subjects.KV_LINKS].put("l1", codec.encode(wrong_key))
    await env.buckets[subjects.KV_ACCOUNTS].put("f1", b"\x93garbage")
    await env.wait(
        lambda: bad_messages_metric("kv_tc_links") == links_before + 2, "the bad links counted"
    )
    await env.wait(
        lambda: bad_messages_metric("kv_tc_accounts") == accounts_before + 1,
        "the bad account state counted",
    )

    await env.publish(opened("ev-1", "m1", "p1", volume=0.5))
    order = await env.order("ev-1:l1")
    assert order.volume == 1.0  # the last good link (× 2) and account state still apply
    assert replicator.health()["ok"] is True
    assert replicator.health()["links"] == 1
    assert env.decisions == []


_fuzz_ids = itertools.count()


@pytest.fixture
async def copying(env: Env) -> Env:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.start()
    return env


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=200))
async def test_random_bytes_on_a_master_subject_never_stop_copying(
    copying: Env, payload: bytes
) -> None:
    before = bad_messages_metric("master_event")
    event_id = f"fuzz-{next(_fuzz_ids)}"
    await copying.publish_raw("m1", payload)
    await copying.publish(opened(event_id, "m1", f"pos-{event_id}"))
    await copying.order(f"{event_id}:l1")
    assert bad_messages_metric("master_event") == before + 1
    assert copying.replicators[0].health()["ok"] is True


def _decodes(payload: bytes) -> bool:
    try:
        codec.master_event_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return False
    return True


_VALID_EVENTS = [
    msgspec.to_builtins(event)
    for event in (
        opened("tmpl-open", "m1", "tmpl-p"),
        modified("tmpl-mod", "m1", "tmpl-p", sl=1.0, tp=1.2),
        reduced("tmpl-red", "m1", "tmpl-p", before=1.0, after=0.5),
        closed("tmpl-close", "m1", "tmpl-p"),
    )
]
_msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
_msgpack_values = st.recursive(
    _msgpack_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)

_same_type: dict[type, st.SearchStrategy[Any]] = {
    str: st.text(max_size=16),
    int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
    float: st.floats(allow_nan=True, allow_infinity=True),
    bool: st.booleans(),
    dict: st.dictionaries(st.text(max_size=8), st.integers(min_value=0, max_value=2**63)),
}


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid master event with a few fields replaced, dropped or added: sometimes still
    valid (then it is copied like any event), mostly not."""
    event = dict(draw(st.sampled_from(_VALID_EVENTS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from([*event, "extra", "type"]))
        how = draw(st.sampled_from(["same type", "same type", "any value", "drop"]))
        if how == "drop":
            event.pop(key, None)
        elif how == "same type" and key in event and event[key] is not None:
            event[key] = draw(_same_type.get(type(event[key]), _msgpack_values))
        else:
            event[key] = draw(_msgpack_values)
    return msgspec.msgpack.encode(event)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.one_of(mutated_events(), _msgpack_values.map(msgspec.msgpack.encode)))
async def test_msgpack_of_any_shape_on_a_master_subject_never_stops_copying(
    copying: Env, payload: bytes
) -> None:
    before = bad_messages_metric("master_event")
    event_id = f"fuzz-{next(_fuzz_ids)}"
    await copying.publish_raw("m1", payload)
    await copying.publish(opened(event_id, "m1", f"pos-{event_id}"))
    await copying.order(f"{event_id}:l1")
    assert bad_messages_metric("master_event") == before + (0 if _decodes(payload) else 1)
    assert copying.replicators[0].health()["ok"] is True


async def test_an_event_that_cannot_be_fanned_out_does_not_block_its_partition(env: Env) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1", max_signal_age_ms=60_000))
    await env.start(ack_wait_s=1.0)
    poison = msgspec.structs.replace(opened("ev-poison", "m1", "p0"), ts_ns=2**64 - 1)
    await env.publish(poison)
    await env.publish(opened("ev-1", "m1", "p1"))
    await wait_until(lambda: "ev-1:l1" in env.order_ids(), "the next event", timeout=4.0)
    await env.wait(lambda: env.rejected() == {"seq:1": INVALID}, "the poison's rejection")


async def test_an_event_whose_orders_exceed_max_payload_does_not_block_its_partition(
    env: Env,
) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.start(ack_wait_s=1.0)
    await env.publish(opened("x" * 400_000, "m1", "p0"), msg_id="ev-huge")
    await env.publish(opened("ev-1", "m1", "p1"))
    await wait_until(lambda: "ev-1:l1" in env.order_ids(), "the next event", timeout=4.0)


# --- 10. scale-out --------------------------------------------------------------------------


async def test_two_instances_share_the_partitions_and_copy_every_event_once(env: Env) -> None:
    masters = [f"m{n}" for n in range(5)]
    for master in masters:
        await env.follower(CopyLink(link_id=f"l-{master}", master=master, follower=f"f-{master}"))
    first = await env.start(instance="a")
    second = await env.start(instance="b")

    per_master = 10
    expected: dict[str, list[str]] = {master: [] for master in masters}
    for n in range(per_master):
        for master in masters:
            event = (
                opened(f"{master}-{n}", master, f"{master}-p{n}")
                if n % 2 == 0
                else closed(f"{master}-{n}", master, f"{master}-p{n - 1}")
            )
            expected[master].append(f"{event.event_id}:l-{master}")
            await env.publish(event)
    total = per_master * len(masters)
    await env.wait(lambda: len(env.orders) >= total, f"{total} orders")
    await env.idle()

    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == total
    assert sorted(env.order_ids()) == sorted(i for ids in expected.values() for i in ids)
    for master in masters:
        assert [o.order_id for o in env.orders_for(f"l-{master}")] == expected[master]
    assert first.events_processed + second.events_processed >= total
    assert first.events_processed > 0
    assert second.events_processed > 0


# --- 11. restart ----------------------------------------------------------------------------


async def test_events_published_while_the_replicator_is_down_are_copied_after_restart(
    env: Env,
) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.follower(CopyLink(link_id="l2", master="m2", follower="f2"))
    await env.start(ack_wait_s=1.0)
    await env.publish(opened("ev-0", "m1", "p0"))
    await env.order("ev-0:l1")
    await env.stop_all()

    missed = [opened(f"ev-{n}", f"m{1 + n % 2}", f"p{n}") for n in range(1, 11)]
    for event in missed:
        await env.publish(event)
    await asyncio.sleep(0.2)
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 1  # nobody is copying

    await env.start(ack_wait_s=1.0)
    expected = ["ev-0:l1"] + [f"{e.event_id}:l{1 + int(e.event_id[3:]) % 2}" for e in missed]
    await env.wait(lambda: len(env.orders) >= len(expected), "the missed orders")
    await env.idle()
    assert sorted(env.order_ids()) == sorted(expected)
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == len(expected)
    for link_id in ("l1", "l2"):
        ids = [o.order_id for o in env.orders_for(link_id)]
        assert ids == [i for i in expected if i.endswith(f":{link_id}")]


# --- 12. refused events, bounded waits, liveness ----------------------------------------------


def rejections_metric(reason: RejectionReason) -> float:
    return metric("tradecopy_replicator_rejections_total", reason=reason.value)


async def test_hostile_master_events_are_rejected_on_their_subject_and_copying_goes_on(
    env: Env,
) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1", max_signal_age_ms=5_000))
    await env.put_spec(spec("m1"))  # the master's own EURUSD: at most 100 lots per order
    await env.start()
    day_ns = 86_400 * 10**9
    hostile = msgspec.structs.replace(
        opened("ev-hostile", "m1", "p0", volume=1e300, price=math.inf),
        ts_ns=time.time_ns() + day_ns,
    )
    events = {
        "ev-hostile": (hostile, RejectionReason.INVALID_PRICE),
        "ev-inf-volume": (opened("ev-inf-volume", "m1", "p1", volume=math.inf),
                          RejectionReason.INVALID_VOLUME),
        "ev-zero-price": (opened("ev-zero-price", "m1", "p2", price=0.0),
                          RejectionReason.INVALID_PRICE),
        "ev-inf-sl": (msgspec.structs.replace(opened("ev-inf-sl", "m1", "p3"), sl=-math.inf),
                      RejectionReason.INVALID_PRICE),
        "ev-huge": (opened("ev-huge", "m1", "p4", volume=1e300),
                    RejectionReason.VOLUME_ABOVE_SYMBOL_MAX),
        "ev-other-master": (opened("ev-other-master", "m2", "p5"),
                            RejectionReason.SUBJECT_MISMATCH),
    }  # fmt: skip
    before = {reason: rejections_metric(reason) for _, reason in events.values()}
    for event, _ in events.values():
        # Every one on m1's subject, as a producer allowed to publish there would.
        await env.js.publish(subjects.master_events("m1"), codec.encode(event),
                             headers={"Nats-Msg-Id": event.event_id})  # fmt: skip
    await env.publish(opened("ev-ok", "m1", "p6", volume=0.5))

    order = await env.order("ev-ok:l1")
    assert order.volume == 0.5
    await env.idle()
    await env.wait(lambda: len(env.rejections) == len(events), "every hostile event rejected")
    assert env.rejected() == {event_id: reason for event_id, (_, reason) in events.items()}
    assert env.order_ids() == ["ev-ok:l1"]  # not one order from a hostile event
    for subject, rejection in env.rejections:
        assert subject == subjects.master_rejections("m1")
        assert rejection.master == "m1" and rejection.event_type == "position_opened"
    huge = await env.rejection("ev-huge")
    assert huge.numbers == {"volume": 1e300, "volume_max": 100.0, "symbol": SYMBOL}
    after = {reason: rejections_metric(reason) for _, reason in events.values()}
    counted = {reason: after[reason] - before[reason] for reason in after}
    expected: dict[RejectionReason, int] = {}
    for _, reason in events.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert counted == expected
    assert env.replicators[0].health()["ok"] is True


async def test_a_future_dated_event_is_judged_by_its_arrival(env: Env) -> None:
    max_age_ms = 2_000
    await env.follower(
        CopyLink(link_id="l1", master="m1", follower="f1", max_signal_age_ms=max_age_ms)
    )
    await env.start(clock_skew_s=5.0)
    before = metric("tradecopy_replicator_future_dated_events_total")
    now = time.time_ns()
    skewed = msgspec.structs.replace(opened("ev-skewed", "m1", "p1"), ts_ns=now + 3 * 10**9)
    future = msgspec.structs.replace(opened("ev-future", "m1", "p2"), ts_ns=now + 86_400 * 10**9)
    await env.publish(skewed)
    await env.publish(future)
    within_skew = await env.order("ev-skewed:l1")
    judged = await env.order("ev-future:l1")
    # Within the tolerance the producer's clock is trusted; beyond it, the arrival time is:
    # a copy dated a day ahead must not stay executable for a day.
    assert within_skew.expires_ns == skewed.ts_ns + max_age_ms * 1_000_000
    arrived = judged.trace.replicator_in_ns
    assert judged.expires_ns == arrived + max_age_ms * 1_000_000
    assert now <= arrived < now + 5 * 10**9
    assert metric("tradecopy_replicator_future_dated_events_total") == before + 1
    assert env.rejections == []


async def test_an_event_whose_copy_rules_raise_is_rejected_and_its_partition_moves_on(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.replicator import service

    def defective(planner: Any) -> Any:
        def plan(event: MasterEvent, *args: Any) -> Any:
            if event.event_id == "ev-defect":
                raise ZeroDivisionError("float division by zero")
            return planner(event, *args)

        return plan

    # Whichever planner the service uses (the fan-out planner unless configured otherwise).
    monkeypatch.setattr(service, "plan_event", defective(service.plan_event))
    monkeypatch.setattr(service, "plan_fan_out", defective(service.plan_fan_out))
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.start()
    before = rejections_metric(RejectionReason.PLANNING_FAILED)
    await env.publish(opened("ev-defect", "m1", "p1"))
    await env.publish(opened("ev-2", "m1", "p2"))
    await env.order("ev-2:l1")
    rejection = await env.rejection("ev-defect")
    assert rejection.reason is RejectionReason.PLANNING_FAILED
    assert "ZeroDivisionError" in rejection.message
    await env.idle()
    assert env.order_ids() == ["ev-2:l1"]
    assert rejections_metric(RejectionReason.PLANNING_FAILED) == before + 1


async def _silence_orders_of(env: Env, nc: Any, follower: str) -> Callable[[], Awaitable[None]]:
    """Take ``follower``'s order subject out of the stream and listen there without answering:
    publish acks never come (what a restarted server does to acks in flight). Returns the
    undo; the copies the listener saw land in ``env.silenced``."""
    stream = (await env.js.stream_info(FOLLOWER_ORDERS_STREAM)).config
    wanted = list(stream.subjects or [])
    stream.subjects = [subjects.follower_orders("nobody"), subjects.CONNECTOR_ORDERS]
    await env.js.update_stream(stream)
    env.silenced = []

    async def swallow(msg: Any) -> None:
        env.silenced.append((msg.headers or {}).get("Nats-Msg-Id", ""))

    sub = await nc.subscribe(subjects.follower_orders(follower), cb=swallow)

    async def undo() -> None:
        await sub.unsubscribe()
        stream.subjects = wanted
        await env.js.update_stream(stream)

    return undo


async def test_a_fan_out_whose_acks_never_come_is_sent_again_then_redelivered(
    env: Env, nc: Any
) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    replicator = await env.start(
        publish_timeout_s=0.3, publish_attempts=2, redelivery_delay_s=0.1, ack_wait_s=30.0,
        stall_after_s=1.0, lag_poll_s=0.1, max_deliveries=1_000,
    )  # fmt: skip
    retries = metric("tradecopy_replicator_publish_retries_total")
    undo = await _silence_orders_of(env, nc, "f1")
    await env.publish(opened("ev-1", "m1", "p1"))

    # Each attempt waits a bounded time, sends the same message again (same dedup id), and
    # the event goes back for redelivery: nothing waits forever.
    await env.wait(lambda: len(env.silenced) >= 4, "the order sent on every attempt")
    assert set(env.silenced) == {"ev-1:l1"}
    assert metric("tradecopy_replicator_publish_retries_total") >= retries + 2
    # Work pending, nothing advancing: the partition is reported stalled.
    await env.wait(lambda: not replicator.health()["ok"], "health to report the stall")
    health = replicator.health()
    [stalled] = health["stalled_partitions"]  # type: ignore[misc]
    assert health["nats_connected"] is True
    assert metric("tradecopy_replicator_partition_stall_seconds", partition=str(stalled)) >= 1.0

    await undo()
    await env.order("ev-1:l1")
    await env.idle()
    await env.wait(lambda: replicator.health()["ok"], "health to recover")
    assert metric("tradecopy_replicator_partition_stall_seconds", partition=str(stalled)) == 0.0
    assert env.order_ids() == ["ev-1:l1"]
    assert await env.stream_messages(FOLLOWER_ORDERS_STREAM) == 1
    assert env.rejections == []


async def test_a_fan_out_nats_never_stores_is_rejected_after_max_deliveries(
    env: Env, nc: Any
) -> None:
    await env.follower(CopyLink(link_id="l1", master="m1", follower="f1"))
    await env.start(
        publish_timeout_s=0.2, publish_attempts=1, redelivery_delay_s=0.05, max_deliveries=3
    )
    before = rejections_metric(RejectionReason.PUBLISH_FAILED)
    undo = await _silence_orders_of(env, nc, "f1")
    await env.publish(opened("ev-1", "m1", "p1"))
    rejection = await env.rejection("ev-1")
    assert rejection.reason is RejectionReason.PUBLISH_FAILED
    assert rejection.numbers["deliveries"] == 3
    assert env.silenced == ["ev-1:l1"] * 3  # one attempt per delivery
    # Counted once the rejection is stored, which a subscriber may see a moment earlier.
    await wait_until(
        lambda: rejections_metric(RejectionReason.PUBLISH_FAILED) == before + 1,
        "the publish_failed rejection counted",
    )

    await undo()
    await env.publish(opened("ev-2", "m1", "p2"))
    await env.order("ev-2:l1")
    await env.idle()
    assert env.order_ids() == ["ev-2:l1"]


def test_the_ops_endpoint_listens_on_localhost_unless_told_otherwise() -> None:
    assert ReplicatorConfig().metrics_host == "127.0.0.1"
