"""The replicator's live view: links, accounts, specs, FX, stops and link states from NATS KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog
from conftest import wait_until
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.kv import KeyValue
from prometheus_client import REGISTRY

from engine.replicator.live import LiveView
from engine.replicator.state import LinkState, link_state_encoder
from engine.runtime.jetstream import ensure_buckets
from schemas import codec, subjects
from schemas.account import AccountState, FxRate, SymbolSpec
from schemas.control import EmergencyStop, StopScope, stop_key
from schemas.links import CopyLink, FixedLot, Multiplier

Buckets = dict[str, KeyValue]


def bad_messages(bucket: str) -> float:
    labels = {"reason": f"kv_{bucket}"}
    return REGISTRY.get_sample_value("tradecopy_replicator_bad_messages_total", labels) or 0.0


def link(link_id: str, master: str = "m1", follower: str = "f1", **fields: Any) -> CopyLink:
    return CopyLink(link_id=link_id, master=master, follower=follower, **fields)


def account(name: str, equity: float = 10_000.0, **fields: Any) -> AccountState:
    return AccountState(
        account=name,
        ts_ns=time.time_ns(),
        currency="USD",
        balance=10_000.0,
        equity=equity,
        **fields,
    )


def spec(name: str, symbol: str, volume_step: float = 0.01) -> SymbolSpec:
    return SymbolSpec(
        account=name,
        symbol=symbol,
        contract_size=100_000.0,
        tick_size=0.001,
        tick_value=0.65,
        digits=3,
        volume_min=0.01,
        volume_max=50.0,
        volume_step=volume_step,
    )


class Kv:
    """Writes to the buckets the way links apply, connectors and operators do."""

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets

    async def put(self, bucket: str, key: str, value: bytes) -> int:
        revision: int = await self.buckets[bucket].put(key, value)
        return revision

    async def link(self, value: CopyLink) -> int:
        return await self.put(subjects.KV_LINKS, value.link_id, codec.encode(value))

    async def account(self, value: AccountState) -> int:
        return await self.put(subjects.KV_ACCOUNTS, value.account, codec.encode(value))

    async def spec(self, value: SymbolSpec) -> int:
        key = subjects.symbol_key(value.account, value.symbol)
        return await self.put(subjects.KV_SYMBOLS, key, codec.encode(value))

    async def fx(self, value: FxRate, key: str | None = None) -> int:
        key = subjects.fx_key(value.base, value.quote) if key is None else key
        return await self.put(subjects.KV_FX, key, codec.encode(value))

    async def stop(self, value: EmergencyStop) -> int:
        return await self.put(subjects.KV_CONTROL, value.key, codec.encode(value))

    async def link_state(self, link_id: str, value: LinkState) -> int:
        return await self.put(subjects.KV_LINK_STATE, link_id, link_state_encoder.encode(value))

    async def delete(self, bucket: str, key: str) -> None:
        await self.buckets[bucket].delete(key)


@pytest.fixture
async def buckets(js: JetStreamContext) -> Buckets:
    return await ensure_buckets(js, StorageType.MEMORY)


@pytest.fixture
def kv(buckets: Buckets) -> Kv:
    return Kv(buckets)


@pytest.fixture
async def views(buckets: Buckets) -> AsyncIterator[Callable[[], Awaitable[LiveView]]]:
    """Start live views on the test's buckets; every one is stopped at the end."""
    started: list[LiveView] = []

    async def start() -> LiveView:
        view = LiveView(buckets)
        started.append(view)
        await asyncio.wait_for(view.start(), timeout=10)
        return view

    yield start
    for view in started:
        await view.stop()


async def settled(kv: Kv, view: LiveView, bucket: str) -> None:
    """Every entry written to ``bucket`` before this call has reached ``view``.

    One watcher applies a bucket's entries in order, so once a marker account, link or
    link state written after them shows up, they have all been handled (in a history-1
    bucket a value already replaced by a newer one for its key may be skipped).
    """
    marker = f"marker-{time.monotonic_ns()}"
    if bucket == subjects.KV_ACCOUNTS:
        await kv.account(account(marker))
        await wait_until(lambda: marker in view.view.accounts, "the marker account")
    elif bucket == subjects.KV_LINKS:
        await kv.link(link(marker, master="marker-m", follower="marker-f"))
        await wait_until(lambda: marker in view.links, "the marker link")
    elif bucket == subjects.KV_LINK_STATE:
        await kv.link_state(marker, LinkState(day="2026-01-01"))
        await wait_until(lambda: marker in view.view.link_states, "the marker link state")
    else:
        raise AssertionError(f"no marker for {bucket}")


