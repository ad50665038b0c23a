"""Paper venues priced by quotes a live source publishes on NATS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import wait_until

from connectors.paper.connector import PaperConnector, PaperTerminal
from connectors.paper.prices import PriceReplay, bar_to_ticks, load_bars
from connectors.paper.quotes import NatsQuotes, publish_quotes
from engine.runtime.jetstream import ensure_buckets, ensure_streams
from schemas import codec, subjects
from schemas.common import Side
from schemas.market import Quote


async def test_quotes_on_nats_price_the_venue_and_trigger_its_stops(
    nats_server: Any, nc: Any, js: Any, tmp_path: Path
) -> None:
    await ensure_streams(js)
    await ensure_buckets(js)
    terminal = PaperTerminal.open(tmp_path / "p.state", [("m1", "USD", 10_000.0, 100, "master")])
    connector = PaperConnector(nc, "pq", terminal, NatsQuotes(nc, ["XAUUSD"]))
    await connector.start()
    try:
        now = time.time_ns()
        await nc.publish(
            subjects.quotes("XAUUSD"),
            codec.encode(Quote(symbol="XAUUSD", bid=5000.0, ask=5000.2, ts_ns=now)),
        )
        await wait_until(lambda: terminal.venue.quote("XAUUSD") is not None, "the first quote")
        assert terminal.venue.quote("XAUUSD").ask == 5000.2
        opened = await connector.trade(
            lambda v: v.market_order("m1", "XAUUSD", Side.BUY, 0.1, sl=4990.0)
        )
        assert opened.ok and opened.price == 5000.2

        # Garbage on the subject is counted and ignored; the feed goes on.
        await nc.publish(subjects.quotes("XAUUSD"), b"\xc1 not msgpack")
        await nc.publish(
            subjects.quotes("XAUUSD"),
            codec.encode(Quote(symbol="XAUUSD", bid=4989.5, ask=4989.7, ts_ns=now + 1)),
        )
        await wait_until(lambda: not terminal.venue.positions("m1"), "the stop loss to close it")
        assert connector.replay is not None and connector.replay.bad == 1
        stored = await js.stream_info("TC_MASTER_EVENTS")
        assert stored.state.messages == 2  # the open and the SL close, both published
    finally:
        await connector.stop()


def test_quotes_publish_command_sends_real_bars(nats_server: Any) -> None:
    received: list[Quote] = []

    async def listen() -> None:
        import nats

        client = await nats.connect(nats_server.url)

        async def got(msg: Any) -> None:
            received.append(codec.quote_decoder.decode(msg.data))

        await client.subscribe(subjects.quotes("XAUUSD"), cb=got)
        await client.flush()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "quotes", "publish", "--nats-url",
            nats_server.url, "--speed", "0", "--count", "40",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert b"40 quotes published" in out
        await wait_until(lambda: len(received) == 40, "40 quotes")
        await client.close()

    asyncio.run(listen())
    first = received[0]
    # The shipped file's first bar opens at 5010.50 bid with a 19-point spread.
    assert (first.bid, round(first.ask - first.bid, 2)) == (5010.5, 0.19)
    assert all(q.ask > q.bid for q in received)


async def test_publish_quotes_sends_count_quotes_in_replay_order_stamped_when_sent(
    nats_server: Any, nc: Any
) -> None:
    received: list[Quote] = []

    async def got(msg: Any) -> None:
        received.append(codec.quote_decoder.decode(msg.data))

    await nc.subscribe(subjects.quotes("XAUUSD"), cb=got)
    await nc.flush()
    bars = load_bars()[:3]
    expected = [q for bar in bars for q in bar_to_ticks(bar, "XAUUSD", steps_per_leg=3)][:25]
    before = time.time_ns()
    sent = await publish_quotes(nc, PriceReplay(bars, speed=0, steps_per_leg=3), count=25)
    after = time.time_ns()
    assert sent == 25
    await wait_until(lambda: len(received) >= 25, "25 quotes")
    await asyncio.sleep(0.05)  # and no more than asked
    assert len(received) == 25
    assert [(q.symbol, q.bid, q.ask) for q in received] == [
        (q.symbol, q.bid, q.ask) for q in expected
    ]
    stamps = [q.ts_ns for q in received]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after
    assert nc.is_connected  # the caller's connection, left open
