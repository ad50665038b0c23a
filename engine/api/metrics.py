"""Prometheus metrics of the API."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ACCOUNT_POOL_FULL = Counter(
    "tradecopy_api_account_pool_full_total",
    "Accounts refused because the provider's operator plan's account pool was full",
)
REFRESH_REUSE = Counter(
    "tradecopy_api_refresh_reuse_total",
    "Refresh tokens presented again after use: their whole family is revoked",
)
EMAILS_SENT = Counter(
    "tradecopy_api_emails_sent_total", "Emails of the outbox accepted by the SMTP server", ["kind"]
)
EMAILS_FAILED = Counter(
    "tradecopy_api_emails_failed_total",
    "Failed attempts to send an email of the outbox (outcome: retry, or gave_up for good)",
    ["kind", "outcome"],
)
STREAMS_OPEN = Gauge("tradecopy_api_streams_open", "Live (SSE) streams open now")
STREAM_EVENTS = Counter(
    "tradecopy_api_stream_events_total", "Events sent on live streams", ["event"]
)
STREAMS_DROPPED = Counter(
    "tradecopy_api_streams_dropped_total",
    "Live streams closed by the server because the client fell behind",
    ["reason"],
)
MANUAL_ORDERS = Counter(
    "tradecopy_api_manual_orders_total", "Manual orders published to a connector", ["type"]
)
