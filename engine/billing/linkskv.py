"""Billing's access to the ``tc_links`` KV: every link read, and revision-checked edits, each
tried with exponential backoff. Enforcement (stops) and provisioning (risk templates) share it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from engine.runtime.jetstream import live_keys
from schemas import codec, subjects
from schemas.links import CopyLink

log = structlog.get_logger("tradecopy.billing")

T = TypeVar("T")

#: What another try may cure: the network, a timeout, a JetStream without a leader.
TRANSIENT = (TimeoutError, OSError, nats.errors.Error, nats.js.errors.ServiceUnavailableError)
_GONE = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)


class LinksKv:
    """The links bucket as billing writes it: at most ``attempts`` tries per operation, waiting
    ``base_delay_s × 2ⁿ⁻¹`` between them; the last failure becomes ``failure(message)``."""

    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        *,
        failure: Callable[[str], Exception],
        attempts: int = 5,
        base_delay_s: float = 0.5,
        op_timeout_s: float = 5.0,
        log_event: str = "links_retry",
    ) -> None:
        self.js = js
        self.kv = kv
        self.failure = failure
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.op_timeout_s = op_timeout_s
        self.log_event = log_event

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op`` tried at most ``attempts`` times, waiting base × 2^n between tries."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await asyncio.wait_for(op(), self.op_timeout_s)
            except TRANSIENT as exc:
                if attempt == self.attempts:
                    raise self.failure(f"{what}: {type(exc).__name__} {exc}") from exc
                delay = self.base_delay_s * 2 ** (attempt - 1)
                log.warning(self.log_event, what=what, attempt=attempt, delay=delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def links(self) -> dict[str, CopyLink]:
        """Every live link by its key."""

        async def read() -> dict[str, CopyLink]:
            found: dict[str, CopyLink] = {}
            for key in await live_keys(self.js, self.kv, subjects.KV_LINKS):
                try:
                    entry = await self.kv.get(key)
                except _GONE:
                    continue
                if entry.value:
                    found[key] = codec.copy_link_decoder.decode(entry.value)
            return found

        return await self.retrying("read links", read)

    async def edit(
        self, link_id: str, change: Callable[[CopyLink], CopyLink]
    ) -> tuple[CopyLink, CopyLink] | None:
        """Write ``change(link)`` over ``link_id``, compare-and-set on its revision: an edit
        made meanwhile fails the update, and the link is read again, with that edit, and
        changed again. The link before and after; None when the link is gone. ``change``
        returning the link unchanged writes nothing."""

        async def write() -> tuple[CopyLink, CopyLink] | None:
            while True:
                try:
                    entry = await self.kv.get(link_id)
                except _GONE:
                    return None
                if not entry.value:
                    return None
                link = codec.copy_link_decoder.decode(entry.value)
                changed = change(link)
                if changed == link:
                    return link, link
                try:
                    await self.kv.update(link_id, codec.encode(changed), last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    log.info("link_changed_meanwhile", link_id=link_id)
                    continue
                return link, changed

        return await self.retrying(f"link {link_id}", write)
