"""Exactly one run per candle across workers: a JetStream KV create, leases, takeovers."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats.js.errors
import structlog

from engine.signals import metrics

log = structlog.get_logger("tradecopy.signals")


class ClaimState(enum.StrEnum):
    RUNNING = "running"
    """A worker runs the candle; it holds it until ``lease_until_ns``."""
    DONE = "done"
    """The run finished with a signal (published unless it was a hold)."""
    FAILED = "failed"
    """The run finished with a failure (recorded on the failures subject)."""


class CandleClaim(msgspec.Struct, frozen=True, kw_only=True):
    """The value under a run's key in the claims bucket."""

    worker: str
    state: ClaimState
    lease_until_ns: int
    """Wall-clock UTC ns: after it a running claim may be taken over. Workers' clocks must
    agree to well under the lease's margin over the run's time limit (NTP does)."""
    attempt: int = 1
    """1 for the first worker; each takeover adds one."""
    outcome: str = ""


class HeldClaim(msgspec.Struct, frozen=True, kw_only=True):
    """A claim this worker holds: the revision it wrote is what it must compare against."""

    key: str
    revision: int
    claim: CandleClaim


class Leased(msgspec.Struct, frozen=True, kw_only=True):
    """Another worker holds the claim until ``lease_until_ns``."""

    worker: str
    lease_until_ns: int


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CandleClaim)


class CandleClaims:
    """Claims on one KV bucket for one worker.

    The first ``create`` of a key wins; everyone else reads the claim. A finished claim means
    the candle ran. A running claim whose lease is over belonged to a worker that died (or
    stalled past its run's time limit): it is taken over with an ``update`` on the revision
    read, so of several workers trying, exactly one succeeds. No other lock is involved.
    """

    def __init__(
        self,
        kv: Any,
        worker: str,
        lease_s: float,
        *,
        poll_s: float = 0.5,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.kv = kv
        self.worker = worker
        self.lease_ns = int(lease_s * 1e9)
        self.poll_s = poll_s
        self.clock = clock

    def _running(self, attempt: int) -> bytes:
        return _encoder.encode(
            CandleClaim(
                worker=self.worker,
                state=ClaimState.RUNNING,
                lease_until_ns=self.clock() + self.lease_ns,
                attempt=attempt,
            )
        )

    async def acquire(self, key: str) -> HeldClaim | None:
        """Hold ``key``'s run, or ``None`` once another worker has finished it.

        Waits while another worker's lease runs: if that worker dies, this one (or another
        waiting one) takes over when the lease ends.
        """
        while True:
            outcome = await self.try_acquire(key)
            if not isinstance(outcome, Leased):
                return outcome
            await asyncio.sleep(self.wait_s(outcome))

    def wait_s(self, leased: Leased) -> float:
        """How long to wait before looking at a claim another worker holds again."""
        return max(0.0, min(self.poll_s, (leased.lease_until_ns - self.clock()) / 1e9))

    async def try_acquire(self, key: str) -> HeldClaim | Leased | None:
        """One attempt: the claim (created, or taken over after its lease), ``Leased`` while
        another worker holds it, or ``None`` once the run finished."""
        while True:
            _raise_if_cancelled()
            value = self._running(1)
            try:
                revision = await self.kv.create(key, value)
                return HeldClaim(key=key, revision=revision, claim=_decoder.decode(value))
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # deleted between the two calls: create again
            claim = _decoder.decode(entry.value)
            if claim.state is not ClaimState.RUNNING:
                return None
            left_ns = claim.lease_until_ns - self.clock()
            if left_ns > 0:
                return Leased(worker=claim.worker, lease_until_ns=claim.lease_until_ns)
            value = self._running(claim.attempt + 1)
            try:
                revision = await self.kv.update(key, value, last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another worker took it over first, or the holder finished
            metrics.CLAIM_TAKEOVERS.inc()
            log.warning(
                "claim_taken_over",
                key=key,
                previous_worker=claim.worker,
                attempt=claim.attempt + 1,
                lease_over_s=round(-left_ns / 1e9, 3),
            )
            return HeldClaim(key=key, revision=revision, claim=_decoder.decode(value))

    async def finish(self, held: HeldClaim, state: ClaimState, outcome: str) -> bool:
        """Mark the run finished; ``False`` if the claim was taken over meanwhile (this worker
        stalled past its lease: what it published carries the run's id, so it counts once)."""
        value = _encoder.encode(
            msgspec.structs.replace(held.claim, state=state, outcome=outcome[:500])
        )
        try:
            await self.kv.update(held.key, value, last=held.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            metrics.CLAIMS_LOST.inc()
            log.error("claim_lost", key=held.key, worker=self.worker)
            return False
        return True

    async def read(self, key: str) -> CandleClaim | None:
        """The claim under ``key``, if any (for operators and tests)."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return _decoder.decode(entry.value)


def _raise_if_cancelled() -> None:
    """nats-py's publish path can swallow a ``CancelledError`` (its flush catches it), which
    would leave a cancelled waiter polling forever; the task still counts the request."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def decode_claim(value: bytes) -> CandleClaim:
    return _decoder.decode(value)
