"""Provider presets over values-production.yaml (issue 28): values-gke.yaml, values-eks.yaml and
values-gfd.yaml select GPU nodes by labels their clusters have, with the tolerations their GPU nodes
need, requests that fit the machine types they select, and storage that binds there. Every other
test of the chart runs on their renders too (support.CASES)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.support import CASES, CHART, PRESETS, PRODUCTION, by_kind, helm_template, one, pod_templates

# Labels each provider sets on a node before it exists (so a cluster autoscaler scaling a pool from
# zero can match them), and the labels only GPU Feature Discovery writes on a running node.
PROVIDER_LABELS = {
    "gke": {"cloud.google.com/gke-accelerator", "node.kubernetes.io/instance-type"},
    "eks": {"node.kubernetes.io/instance-type"},
    "gfd": {"nvidia.com/gpu.product", "nvidia.com/gpu.count"},
}
RWX_CLASSES = {"gke": "standard-rwx", "eks": "efs-sc"}


def _gpu_pods(objs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    return {g["groupName"]: tpl["spec"] for g, tpl in pod_templates(cluster)[1:]
            if "nvidia.com/gpu" in tpl["spec"]["containers"][0]["resources"].get("limits", {})}


def _node_labels(spec: dict[str, Any]) -> set[str]:
    labels = set(spec.get("nodeSelector") or {})
    for term in (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms", []):
        labels |= {e["key"] for e in term.get("matchExpressions", [])}
    return labels


@pytest.mark.parametrize("provider", list(PRESETS))
def test_gpu_groups_select_nodes_by_the_providers_labels(provider: str) -> None:
    pods = _gpu_pods(helm_template(*CASES[f"production-{provider}"]))
    assert set(pods) == {"l4", "a100x2"}
    for group, spec in pods.items():
        labels = _node_labels(spec)
        assert labels and labels <= PROVIDER_LABELS[provider], (group, labels)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        if provider != "gfd":
            assert not labels & PROVIDER_LABELS["gfd"], "GFD labels are not there when a pool scales from zero"


def test_production_alone_is_provider_neutral() -> None:
    for group, spec in _gpu_pods(helm_template("-f", PRODUCTION)).items():
        assert not _node_labels(spec) & set().union(*PROVIDER_LABELS.values()), group


@pytest.mark.parametrize("provider", list(PRESETS))
def test_presets_change_only_placement_and_storage(provider: str) -> None:
    """Helm replaces lists: a preset repeats production's worker groups, which must stay production's
    but for where they run (and a node shape)."""
    prod = yaml.safe_load(Path(PRODUCTION).read_text())
    preset = yaml.safe_load(Path(PRESETS[provider]).read_text())
    assert set(preset) <= {"workerGroups", "modelCache"}, sorted(preset)
    placement = {"nodeSelector", "affinity", "node"}
    for mine, theirs in zip(preset["workerGroups"], prod["workerGroups"], strict=True):
        if mine["name"] == "gateway":
            assert mine == theirs
            continue
        assert {k: v for k, v in mine.items() if k not in placement} == \
            {k: v for k, v in theirs.items() if k not in placement}, mine["name"]


@pytest.mark.parametrize("provider", ["gke", "eks"])
def test_requests_fit_the_machine_types_the_preset_selects(provider: str) -> None:
    preset = yaml.safe_load(Path(PRESETS[provider]).read_text())
    for group in preset["workerGroups"]:
        if group["gpus"]:
            assert group["node"]["type"] == group["nodeSelector"]["node.kubernetes.io/instance-type"]
            assert group["gpus"] <= group["node"]["gpus"]


def test_a_request_above_the_node_is_refused() -> None:
    import subprocess

    from tests.k8s.support import tool

    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), "-f", PRODUCTION, "-f", PRESETS["gke"],
                           "--set", "workerGroups[2].resources.requests.memory=160Gi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    want = "workerGroups a100x2 requests memory 160Gi, more than the allocatable of its node a2-highgpu-2g"
    assert want in proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_the_model_cache_binds_on_the_clusters_storage(case: str) -> None:
    """ReadWriteOnce works by default (per pod); a shared ReadWriteMany claim only on a named class
    that offers it, or an existing claim: never the cluster default (GKE's and EKS' are ReadWriteOnce,
    the claim would stay Pending and every Ray pod with it)."""
    objs = helm_template(*CASES[case])
    for claim in by_kind(objs, "PersistentVolumeClaim"):
        if claim["metadata"]["name"].endswith("-model-cache"):
            assert "ReadWriteMany" in claim["spec"]["accessModes"]
            assert claim["spec"].get("storageClassName"), "a named class that offers ReadWriteMany"
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    for _, tpl in pod_templates(cluster):
        [volume] = [v for v in tpl["spec"]["volumes"] if v["name"] == "model-cache"]
        if "ephemeral" in volume:
            assert volume["ephemeral"]["volumeClaimTemplate"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    provider = case.removeprefix("production-")
    if provider in RWX_CLASSES:
        [claim] = [c for c in by_kind(objs, "PersistentVolumeClaim") if c["metadata"]["name"].endswith("-model-cache")]
        assert claim["spec"]["storageClassName"] == RWX_CLASSES[provider]


def test_a_shared_cache_on_the_default_class_is_refused_and_per_pod_volumes_work() -> None:
    import subprocess

    from tests.k8s.support import tool

    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), "--set", "modelCache.type=pvc"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "name a class that offers it in modelCache.storageClassName" in proc.stderr
    objs = helm_template("--set", "modelCache.type=ephemeral,modelCache.size=50Gi")
    assert not by_kind(objs, "PersistentVolumeClaim")
    for _, tpl in pod_templates(one(objs, "RayService")["spec"]["rayClusterConfig"]):
        [volume] = [v for v in tpl["spec"]["volumes"] if v["name"] == "model-cache"]
        spec = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert spec == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}}
