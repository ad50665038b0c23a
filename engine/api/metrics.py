"""Prometheus metrics of the API."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "tradecopy_api_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "tradecopy_api_request_seconds",
    "Time from a request's arrival to its answer",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
AUTH_FAILURES = Counter(
    "tradecopy_api_auth_failures_total", "Refused logins, refreshes and keys", ["reason"]
)
RATE_LIMITED = Counter(
    "tradecopy_api_rate_limited_total", "Requests refused by an auth rate limit", ["route"]
)
REFRESH_REUSE = Counter(
    "tradecopy_api_refresh_reuse_total",
    "Refresh tokens presented again after use: their whole family is revoked",
)
