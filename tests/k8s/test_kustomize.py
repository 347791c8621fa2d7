"""k8s/ (kustomize) is generated from the chart by k8s/generate.py: the files on disk are exactly what
it writes now (any drift fails, whichever side moved), each overlay builds offline and validates,
holds no generated secret, and names the Secrets its user creates; the dashboard exists once."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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
    docs,
    kustomize,
    one,
    pod_templates,
    run,
    tool,
    validate,
)


@functools.cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_generate", KUSTOMIZE / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _overlay(name: str) -> Any:
    return next(o for o in generator().OVERLAYS if o.name == name)


def _named(objs: tuple[dict, ...], kind: str, name: str) -> dict:
    return next(o for o in by_kind(objs, kind) if o["metadata"]["name"] == name)


def test_k8s_is_what_the_generator_writes() -> None:
    want, have = generator().render_all(), generator().on_disk()
    drift = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
    assert drift == [], "k8s/ differs from the chart's render: run `python k8s/generate.py`"
    assert sorted({p.split("/")[1] for p in want if p.startswith("overlays/")}) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str) -> None:
    objs = kustomize(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"RayService", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "StatefulSet"} <= kinds
    assert "Pod" not in kinds, "no helm test hooks in plain manifests"
    for obj in objs:
        validate(obj)
        assert obj["metadata"].get("namespace") == _overlay(overlay).namespace, obj["metadata"]["name"]


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
    names["Secret"] |= {s.name for s in _overlay(overlay).secrets}
    # A claim the overlay's values name as existing is the user's, said in its kustomization.yaml.
    values = yaml.safe_load((CHART / _overlay(overlay).values).read_text())
    if claim := (values.get("modelCache") or {}).get("existingClaim"):
        kustomization = (KUSTOMIZE / "overlays" / overlay / "kustomization.yaml").read_text()
        assert f"PersistentVolumeClaim {claim}" in kustomization
        names["PersistentVolumeClaim"].add(claim)
    check_pod_references(one(objs, "RayService")["spec"]["rayClusterConfig"], names)


def _referenced_secrets(objs: tuple[dict[str, Any], ...]) -> set[tuple[str, str | None]]:
    """(Secret, key) of every secretKeyRef and (Secret, None) of every secret volume in any pod."""
    specs = [tpl["spec"] for rs in by_kind(objs, "RayService")
             for _, tpl in pod_templates(rs["spec"]["rayClusterConfig"])]
    specs += [s["spec"]["template"]["spec"] for s in by_kind(objs, "StatefulSet")]
    refs: set[tuple[str, str | None]] = set()
    for spec in specs:
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        refs |= {(v["secret"]["secretName"], None) for v in spec.get("volumes", []) if "secret" in v}
    return refs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_no_generated_secret_and_lists_the_ones_to_create(overlay: str) -> None:
    objs = kustomize(overlay)
    rendered = {s["metadata"]["name"] for s in by_kind(objs, "Secret")}
    # Only the API-key Secret may be rendered: keys.yaml holds hashes of keys given in the values.
    assert rendered <= {"llmserve-api-keys"}
    for s in by_kind(objs, "Secret"):
        assert set(s["data"]) == {"keys.yaml"}
    external = {(n, k) for n, k in _referenced_secrets(objs) if n not in rendered}
    listed = _overlay(overlay).secrets
    assert {n for n, _ in external} == {s.name for s in listed}
    for s in listed:
        assert {k for n, k in external if n == s.name} - {None} <= {s.key}, s.name
    text = (KUSTOMIZE / "overlays" / overlay / "kustomization.yaml").read_text()
    for s in listed:
        assert s.command(_overlay(overlay).namespace) in text


def test_one_dashboard_file() -> None:
    assert not list(KUSTOMIZE.rglob("*.json")), "helm/llmserve/files/dashboard.json is the only copy"
    for overlay in OVERLAYS:
        dash = _named(kustomize(overlay), "ConfigMap", "llmserve-dashboard")
        assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(dash["data"]["llmserve.json"]) == json.loads((OBSERVABILITY / "dashboard.json").read_text())


def test_monitoring_component_adds_the_charts_monitors(tmp_path: Path) -> None:
    """An overlay of cpu-dev with the component (built in a copy: kustomize refuses absolute paths)."""
    shutil.copytree(KUSTOMIZE, tmp_path / "k8s", ignore=shutil.ignore_patterns("__pycache__"))
    overlay = tmp_path / "k8s" / "overlays" / "with-monitoring"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: llmserve-dev\n"
        "resources: [../cpu-dev]\ncomponents: [../../components/monitoring]\n")
    objs = docs(run([tool("kubectl"), "kustomize", str(overlay)]))
    monitors = [o for o in objs if o["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(o["kind"] for o in monitors) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for obj in monitors:
        validate(obj)
        assert obj["metadata"]["namespace"] == "llmserve-dev"
    rule = one(objs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"]
