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


async def live_keys(js: JetStreamContext, kv: KeyValue, bucket: str) -> list[str]:
    """Every key with a live value, read from the bucket's stream state.

    nats-py's ``KeyValue.keys()`` builds its list from a watcher and can return before the
    first entry arrives; listing the stream's subjects is deterministic. Deleted or purged
    keys still have a subject (their marker), so each is checked with a get.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    keys = []
    for subject in sorted(info.state.subjects or {}):
        key = subject[len(prefix) :]
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue
        if entry.value is not None:
            keys.append(key)
    return keys
