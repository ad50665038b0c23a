"""Child processes the embedded modes start: the replicator in its own process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from schemas.streams import MASTER_EVENTS_STREAM, replicator_consumer


def spawn_replicator(
    nats_url: str,
    *,
    instance: str = "local",
    metrics_port: int = -1,
    partitions: int | None = None,
    log_level: str = "warning",
    quiet: bool = True,
    batch_by_connector: bool = False,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``tradecopy replicator run`` with this interpreter (works without PATH).

    ``env`` (default: ours) carries its NATS credentials (``TRADECOPY_NATS_SEED`` …): a seed
    never goes on the command line, where any local user could read it."""
    # -P: the installed package, never a source tree that happens to be the working directory
    # (whose planner would be the uncompiled one).
    args = [sys.executable, "-P", "-m", "engine.cli", "replicator", "run", "--nats-url", nats_url,
            "--instance", instance, "--metrics-port", str(metrics_port),
            "--log-level", log_level]  # fmt: skip
    if partitions is not None:
        args += ["--partitions", str(partitions)]
    if batch_by_connector:
        args.append("--batch-by-connector")
    return subprocess.Popen(
        args,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
    )


async def wait_for_replicator(js: Any, timeout: float = 30.0) -> None:
    """Until a replicator consumes: its partition consumers exist once it has started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.consumer_info(MASTER_EVENTS_STREAM, replicator_consumer(0))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replicator consuming within {timeout:g} s") from None
            await asyncio.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
