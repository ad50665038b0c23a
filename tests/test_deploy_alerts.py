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

import connectors.journal  # noqa: F401 - registers the order-memory metrics
import engine.replicator.metrics  # noqa: F401 - registers the replicator metrics
from connectors.contract import (
    ACCOUNT_NOT_SERVED,
    FOREIGN_BATCH,
    SUBJECT_MISMATCH,
    ConnectorRuntime,
)
from engine.replicator.config import ReplicatorConfig
from schemas.rejections import RejectionReason

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "tradecopy.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tradecopy.json"

STALL_ALERTS = {
    "TradecopyReplicatorPartitionStalled": "tradecopy_replicator_partition_stall_seconds",
    "TradecopyConnectorStalled": "tradecopy_connector_stall_seconds",
}
REFUSAL_ALERTS = {
    "TradecopyMasterEventsRejected": "tradecopy_replicator_rejections_total",
    "TradecopyConnectorRefusedOrders": "tradecopy_connector_refused_orders_total",
}
#: Every reason a refusal counter may carry: each must have a series before its first use.
REASONS = {
    "tradecopy_replicator_rejections_total": {r.value for r in RejectionReason},
    "tradecopy_connector_refused_orders_total": {
        SUBJECT_MISMATCH, FOREIGN_BATCH, ACCOUNT_NOT_SERVED,
    },
}  # fmt: skip


def _alerts() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {r["alert"]: r for g in data["groups"] for r in g["rules"] if "alert" in r}


def _exported() -> set[str]:
    """Every series name the code registers (counters with their ``_total``)."""
    return set(prometheus_client.REGISTRY._names_to_collectors)


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
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used |= _names(target["expr"])
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
    healthz_limit = (
        ReplicatorConfig().stall_after_s
        if "replicator" in metric
        else inspect.signature(ConnectorRuntime).parameters["stall_after_s"].default
    )
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
