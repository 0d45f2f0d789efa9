"""The chart's Grafana dashboard and alert rules ask only for series the balancer exports.

Both live as plain files under charts/paddler/files/ (the chart wraps them in a ConfigMap
and a PrometheusRule), so their PromQL can be read here: every metric name must be one
that balancer/paddler_balancer/metrics.py renders, and every label they filter or group
by must be one of its labels or one Prometheus adds to a scraped pod.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from paddler_balancer.metrics import AgentGauges, GroupGauges, Metrics

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "charts" / "paddler" / "files"
DASHBOARD = FILES / "dashboards" / "paddler.json"
RULES = FILES / "prometheus-rules.yaml"

TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
"""Labels Prometheus puts on every series of a scraped pod (the operator's PodMonitors)."""
NOT_THE_BALANCERS = {"up"}
"""Prometheus' own per-target series: the one way to see a balancer that exports nothing."""
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$model_group": ".*"}


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, as a balancer with one group, one agent and one finished
    request renders them."""
    metrics = Metrics(
        lambda: [GroupGauges("m", agents=1, slots_total=4, slots_processing=1, requests_buffered=2)],
        lambda: [AgentGauges("m", "id", "agent-0", kv_cache_tokens_used=10, kv_cache_tokens_total=100)],
    )
    metrics.time_to_first_token.labels("m").observe(0.2)
    metrics.request_duration.labels("m").observe(1.0)
    metrics.generated_tokens.labels("m").inc(5)
    metrics.requests.labels("m", "200").inc()
    metrics.refusals.labels("m", "NoFreeSlot").inc()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    return [("dashboard", e) for e in dashboard_exprs()] + [("rules", e) for e in rule_exprs()]


def promql_for_prometheus(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced (what a Prometheus accepts)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


SELECTOR = re.compile(r"\b([a-z_:][a-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
METRIC = re.compile(r"\b(paddler_[a-z0-9_]+|up)\b")


@pytest.mark.parametrize(("where", "expr"), all_exprs())
def test_every_series_is_one_the_balancer_exports(where: str, expr: str) -> None:
    names = exported()
    for metric in METRIC.findall(expr):
        assert metric in names or metric in NOT_THE_BALANCERS, f"{where}: {metric} is not exported: {expr}"
    for metric, matchers in SELECTOR.findall(expr):
        known = names.get(metric, set()) | TARGET_LABELS
        for label in MATCHER.findall(matchers):
            assert label in known, f"{where}: {metric} has no label {label}: {expr}"


@pytest.mark.parametrize(("where", "expr"), all_exprs())
def test_grouping_labels_exist(where: str, expr: str) -> None:
    labels = set().union(*exported().values()) | TARGET_LABELS
    for group in GROUPING.findall(expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            assert label in labels, f"{where}: no series has label {label}: {expr}"


def test_grafana_variables_are_the_only_placeholders() -> None:
    for expr in dashboard_exprs():
        rest = promql_for_prometheus(expr)
        assert "$" not in rest, expr


def test_dashboard_shows_what_an_operator_watches() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "model_group"}
    text = json.dumps(dashboard)
    for series in (
        "paddler_slots_total",
        "paddler_slots_processing",
        "paddler_requests_buffered",
        "paddler_generated_tokens_total",
        "paddler_time_to_first_token_seconds_bucket",
        'code=~\\"503|504\\"',
        "paddler_agent_kv_cache_tokens_used",  # per agent
    ):
        assert series in text, series


def test_alert_rules_cover_wake_up_errors_agents_and_balancers() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    by_name = {r["alert"]: r for r in rules}
    assert set(by_name) == {
        "PaddlerWakeUpFailing",
        "PaddlerRequestsRejected",
        "PaddlerAgentsWithoutSlots",
        "PaddlerAgentsLostMidRequest",
        "PaddlerBalancerDown",
    }
    assert by_name["PaddlerWakeUpFailing"]["for"] == "2m"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
