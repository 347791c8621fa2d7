"""k8s/ (kustomize): each overlay renders offline, every object validates, and it deploys the same
objects as the Helm chart with the matching values file (k8s/ was written from the chart's renders;
this keeps the two from drifting apart)."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from tests.k8s.support import (
    CHART,
    KUSTOMIZE,
    OBSERVABILITY,
    OVERLAYS,
    by_kind,
    check_gateway_wiring,
    check_pod_references,
    check_serve_config_v2,
    helm_template,
    kustomize,
    one,
    validate,
)

VALUES = {"cpu-dev": "values-cpu-dev.yaml", "gpu-production": "values-production.yaml"}
# Objects an overlay expects to exist outside git (created by the operator, see its kustomization.yaml).
EXTERNAL = {"cpu-dev": {"Secret": {"llmserve-engine"}},
            "gpu-production": {"Secret": {"llmserve-api-keys", "hf-token", "llmserve-engine"}}}


def _helm(overlay: str) -> tuple[dict, ...]:
    return helm_template("-f", str(CHART / VALUES[overlay]), release="llmserve")


def _named(objs: tuple[dict, ...], kind: str, name: str) -> dict:
    return next(o for o in by_kind(objs, kind) if o["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    objs = kustomize(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"RayService", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds, kinds
    for obj in objs:
        validate(obj)
        assert obj["metadata"].get("namespace"), f"{obj['kind']} without a namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_serve_config(overlay: str) -> None:
    from serve.config import Config

    objs = kustomize(overlay)
    raw, config = check_serve_config_v2(one(objs, "RayService")["spec"]["serveConfigV2"])
    mounted = yaml.safe_load(_named(objs, "ConfigMap", "llmserve-config")["data"]["config.yaml"])
    assert Config.model_validate(mounted) == config, "config.yaml differs from the gateway's args.config"
    check_gateway_wiring(objs, raw, config)
    names = {k: {o["metadata"]["name"] for o in by_kind(objs, k)} for k in ("ConfigMap", "Secret",
                                                                           "PersistentVolumeClaim")}
    names["Secret"] |= EXTERNAL[overlay]["Secret"]
    check_pod_references(one(objs, "RayService")["spec"]["rayClusterConfig"], names)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_deploys_what_the_chart_deploys(overlay: str) -> None:
    ours, chart = kustomize(overlay), _helm(overlay)
    ours_rs, chart_rs = one(ours, "RayService")["spec"], one(chart, "RayService")["spec"]
    assert yaml.safe_load(ours_rs["serveConfigV2"]) == yaml.safe_load(chart_rs["serveConfigV2"])
    assert {**ours_rs, "serveConfigV2": None} == {**chart_rs, "serveConfigV2": None}
    for kind in ("Service", "PodDisruptionBudget", "Ingress", "PersistentVolumeClaim", "ServiceMonitor",
                 "PodMonitor", "PrometheusRule"):
        assert len(by_kind(ours, kind)) == len(by_kind(chart, kind)), kind
        for a, b in zip(by_kind(ours, kind), by_kind(chart, kind), strict=True):
            assert a["spec"] == b["spec"], f"{kind} differs from the chart's"
    for name in ("llmserve-config", "llmserve-dashboard"):
        a, b = _named(ours, "ConfigMap", name)["data"], _named(chart, "ConfigMap", name)["data"]
        assert {k: yaml.safe_load(v) for k, v in a.items()} == {k: yaml.safe_load(v) for k, v in b.items()}
    secrets = [_named(objs, "Secret", "llmserve-api-keys") if by_kind(objs, "Secret") else None
               for objs in (ours, chart)]
    if secrets[1] is None:
        assert secrets[0] is None
    else:
        a, b = (yaml.safe_load(base64.b64decode(s["data"]["keys.yaml"])) for s in secrets)
        assert a == b


def test_observability_copies_match_the_chart() -> None:
    copy = KUSTOMIZE / "base" / "observability" / "dashboard.json"
    assert json.loads(copy.read_text()) == json.loads((OBSERVABILITY / "dashboard.json").read_text()), (
        "cp helm/llmserve/files/dashboard.json k8s/base/observability/dashboard.json")
    rule = yaml.safe_load((KUSTOMIZE / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"], (
        "k8s/components/monitoring/prometheusrule.yaml must carry helm/llmserve/files/alerts.yaml's groups")
    dash = _named(kustomize("cpu-dev"), "ConfigMap", "llmserve-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
