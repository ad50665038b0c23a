"""The liveness and refusal alerts (deploy/prometheus/rules/tradecopy.rules.yml) and their
dashboard panels: every metric they use is one the code exports, their thresholds match the
services' own /healthz limits, and ``promtool test rules`` shows each fires when it should
and stays quiet when it should not.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

import connectors.journal  # registers the order-memory metrics
import connectors.mt5.connector  # noqa: F401 - registers the MT5 terminal metrics
import engine.ledger.metrics  # registers the ledger metrics
import engine.replicator.metrics  # noqa: F401 - registers the replicator metrics
from connectors.bridge.connector import BAD_FRAME_REASONS
from connectors.contract import (
    ACCOUNT_NOT_SERVED,
    FOREIGN_BATCH,
    SUBJECT_MISMATCH,
    ConnectorRuntime,
)
from engine.ledger.config import LedgerConfig
from engine.ledger.records import DROP_REASONS, Kind
from engine.replicator.config import ReplicatorConfig
from schemas.rejections import RejectionReason

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "tradecopy.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tradecopy.json"

STALL_ALERTS = {
    "TradecopyReplicatorPartitionStalled": "tradecopy_replicator_partition_stall_seconds",
    "TradecopyConnectorStalled": "tradecopy_connector_stall_seconds",
    "TradecopyLedgerConsumerStalled": "tradecopy_ledger_stall_seconds",
}
REFUSAL_ALERTS = {
    "TradecopyMasterEventsRejected": "tradecopy_replicator_rejections_total",
    "TradecopyConnectorRefusedOrders": "tradecopy_connector_refused_orders_total",
    "TradecopyBridgeBadFrames": "tradecopy_bridge_bad_frames_total",
}
#: Every reason a refusal counter may carry: each must have a series before its first use.
REASONS = {
    "tradecopy_replicator_rejections_total": {r.value for r in RejectionReason},
    "tradecopy_connector_refused_orders_total": {
        SUBJECT_MISMATCH, FOREIGN_BATCH, ACCOUNT_NOT_SERVED,
    },
    "tradecopy_bridge_bad_frames_total": set(BAD_FRAME_REASONS),
}  # fmt: skip


def _alerts() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {r["alert"]: r for g in data["groups"] for r in g["rules"] if "alert" in r}


def _exported() -> set[str]:
    """Every series name the code registers (counters with their ``_total``), and the
    replicator's per-link series, exposed as text beside the registry."""
    from engine.replicator.metrics import TEXT_SERIES

    return set(prometheus_client.REGISTRY._names_to_collectors) | TEXT_SERIES


def _panel_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


_NAME = re.compile(r"\b(tradecopy_[a-z0-9_]+)")


def _names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def _threshold(expr: str) -> float:
    match = re.search(r">\s*([\d.]+)\s*$", expr.strip())
    assert match, f"no `> threshold` at the end of {expr!r}"
    return float(match.group(1))


def test_every_tradecopy_metric_in_the_rules_and_the_dashboard_is_exported_by_the_code() -> None:
    exported = _exported()
    used = set()
    for alert in _alerts().values():
        used |= _names(alert["expr"])
    for expr in _panel_exprs():
        used |= _names(expr)
    assert used, "no tradecopy metric found: the pattern is wrong"
    assert used <= exported, f"not exported by any module: {sorted(used - exported)}"


@pytest.mark.parametrize(("alert", "metric"), STALL_ALERTS.items())
def test_a_stall_alert_is_critical_and_waits_for_the_healthz_limit(alert: str, metric: str) -> None:
    rule = _alerts()[alert]
    assert _names(rule["expr"]) == {metric}
    assert rule["labels"]["severity"] == "critical"
    assert rule["for"] == "1m"
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The alert never fires before the service itself says it is stalled.
    if "replicator" in metric:
        healthz_limit = ReplicatorConfig().stall_after_s
    elif "ledger" in metric:
        healthz_limit = LedgerConfig().stall_after_s
    else:
        healthz_limit = inspect.signature(ConnectorRuntime).parameters["stall_after_s"].default
    assert _threshold(rule["expr"]) == healthz_limit


@pytest.mark.parametrize(("alert", "metric"), REFUSAL_ALERTS.items())
def test_a_refusal_alert_fires_on_the_first_refusal_by_reason(alert: str, metric: str) -> None:
    rule = _alerts()[alert]
    expr = " ".join(rule["expr"].split())
    assert _names(expr) == {metric}
    assert f"rate({metric}[5m])" in expr
    assert re.search(r"by \([^)]*\breason\b", expr)
    assert _threshold(expr) == 0
    assert rule["labels"]["severity"] in {"warning", "critical"}
    # rate() cannot see a counter's first increment unless its series exists at 0.
    family = prometheus_client.REGISTRY._names_to_collectors[metric]
    samples = [s for m in family.collect() for s in m.samples if s.name == metric]
    assert {s.labels["reason"] for s in samples} == REASONS[metric]


