"""The deployments bucket (``tc_signal_deployments``) as the worker and the drive follow it:
each valid value by key, kept current by a watch, with a callback after every change."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from nats.js.kv import KV_DEL, KV_PURGE

from engine.signals import metrics
from engine.signals.errors import StrategyVersionError
from engine.signals.versions import verify
from schemas import subjects
from schemas.signals import StrategyDeployment, deployment_decoder

log = structlog.get_logger("tradecopy.signals")


def bucket_deployment(key: str, value: bytes) -> StrategyDeployment:
    """The deployment a bucket entry holds; raises why it cannot run (it does not decode, sits
    under another run's key, or its version fails ``verify``)."""
    deployment = deployment_decoder.decode(value)
    expected = subjects.deployment_key(
        deployment.version.version_id, deployment.symbol, deployment.timeframe
    )
    if key != expected:
        raise ValueError(f"a deployment of {expected} stored under another key")
    verify(deployment.version)
    return deployment


class DeploymentsWatch:
    """The bucket's valid deployments by key (``current``).

    ``start`` returns once the bucket's current values are loaded; after that every put,
    delete or purge updates ``current`` and awaits ``on_change``. A value that cannot run is
    counted (``tradecopy_signals_deployments_invalid_total``), logged, and replaces what its
    key held before: a deployment its owner tried to change is not left running as it was.
    """

    def __init__(
        self, kv: Any, on_change: Callable[[], Awaitable[None]], *, component: str
    ) -> None:
        self.kv = kv
        self.on_change = on_change
        self.component = component
        self.current: dict[str, StrategyDeployment] = {}
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watcher = await self.kv.watchall()
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(loaded))
        await loaded

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        initial = True
        async for entry in self._watcher:
            if entry is not None:
                self._take(entry)
                if initial and entry.delta != 0:
                    continue  # more of the bucket's current values to come
            elif not initial:
                continue  # an end-of-values marker after the last value: nothing new
            # One call per change, and one for the whole initial load, from this one task:
            # the callbacks never overlap.
            await self._changed()
            if initial:
                initial = False
                loaded.set_result(None)

    def _take(self, entry: Any) -> None:
        bound = log.bind(component=self.component, key=entry.key)
        try:
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                if self.current.pop(entry.key, None) is not None:
                    bound.info("signal_deployment_removed")
            else:
                self.current[entry.key] = bucket_deployment(entry.key, entry.value)
                bound.info("signal_deployment_loaded")
        except (msgspec.DecodeError, StrategyVersionError, ValueError) as exc:
            metrics.DEPLOYMENTS_INVALID.inc()
            self.current.pop(entry.key, None)
            bound.error("signal_deployment_invalid", error=str(exc))
        except Exception as exc:  # a bug here must not end the watch for every deployment
            metrics.DEPLOYMENTS_INVALID.inc()
            self.current.pop(entry.key, None)
            bound.exception("signal_deployment_invalid", error=repr(exc))

    async def _changed(self) -> None:
        try:
            await self.on_change()
        except Exception as exc:  # NATS trouble: the next change applies again
            log.error("signal_deployments_apply_failed", component=self.component, error=repr(exc))
