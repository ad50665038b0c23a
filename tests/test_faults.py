"""The copy core under faults: NATS killed or restarted mid-burst, the follower connector killed
mid-burst, a follower down while thousands of orders wait.

Every scenario publishes bursts of master opens for several masters, each copied to many paper
followers, and counts on the follower venue itself: every copy exactly once (lost = 0,
duplicated = 0), each follower's copies of one master in the master's order, and everything
done within a deadline (a stall fails the test with the counts so far).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import wait_until
from fault_follower import open_terminal

from connectors.paper.connector import PaperConnector, PaperTerminal
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.natsconn import connect
from engine.runtime.natsserver import EmbeddedNats, free_port
from engine.runtime.processes import spawn_replicator, stop_process, wait_for_replicator
from schemas import codec, subjects
from schemas.common import Side
from schemas.links import CopyLink
from schemas.master import PositionOpened

pytestmark = pytest.mark.slow

PARTITIONS = 4
MASTERS = 3
FOLLOWERS_PER_MASTER = 20
#: How long a scenario may take to copy everything once the faults are over.
SETTLE_S = 90.0
FOLLOWER_SCRIPT = Path(__file__).with_name("fault_follower.py")


def follower_ids() -> list[str]:
    return [f"ff-{m}-{f:02d}" for m in range(MASTERS) for f in range(FOLLOWERS_PER_MASTER)]


def links() -> list[CopyLink]:
    return [
        CopyLink(link_id=f"fl-{m}-{f:02d}", master=f"fm-{m}", follower=f"ff-{m}-{f:02d}")
        for m in range(MASTERS)
        for f in range(FOLLOWERS_PER_MASTER)
    ]


def master_open(master: str, seq: int) -> PositionOpened:
    return PositionOpened(
        event_id=f"{master}-open-{seq:05d}", master=master, symbol="XAUUSD",
        ts_ns=time.time_ns(), position_id=f"{master}-p{seq:05d}", side=Side.BUY,
        volume=0.01, price=5000.0,
    )  # fmt: skip


@dataclass
class Copies:
    """What the follower venue holds, counted against what the masters opened."""

    expected: set[tuple[str, str]] = field(default_factory=set)
    """(follower, master ref) of every copy that must exist."""

    def count(self, terminal: PaperTerminal) -> tuple[int, int, list[str]]:
        """Lost copies, duplicated copies, and (follower, master) pairs copied out of order."""
        held: Counter[tuple[str, str]] = Counter()
        by_pair: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        for follower in terminal.followers:
            for position in terminal.venue.positions(follower):
                ref = position.master_ref or ""
                held[(follower, ref)] += 1
                by_pair[(follower, ref.split(":")[0])].append((int(position.position_id), ref))
        lost = len(self.expected - set(held))
        duplicated = sum(n - 1 for n in held.values() if n > 1)
        out_of_order = [
            f"{pair}" for pair, opened in by_pair.items()
            if [ref for _, ref in sorted(opened)] != sorted(ref for _, ref in opened)
        ]  # fmt: skip
        return lost, duplicated, out_of_order


class Masters:
    """Publishes master opens; a publish that fails while NATS is away is retried with the same
    ``Nats-Msg-Id``, as a connector's outbox would."""

    def __init__(self, js: Any, copies: Copies) -> None:
        self.js = js
        self.copies = copies
        self.sent = 0

    async def publish(self, seq: int) -> None:
        for m in range(MASTERS):
            event = master_open(f"fm-{m}", seq)
            deadline = time.monotonic() + 60
            while True:
                try:
                    await self.js.publish(
                        subjects.master_events(event.master), codec.encode(event),
                        headers={"Nats-Msg-Id": event.event_id}, timeout=2.0,
                    )  # fmt: skip
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            for f in range(FOLLOWERS_PER_MASTER):
                self.copies.expected.add((f"ff-{m}-{f:02d}", f"{event.master}:{event.position_id}"))
            self.sent += 1


async def wait_held(copies: Copies, held: Callable[[], Any]) -> None:
    """Until the followers hold as many copies as expected, or the deadline (then the exact
    count that follows says what is missing: a stall shows up as lost copies)."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        count = held()
        if asyncio.iscoroutine(count):
            count = await count
        if count >= len(copies.expected):
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)  # a late duplicate has its chance to show up


def assert_exact(copies: Copies, terminal: PaperTerminal, what: str) -> None:
    lost, duplicated, out_of_order = copies.count(terminal)
    assert (lost, duplicated, out_of_order) == (0, 0, []), (
        f"{what}: lost {lost}, duplicated {duplicated}, out of order {out_of_order[:5]} "
        f"of {len(copies.expected)} copies"
    )


def positions_held(terminal: PaperTerminal) -> int:
    return sum(len(terminal.venue.positions(f)) for f in terminal.followers)


@dataclass
class Rig:
    server: EmbeddedNats
    js: Any
    root: Path
    replicators: list[subprocess.Popen[bytes]] = field(default_factory=list)
    health_ports: list[int] = field(default_factory=list)

    def spawn_replicators(self, count: int) -> None:
        for i in range(count):
            port = free_port()
            self.health_ports.append(port)
            self.replicators.append(spawn_replicator(
                self.server.url, instance=f"fault-{i + 1}", partitions=PARTITIONS,
                log_level="error", metrics_port=port,
            ))  # fmt: skip

    async def every_replicator_healthy(self) -> bool:
        return all(await self.replicators_healthy())

    async def no_replicator_healthy(self) -> bool:
        return not any(await self.replicators_healthy())

    async def replicators_healthy(self) -> list[bool]:
        """What each replicator's /healthz says (an unanswered probe counts as not ok)."""
        answers = []
        async with aiohttp.ClientSession() as http:
            for port in self.health_ports:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                        answers.append(r.status == 200 and (await r.json())["ok"] is True)
                except (aiohttp.ClientError, TimeoutError):
                    answers.append(False)
        return answers


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    await server.start()
    nc = await connect(server.url, "fault-masters")
    js = nc.jetstream()
    await ensure_streams(js, PARTITIONS)
    buckets = await ensure_buckets(js)
    for link in links():
        await buckets[subjects.KV_LINKS].put(link.link_id, codec.encode(link))
    r = Rig(server=server, js=js, root=tmp_path)
    try:
        yield r
    finally:
        for proc in r.replicators:
            stop_process(proc, timeout=5)
        with contextlib.suppress(Exception):
            await nc.close()
        await server.stop()