def test_a_ledger_drop_alert_fires_on_the_first_drop_of_any_kind_and_reason() -> None:
    rule = _alerts()["TradecopyLedgerDroppedMessages"]
    metric = "tradecopy_ledger_bad_messages_total"
    expr = " ".join(rule["expr"].split())
    assert _names(expr) == {metric}
    assert f"increase({metric}[10m])" in expr
    assert re.search(r"by \([^)]*\bkind\b[^)]*\breason\b", expr)
    assert _threshold(expr) == 0
    # increase() cannot see a counter's first increment unless its series exists at 0.
    family = prometheus_client.REGISTRY._names_to_collectors[metric]
    samples = {
        (s.labels["kind"], s.labels["reason"])
        for m in family.collect() for s in m.samples if s.name == metric
    }  # fmt: skip
    assert samples >= {(kind.value, reason) for kind in Kind for reason in DROP_REASONS}


def test_the_ledger_lag_alert_holds_the_budget_of_50_ms_at_p99_for_5_minutes() -> None:
    rule = _alerts()["TradecopyLedgerLagHigh"]
    expr = " ".join(rule["expr"].split())
    assert _names(expr) == {"tradecopy_ledger_lag_seconds_bucket"}
    assert "histogram_quantile( 0.99," in expr and _threshold(expr) == 0.05
    assert rule["for"] == "5m"
    # The histogram has a bucket boundary at the budget, so the estimate is not interpolated
    # across it.
    from engine.ledger.metrics import LAG

    assert 0.05 in LAG._upper_bounds


def test_the_dashboard_shows_stalls_by_partition_and_rejections_by_reason() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    grouped = {
        (name, by)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in _names(target["expr"])
        for by in re.findall(r"by \(([^)]*)\)", target["expr"])
    }
    assert ("tradecopy_replicator_partition_stall_seconds", "partition") in grouped
    assert ("tradecopy_replicator_rejections_total", "reason") in grouped


# ---------------------------------------------------------------- promtool rule unit tests


def _annotations(alert: str, labels: dict[str, str], duration: str = "") -> dict[str, str]:
    """The alert's annotations as Prometheus renders them for ``labels`` (and a humanized
    duration for ``$value``): promtool compares them whole."""

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return text.replace("{{ $value | humanizeDuration }}", duration)

    return {k: render(v) for k, v in _alerts()[alert]["annotations"].items()}


def _fires(alert: str, at: str, labels: dict[str, str], duration: str = "") -> dict[str, Any]:
    severity = _alerts()[alert]["labels"]["severity"]
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {
                "exp_labels": {"severity": severity, **labels},
                "exp_annotations": _annotations(alert, labels, duration),
            }
        ],
    }


