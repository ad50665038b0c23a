"""Token buckets for the auth endpoints, in this process.

Each API instance limits on its own: with N instances a client gets up to N times the rate,
which still bounds password guessing (Argon2id makes each guess cost ~50 ms of a core anyway).
A shared limiter (in NATS KV or PostgreSQL) can replace this without changing callers.
"""

from __future__ import annotations

import time
from collections import OrderedDict

_MAX_KEYS = 100_000


class TokenBuckets:
    """``take(key)`` spends one token of ``key``'s bucket; refilled at ``rate_per_s`` up to
    ``burst``. Least recently used keys are forgotten past ``_MAX_KEYS`` (a full bucket)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when allowed, else the seconds until a token is back."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > _MAX_KEYS:
            self._buckets.popitem(last=False)
        return wait
