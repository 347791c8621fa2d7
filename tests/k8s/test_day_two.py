"""Day two on a stock cluster (issue 28): drains go through the PodDisruptionBudgets, every pod
passes Pod Security "restricted", a worker leaving the Service is given time before `ray stop`,
gateways spread over zones. Checked on the render of every values file."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.k8s.support import CASES, by_kind, helm_template, pod_templates, validate, values_of


def _clusters(objs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return ([("RayService", o["spec"]["rayClusterConfig"]) for o in by_kind(objs, "RayService")]
            + [("RayJob", o["spec"]["rayClusterSpec"]) for o in by_kind(objs, "RayJob")])


def _pods(objs: tuple[dict[str, Any], ...], cluster: str = "c1") -> list[tuple[str, int, dict[str, str]]]:
    """(group, minimum pods, labels as KubeRay sets them) of every group of every Ray cluster."""
    out = []
    for kind, spec in _clusters(objs):
        for i, (group, tpl) in enumerate(pod_templates(spec)):
            name = group.get("groupName", "headgroup")
            labels = {**tpl["metadata"]["labels"], "ray.io/group": name, "ray.io/cluster": f"{kind}-{cluster}",
                      "ray.io/node-type": "head" if i == 0 else "worker"}
            out.append((f"{kind}/{name}", 1 if i == 0 else group["minReplicas"], labels))
    return out


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("case", list(CASES))
def test_pdbs_per_role_with_an_integer_min_available_that_lets_a_drain_through(case: str) -> None:
    """Pods of a RayCluster (no scale subresource) are protected only by an integer minAvailable:
    with maxUnavailable or a percentage, disruptionsAllowed stays 0 and every drain hangs. One budget
    per role (the gateways; each engine group), none holding a pod twice (an eviction under two
    budgets is refused), and each allows a disruption at the role's minimum."""
    objs = helm_template(*CASES[case])
    pdbs = by_kind(objs, "PodDisruptionBudget")
    assert pdbs
    for pdb in pdbs:
        validate(pdb)
        spec = pdb["spec"]
        assert set(spec) == {"minAvailable", "selector"}, f"{pdb['metadata']['name']}: {sorted(spec)}"
        assert isinstance(spec["minAvailable"], int), "a percentage is refused for pods without a scale subresource"
    pods = _pods(objs)
    serving = [p for p in pods if p[0].startswith("RayService/")]
    covered: dict[str, list[str]] = {}
    for group, _, labels in pods:
        covered[group] = [p["metadata"]["name"] for p in pdbs if _selects(p["spec"]["selector"], labels)]
        assert len(covered[group]) <= 1, f"{group} is under two budgets: {covered[group]}"
    values = values_of(case)
    for group, _, labels in serving:
        is_head = labels["ray.io/node-type"] == "head"
        if is_head and labels.get("llmserve.io/gateway") != "true":
            assert covered[group] == [], "the head alone has no budget"
        else:
            assert covered[group], f"{group} has no budget"
    for group, _, _ in pods:
        if group.startswith("RayJob/"):
            assert covered[group] == [], "batch pods are not the serving cluster's"
    for pdb in pdbs:
        members = [(g, n) for g, n, labels in serving if _selects(pdb["spec"]["selector"], labels)]
        minimum = sum(n for _, n in members)
        assert members, f"{pdb['metadata']['name']} selects no pod"
        allowed = minimum - pdb["spec"]["minAvailable"]
        assert allowed == min(minimum, values["pdb"]["maxUnavailable"]), (pdb["metadata"]["name"], members)


def test_production_keeps_one_gateway_through_a_drain() -> None:
    objs = helm_template(*CASES["production"])
    pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(objs, "PodDisruptionBudget")}
    assert pdbs["llm-llmserve-gateway"]["minAvailable"] == 1  # two gateway pods
    assert set(pdbs) == {"llm-llmserve-gateway", "llm-llmserve-workers-l4", "llm-llmserve-workers-a100x2"}


