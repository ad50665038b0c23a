"""The local copy stack: embedded NATS → streams → buckets → links → replicator processes.

``tradecopy up``, ``tradecopy demo`` and every benchmark stand on this one builder, so they start,
wire and stop the stack the same way. Each step is a method, called in the order a caller needs
(the fan-out benchmark seeds accounts after its replicator is up; ``up`` checks its links before
anything starts), and ``stop`` undoes whatever was started, in reverse.

Secured by default: every role gets its own nkey user, made afresh at each start (seeds stay in
memory and reach child processes through their environment), and the server admits only them,
each with the permissions of ``engine.runtime.natsauth``. The admin user creates the streams and
buckets; the stack's own client (``nc``) is the operator; replicators run as the replicator;
each connector gets a user of its own (``add_connector``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from engine.runtime.jetstream import ensure_buckets, ensure_streams
from engine.runtime.links import ApplyResult, apply_links
from engine.runtime.natsauth import (
    CREDENTIAL_VARIABLES,
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    SINGLE_USER_ROLES,
    NatsUser,
    Role,
    connector_user_name,
)
from engine.runtime.natsconn import connect
from engine.runtime.natsserver import EmbeddedNats, NatsTls
from engine.runtime.processes import spawn_replicator, stop_process, wait_for_replicator
from schemas import subjects
from schemas.links import CopyLink

#: The link shard ``i/n`` a replicator process plans (``tradecopy replicator run --shard``).
ENV_REPLICATOR_SHARD = "TRADECOPY_REPLICATOR_SHARD"


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
        secure: bool = True,
        sync_interval: str | None = None,
        tls: NatsTls | None = None,
    ) -> None:
        self.secure = secure
        self.users: dict[str, NatsUser] = {}
        if secure:
            for role in SINGLE_USER_ROLES:
                self.users[role.value] = NatsUser.generate(role)
        self.server = EmbeddedNats(
            store_dir=store_dir, host=host, port=port, http_port=http_port,
            users=list(self.users.values()), tls=tls, sync_interval=sync_interval,
        )  # fmt: skip
        self.partitions = partitions
        self.name = name
        self.replicators: list[subprocess.Popen[bytes]] = []
        self._replicator_args: list[dict[str, Any]] = []
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._buckets: dict[str, Any] = {}
        self._clients: list[Client] = []

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def nc(self) -> Client:
        """The stack's own client: the operator (links, stops, reads) when secured."""
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
        """KV bucket name (``schemas.subjects.KV_*``) → bucket, opened by the operator."""
        return self._buckets

    def user(self, role: Role | str) -> NatsUser | None:
        """The user of a single-user role, or a connector's by its user name; None when open."""
        return self.users.get(str(role))

    def connector_user(self, connector_id: str) -> NatsUser | None:
        """The user ``add_connector`` made (None on an open stack)."""
        if not self.secure:
            return None
        try:
            return self.users[connector_user_name(connector_id)]
        except KeyError:
            raise KeyError(f"connector {connector_id!r} has no user: add_connector first") from None

    async def add_connector(
        self, connector_id: str, *, masters: Iterable[str] = (), followers: Iterable[str] = ()
    ) -> NatsUser | None:
        """A user for one connector, allowed only these accounts (None on an open stack).

        Best called before ``start``; afterwards the server reloads its config (POSIX)."""
        if not self.secure:
            return None
        user = NatsUser.connector(connector_id, masters, followers)
        if user.name in self.users:
            raise ValueError(f"connector {connector_id!r} already has a user")
        self.users[user.name] = user
        await self.server.add_users([user])
        return user

    def child_env(self, user: NatsUser | None) -> dict[str, str]:
        """A child process's environment: ours without any NATS identity or TLS settings of our
        own (they may be for another server), plus ``user``'s and this server's CA."""
        ours = {*CREDENTIAL_VARIABLES, ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY}
        env = {k: v for k, v in os.environ.items() if k not in ours}
        if user is not None:
            env.update(user.credentials.env())
        tls = self.server.tls
        if tls is not None and tls.ca is not None:
            env[ENV_TLS_CA] = str(tls.ca)
        if tls is not None and tls.verify:  # as client_options: the server's pair proves us
            env[ENV_TLS_CERT], env[ENV_TLS_KEY] = str(tls.cert), str(tls.key)
        return env

    async def start(self) -> LocalStack:
        """Start nats-server and create the contract's streams and KV buckets (idempotent)."""
        await self.server.start()
        try:
            admin = await self.connect(f"{self.name}-admin", self.user(Role.ADMIN))
            js = admin.jetstream()
            if self.partitions is None:
                await ensure_streams(js)
            else:
                await ensure_streams(js, self.partitions)
            await ensure_buckets(js)
            # The admin's work is done: nothing else in this process may change streams.
            self._clients.remove(admin)
            await admin.close()
            self._nc = await self.connect(self.name, self.user(Role.OPERATOR))
            self._js = self._nc.jetstream()
            self._buckets = await ensure_buckets(self._js)
        except BaseException:
            await self.stop()
            raise
        return self

    async def connect(self, name: str, user: NatsUser | None = None) -> Client:
        """Another client on the stack's server (closed by ``stop``): one per simulated process.

        ``user`` defaults to the operator; on an open stack every client is anonymous."""
        if user is None:
            user = self.user(Role.OPERATOR)
        options = self.server.client_options(user)
        tls = options.pop("tls", None)
        credentials = user.credentials if user is not None else None
        client: Client = await connect(
            self.server.url, name, credentials=credentials, tls=tls, **options
        )
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
        shards: int = 1,
    ) -> list[subprocess.Popen[bytes]]:
        """``count`` more replicator processes, named ``<instance>-<n>`` (n counts from 1 across
        calls); a metrics port > 0 is counted up per process. Each runs as the replicator.

        ``shards`` > 1 splits every master's links into that many link shards; process i
        plans shard ``i % shards`` (so ``count`` should be a multiple of ``shards``)."""
        started = []
        for i in range(count):
            args: dict[str, Any] = {
                "shard": f"{i % shards}/{shards}",
                "instance": f"{instance}-{len(self.replicators) + i + 1}",
                "metrics_port": metrics_port + i if metrics_port > 0 else metrics_port,
                "log_level": log_level,
                "quiet": quiet,
                "batch_by_connector": batch_by_connector,
            }
            self._replicator_args.append(args)
            started.append(self._spawn_replicator(args))
        self.replicators += started
        return started

    def _spawn_replicator(self, args: dict[str, Any]) -> subprocess.Popen[bytes]:
        env = self.child_env(self.user(Role.REPLICATOR))
        options = dict(args)
        env[ENV_REPLICATOR_SHARD] = options.pop("shard")
        return spawn_replicator(self.server.url, partitions=self.partitions, env=env, **options)

    # ------------------------------------------------------------------ supervision

    def nats_running(self) -> bool:
        return self.server.running

    async def restart_nats(self) -> None:
        """Start the server again after it died: same port, store, users and TLS, so every
        client (they reconnect forever) finds it where it was."""
        self.server.kill()  # reaps what is left of the dead child
        await self.server.start()

    def replicator_exit_codes(self) -> list[int | None]:
        return [proc.poll() for proc in self.replicators]

    def respawn_replicator(self, index: int) -> int:
        """Start replicator ``index`` again with the arguments it was first started with."""
        proc = self._spawn_replicator(self._replicator_args[index])
        self.replicators[index] = proc
        return proc.pid

    async def wait_for_replicator(self, timeout: float = 30.0) -> None:
        """Until a replicator consumes the master-event stream."""
        await wait_for_replicator(self.js, timeout)

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
