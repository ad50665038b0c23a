"""The local copy stack: embedded NATS → streams → buckets → links → replicator processes.

``tradecopy up``, ``tradecopy demo`` and every benchmark stand on this one builder, so they start,
wire and stop the stack the same way. Each step is a method, called in the order a caller needs
(the fan-out benchmark seeds accounts after its replicator is up; ``up`` checks its links before
anything starts), and ``stop`` undoes whatever was started, in reverse.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.links import ApplyResult, apply_links
from engine.runtime.natsserver import EmbeddedNats
from engine.runtime.processes import spawn_replicator, stop_process, wait_for_replicator
from schemas import subjects
from schemas.links import CopyLink


class LocalStack:
    """One embedded NATS with the contract's streams and buckets, and the processes on it."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        http_port: int | None = None,
        partitions: int | None = None,
        name: str = "tradecopy",
    ) -> None:
        self.server = EmbeddedNats(store_dir=store_dir, host=host, port=port, http_port=http_port)
        self.partitions = partitions
        self.name = name
        self.replicators: list[subprocess.Popen[bytes]] = []
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._buckets: dict[str, Any] = {}
        self._clients: list[Client] = []

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("the local stack is not started")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the local stack is not started")
        return self._js

    @property
    def buckets(self) -> dict[str, Any]:
        """KV bucket name (``schemas.subjects.KV_*``) → bucket."""
        return self._buckets

    async def start(self) -> LocalStack:
        """Start nats-server and create the contract's streams and KV buckets (idempotent)."""
        await self.server.start()
        try:
            self._nc = await nats.connect(self.server.url, name=self.name)
            self._js = self._nc.jetstream()
            if self.partitions is None:
                await ensure_streams(self._js)
            else:
                await ensure_streams(self._js, self.partitions)
            self._buckets = await ensure_buckets(self._js)
        except BaseException:
            await self.stop()
            raise
        return self

    async def connect(self, name: str) -> Client:
        """Another client on the stack's server (closed by ``stop``): one per simulated process."""
        client = await nats.connect(self.server.url, name=name)
        self._clients.append(client)
        return client

    async def apply_links(self, links: Sequence[CopyLink], *, prune: bool = False) -> ApplyResult:
        return await apply_links(self.buckets[subjects.KV_LINKS], list(links), prune=prune)

    def spawn_replicators(
        self,
        count: int = 1,
        *,
        instance: str = "local",
        metrics_port: int = -1,
        log_level: str = "warning",
        quiet: bool = True,
        batch_by_connector: bool = False,
    ) -> list[subprocess.Popen[bytes]]:
        """``count`` more replicator processes, named ``<instance>-<n>`` (n counts from 1 across
        calls); a metrics port > 0 is counted up per process."""
        started = []
        for i in range(count):
            started.append(
                spawn_replicator(
                    self.server.url,
                    instance=f"{instance}-{len(self.replicators) + i + 1}",
                    metrics_port=metrics_port + i if metrics_port > 0 else metrics_port,
                    partitions=self.partitions,
                    log_level=log_level,
                    quiet=quiet,
                    batch_by_connector=batch_by_connector,
                )
            )
        self.replicators += started
        return started

    async def wait_for_replicator(self, timeout: float = 30.0) -> None:
        """Until a replicator consumes the master-event stream."""
        await wait_for_replicator(self.js, timeout)

    def exited_replicators(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc in self.replicators if proc.poll() is not None]

    async def stop(self) -> None:
        """Stop the replicators, close every client, stop the server; safe to call twice."""
        for proc in self.replicators:
            stop_process(proc)
        for client in [*self._clients, self._nc]:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        self._clients.clear()
        self._nc = self._js = None
        await self.server.stop()

    async def __aenter__(self) -> LocalStack:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
