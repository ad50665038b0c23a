"""Live quotes on NATS for paper venues: the publisher of real bars and the subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import structlog

from connectors.paper.prices import PriceReplay
from schemas import codec, subjects
from schemas.market import Quote

log = structlog.get_logger("tradecopy.paper")


async def publish_quotes(nc: Any, replay: PriceReplay, count: int = 0) -> int:
    """Publish the replay's quotes on ``tc.v1.quotes.<symbol>`` as live ones, stamped with the
    wall clock when sent, until ``count`` were sent (0: until cancelled); returns how many.

    The caller owns the connection; what was sent is flushed before returning.
    """
    sent = 0
    try:
        async for quote in replay.quotes():
            # Stamped when sent: receivers compare quote times with the present.
            quote = msgspec.structs.replace(quote, ts_ns=time.time_ns())
            await nc.publish(subjects.quotes(quote.symbol), codec.encode(quote))
            sent += 1
            if count and sent >= count:
                break
    finally:
        await nc.flush()
    return sent


class NatsQuotes:
    """Quotes a live source publishes on ``tc.v1.quotes.<symbol>`` (core NATS, latest wins)."""

    def __init__(self, nc: Any, symbols: Sequence[str]) -> None:
        self.nc = nc
        self.symbols = symbols
        self.bad = 0
        self._queue: asyncio.Queue[Quote] = asyncio.Queue(maxsize=10_000)
        self._subs: list[Any] = []

    async def start(self) -> None:
        """Listen now (quotes are not stored: one sent before this is gone)."""
        for symbol in self.symbols:
            self._subs.append(await self.nc.subscribe(subjects.quotes(symbol), cb=self._arrived))
        await self.nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def _arrived(self, msg: Any) -> None:
        try:
            quote = codec.quote_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            self.bad += 1
            log.warning("quote_invalid", subject=msg.subject, error=str(exc))
            return
        if self._queue.full():  # a slow venue keeps the newest prices, not the oldest
            self._queue.get_nowait()
        self._queue.put_nowait(quote)

    async def quotes(self) -> AsyncIterator[Quote]:
        while True:
            yield await self._queue.get()
