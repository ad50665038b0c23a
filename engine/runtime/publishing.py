"""Storing messages in JetStream with a bound on every wait, for every service and connector.

nats-py's ``publish_async`` futures may never resolve (after a server restart the acks of
messages in flight are simply gone), so nothing here awaits one without a deadline. A message
whose ack does not come in time is sent again with the same ``Nats-Msg-Id`` — JetStream drops
the copy if the first one was stored — and after the last attempt the caller gets
``NotStored`` and takes its normal redelivery path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors

MSG_ID = "Nats-Msg-Id"

#: One message to store: subject, payload and its ``Nats-Msg-Id`` (the deduplication key).
Publication = tuple[str, bytes, str]

#: A retry after an attempt that failed fast (e.g. no stream answered) waits this long first.
_RETRY_PAUSE_S = 0.05


class NotStored(Exception):
    """JetStream did not confirm every message within the bounded attempts (transient)."""

    def __init__(self, missing: int, total: int, attempts: int, cause: BaseException | None):
        super().__init__(
            f"{missing} of {total} messages not confirmed stored after {attempts} attempt(s)"
            + ("" if cause is None else f": {cause!r}")
        )
        self.missing = missing
        self.cause = cause


async def publish_stored(
    js: Any,
    messages: Sequence[Publication],
    *,
    timeout_s: float,
    attempts: int,
    on_the_wire: Callable[[], None] | None = None,
    before_retry: Callable[[], Awaitable[None]] | None = None,
    retried: Callable[[int], None] | None = None,
) -> None:
    """Publish every message and return once JetStream has confirmed storing each.

    All messages go out at once and their acks are awaited together (one round trip per
    batch, never one per message). Each attempt, sending included, is bounded by
    ``timeout_s``; unconfirmed futures are cancelled, which also frees their slot in the
    client's pending-publish allowance. Hooks: ``on_the_wire`` runs once, after the first
    attempt's messages are handed to the client and before their acks are awaited (e.g.
    persisting while they travel); ``before_retry`` runs before each new attempt (e.g. telling
    the server the message being handled is still in progress); ``retried(n)`` counts the
    messages sent again.

    ``nats.errors.MaxPayloadError`` is raised at once: sending the same bytes again cannot help.
    """
    pending = list(messages)
    cause: BaseException | None = None
    loop = asyncio.get_running_loop()
    for attempt in range(attempts):
        if attempt:
            if retried is not None:
                retried(len(pending))
            await asyncio.sleep(_RETRY_PAUSE_S * attempt)
            if before_retry is not None:
                try:
                    await asyncio.wait_for(before_retry(), timeout_s)
                except Exception as exc:  # only a courtesy to the server: the retry goes on
                    cause = exc
        futures: list[asyncio.Future[Any]] = []
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                for subject, payload, msg_id in pending:
                    futures.append(
                        await js.publish_async(subject, payload, headers={MSG_ID: msg_id})
                    )
            if on_the_wire is not None and attempt == 0:
                await asyncio.sleep(0)  # let the client's flusher put the messages on the wire
                on_the_wire()
            if futures:
                async with asyncio.timeout_at(deadline):
                    await asyncio.wait(futures)
        except (TimeoutError, nats.errors.Error, ConnectionError) as exc:
            if isinstance(exc, nats.errors.MaxPayloadError):
                _cancel(futures)  # the same bytes can never be stored: no retry
                raise
            cause = exc
        except BaseException:
            _cancel(futures)  # cancelled, or the caller's hook failed: free every slot
            raise
        unconfirmed: list[Publication] = []
        for message, future in zip(pending, futures, strict=False):
            if not future.done():
                # Its ack may still come: too late, it is ignored (the retry has the same id).
                future.cancel()
                unconfirmed.append(message)
            elif future.cancelled():
                unconfirmed.append(message)
            elif future.exception() is not None:
                cause = future.exception()
                unconfirmed.append(message)
        unconfirmed.extend(pending[len(futures) :])
        if not unconfirmed:
            return
        pending = unconfirmed
    raise NotStored(len(pending), len(messages), attempts, cause)


def _cancel(futures: list[asyncio.Future[Any]]) -> None:
    for future in futures:
        if not future.done():
            future.cancel()
