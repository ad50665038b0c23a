"""Ledger configuration."""

from __future__ import annotations

import socket
from typing import Annotated

import msgspec


class LedgerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str | None = None
    """PostgreSQL; None: ``TRADECOPY_DATABASE_URL``, else the embedded server under the state
    directory (``engine.runtime.postgres``)."""
    instance: str = msgspec.field(default_factory=socket.gethostname)
    default_tenant: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "default"
    """The tenant of every account without a row in ``account_tenants`` (single-tenant
    installs never write one)."""
    batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1_000
    """Most messages of one stream written in one transaction (and asked for by one pull
    request)."""
    writers: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    """Batches in flight at once, each on its own connection: one is inserted while another's
    commit waits for its fsync (PostgreSQL flushes concurrent commits together)."""
    pull_expires_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """How long one pull request stays open at the server before it is renewed."""
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """How long a fetched message may stay unacknowledged (its batch not committed) before
    JetStream gives it to another instance; keep it well above a commit's worst time."""
    max_ack_pending: Annotated[int, msgspec.Meta(ge=1)] = 50_000
    """Messages fetched and not yet acknowledged, per stream, over all instances."""
    write_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    """Attempts to commit one batch (connection lost, deadlock, server restarting) before its
    messages go back to JetStream for redelivery."""
    stall_after_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """A consumer with messages pending and its acknowledgement floor still for this long is
    stuck: ``/healthz`` answers 503. Keep it above ``ack_wait_s``."""
    health_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """How often the consumers' backlog is read and PostgreSQL is asked whether it answers."""
    migrate: bool = False
    """Apply the ledger's migrations before consuming (local modes); production runs
    ``tradecopy db migrate`` as a job of its own."""
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = 9465
