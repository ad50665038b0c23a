"""Create or update tradecopy's streams and KV buckets (idempotent; every service calls it)."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from schemas.streams import DEFAULT_PARTITIONS, KV_BUCKETS, all_streams


async def ensure_streams(
    js: JetStreamContext,
    partitions: int | None = DEFAULT_PARTITIONS,
    storage: StorageType = StorageType.FILE,
) -> None:
    """Create missing streams. ``partitions=None``: whatever the master-event stream already
    has is fine (connectors); a number must match an existing stream (the replicator)."""
    for config in all_streams(partitions or DEFAULT_PARTITIONS, storage):
        try:
            info = await js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            continue
        if partitions is None:
            continue
        existing = info.config.subject_transform
        wanted = config.subject_transform
        if (existing and existing.dest) != (wanted and wanted.dest):
            # Changing the partition count re-hashes masters: refuse rather than reorder.
            raise RuntimeError(
                f"stream {config.name} is partitioned as {existing and existing.dest!r}, "
                f"configuration asks for {wanted and wanted.dest!r}; drain it before changing"
            )


async def ensure_buckets(
    js: JetStreamContext, storage: StorageType = StorageType.FILE
) -> dict[str, KeyValue]:
    buckets: dict[str, KeyValue] = {}
    for name, history in KV_BUCKETS.items():
        try:
            buckets[name] = await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            buckets[name] = await js.create_key_value(
                KeyValueConfig(bucket=name, history=history, storage=storage)
            )
    return buckets
