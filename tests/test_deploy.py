"""deploy/: the Grafana dashboard and the Prometheus alerts use metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from relay import __version__
from relay.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\brelay_[a-z_]+\b")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported() -> set[str]:
    """Every sample name the relay's registry can produce."""
    names: set[str] = set()
    for family in Metrics(__version__).registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    known = exported()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used - known == set()
    for needed in ("relay_account_state", "relay_account_rate_ratio"):
        assert needed in used
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(
        dashboard["panels"]
    )


def test_alerts_cover_the_operators_cases_with_exported_metrics() -> None:
    document: dict[str, Any] = yaml.safe_load(
        (DEPLOY / "prometheus-alerts.yml").read_text()
    )
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {
        "RelayAccountSuspended",
        "RelayAccountRateNearThreshold",
        "RelayQueueGrowing",
        "RelayDeliveryFailures",
    } <= names
    known = exported()
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        used = set(METRIC.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used - known == set(), rule["alert"]