async def in_process_follower(rig: Rig) -> tuple[PaperConnector, PaperTerminal, Any]:
    terminal = open_terminal(rig.root / "followers.state", follower_ids())
    nc = await connect(rig.server.url, "fault-followers")
    connector = PaperConnector(nc, "fault-pf", terminal, None)
    await connector.start()
    return connector, terminal, nc


@pytest.mark.parametrize("replicators", [1, 2])
@pytest.mark.parametrize("restart", ["sigkill", "clean"])
async def test_nats_restarted_mid_burst_loses_repeats_and_reorders_nothing(
    rig: Rig, restart: str, replicators: int
) -> None:
    rig.spawn_replicators(replicators)
    connector, terminal, nc = await in_process_follower(rig)
    try:
        await wait_for_replicator(rig.js)
        copies = Copies()
        masters = Masters(rig.js, copies)
        for seq in range(40):
            await masters.publish(seq)
            if seq == 15:
                # Mid-burst: fan-outs in flight in the replicator, orders in the connector.
                if restart == "sigkill":
                    rig.server.kill()
                else:
                    await rig.server.stop()
                # Health tells the truth while NATS is away ...
                await wait_until(lambda: not connector.runtime.health()["ok"], "connector not ok")
                await wait_until(rig.no_replicator_healthy, "no replicator ok without NATS")
                await asyncio.sleep(0.5)
                await rig.server.start()
        await wait_held(copies, lambda: positions_held(terminal))
        assert_exact(copies, terminal, f"NATS {restart}, {replicators} replicator(s)")
        assert all(proc.poll() is None for proc in rig.replicators)
        # ... and once everything is copied again.
        assert connector.runtime.health()["ok"], connector.runtime.health()
        await wait_until(rig.every_replicator_healthy, "every replicator ok again")
    finally:
        await connector.stop()
        await nc.close()


class FollowerProcess:
    """The follower connector as a process of its own, to be SIGKILLed."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.state = rig.root / "follower-process.state"
        self.proc: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FOLLOWER_SCRIPT), self.rig.server.url, str(self.state),
             "fault-proc", *follower_ids()],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        stdout = self.proc.stdout
        assert stdout is not None

        def until_ready() -> None:
            for line in stdout:  # log lines may come first
                if line.strip() == "ready":
                    return
            raise AssertionError("the follower process exited before it was ready")

        await asyncio.wait_for(asyncio.to_thread(until_ready), 30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)  # type: ignore[arg-type]

    async def positions_held(self) -> int:
        """Open positions over every follower, as the running process publishes them."""
        kv = await self.rig.js.key_value(subjects.KV_ACCOUNTS)
        held = 0
        for account in follower_ids():
            with contextlib.suppress(Exception):
                entry = await kv.get(account)
                held += codec.account_state_decoder.decode(entry.value).open_positions
        return held

    def terminal(self) -> PaperTerminal:
        """The follower venue as the stopped process persisted it."""
        assert self.proc is not None and self.proc.poll() is not None
        return open_terminal(self.state, follower_ids())


async def test_the_follower_connector_killed_mid_burst_loses_and_repeats_nothing(
    rig: Rig,
) -> None:
    rig.spawn_replicators(1)
    follower = FollowerProcess(rig)
    await follower.start()
    try:
        await wait_for_replicator(rig.js)
        copies = Copies()
        masters = Masters(rig.js, copies)
        for seq in range(40):
            await masters.publish(seq)
            if seq in (10, 25):
                follower.kill()  # SIGKILL: orders taken and not acknowledged come back
                await follower.start()
        await wait_held(copies, follower.positions_held)
        follower.stop()
        assert_exact(copies, follower.terminal(), "follower connector SIGKILLed twice")
    finally:
        follower.stop()


async def test_a_follower_down_while_2000_orders_wait_copies_each_once_in_order(
    rig: Rig,
) -> None:
    rig.spawn_replicators(1)
    follower = FollowerProcess(rig)
    await follower.start()  # its durable consumer exists: orders wait for it while it is down
    follower.stop()
    try:
        await wait_for_replicator(rig.js)
        copies = Copies()
        masters = Masters(rig.js, copies)
        for seq in range(34):  # 34 × 3 masters × 20 followers = 2,040 orders
            await masters.publish(seq)
        assert len(copies.expected) >= 2_000
        await follower.start()
        await wait_held(copies, follower.positions_held)
        follower.stop()
        assert_exact(copies, follower.terminal(), "follower back after 2,040 orders")
    finally:
        follower.stop()
