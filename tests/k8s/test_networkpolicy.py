"""The chart's NetworkPolicies, evaluated as Kubernetes evaluates them (networking.k8s.io/v1 Ingress:
a pod selected by any policy accepts only what one of those policies' rules allows; a rule without
`ports` allows every port, without `from` every source; peers select pods by label, namespaces by
label, or both) on the pods the chart renders, plus pods a cluster has around them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.k8s.support import CHART, CPU_DEV, PRODUCTION, by_kind, helm_template, pod_templates, tool, validate

NS = "llm"
ENGINE_PORT = 34567  # an engine replica's port: random, on the pod IP


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    namespace: str = NS
    ns_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ns_labels = {"kubernetes.io/metadata.name": self.namespace, **self.ns_labels}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], src: Pod) -> bool:
    assert "ipBlock" not in peer, "the chart's peers are pods and namespaces"
    # No namespaceSelector: the policy's own namespace.
    in_ns = _selects(peer["namespaceSelector"], src.ns_labels) if "namespaceSelector" in peer else src.namespace == NS
    return in_ns and _selects(peer.get("podSelector") or {}, src.labels)


def allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], dst.labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports") or []
            assert all(isinstance(p["port"], int) for p in ports), "numeric ports"
            if ports and port not in [p["port"] for p in ports]:
                continue
            peers = rule.get("from") or []
            if not peers or any(_peer_matches(peer, src) for peer in peers):
                return True
    return False


def _cluster_pods(objs: tuple[dict[str, Any], ...]) -> dict[str, Pod]:
    """The release's pods as KubeRay and the StatefulSet create them (template labels plus the
    labels KubeRay adds), and pods from elsewhere."""
    pods: dict[str, Pod] = {}
    for kind, key in (("RayService", "rayClusterConfig"), ("RayJob", "rayClusterSpec")):
        for obj in by_kind(objs, kind):
            for i, (group, tpl) in enumerate(pod_templates(obj["spec"][key])):
                name = f"{kind}/{group.get('groupName', 'head')}"
                pods[name] = Pod(name, {**tpl["metadata"]["labels"], "ray.io/node-type": "head" if i == 0 else "worker",
                                        "ray.io/cluster": obj["metadata"]["name"] + "-x", "ray.io/serve": "true"})
    for sts in by_kind(objs, "StatefulSet"):
        pods["redis"] = Pod("redis", sts["spec"]["template"]["metadata"]["labels"])
    for test in by_kind(objs, "Pod"):
        pods["helm-test"] = Pod("helm-test", test["metadata"]["labels"])
    pods["submitter"] = Pod("submitter", {"ray.io/originated-from-cr-name": "llm-llmserve-batch",
                                          "ray.io/originated-from-crd": "RayJob",
                                          "app.kubernetes.io/created-by": "kuberay-operator"})
    pods["neighbour"] = Pod("neighbour", {"app": "other", "app.kubernetes.io/instance": "other"})
    pods["elsewhere"] = Pod("elsewhere", {"app": "x"}, namespace="default")
    pods["operator"] = Pod("operator", {"app.kubernetes.io/name": "kuberay-operator"}, namespace="kuberay-system")
    # Anyone who may create a pod can wear the operator's label, in their own namespace.
    pods["impostor"] = Pod("impostor", {"app.kubernetes.io/name": "kuberay-operator"}, namespace="tenant-a")
    # Nor is another pod of the operator's namespace the operator.
    pods["operator-neighbour"] = Pod("operator-neighbour", {"app": "webhook"}, namespace="kuberay-system")
    pods["prometheus"] = Pod("prometheus", {"app": "prometheus"}, namespace="monitoring",
                             ns_labels={"llmserve.io/monitoring": "true"})
    pods["unlabelled-prometheus"] = Pod("unlabelled-prometheus", {"app": "prometheus"}, namespace="metrics")
    pods["ingress"] = Pod("ingress", {"app.kubernetes.io/name": "ingress-nginx"}, namespace="ingress-nginx")
    return pods


def _setup(*args: str) -> tuple[list[dict[str, Any]], dict[str, Pod]]:
    objs = helm_template(*args)
    policies = by_kind(objs, "NetworkPolicy")
    for p in policies:
        validate(p)
    return policies, _cluster_pods(objs)


def _ray(pods: dict[str, Pod]) -> list[Pod]:
    return [p for n, p in pods.items() if n.startswith(("RayService/", "RayJob/"))]


OUTSIDERS = ("helm-test", "submitter", "neighbour", "elsewhere", "operator", "impostor", "prometheus", "ingress")


@pytest.mark.parametrize("values", [CPU_DEV, PRODUCTION])
def test_engine_ports_accept_only_the_releases_ray_pods(values: str) -> None:
    policies, pods = _setup("-f", values, "--set", "batchJob.enabled=true")
    ray = _ray(pods)
    assert {p.name for p in ray} >= {"RayService/head", "RayJob/head"}
    for dst in ray:
        for src in ray:
            assert allowed(policies, src, dst, ENGINE_PORT), f"{src.name} -> {dst.name}"
        for name in (*OUTSIDERS, "redis"):
            assert not allowed(policies, pods[name], dst, ENGINE_PORT), f"{name} -> {dst.name}"


def test_the_gateway_port_is_open_on_gateway_pods_only() -> None:
    policies, pods = _setup("-f", PRODUCTION)
    gateways = [p for p in _ray(pods) if p.labels.get("llmserve.io/gateway") == "true"]
    assert [p.name for p in gateways] == ["RayService/gateway"]
    for name in OUTSIDERS:
        assert allowed(policies, pods[name], gateways[0], 8000), name
    for dst in _ray(pods):
        if dst not in gateways:
            assert not allowed(policies, pods["elsewhere"], dst, 8000), dst.name


def test_gateway_from_restricts_clients_but_keeps_helm_test() -> None:
    peers = "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=ingress-nginx"
    policies, pods = _setup("-f", CPU_DEV, "--set", peers)
    head = pods["RayService/head"]  # cpu-dev: the gateway runs on the head
    assert allowed(policies, pods["ingress"], head, 8000)
    assert allowed(policies, pods["helm-test"], head, 8000)
    assert allowed(policies, pods["RayService/cpu"], head, 8000)
    for name in ("elsewhere", "neighbour", "operator"):
        assert not allowed(policies, pods[name], head, 8000), name


def test_metrics_ports_from_monitoring_namespaces_only() -> None:
    policies, pods = _setup("-f", PRODUCTION)
    gateway = pods["RayService/gateway"]
    for dst in _ray(pods):
        assert allowed(policies, pods["prometheus"], dst, 8080), dst.name
        assert not allowed(policies, pods["unlabelled-prometheus"], dst, 8080), dst.name
        assert not allowed(policies, pods["prometheus"], dst, ENGINE_PORT), dst.name
        assert allowed(policies, pods["prometheus"], dst, 9464) == (dst is gateway), dst.name
    assert not allowed(policies, pods["elsewhere"], gateway, 9464)


def test_dashboard_from_the_operator_and_the_job_submitter() -> None:
    policies, pods = _setup("-f", CPU_DEV, "--set", "batchJob.enabled=true")
    for head in (pods["RayService/head"], pods["RayJob/head"]):
        assert allowed(policies, pods["operator"], head, 8265)
        assert allowed(policies, pods["submitter"], head, 8265)
        assert not allowed(policies, pods["operator"], head, 6379), "the operator needs the dashboard only"
        for name in ("elsewhere", "neighbour", "helm-test", "impostor", "operator-neighbour"):
            assert not allowed(policies, pods[name], head, 8265), name
    policies, pods = _setup("-f", CPU_DEV)
    assert not allowed(policies, pods["submitter"], pods["RayService/head"], 8265), "no RayJob, no submitter"


def test_the_dashboard_admits_the_operator_by_namespace_name_and_label_in_one_peer() -> None:
    """The operator's label alone admits a pod from any namespace (issue 26); its namespace alone,
    any pod there. Both, in one peer (two peers would be either one)."""
    policies, pods = _setup("-f", PRODUCTION, "--set", "networkPolicy.operator.namespace=ray-ops")
    head = pods["RayService/head"]
    assert not allowed(policies, pods["operator"], head, 8265), "the operator moved to ray-ops"
    moved = Pod("operator", {"app.kubernetes.io/name": "kuberay-operator"}, namespace="ray-ops")
    assert allowed(policies, moved, head, 8265)
    assert not allowed(policies, pods["impostor"], head, 8265)
    [ray] = [p for p in policies if p["metadata"]["name"] == "llm-llmserve-ray"]
    [dashboard] = [r for r in ray["spec"]["ingress"] if r.get("ports") == [{"port": 8265, "protocol": "TCP"}]]
    assert dashboard["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-ops"}},
                                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    out = subprocess.run([tool("helm"), "template", "llm", str(CHART), "--set", "networkPolicy.operator.namespace="],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "networkPolicy/operator/namespace" in out.stderr, out.stderr


def test_redis_accepts_only_the_releases_ray_pods() -> None:
    policies, pods = _setup("-f", CPU_DEV, "--set", "batchJob.enabled=true")
    redis = pods["redis"]
    for src in _ray(pods):
        assert allowed(policies, src, redis, 6379), src.name
    for name in OUTSIDERS:
        assert not allowed(policies, pods[name], redis, 6379), name


def test_policies_select_every_ray_pod_and_redis_and_not_the_test_pod() -> None:
    policies, pods = _setup("-f", PRODUCTION, "--set", "batchJob.enabled=true")
    by_name = {p["metadata"]["name"]: p["spec"]["podSelector"] for p in policies}
    assert set(by_name) == {"llm-llmserve-ray", "llm-llmserve-gateway", "llm-llmserve-redis"}
    ray = {p.name for p in _ray(pods)}
    assert {n for n, p in pods.items() if _selects(by_name["llm-llmserve-ray"], p.labels)} == ray
    assert {n for n, p in pods.items() if _selects(by_name["llm-llmserve-gateway"], p.labels)} == {"RayService/gateway"}
    assert {n for n, p in pods.items() if _selects(by_name["llm-llmserve-redis"], p.labels)} == {"redis"}


def test_disabled_renders_no_policy() -> None:
    assert not by_kind(helm_template("-f", CPU_DEV, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")
