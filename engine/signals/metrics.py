"""Prometheus metrics of the strategy workers."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS = Counter(
    "tradecopy_signals_strategy_runs_total",
    "Strategy runs finished by this worker, by outcome (a signal's action or a failure's kind)",
    ["outcome"],
)
RUN_FAILURES = Counter(
    "tradecopy_signals_strategy_failures_total",
    "Strategy runs that failed, per strategy version and kind",
    ["version", "kind"],
)
RUN_SECONDS = Histogram(
    "tradecopy_signals_strategy_run_seconds",
    "Wall-clock time of one sandboxed strategy run, interpreter start-up included",
    buckets=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
CANDLES_CLOSED = Counter(
    "tradecopy_signals_candles_closed_total", "Closed candles built from quotes", ["timeframe"]
)
CANDLES_SKIPPED = Counter(
    "tradecopy_signals_candles_skipped_total",
    "Candle runs this worker did not execute because another worker had finished them",
)
CLAIM_TAKEOVERS = Counter(
    "tradecopy_signals_claim_takeovers_total",
    "Candle runs taken over from a worker whose lease ran out",
)
CLAIMS_LOST = Counter(
    "tradecopy_signals_claims_lost_total",
    "Runs this worker finished after another worker had taken its claim over",
)
PUBLISH_FAILURES = Counter(
    "tradecopy_signals_publish_failures_total",
    "Signals or failure records JetStream did not confirm; the claim is left to expire",
)
DEPLOYMENTS = Gauge(
    "tradecopy_signals_deployments",
    "Deployments this worker runs now: its configuration's and the deployments bucket's",
)
DEPLOYMENTS_INVALID = Counter(
    "tradecopy_signals_deployments_invalid_total",
    "Values of the deployments bucket that do not decode, verify or match their key (skipped)",
)