def _restricted(pod_spec: dict[str, Any], containers: list[dict[str, Any]]) -> list[str]:
    """Pod Security Standards "restricted" (v1.26+), the checks a Ray pod could fail."""
    errs = []
    psc = pod_spec.get("securityContext") or {}
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c.get("name")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            errs.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            errs.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            errs.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"{name}: allowPrivilegeEscalation")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            errs.append(f"{name}: capabilities {caps}")
        if sc.get("privileged"):
            errs.append(f"{name}: privileged")
    for v in pod_spec.get("volumes", []):
        if "hostPath" in v:
            errs.append(f"volume {v['name']}: hostPath")
    return errs


@pytest.mark.parametrize("case", list(CASES))
def test_every_pod_passes_pod_security_restricted(case: str) -> None:
    """Every Ray container, KubeRay's autoscaler sidecar (its securityContext is autoscalerOptions')
    and wait-gcs-ready init container (a copy of the Ray container's), Redis and the test pod."""
    objs = helm_template(*CASES[case])
    for kind, spec in _clusters(objs):
        for group, tpl in pod_templates(spec):
            pod = tpl["spec"]
            containers = list(pod["containers"])
            containers.append({**containers[0], "name": "wait-gcs-ready"})  # what KubeRay injects
            if "groupName" not in group and spec.get("enableInTreeAutoscaling"):
                sidecar = spec["autoscalerOptions"].get("securityContext")
                containers.append({"name": "autoscaler", "securityContext": sidecar})
            errs = _restricted(pod, containers)
            assert not errs, f"{kind}/{group.get('groupName', 'head')}: {errs}"
    for sts in by_kind(objs, "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        assert not _restricted(pod, pod["containers"]), sts["metadata"]["name"]
    for test in by_kind(objs, "Pod"):
        assert not _restricted(test["spec"], test["spec"]["containers"]), test["metadata"]["name"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_service_account_token_only_where_the_autoscaler_needs_it(case: str) -> None:
    objs = helm_template(*CASES[case])
    for kind, spec in _clusters(objs):
        for group, tpl in pod_templates(spec):
            head = "groupName" not in group
            needs = head and spec.get("enableInTreeAutoscaling", False)
            mounted = tpl["spec"].get("automountServiceAccountToken", True)
            assert mounted is needs, (kind, group.get("groupName", "head"))
    for obj in [*by_kind(objs, "StatefulSet"), *by_kind(objs, "Pod")]:
        pod = obj["spec"]["template"]["spec"] if obj["kind"] == "StatefulSet" else obj["spec"]
        assert pod["automountServiceAccountToken"] is False, obj["metadata"]["name"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_worker_pauses_for_its_endpoint_removal_before_ray_stop(case: str) -> None:
    """kube-proxy, ingress controllers and clients learn of a terminating pod's removal from the
    endpoints asynchronously: `ray stop` at once would refuse the requests still sent there."""
    objs = helm_template(*CASES[case])
    for kind, spec in _clusters(objs):
        for group, tpl in pod_templates(spec)[1:]:
            [c] = tpl["spec"]["containers"]
            command = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
            m = re.search(r"sleep (\d+)\s*;\s*ray stop$", command)
            assert m, f"{kind}/{group['groupName']}: preStop {command!r}"
            pause = int(m.group(1))
            assert pause >= 5
            # The pause and the gateway's 40 s drain (graceful_shutdown_timeout_s) fit the grace period.
            assert tpl["spec"]["terminationGracePeriodSeconds"] >= pause + 40


@pytest.mark.parametrize("case", list(CASES))
def test_gateway_pods_spread_over_zones(case: str) -> None:
    objs = helm_template(*CASES[case])
    for kind, spec in _clusters(objs):
        for group, tpl in pod_templates(spec):
            labels = tpl["metadata"]["labels"]
            spread = tpl["spec"].get("topologySpreadConstraints", [])
            if labels.get("llmserve.io/gateway") != "true":
                assert not spread, f"{kind}/{group.get('groupName', 'head')}"
                continue
            [zone] = [s for s in spread if s["topologyKey"] == "topology.kubernetes.io/zone"]
            assert zone["maxSkew"] == 1
            assert _selects(zone["labelSelector"], labels), "it counts the gateway pods"
            assert zone["matchLabelKeys"] == ["ray.io/cluster"], "of its own RayCluster only"
            assert zone["whenUnsatisfiable"] in ("ScheduleAnyway", "DoNotSchedule")
