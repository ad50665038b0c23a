"""Keeps a local stack's children alive: nats-server and every replicator, restarted with backoff.

``tradecopy up`` runs for days on one machine: a nats-server or a replicator that dies is brought
back on the same port, store and credentials, after a delay that doubles on every failure in a
row (0.5 s up to 30 s) and starts again from the bottom once the child has stayed up for a minute.
Each change of state is one log line (``nats_server_exited``, ``nats_server_restarted``,
``replicator_exited``, ``replicator_restarted``), never a line per attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

log = structlog.get_logger("tradecopy.supervisor")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: A child up this long is healthy again: its next failure starts the backoff from the bottom.
STABLE_S = 60.0


@dataclass
class Backoff:
    """The restart schedule of one child."""

    first_s: float = BACKOFF_FIRST_S
    max_s: float = BACKOFF_MAX_S
    failures: int = 0
    next_try: float = 0.0
    up_since: float | None = None

    def failed(self, now: float) -> float:
        """The child died or could not start: when to try again (seconds from now)."""
        delay = min(self.first_s * 2**self.failures, self.max_s)
        self.failures += 1
        self.next_try = now + delay
        self.up_since = None
        return delay

    def started(self, now: float) -> None:
        self.up_since = now

    def check_stable(self, now: float) -> None:
        if self.up_since is not None and now - self.up_since >= STABLE_S:
            self.failures = 0

    def due(self, now: float) -> bool:
        return now >= self.next_try


class Supervised(Protocol):
    """What the supervisor needs from a stack (``engine.runtime.stack.LocalStack``)."""

    def nats_running(self) -> bool: ...

    async def restart_nats(self) -> None: ...

    def replicator_exit_codes(self) -> list[int | None]: ...

    def respawn_replicator(self, index: int) -> int: ...


@dataclass
class StackSupervisor:
    stack: Supervised
    clock: Callable[[], float] = time.monotonic
    nats: Backoff = field(default_factory=Backoff)
    replicators: dict[int, Backoff] = field(default_factory=dict)
    nats_down: bool = False
    restarts: int = 0

    async def check(self) -> None:
        """One round: note what died, restart what is due. Call it about once a second."""
        now = self.clock()
        await self._check_nats(now)
        for index, code in enumerate(self.stack.replicator_exit_codes()):
            backoff = self.replicators.setdefault(index, Backoff(up_since=now))
            if code is None:
                backoff.check_stable(now)
                continue
            if backoff.up_since is not None:
                delay = backoff.failed(now)
                log.error("replicator_exited", replicator=index + 1, code=code,
                          restart_in_s=delay)  # fmt: skip
            if backoff.due(now) and not self.nats_down:
                pid = self.stack.respawn_replicator(index)
                backoff.started(now)
                self.restarts += 1
                log.info("replicator_restarted", replicator=index + 1, pid=pid,
                         attempt=backoff.failures)  # fmt: skip

    async def _check_nats(self, now: float) -> None:
        if self.stack.nats_running():
            if not self.nats_down:
                self.nats.check_stable(now)
            return
        if not self.nats_down:
            self.nats_down = True
            delay = self.nats.failed(now)
            log.error("nats_server_exited", restart_in_s=delay)
        if not self.nats.due(now):
            return
        try:
            await self.stack.restart_nats()
        except Exception as exc:
            delay = self.nats.failed(now)
            log.warning("nats_server_restart_failed", error=str(exc), retry_in_s=delay)
            return
        self.nats_down = False
        self.nats.started(now)
        self.restarts += 1
        log.info("nats_server_restarted", attempt=self.nats.failures)
