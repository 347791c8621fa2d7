"""Alerts and dashboard: promtool checks and unit tests of the rules, PromQL syntax of every dashboard
query, and every metric name they use exists: llmserve_* in the gateway's registry, ray_vllm_* among
the metrics vLLM defines (as Ray exports them)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.k8s.support import OBSERVABILITY, by_kind, helm_template, run, tool

ALERTS = OBSERVABILITY / "alerts.yaml"
ALERTS_TEST = OBSERVABILITY / "alerts-test.yaml"
DASHBOARD = OBSERVABILITY / "dashboard.json"

# Where vLLM defines its Prometheus metrics (`self._gauge_cls(name="vllm:...")` etc.), relative to the
# installed vllm package. Inside Ray Serve LLM (`log_engine_metrics`), vLLM's RayPrometheusStatLogger
# (vllm/v1/metrics/ray_wrappers.py) registers them as Ray metrics with the name sanitized for
# OpenTelemetry (every character outside [a-zA-Z0-9_] becomes '_'), and Ray's exporter prefixes its
# namespace `ray_` (ray/_private/telemetry/open_telemetry_metric_recorder.py): vllm:kv_cache_usage_perc
# -> ray_vllm_kv_cache_usage_perc. Counters gain `_total`, histograms `_bucket/_sum/_count`.
VLLM_METRIC_SOURCES = ("v1/metrics/loggers.py", "v1/metrics/perf.py", "v1/spec_decode/metrics.py")
# Labels Prometheus adds when scraping (target labels), on top of a metric's own.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
METRIC = re.compile(r"\b((?:llmserve|ray_vllm)_[A-Za-z0-9_]+)(\{[^}]*\})?")


def _llmserve_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, from the gateway's registry after touching every metric once."""
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from serve.gateway.metrics import Metrics

    m = Metrics()
    for metric in vars(m).values():
        if not isinstance(metric, (Counter, Gauge, Histogram)):
            continue
        child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
        if isinstance(child, Histogram):
            child.observe(0.1)
        elif isinstance(child, Gauge):
            child.set(1)
        else:
            child.inc()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _vllm_metrics() -> set[str]:
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    assert spec and spec.submodule_search_locations, "vllm is not installed"
    root = Path(next(iter(spec.submodule_search_locations)))
    defined = re.compile(r"_(gauge|counter|histogram)_cls\(\s*name=\"(vllm:[A-Za-z0-9_:]+)\"")
    names: set[str] = set()
    for rel in VLLM_METRIC_SOURCES:
        for kind, name in defined.findall((root / rel).read_text()):
            base = "ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
            if kind == "gauge":
                names.add(base)
            elif kind == "counter":
                names.add(base if base.endswith("_total") else base + "_total")
            else:
                names |= {base + "_bucket", base + "_sum", base + "_count"}
    assert "ray_vllm_kv_cache_usage_perc" in names, "vLLM's KV-cache gauge moved: update VLLM_METRIC_SOURCES"
    return names


def _alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_promtool_check_rules() -> None:
    out = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert f"SUCCESS: {len(_alert_rules())} rules found" in out


def test_promtool_test_rules() -> None:
    run([tool("promtool"), "test", "rules", ALERTS_TEST.name], cwd=OBSERVABILITY)


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in _alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no test where it stays quiet"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule), Grafana variables substituted."""
    rules = []
    for i, expr in enumerate(_dashboard_queries()):
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", expr)
        expr = m.group(1) if m else expr
        expr = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$model", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([tool("promtool"), "check", "rules", str(path)])


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "llmserve"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_name_exists(source: str) -> None:
    exprs = [r["expr"] for r in _alert_rules()] if source == "alerts" else _dashboard_queries()
    llmserve, vllm = _llmserve_metrics(), _vllm_metrics()
    used = [(name, matchers or "") for e in exprs for name, matchers in METRIC.findall(e)]
    assert used, "no metric found"
    missing = sorted({n for n, _ in used if n not in (llmserve if n.startswith("llmserve_") else vllm)})
    assert not missing, f"{source} uses metrics nothing emits: {missing}"
    for name, matchers in used:
        if name.startswith("llmserve_"):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            unknown = labels - llmserve[name] - TARGET_LABELS
            assert not unknown, f"{source}: {name} has no label(s) {sorted(unknown)}"
    if source == "alerts":
        assert {"llmserve_requests_total", "llmserve_time_to_first_token_seconds_bucket",
                "llmserve_ready_replicas", "ray_vllm_kv_cache_usage_perc", "llmserve_cache_redis_up",
                "llmserve_cache_redis_errors_total"} <= {n for n, _ in used}


@pytest.mark.parametrize("release", ["llm", "llmserve"])
def test_alerts_fire_for_an_absent_gateway_and_an_unreachable_redis(release: str) -> None:
    """An absent gateway fails every request and an OOM-looping Redis takes every tenant's state:
    each has an alert (issue 28), on the job the chart's ServiceMonitor scrapes (Prometheus
    Operator names it after the Service), and the chart's PrometheusRule carries both."""
    rules = {r["alert"]: r for r in _alert_rules()}
    gateway, redis = rules["LLMServeGatewayDown"], rules["LLMServeRedisDown"]
    assert gateway["labels"]["severity"] == redis["labels"]["severity"] == "critical"
    objs = helm_template("--set", "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true",
                         release=release)
    [monitor] = by_kind(objs, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    [service] = [s for s in by_kind(objs, "Service") if all(s["metadata"]["labels"].get(k) == v for k, v in wanted)]
    # The job a target gets: the Service's name, unless a relabeling replaces it.
    job = service["metadata"]["name"]
    for relabel in monitor["spec"]["endpoints"][0].get("relabelings", []):
        if relabel.get("targetLabel") == "job" and relabel.get("action", "replace") == "replace":
            job = relabel["replacement"]
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', gateway["expr"]))
    assert jobs == {job}, (jobs, job)
    assert "llmserve_cache_redis_up" in redis["expr"] and "llmserve_cache_redis_errors_total" in redis["expr"]
    [rule] = by_kind(objs, "PrometheusRule")
    charted = {r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"LLMServeGatewayDown", "LLMServeRedisDown"} <= charted


def test_metric_catalogues_are_real() -> None:
    llmserve = _llmserve_metrics()
    assert {"llmserve_requests_total", "llmserve_request_latency_seconds_bucket",
            "llmserve_time_to_first_token_seconds_count", "llmserve_ready_replicas"} <= set(llmserve)
    assert llmserve["llmserve_requests_total"] == {"route", "model", "status"}
    vllm = _vllm_metrics()
    assert {"ray_vllm_num_requests_running", "ray_vllm_prompt_tokens_total",
            "ray_vllm_time_to_first_token_seconds_bucket"} <= vllm