# ---------------------------------------------------------------------------- start-up


async def test_start_returns_with_every_bucket_already_loaded(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    link_revision = await kv.link(link("gold-x2", sizing=Multiplier(2.0)))
    await kv.account(account("f1", equity=9_500.0))
    await kv.spec(spec("f1", "usdjpy."))  # a symbol that needs escaping in the key
    await kv.fx(FxRate(base="EUR", quote="USD", rate=1.08))
    await kv.stop(EmergencyStop(scope=StopScope.GLOBAL, reason="maintenance"))
    state_revision = await kv.link_state("gold-x2", LinkState(day="2026-02-16", paused=True))

    live = await views()  # no waiting after start: the initial load is complete

    assert list(live.links) == ["gold-x2"]
    assert live.links["gold-x2"].link.sizing == Multiplier(2.0)
    assert live.link_revisions == {"gold-x2": link_revision}
    assert [cl.link_id for cl in live.links_by_master["m1"]] == ["gold-x2"]
    assert [cl.link_id for cl in live.links_by_follower["f1"]] == ["gold-x2"]
    assert live.view.accounts["f1"].equity == 9_500.0
    assert live.view.symbols[("f1", "usdjpy.")].symbol == "usdjpy."
    assert live.view.fx_rates == {"EURUSD": 1.08}
    assert live.view.stops["global"].reason == "maintenance"
    assert live.view.link_state("gold-x2") == LinkState(day="2026-02-16", paused=True)
    assert live.link_state_revisions == {"gold-x2": state_revision}


async def test_start_on_empty_buckets_returns_with_an_empty_view(
    views: Callable[[], Awaitable[LiveView]],
) -> None:
    live = await views()
    assert live.links == {} and live.links_by_master == {} and live.links_by_follower == {}
    assert (live.view.accounts, live.view.symbols, live.view.fx_rates) == ({}, {}, {})
    assert (live.view.stops, live.view.link_states) == ({}, {})


# ------------------------------------------------------------------------------- links


async def test_a_link_put_after_start_shows_up_indexed_by_master_and_follower(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    await kv.link(link("l2", master="m1", follower="f2"))
    revision = await kv.link(link("l1", master="m1", follower="f1"))
    await wait_until(lambda: {"l1", "l2"} <= live.links.keys(), "both links")
    # Each master's links in link id order: fan-out order does not depend on arrival.
    assert [cl.link_id for cl in live.links_by_master["m1"]] == ["l1", "l2"]
    assert [cl.link_id for cl in live.links_by_follower["f2"]] == ["l2"]
    assert live.link_revisions["l1"] == revision


async def test_a_changed_link_replaces_the_old_one_in_every_index(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    await kv.link(link("l1", master="m1", follower="f1"))
    live = await views()
    await kv.link(link("l1", master="m2", follower="f3", sizing=FixedLot(0.5)))
    await wait_until(lambda: "m2" in live.links_by_master, "the link under its new master")
    assert live.links["l1"].link.sizing == FixedLot(0.5)
    assert "m1" not in live.links_by_master and "f1" not in live.links_by_follower
    assert [cl.link_id for cl in live.links_by_follower["f3"]] == ["l1"]


@pytest.mark.parametrize("how", ["delete", "purge"])
async def test_a_removed_link_disappears_from_every_index(
    kv: Kv, views: Callable[[], Awaitable[LiveView]], how: str
) -> None:
    await kv.link(link("l1", master="m1", follower="f1"))
    await kv.link(link("l2", master="m1", follower="f2"))
    live = await views()
    await getattr(kv.buckets[subjects.KV_LINKS], how)("l1")
    await wait_until(lambda: "l1" not in live.links, f"the {how}d link to go")
    assert [cl.link_id for cl in live.links_by_master["m1"]] == ["l2"]
    assert "f1" not in live.links_by_follower


async def test_a_bad_link_value_is_counted_and_logged_and_the_last_good_link_kept(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    await kv.link(link("l1", sizing=Multiplier(2.0)))
    live = await views()
    before = bad_messages(subjects.KV_LINKS)
    with structlog.testing.capture_logs() as logs:
        await kv.put(subjects.KV_LINKS, "l1", b"\x00garbage")
        # A valid link, stored under another link's key.
        await kv.put(subjects.KV_LINKS, "l1", codec.encode(link("other", sizing=FixedLot(5.0))))
        await wait_until(
            lambda: bad_messages(subjects.KV_LINKS) == before + 2, "both bad links counted"
        )
    assert live.links["l1"].link.sizing == Multiplier(2.0)
    assert "other" not in live.links
    invalid = [e for e in logs if e["event"] == "kv_entry_invalid"]
    assert [(e["bucket"], e["key"], e["log_level"]) for e in invalid] == [
        (subjects.KV_LINKS, "l1", "error"),
        (subjects.KV_LINKS, "l1", "error"),
    ]
    assert "link stored under key 'l1' has link_id 'other'" in invalid[1]["error"]
    # The watcher is still alive: the next good value applies.
    await kv.link(link("l1", sizing=Multiplier(3.0)))
    await wait_until(
        lambda: live.links["l1"].link.sizing == Multiplier(3.0), "the next good link applied"
    )


# --------------------------------------------------------- accounts, specs, FX rates


async def test_account_states_are_tracked_replaced_and_dropped(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    await kv.account(account("f1", equity=10_000.0, connector="bridge-1"))
    await wait_until(lambda: "f1" in live.view.accounts, "the account state")
    assert live.view.accounts["f1"].connector == "bridge-1"
    await kv.account(account("f1", equity=8_250.5))
    await wait_until(lambda: live.view.accounts["f1"].equity == 8_250.5, "the new equity")
    await kv.delete(subjects.KV_ACCOUNTS, "f1")
    await wait_until(lambda: "f1" not in live.view.accounts, "the account to go")


async def test_symbol_specs_are_keyed_by_account_and_unescaped_symbol(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    await kv.spec(spec("f1", "XAUUSD.m"))
    await kv.spec(spec("f2", "XAUUSD.m", volume_step=0.1))
    await wait_until(lambda: len(live.view.symbols) == 2, "both specs")
    assert live.view.symbols[("f1", "XAUUSD.m")].volume_step == 0.01
    assert live.view.symbols[("f2", "XAUUSD.m")].volume_step == 0.1
    await kv.delete(subjects.KV_SYMBOLS, subjects.symbol_key("f1", "XAUUSD.m"))
    await wait_until(lambda: ("f1", "XAUUSD.m") not in live.view.symbols, "f1's spec to go")
    assert ("f2", "XAUUSD.m") in live.view.symbols


async def test_fx_rates_are_kept_by_pair_and_dropped_with_their_key(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    await kv.fx(FxRate(base="EUR", quote="USD", rate=1.08))
    await kv.fx(FxRate(base="USD", quote="JPY", rate=151.2))
    await wait_until(lambda: len(live.view.fx_rates) == 2, "both rates")
    assert live.view.fx_rates == {"EURUSD": 1.08, "USDJPY": 151.2}
    await kv.fx(FxRate(base="EUR", quote="USD", rate=1.09))
    await wait_until(lambda: live.view.fx_rates["EURUSD"] == 1.09, "the new EURUSD rate")
    await kv.delete(subjects.KV_FX, "USDJPY")
    await wait_until(lambda: "USDJPY" not in live.view.fx_rates, "USDJPY to go")


async def test_an_fx_rate_under_a_key_that_is_not_its_pair_is_refused(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    """Like every other bucket: a value whose key does not match it is refused, so a delete of
    its key can never leave a rate behind that keeps feeding sizing."""
    live = await views()
    await kv.fx(FxRate(base="EUR", quote="USD", rate=1.08), key="EURUSD-old")
    await kv.fx(FxRate(base="GBP", quote="USD", rate=1.27))  # written after: handled after
    await wait_until(lambda: "GBPUSD" in live.view.fx_rates, "the GBPUSD rate")
    assert "EURUSD" not in live.view.fx_rates
    assert "EURUSD-old" not in live.view.fx_rates


async def test_bad_values_in_every_bucket_are_counted_and_never_stop_its_watcher(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    await kv.account(account("f1", equity=7_000.0))
    await kv.spec(spec("f1", "EURUSD"))
    live = await views()
    cases: list[tuple[str, str, bytes]] = [
        (subjects.KV_ACCOUNTS, "f1", b"\x93garbage"),
        (subjects.KV_ACCOUNTS, "f1", codec.encode(account("f9"))),  # another account's state
        (subjects.KV_ACCOUNTS, "f1", codec.encode({"account": "f1", "leverage": 0})),
        (subjects.KV_SYMBOLS, "f1.EURUSD", codec.encode(spec("f1", "GBPUSD"))),
        (subjects.KV_SYMBOLS, "f1.=ZZ", codec.encode(spec("f1", "EURUSD"))),  # bad escape
        (subjects.KV_SYMBOLS, "f1.=FF", codec.encode(spec("f1", "EURUSD"))),  # not UTF-8
        (subjects.KV_FX, "EURUSD", codec.encode({"base": "EUR", "quote": "USD", "rate": -1.0})),
        (subjects.KV_CONTROL, "global", codec.encode({"scope": "everything"})),
        (subjects.KV_LINK_STATE, "l1", b"\xc1"),
        (subjects.KV_LINKS, "l1", codec.encode({"link_id": "l1", "master": "m1"})),
        (subjects.KV_LINKS, "l1", b"\x81\xa1\xff\x00"),  # a map whose key is not UTF-8
    ]
    for bucket, key, value in cases:
        # One at a time: in a history-1 bucket a value not yet delivered when the next one
        # for its key is stored is gone from the stream, and a watcher never sees it.
        before = bad_messages(bucket)
        await kv.put(bucket, key, value)
        await wait_until(lambda b=bucket, n=before: bad_messages(b) == n + 1, f"{key} counted")
    assert live.view.accounts["f1"].equity == 7_000.0
    assert live.view.symbols == {("f1", "EURUSD"): spec("f1", "EURUSD")}
    assert (live.view.fx_rates, live.view.stops, live.view.link_states, live.links) == (
        {},
        {},
        {},
        {},
    )
    # Each watcher goes on with the next good value.
    await kv.account(account("f1", equity=7_500.0))
    await kv.fx(FxRate(base="EUR", quote="USD", rate=1.08))
    await kv.stop(EmergencyStop(scope=StopScope.GLOBAL))
    await kv.link_state("l1", LinkState(day="2026-02-16"))
    await kv.link(link("l1"))
    await wait_until(
        lambda: (
            live.view.accounts["f1"].equity == 7_500.0
            and "EURUSD" in live.view.fx_rates
            and "global" in live.view.stops
            and "l1" in live.view.link_states
            and "l1" in live.links
        ),
        "the good values after the bad ones",
    )


# ----------------------------------------------------------------------- emergency stops


async def test_emergency_stops_apply_to_their_scope_and_are_logged(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    mine, other = link("l1", follower="f1"), link("l2", follower="f2")
    with structlog.testing.capture_logs() as logs:
        await kv.stop(EmergencyStop(scope=StopScope.ACCOUNT, target="f1", reason="margin call"))
        key = stop_key(StopScope.ACCOUNT, "f1")
        await wait_until(lambda: key in live.view.stops, "the account stop")
    stop = live.view.active_stop(mine)
    assert stop is not None and stop.reason == "margin call"
    assert live.view.active_stop(other) is None
    changed = [e for e in logs if e["event"] == "emergency_stop_changed"]
    assert [
        (e["scope"], e["target"], e["active"], e["reason"], e["log_level"]) for e in changed
    ] == [("account", "f1", True, "margin call", "warning")]

    await kv.stop(EmergencyStop(scope=StopScope.ACCOUNT, target="f1", active=False))
    await wait_until(lambda: not live.view.stops[key].active, "the stop released")
    assert live.view.active_stop(mine) is None

    await kv.stop(EmergencyStop(scope=StopScope.LINK, target="l2"))
    await wait_until(lambda: live.view.active_stop(other) is not None, "the link stop")
    await kv.delete(subjects.KV_CONTROL, stop_key(StopScope.LINK, "l2"))
    await wait_until(lambda: live.view.active_stop(other) is None, "the link stop deleted")


# --------------------------------------------------------------------------- link states


async def test_link_states_follow_the_bucket_with_their_revisions(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    assert live.view.link_state("l1") == LinkState()
    revision = await kv.link_state("l1", LinkState(day="2026-02-16", opened=["p1"]))
    await wait_until(lambda: "l1" in live.view.link_states, "the link state")
    assert live.view.link_state("l1").opened == ["p1"]
    assert live.link_state_revisions["l1"] == revision
    await kv.delete(subjects.KV_LINK_STATE, "l1")
    await wait_until(lambda: "l1" not in live.view.link_states, "the link state to go")
    assert "l1" not in live.link_state_revisions
    assert live.view.link_state("l1") == LinkState()


async def test_a_state_remembered_from_a_newer_write_is_not_overwritten_by_an_older_entry(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    # Our own compare-and-set returned revision 1,000; the watch then delivers older entries.
    ours = LinkState(day="2026-02-16", opened=["p1", "p2"])
    live.remember_link_state("l1", ours, 1_000)
    await kv.link_state("l1", LinkState(day="2026-02-16", opened=["p1"]))
    await settled(kv, live, subjects.KV_LINK_STATE)
    assert live.view.link_state("l1") == ours
    assert live.link_state_revisions["l1"] == 1_000


async def test_remembering_an_older_revision_keeps_the_newer_state() -> None:
    live = LiveView({})
    newer, older = LinkState(paused=True), LinkState()
    live.remember_link_state("l1", newer, 7)
    live.remember_link_state("l1", older, 6)
    assert (live.view.link_state("l1"), live.link_state_revisions["l1"]) == (newer, 7)
    live.remember_link_state("l1", older, 8)
    assert (live.view.link_state("l1"), live.link_state_revisions["l1"]) == (older, 8)


# ---------------------------------------------------------------- follower account events


async def test_follower_account_changes_after_start_reach_the_listeners(
    kv: Kv, buckets: Buckets
) -> None:
    await kv.link(link("l1", master="m1", follower="f1"))
    await kv.account(account("f1", equity=10_000.0))  # the initial load is no change
    heard: list[AccountState] = []

    async def listener(state: AccountState) -> None:
        heard.append(state)

    live = LiveView(buckets)
    live.on_follower_account(listener)
    await asyncio.wait_for(live.start(), timeout=10)
    try:
        await kv.account(account("m1", equity=1.0))  # a master: nobody follows it
        await kv.account(account("f1", equity=9_000.0))
        await wait_until(lambda: heard, "the follower's new state")
        await kv.delete(subjects.KV_ACCOUNTS, "f1")
        await settled(kv, live, subjects.KV_ACCOUNTS)
        assert [(s.account, s.equity) for s in heard] == [("f1", 9_000.0)]
    finally:
        await live.stop()


# -------------------------------------------------------------------------------- stop


async def test_a_stopped_view_no_longer_follows_the_buckets(
    kv: Kv, views: Callable[[], Awaitable[LiveView]]
) -> None:
    stopped = await views()
    await stopped.stop()
    await kv.link(link("l1"))
    fresh = await views()  # loads l1 at start, so it has surely been published
    assert "l1" in fresh.links
    await settled(kv, fresh, subjects.KV_LINKS)
    assert stopped.links == {}


async def test_stop_after_the_connection_closed_does_not_raise(
    nc: Client, views: Callable[[], Awaitable[LiveView]]
) -> None:
    live = await views()
    await nc.close()
    await asyncio.wait_for(live.stop(), timeout=5)  # neither raises nor hangs
