"""Replicator configuration."""

from __future__ import annotations

import socket
from typing import Annotated

import msgspec

from schemas.streams import DEFAULT_PARTITIONS


class ReplicatorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats_url: str = "nats://127.0.0.1:4222"
    instance: str = msgspec.field(default_factory=socket.gethostname)
    partitions: Annotated[int, msgspec.Meta(ge=1, le=1024)] = DEFAULT_PARTITIONS
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """How long a master event may stay unacknowledged before another instance takes it over."""
    metrics_host: str = "0.0.0.0"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = 9464
    memory_storage: bool = False
    """Keep streams in memory (benchmarks, throwaway demos); production uses file storage."""
    batch_by_connector: bool = False
    """Publish one ``FollowerOrderBatch`` per connector and master event instead of one
    message per follower order (accounts whose state names no connector still get single
    orders). Connectors consume both subjects from the same stream, in stream order."""
    lag_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
