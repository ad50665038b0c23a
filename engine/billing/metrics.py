"""Billing's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CHARGES_ISSUED = Counter(
    "tradecopy_billing_charges_issued_total",
    "Charges stored (one per idempotency key)",
    ["module"],
)
CHARGE_SENDS = Counter(
    "tradecopy_billing_charge_sends_total",
    "Off-session PaymentIntents sent to Stripe, by outcome",
    ["outcome"],
)
EVENTS_RECEIVED = Counter(
    "tradecopy_billing_stripe_events_received_total",
    "Stripe events received (webhook or recovery listing), duplicates included",
    ["source", "duplicate"],
)
EVENTS_APPLIED = Counter(
    "tradecopy_billing_stripe_events_applied_total",
    "Stored Stripe events applied to charges, by result",
    ["result"],
)
WEBHOOKS_REFUSED = Counter(
    "tradecopy_billing_webhooks_refused_total", "Webhook deliveries refused", ["reason"]
)
JOB_RUNS = Counter("tradecopy_billing_job_runs_total", "Billing job runs", ["job", "result"])
JOB_SECONDS = Histogram("tradecopy_billing_job_seconds", "Billing job duration", ["job"])
ENFORCEMENT_WRITES = Counter(
    "tradecopy_billing_enforcement_writes_total",
    "Link writes of enforcement (stop: enabled=false, resume: enabled=true), by result",
    ["action", "result"],
)
EMAILS = Counter(
    "tradecopy_billing_emails_total", "Billing emails handed to SMTP, by result", ["result"]
)
LEADER = Gauge("tradecopy_billing_scheduler_leader", "1 while this instance leads the jobs")
