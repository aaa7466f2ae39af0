"""deploy/: the Grafana dashboard and the Prometheus alerting rules parse, and every PromQL
expression in them names only metrics that GET /metrics exports (`gateway.metrics`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-alerts.yml"

COUNTERS = {
    "gateway_events_accepted_total",
    "gateway_attempts_total",
    "gateway_alerts_sent_total",
    "gateway_inbound_refused_total",
    "gateway_proxy_answers_total",
}
GAUGES = {
    "gateway_events",
    "gateway_oldest_pending_age_seconds",
    "gateway_integration_paused",
    "gateway_consecutive_failures",
    "gateway_workers_live",
    "gateway_max_in_flight",
    "gateway_rate_limit_per_second",
    "gateway_integration_waiting_seconds",
}
HISTOGRAMS = {
    "gateway_attempt_duration_seconds",
    "gateway_schedule_wait_seconds",
    "gateway_proxy_duration_seconds",
}
EXPORTED = COUNTERS | GAUGES | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
METRIC = re.compile(r"\bgateway_[a-z_]+\b")


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def panel_exprs(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        yield from panel_exprs(panel.get("panels", []))  # panels folded inside a row
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def load_rules() -> list[dict[str, Any]]:
    document: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    query = variables["integration"]["definition"]
    assert query == "label_values(gateway_events_accepted_total, integration)"

    exprs = list(panel_exprs(dashboard["panels"]))
    exprs.append(("$integration", query))
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no gateway metric in {expr!r}"
        assert names <= EXPORTED, f"{title}: unknown metrics {sorted(names - EXPORTED)}"
        used |= names
    titled = [title for title, _ in exprs]
    assert len(dashboard["panels"]) >= 11 and len(set(titled)) >= 11
    # every exported family has a panel (the histogram through its buckets)
    assert (COUNTERS | GAUGES | {h + "_bucket" for h in HISTOGRAMS}) <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_rules_use_only_exported_metrics() -> None:
    rules = load_rules()
    assert {r["alert"] for r in rules} == {
        "GatewayIntegrationPaused",
        "GatewayOldestPendingTooOld",
        "GatewayFailureRatioHigh",
        "GatewayNoLiveWorkers",
    }
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no gateway metric"
        assert names <= EXPORTED, f"{rule['alert']}: unknown metrics {sorted(names - EXPORTED)}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "by (integration)" in rule["expr"]:  # per-integration alerts say which one
            assert "$labels.integration" in rule["annotations"]["summary"]


def test_promtool_accepts_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout
