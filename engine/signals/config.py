"""The strategy worker's configuration: which versions run on which candles, and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from engine.signals.candles import NEW_YORK_CLOSE, ServerDay
from engine.signals.errors import StrategyVersionError
from engine.signals.sandbox import SandboxLimits
from engine.signals.versions import verify
from schemas.signals import StrategyDeployment as StrategyDeployment  # a wire type (the KV's)
from schemas.streams import SIGNALS_DUPLICATE_WINDOW_S

_Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Seconds = Annotated[float, msgspec.Meta(gt=0.0, le=3_600.0)]


class SignalWorkerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    worker_id: _Token
    """Names this worker in its claims and in what it publishes; unique per process."""
    nats_url: str = ""
    """Empty: the command line's ``--nats-url`` or ``$TRADECOPY_NATS_URL`` (never a guess)."""
    deployments: list[StrategyDeployment] = []
    """Deployments that always run; the deployments bucket (``tc_signal_deployments``) adds
    more at run time, so a worker may start with none."""
    limits: SandboxLimits = SandboxLimits()
    lease_margin_s: _Seconds = 5.0
    """A claim's lease is the run's wall-clock limit plus this: start-up, publishing and the
    clock difference between workers. A live worker's claim is never taken over."""
    close_grace_s: Annotated[float, msgspec.Meta(ge=0.0, le=60.0)] = 2.0
    """A quiet market's candle closes this long after its end (quotes still in flight)."""
    poll_s: _Seconds = 0.5
    """How often a worker waiting on another's claim looks again."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    """Takeovers after which a candle is recorded as failed without running again: a
    strategy that takes its workers down with it does not take down every worker in turn."""
    max_concurrent_runs: Annotated[int, msgspec.Meta(ge=1, le=1_024)] = 2
    """Sandboxes at once (each is an interpreter): about the worker's CPU cores."""
    publish_timeout_s: _Seconds = 5.0
    server_day: ServerDay = NEW_YORK_CLOSE
    memory_storage: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] | None = None
    """``GET /metrics`` and ``GET /healthz`` on this port; none: not served."""

    @property
    def lease_s(self) -> float:
        return self.limits.wall_s + self.lease_margin_s

    def __post_init__(self) -> None:
        if self.lease_s * self.max_attempts >= SIGNALS_DUPLICATE_WINDOW_S:
            raise ValueError(
                f"lease ({self.lease_s:g}s) x attempts ({self.max_attempts}) must stay inside the "
                f"signals stream's duplicate window ({SIGNALS_DUPLICATE_WINDOW_S:g}s)"
            )
        seen = set()
        for deployment in self.deployments:
            run = (deployment.version.version_id, deployment.symbol, deployment.timeframe)
            if run in seen:
                raise ValueError(f"deployed twice: {run}")
            seen.add(run)
            try:
                verify(deployment.version)
            except StrategyVersionError as exc:
                raise ValueError(str(exc)) from None


def load_config(path: str | Path) -> SignalWorkerConfig:
    """A worker configuration from a JSON file (JSON, not TOML: a version's parameters may be
    null, and TOML has no null)."""
    return msgspec.json.decode(Path(path).read_bytes(), type=SignalWorkerConfig)
