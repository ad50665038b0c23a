"""Create or update tradecopy's streams and KV buckets (idempotent; every service calls it).

Replicas: every stream and bucket is created with the same replica count, ``replicas`` or else
``$TRADECOPY_NATS_REPLICAS`` (default 1: a single server). A cluster deploy asks for 3, so an
acknowledged message is on a quorum of servers. An explicit ``replicas`` also changes existing
streams and buckets to it (the admin's bootstrap); a service that leaves it out never does.
"""

from __future__ import annotations

import dataclasses
import os

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from engine.core.errors import TradecopyError
from schemas.streams import DEFAULT_PARTITIONS, KV_BUCKETS, KV_MAX_AGE_S, all_streams

log = structlog.get_logger("tradecopy.jetstream")

ENV_REPLICAS = "TRADECOPY_NATS_REPLICAS"
MAX_REPLICAS = 5  # JetStream's limit


def default_replicas() -> int:
    """``$TRADECOPY_NATS_REPLICAS`` or 1."""
    raw = os.environ.get(ENV_REPLICAS, "").strip()
    if not raw:
        return 1
    try:
        return check_replicas(int(raw))
    except ValueError:
        raise TradecopyError(
            f"${ENV_REPLICAS}={raw!r}: a number from 1 to {MAX_REPLICAS}"
        ) from None


def check_replicas(replicas: int) -> int:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise TradecopyError(f"replicas {replicas}: from 1 to {MAX_REPLICAS}")
    return replicas


async def ensure_streams(
    js: JetStreamContext,
    partitions: int | None = DEFAULT_PARTITIONS,
    storage: StorageType = StorageType.FILE,
    replicas: int | None = None,
) -> None:
    """Create missing streams. ``partitions=None``: whatever the master-event stream already
    has is fine (connectors); a number must match an existing stream (the replicator).
    ``replicas`` (see the module): created with it, and existing streams changed to it."""
    count = default_replicas() if replicas is None else check_replicas(replicas)
    for config in all_streams(partitions or DEFAULT_PARTITIONS, storage):
        config = dataclasses.replace(config, num_replicas=count)
        try:
            info = await js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await _create(js, config)
            continue
        if partitions is not None:
            existing = info.config.subject_transform
            wanted = config.subject_transform
            if (existing and existing.dest) != (wanted and wanted.dest):
                # Changing the partition count re-hashes masters: refuse rather than reorder.
                raise RuntimeError(
                    f"stream {config.name} is partitioned as {existing and existing.dest!r}, "
                    f"configuration asks for {wanted and wanted.dest!r}; drain it before changing"
                )
        if replicas is not None:
            await _set_replicas(js, info.config, replicas)


async def ensure_buckets(
    js: JetStreamContext, storage: StorageType = StorageType.FILE, replicas: int | None = None
) -> dict[str, KeyValue]:
    """Open the contract's buckets, creating missing ones (``replicas``: as for streams).

    A bucket whose keys expire (``KV_MAX_AGE_S``) and that exists with another age limit (made
    before the limit was part of the contract) is updated to it; a user that may not update
    streams leaves it as it is, with a warning, until the admin's bootstrap does it."""
    count = default_replicas() if replicas is None else check_replicas(replicas)
    buckets: dict[str, KeyValue] = {}
    for name, history in KV_BUCKETS.items():
        max_age = KV_MAX_AGE_S.get(name, 0.0)
        try:
            buckets[name] = await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            try:
                buckets[name] = await js.create_key_value(
                    KeyValueConfig(
                        bucket=name,
                        history=history,
                        storage=storage,
                        replicas=count,
                        ttl=max_age or None,
                    )
                )
            except nats.js.errors.APIError as exc:
                raise _replicas_refused(f"bucket {name}", count, exc) from None
            except TimeoutError:
                raise _no_answer(f"bucket {name}") from None
            continue
        if max_age:
            await _set_max_age(js, name, max_age)
        if replicas is not None:
            info = await js.stream_info(f"KV_{name}")
            await _set_replicas(js, info.config, replicas)
    return buckets


async def _set_max_age(js: JetStreamContext, bucket: str, max_age: float) -> None:
    info = await js.stream_info(f"KV_{bucket}")
    current = info.config.max_age or 0.0
    if abs(current - max_age) < 1e-3:
        return
    # JetStream refuses a duplicate window longer than the age limit.
    window = min(info.config.duplicate_window or max_age, max_age)
    try:
        await js.update_stream(
            dataclasses.replace(info.config, max_age=max_age, duplicate_window=window)
        )
    except (nats.js.errors.APIError, TimeoutError) as exc:
        # A secured server does not answer a user who may not update streams.
        log.warning(
            "bucket_max_age_not_updated",
            bucket=bucket,
            max_age_s=current,
            wanted_s=max_age,
            error=repr(exc),
            fix="run `tradecopy nats bootstrap` as the admin",
        )
        return
    log.info("bucket_max_age_updated", bucket=bucket, max_age_s=max_age, was_s=current)


async def _create(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.APIError as exc:
        raise _replicas_refused(f"stream {config.name}", config.num_replicas or 1, exc) from None
    except TimeoutError:
        raise _no_answer(f"stream {config.name}") from None


def _no_answer(what: str) -> Exception:
    # A secured server drops a request its user may not make: no answer, only a timeout.
    return TradecopyError(
        f"creating {what}: NATS did not answer; only the admin user may create streams and "
        f"buckets (run `tradecopy nats bootstrap` with the admin's credentials first)"
    )


async def _set_replicas(js: JetStreamContext, current: StreamConfig, replicas: int) -> None:
    if (current.num_replicas or 1) == replicas:
        return
    try:
        await js.update_stream(dataclasses.replace(current, num_replicas=replicas))
    except nats.js.errors.APIError as exc:
        raise _replicas_refused(f"stream {current.name}", replicas, exc) from None


def _replicas_refused(what: str, replicas: int, exc: Exception) -> Exception:
    if replicas > 1:
        return TradecopyError(
            f"{what} with {replicas} replicas refused by NATS ({exc}); more than one replica "
            f"needs a JetStream cluster of at least {replicas} servers"
        )
    return exc


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
