"""deploy/: Prometheus config, alert rules and the Grafana dashboard name only metrics the services export.

Every PromQL expression (alert rules, dashboard targets) is reduced to the metric names and label
names it uses; each metric must be one that router/metrics.py or cloud/metrics.py registers (or
Prometheus' own ``up``), and each label one that metric carries. Also checked: the files the
compose file mounts line up (rule file, datasource uid, dashboard path, scrape ports), and the
router's drift gauge that the EscalationDrift alert reads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cloud.metrics import CloudMetrics
from router.metrics import MIN_DRIFT_DECISIONS, RouterMetrics
from router.thresholds import ThresholdsError, load_thresholds, parse_thresholds

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "matmamba.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
TUNED = ROOT / "docs" / "results" / "tune" / "thresholds-fmnist-level4.json"
VISION = ROOT / "checkpoints" / "matmamba-vision-fmnist"

# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Series suffixes per prometheus_client metric type.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}


def exported_series() -> dict[str, set[str]]:
    """{series name: its label names} for every metric the router and a cloud replica register."""
    series: dict[str, set[str]] = {"up": set(TARGET_LABELS)}
    for owner in (RouterMetrics(), CloudMetrics()):
        # prometheus_client keeps a metric's label names in `_labelnames` (no public accessor);
        # Info metrics take theirs from the dict they are set with, so their labels stay open.
        for metric in vars(owner).values():
            if not hasattr(metric, "_labelnames"):
                continue
            labels = set(metric._labelnames) | TARGET_LABELS
            if metric._type == "histogram":
                labels_bucket = labels | {"le"}
            for suffix in SUFFIXES[metric._type]:
                name = metric._name + suffix
                series[name] = labels_bucket if suffix == "_bucket" else labels
    return series


def promql_names(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(metric names, {metric: labels in its selector}, grouping labels) used by a PromQL expression."""
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors: [5m], [$__rate_interval]
    selectors: dict[str, set[str]] = {}
    for name, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        selectors.setdefault(name, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    grouping: set[str] = set()
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        grouping.update(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", body))
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = {m.group(1) for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)}
    return names - KEYWORDS, selectors, grouping


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_the_expression_parser_finds_names_and_labels() -> None:
    names, selectors, grouping = promql_names(
        'histogram_quantile(0.99, sum by (le, method) (rate(foo_bucket{code!="OK", tier=~"e.*"}[5m]))) '
        '> on() group_left() max(bar{bound="high"}) * 2')
    assert names == {"foo_bucket", "bar"}
    assert selectors == {"foo_bucket": {"code", "tier"}, "bar": {"bound"}}
    assert grouping == {"le", "method"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_promql_expression_names_exported_metrics_and_labels(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert len(exprs) >= (15 if source == "dashboard" else 5)
    series = exported_series()
    for title, expr in exprs:
        names, selectors, grouping = promql_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - set(series)
        assert not unknown, f"{title}: {sorted(unknown)} are not exported by the router or the cloud ({expr!r})"
        for name, labels in selectors.items():
            assert labels <= series[name], f"{title}: {name} has no label {sorted(labels - series[name])}"
        known = set().union(*(series[n] for n in names))
        assert grouping <= known, f"{title}: grouping by {sorted(grouping - known)}, which {sorted(names)} lack"


def test_the_dashboard_has_the_monitor_panels() -> None:
    """The panels of `python -m router.monitor`: rates, escalation vs band, latency, degraded, errors, drift."""
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in ("router_items_total", "router_escalation_rate", "router_escalation_expected",
                   "router_edge_seconds_bucket", "router_cloud_seconds_bucket", "router_degraded_total",
                   "matmamba_cloud_requests_total", "router_escalation_drift"):
        assert metric in exprs, f"no dashboard panel shows {metric}"
    dash = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_the_deploy_files_line_up_with_the_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["prometheus"]["volumes"] if v.startswith("./"))
    assert all((ROOT / source).is_file() for source in mounts.values())
    for rule_file in prometheus["rule_files"]:
        assert mounts[rule_file] == "./deploy/prometheus-alerts.yml"
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}

    def flag(service: str, name: str) -> str:
        command = compose[service]["command"]
        return command[command.index(name) + 1]

    assert jobs["router"]["static_configs"][0]["targets"] == [f"router:{flag('router', '--metrics-port')}"]
    dns = jobs["cloud"]["dns_sd_configs"][0]
    assert dns["names"] == ["cloud"] and str(dns["port"]) == flag("cloud", "--metrics-port")

    grafana = DEPLOY / "grafana"
    datasource = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    dash = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} <= uids
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "matmamba.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["grafana"]["volumes"]


# ------------------------------------------------------------------ the drift gauge behind EscalationDrift


def test_the_tuned_thresholds_file_carries_its_band() -> None:
    from matmamba import load_model

    fingerprint = load_model(VISION).fingerprint
    loaded = load_thresholds(TUNED, task="vision", fingerprint=fingerprint, edge_level=4)
    data = json.loads(TUNED.read_text())["expected_escalation"]
    assert loaded.band == (data["rate"], *data["ci95"])


def test_a_malformed_band_is_refused() -> None:
    raw = json.dumps({"measure": "max_softmax", "threshold": 0.8,
                      "expected_escalation": {"rate": 0.3, "ci95": [0.1, 0.2]}}).encode()
    with pytest.raises(ThresholdsError, match="low <= rate <= high"):
        parse_thresholds(raw, path="t.json", task="vision")


def _gauge(metrics: RouterMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_drift_gauge_follows_the_window_against_the_band(caplog: pytest.LogCaptureFixture) -> None:
    raw = json.dumps({"measure": "max_softmax", "threshold": 0.8,
                      "expected_escalation": {"rate": 0.2, "ci95": [0.18, 0.22]}}).encode()
    metrics = RouterMetrics()
    metrics.set_thresholds(parse_thresholds(raw, path="t.json", task="vision"))
    assert _gauge(metrics, "router_escalation_expected", bound="high") == 0.22
    conf = np.zeros(MIN_DRIFT_DECISIONS)
    in_band = np.arange(MIN_DRIFT_DECISIONS) % 5 == 0  # 20 %
    metrics.record_decisions("Classify", "max_softmax", conf, in_band)
    assert _gauge(metrics, "router_escalation_drift", method="Classify") == 0.0
    with caplog.at_level(logging.WARNING, logger="router.metrics"):
        for _ in range(9):  # 1000 decisions, 60 % escalated: far outside
            metrics.record_decisions("Classify", "max_softmax", conf, np.arange(MIN_DRIFT_DECISIONS) % 5 < 3)
    assert _gauge(metrics, "router_escalation_drift", method="Classify") == 1.0
    assert sum("escalation drift (Classify)" in r.message for r in caplog.records) == 1  # logged once, on the flip
    for _ in range(10):
        metrics.record_decisions("Classify", "max_softmax", conf, in_band)
    assert _gauge(metrics, "router_escalation_drift", method="Classify") == 0.0


def test_without_a_band_there_is_no_drift_signal() -> None:
    metrics = RouterMetrics()
    metrics.set_thresholds(parse_thresholds(b'{"measure": "max_softmax", "threshold": 0.8}', path="t.json",
                                            task="vision"))
    metrics.record_decisions("Classify", "max_softmax", np.zeros(500), np.ones(500, dtype=bool))
    assert _gauge(metrics, "router_escalation_drift", method="Classify") is None
    assert _gauge(metrics, "router_escalation_expected", bound="rate") is None