def _quiet(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


STALL = "tradecopy_replicator_partition_stall_seconds"
CONNECTOR_STALL = "tradecopy_connector_stall_seconds"
REJECTED = "tradecopy_replicator_rejections_total"
REFUSED = "tradecopy_connector_refused_orders_total"
PROMTOOL_TESTS: list[dict[str, Any]] = [
    {  # A partition stuck since t=0: its gauge grows, over the limit for 1m it fires.
        "interval": "15s",
        "input_series": [
            _series(STALL, {"partition": "3", "instance": "r1"}, "0+15x12"),
            _series(STALL, {"partition": "1", "instance": "r1"}, "0x12"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyReplicatorPartitionStalled", "1m"),
            _fires("TradecopyReplicatorPartitionStalled", "3m", {"partition": "3"}, "3m 0s"),
        ],
    },
    {  # Busy but moving (the gauge keeps falling back to 0): never fires.
        "interval": "15s",
        "input_series": [
            _series(STALL, {"partition": "0", "instance": "r1"}, "0 10 20 " * 5),
        ],
        "alert_rule_test": [_quiet("TradecopyReplicatorPartitionStalled", "3m")],
    },
    {  # One rejection is enough; a reason with none stays quiet.
        "interval": "1m",
        "input_series": [
            _series(REJECTED, {"reason": "invalid_price", "instance": "r1"}, "0 0 1 1 1"),
            _series(REJECTED, {"reason": "publish_failed", "instance": "r1"}, "0 0 0 0 0"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyMasterEventsRejected", "1m"),
            _fires("TradecopyMasterEventsRejected", "3m", {"reason": "invalid_price"}),
        ],
    },
    {  # A connector whose orders stopped moving; its master events are fine.
        "interval": "15s",
        "input_series": [
            _series(
                CONNECTOR_STALL, {"connector": "c1", "work": "orders", "instance": "p1"}, "0+15x16"
            ),
            _series(
                CONNECTOR_STALL,
                {"connector": "c1", "work": "master_events", "instance": "p1"},
                "0x16",
            ),
        ],
        "alert_rule_test": [
            _quiet("TradecopyConnectorStalled", "2m"),
            _fires(
                "TradecopyConnectorStalled",
                "4m",
                {"connector": "c1", "work": "orders", "instance": "p1"},
                "4m 0s",
            ),
        ],
    },
    {  # A forged order refused.
        "interval": "1m",
        "input_series": [
            _series(REFUSED, {"reason": "subject_mismatch", "instance": "p1"}, "0 1 1"),
        ],
        "alert_rule_test": [
            _fires(
                "TradecopyConnectorRefusedOrders",
                "2m",
                {"reason": "subject_mismatch", "instance": "p1"},
            ),
        ],
    },
]


LEDGER_LAG = "tradecopy_ledger_lag_seconds_bucket"
LEDGER_BACKLOG = "tradecopy_ledger_consumer_backlog"
LEDGER_MESSAGES = "tradecopy_ledger_messages_total"
LEDGER_DROPS = "tradecopy_ledger_bad_messages_total"
_L1 = {"instance": "l1"}
PROMTOOL_TESTS += [
    {  # Most batches above 50 ms for longer than 5m: fires; not before it has lasted 5m.
        "interval": "15s",
        "input_series": [
            _series(LEDGER_LAG, {**_L1, "kind": "decision", "le": "0.05"}, "0+0x40"),
            _series(LEDGER_LAG, {**_L1, "kind": "decision", "le": "0.1"}, "0+100x40"),
            _series(LEDGER_LAG, {**_L1, "kind": "decision", "le": "+Inf"}, "0+100x40"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyLedgerLagHigh", "4m"),
            # rank 99 of 100, all in (0.05, 0.1]: 0.05 + 0.05 * 99 / 100 s
            _fires("TradecopyLedgerLagHigh", "8m", {}, "99.5ms"),
        ],
    },
    {  # Every batch within the budget: quiet.
        "interval": "15s",
        "input_series": [
            _series(LEDGER_LAG, {**_L1, "kind": "decision", "le": "0.05"}, "0+100x40"),
            _series(LEDGER_LAG, {**_L1, "kind": "decision", "le": "+Inf"}, "0+100x40"),
        ],
        "alert_rule_test": [_quiet("TradecopyLedgerLagHigh", "8m")],
    },
    {  # Orders wait and none is committed: fires; reports wait but are committed: quiet.
        "interval": "1m",
        "input_series": [
            _series(LEDGER_BACKLOG, {**_L1, "kind": "follower_order"}, "500x15"),
            _series(LEDGER_MESSAGES, {**_L1, "kind": "follower_order"}, "100x15"),
            _series(LEDGER_BACKLOG, {**_L1, "kind": "execution_report"}, "500x15"),
            _series(LEDGER_MESSAGES, {**_L1, "kind": "execution_report"}, "0+100x15"),
            _series(LEDGER_BACKLOG, {**_L1, "kind": "decision"}, "0x15"),
            _series(LEDGER_MESSAGES, {**_L1, "kind": "decision"}, "0x15"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyLedgerNotConsuming", "4m"),
            _fires("TradecopyLedgerNotConsuming", "12m", {"kind": "follower_order"}),
        ],
    },
    {  # The first undecodable decision is seen (its series exists at 0 from the start).
        "interval": "1m",
        "input_series": [
            _series(LEDGER_DROPS, {**_L1, "kind": "decision", "reason": "undecodable"},
                    "0 0 1 1"),
            _series(LEDGER_DROPS, {**_L1, "kind": "decision", "reason": "nul_in_text"},
                    "0 0 0 0"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyLedgerDroppedMessages", "1m"),
            _fires("TradecopyLedgerDroppedMessages", "3m",
                   {**_L1, "kind": "decision", "reason": "undecodable"}),
        ],
    },
    {  # A ledger that cannot reach PostgreSQL for a minute; one that can.
        "interval": "15s",
        "input_series": [
            _series("tradecopy_ledger_database_up", _L1, "1 1 0x10"),
            _series("tradecopy_ledger_database_up", {"instance": "l2"}, "1x12"),
        ],
        "alert_rule_test": [
            _fires("TradecopyLedgerDatabaseDown", "2m", _L1),
        ],
    },
    {  # A ledger Prometheus cannot scrape.
        "interval": "15s",
        "input_series": [
            _series("up", {"job": "tradecopy-ledger", "instance": "ledger-1:9465"}, "1 0x10"),
        ],
        "alert_rule_test": [
            _fires("TradecopyLedgerDown", "2m", {"job": "tradecopy-ledger",
                                                 "instance": "ledger-1:9465"}),
        ],
    },
]  # fmt: skip

TERMINAL = "tradecopy_connector_terminal_connected"
CONNECTOR_ORDERS = "tradecopy_connector_orders_total"
SEQUENCE_GAPS = "tradecopy_bridge_sequence_gaps_total"
BAD_FRAMES = "tradecopy_bridge_bad_frames_total"
_NEVER = {"connector": "b1", "account": "never", "instance": "c1"}
_THERE = {"connector": "b1", "account": "there", "instance": "c1"}
PROMTOOL_TESTS += [
    {  # A configured terminal that never connected (0 from the start) and one that is there.
        "interval": "30s",
        "input_series": [
            _series(TERMINAL, _NEVER, "0x10"),
            _series(TERMINAL, _THERE, "1x10"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyTerminalDisconnected", "1m"),
            _fires("TradecopyTerminalDisconnected", "3m", _NEVER),
        ],
    },
    {  # The first rejected order is seen (its series exists at 0); a filled one is not news.
        "interval": "1m",
        "input_series": [
            _series(CONNECTOR_ORDERS, {"connector": "b1", "outcome": "rejected",
                                       "instance": "c1"}, "0 0 1 1"),
            _series(CONNECTOR_ORDERS, {"connector": "b1", "outcome": "filled",
                                       "instance": "c1"}, "0 5 10 15"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyFollowerOrdersRejected", "1m"),
            _fires("TradecopyFollowerOrdersRejected", "3m",
                   {"connector": "b1", "instance": "c1"}),
        ],
    },
    {  # One malformed frame; the other reasons stay quiet.
        "interval": "1m",
        "input_series": [
            _series(BAD_FRAMES, {"reason": "malformed", "instance": "c1"}, "0 0 1 1"),
            _series(BAD_FRAMES, {"reason": "denied", "instance": "c1"}, "0 0 0 0"),
        ],
        "alert_rule_test": [
            _quiet("TradecopyBridgeBadFrames", "1m"),
            _fires("TradecopyBridgeBadFrames", "3m", {"reason": "malformed", "instance": "c1"}),
        ],
    },
]  # fmt: skip


def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not installed: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian's prometheus package)")
    tests = tmp_path / "alerts.test.yml"
    suite = {"rule_files": [str(RULES)], "evaluation_interval": "15s", "tests": PROMTOOL_TESTS}
    tests.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


#: What each kind of trouble an operator asked to see must have: an alert and a panel.
COVERED = {
    "terminal disconnected or never connected": "tradecopy_connector_terminal_connected",
    "bad frames": "tradecopy_bridge_bad_frames_total",
    "sequence gaps": "tradecopy_bridge_sequence_gaps_total",
    "order execution latency": "tradecopy_connector_order_seconds_bucket",
    "stalled replicator consumers": "tradecopy_replicator_partition_stall_seconds",
    "stalled connector consumers": "tradecopy_connector_stall_seconds",
    "master events rejected": "tradecopy_replicator_rejections_total",
    "orders rejected": "tradecopy_connector_orders_total",
    "connector without NATS": "tradecopy_connector_nats_connected",
    "ledger lag over its budget": "tradecopy_ledger_lag_seconds_bucket",
    "ledger not consuming": "tradecopy_ledger_consumer_backlog",
    "stalled ledger consumers": "tradecopy_ledger_stall_seconds",
    "messages the ledger drops": "tradecopy_ledger_bad_messages_total",
    "ledger without PostgreSQL": "tradecopy_ledger_database_up",
}


@pytest.mark.parametrize(("trouble", "metric"), COVERED.items())
def test_every_kind_of_trouble_has_an_alert_and_a_panel(trouble: str, metric: str) -> None:
    alerts = [a for a in _alerts().values() if metric in _names(a["expr"])]
    assert alerts, f"no alert on {trouble} ({metric})"
    assert any(metric in _names(expr) for expr in _panel_exprs()), f"no panel on {trouble}"


def test_a_ledger_that_cannot_be_scraped_is_alerted_on() -> None:
    rule = _alerts()["TradecopyLedgerDown"]
    assert " ".join(rule["expr"].split()) == 'up{job="tradecopy-ledger"} == 0'
    assert rule["labels"]["severity"] == "critical"


def test_a_connector_that_cannot_be_scraped_is_alerted_on() -> None:
    rule = _alerts()["TradecopyConnectorDown"]
    assert " ".join(rule["expr"].split()) == 'up{job="tradecopy-connector"} == 0'
    assert rule["labels"]["severity"] == "critical"
