"""Child processes the embedded modes start: the replicator in its own process."""

from __future__ import annotations

import os
import subprocess
import sys


def spawn_replicator(
    nats_url: str,
    *,
    instance: str = "local",
    metrics_port: int = -1,
    partitions: int | None = None,
    log_level: str = "warning",
    quiet: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``tradecopy replicator run`` with this interpreter (works without PATH)."""
    args = [sys.executable, "-m", "engine.cli", "replicator", "run", "--nats-url", nats_url,
            "--instance", instance, "--metrics-port", str(metrics_port),
            "--log-level", log_level]  # fmt: skip
    if partitions is not None:
        args += ["--partitions", str(partitions)]
    return subprocess.Popen(
        args,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet else None,
    )


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
