"""Replicator configuration."""

from __future__ import annotations

import socket
import zlib
from typing import Annotated, Literal

import msgspec

from schemas.streams import DEFAULT_PARTITIONS


class ReplicatorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats_url: str = "nats://127.0.0.1:4222"
    instance: str = msgspec.field(default_factory=socket.gethostname)
    partitions: Annotated[int, msgspec.Meta(ge=1, le=1024)] = DEFAULT_PARTITIONS
    ack_wait_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """How long a master event may stay unacknowledged before another instance takes it over."""
    metrics_host: str = "127.0.0.1"
    """Where /metrics and /healthz listen: localhost unless the operator opens them up."""
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = 9464
    memory_storage: bool = False
    """Keep streams in memory (benchmarks, throwaway demos); production uses file storage."""
    batch_by_connector: bool = False
    """Publish one ``FollowerOrderBatch`` per connector and master event instead of one
    message per follower order (accounts whose state names no connector still get single
    orders). Connectors consume both subjects from the same stream, in stream order."""
    lag_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    publish_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """How long one attempt waits for JetStream to confirm it stored a fan-out's messages
    (and for a link-state compare-and-set); no wait on NATS is ever longer."""
    publish_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    """Attempts per fan-out: the unconfirmed messages are sent again with the same
    ``Nats-Msg-Id`` (JetStream drops copies), then the event goes back for redelivery."""
    max_deliveries: Annotated[int, msgspec.Meta(ge=1)] = 10
    """Deliveries of one master event whose fan-out failed on NATS before it is given up
    with a ``publish_failed`` rejection, so no event holds its partition for good."""
    redelivery_delay_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    """First delay before a failed fan-out is delivered again; doubles per delivery, ≤ 10 s."""
    clock_skew_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """How far in the future an event's timestamp may be; an event dated later is judged by
    its arrival time (signal age, trading hours), never by the time it claims."""
    shard: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Which link shard this instance plans (``0 … shards-1``)."""
    shards: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    """Link shards: one master's links split by ``crc32(link_id) % shards``, each shard with
    its own durable consumer per partition, so one master's fan-out is planned by several
    processes in parallel. Every follower's link is in exactly one shard, so its orders keep
    the master's event order. Run at least one instance per shard."""
    planner: Literal["fan_out", "reference"] = "fan_out"
    """``fan_out``: every link of an event in one pass over links compiled per master symbol
    (``fanout.py``); ``reference``: each link through ``rules.plan_event``. Same plans."""
    stall_after_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """A partition with master events pending whose acknowledgements have not advanced for
    this long is stalled: ``/healthz`` answers 503. Keep it above ``publish_timeout_s ×
    publish_attempts``, the longest a healthy fan-out can take."""

    def __post_init__(self) -> None:
        if self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} does not exist among {self.shards} shards")


def link_shard(link_id: str, shards: int) -> int:
    """The link shard of ``link_id``: a stable hash, the same in every process and release."""
    return zlib.crc32(link_id.encode()) % shards


def owns_link(config: ReplicatorConfig, link_id: str) -> bool:
    return config.shards == 1 or link_shard(link_id, config.shards) == config.shard
