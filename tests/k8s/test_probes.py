"""Probes and ports of the Ray containers, read the way KubeRay reads them.

KubeRay (ray-operator/controllers/ray/common/pod.go, initLivenessAndReadinessProbe) injects a probe
only where the Ray container has none; for RayService worker pods its readiness probe greps Serve's
proxy /-/healthz on the port named `serve` for "success", which no llmserve pod answers. It submits
serveConfigV2 only once the head pod is Ready (rayservice_controller.go, reconcileServe), to the head
Service's port named `dashboard`, built from the head container's named ports (common/service.go,
getPortsFromCluster); the RayService's <name>-serve-svc needs a port named `serve` on the head.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.k8s.support import CASES, CPU_DEV, PRODUCTION, by_kind, helm_template, pod_templates, values_of

AGENT_PORT = 52365


def _ray_pods(objs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(node type, group spec, container, owner kind) of every Ray pod template rendered."""
    out = []
    for kind, key in (("RayService", "rayClusterConfig"), ("RayJob", "rayClusterSpec")):
        for obj in by_kind(objs, kind):
            cluster = obj["spec"][key]
            for i, (group, tpl) in enumerate(pod_templates(cluster)):
                containers = tpl["spec"]["containers"]
                assert len(containers) == 1, "one Ray container per pod (KubeRay's RayContainerIndex 0)"
                out.append(("head" if i == 0 else "worker", group, containers[0], kind))
    return out


def _hosts_gateway(group: dict[str, Any]) -> bool:
    return (group.get("labels") or {}).get("llmserve.io/gateway") == "true"


def _http(probe: dict[str, Any]) -> tuple[str, int]:
    assert set(probe) & {"exec", "tcpSocket", "grpc"} == set(), probe
    return probe["httpGet"]["path"], probe["httpGet"]["port"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_ray_container_has_its_own_probes(case: str) -> None:
    objs = helm_template(*CASES[case])
    values = values_of(case)
    gateway_port = values["serve"]["gateway"]["port"]
    pods = _ray_pods(objs)
    assert len(pods) >= 2
    gateway_workers = 0
    for node_type, group, c, kind in pods:
        where = f"{kind} {group.get('groupName', 'head')}"
        # Nothing left for KubeRay to inject: it fills only a nil liveness or readiness probe.
        assert c.get("livenessProbe") and c.get("readinessProbe"), where
        assert group["rayStartParams"]["dashboard-agent-listen-port"] == str(AGENT_PORT), where
        assert _http(c["livenessProbe"]) == ("/api/healthz", AGENT_PORT), where
        assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] >= 60, where
        if node_type == "worker" and _hosts_gateway(group):
            gateway_workers += 1
            assert kind == "RayService"
            assert _http(c["readinessProbe"]) == ("/health", gateway_port), where
            assert _http(c["startupProbe"]) == ("/health", gateway_port), where
            startup = c["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, where
            assert {"name": "serve", "containerPort": gateway_port} in c["ports"], where
        else:
            # The head (gateway or not): KubeRay deploys the Serve apps only once it is Ready, so
            # its readiness may not wait for the gateway those apps start.
            assert _http(c["readinessProbe"]) == ("/api/healthz", AGENT_PORT), where
            assert "startupProbe" not in c, where
    assert gateway_workers == (1 if case.startswith("production") else 0)  # group templates, not pods


@pytest.mark.parametrize("case", ["default", "cpu-dev", "production"])
def test_head_declares_the_ports_kuberay_looks_up_by_name(case: str) -> None:
    objs = helm_template(*CASES[case])
    gateway_port = values_of(case)["serve"]["gateway"]["port"]
    [head] = [c for node_type, _, c, kind in _ray_pods(objs) if node_type == "head" and kind == "RayService"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": gateway_port}


def test_production_head_without_gateway_still_has_a_serve_port() -> None:
    """values-production.yaml runs no gateway on the head; KubeRay still refuses to build the
    RayService's serve Service without a head port named `serve`."""
    objs = helm_template("-f", PRODUCTION)
    cluster = by_kind(objs, "RayService")[0]["spec"]["rayClusterConfig"]
    assert not _hosts_gateway(cluster["headGroupSpec"])
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "serve" in [p["name"] for p in head["ports"]]


def test_engine_workers_declare_no_serve_port() -> None:
    objs = helm_template("-f", CPU_DEV)
    workers = [c for node_type, group, c, _ in _ray_pods(objs) if node_type == "worker"]
    assert workers
    for c in workers:
        assert [p["name"] for p in c["ports"]] == ["metrics"]


def test_a_groups_own_agent_port_moves_its_probes() -> None:
    objs = helm_template("-f", CPU_DEV, "--set", "workerGroups[0].rayStartParams.dashboard-agent-listen-port=52400")
    [(_, group, c, _)] = [p for p in _ray_pods(objs) if p[0] == "worker"]
    assert group["rayStartParams"]["dashboard-agent-listen-port"] == "52400"
    assert _http(c["livenessProbe"]) == ("/api/healthz", 52400)
    assert _http(c["readinessProbe"]) == ("/api/healthz", 52400)


def test_probe_timings_follow_values() -> None:
    objs = helm_template("-f", PRODUCTION, "--set",
                         "probes.startup.failureThreshold=7,probes.readiness.periodSeconds=3")
    gateway = [c for node_type, group, c, _ in _ray_pods(objs) if node_type == "worker" and _hosts_gateway(group)]
    assert [c["startupProbe"]["failureThreshold"] for c in gateway] == [7]  # one gateway group
    assert {c["readinessProbe"]["periodSeconds"] for _, _, c, _ in _ray_pods(objs)} == {3}


@pytest.mark.parametrize("args, minutes", [(("-f", CPU_DEV, "--set", "workerGroups[0].gateway=true"), 15),
                                           (("-f", PRODUCTION), 30)])
def test_startup_allows_the_first_model_to_load(args: tuple[str, ...], minutes: int) -> None:
    """15 min by default; values-production.yaml doubles it (GPU node, CUDA image, weights)."""
    [c] = [c for node_type, group, c, _ in _ray_pods(helm_template(*args))
           if node_type == "worker" and _hosts_gateway(group)]
    startup = c["startupProbe"]
    assert startup["periodSeconds"] == 2  # short: it is part of the gateway's hold (below)
    assert startup["periodSeconds"] * startup["failureThreshold"] == minutes * 60


def _hold(c: dict[str, Any]) -> float | None:
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    return float(env["LLMSERVE_GATEWAY_READY_HOLD_S"]) if "LLMSERVE_GATEWAY_READY_HOLD_S" in env else None


@pytest.mark.parametrize("case", list(CASES))
def test_a_gateway_pod_is_ready_before_its_application_runs(case: str) -> None:
    """KubeRay moves a NewCluster upgrade's Service in the reconcile that sees every application of
    the new cluster RUNNING (rayservice_controller.go: reconcileServe, reconcileServicesToReadyCluster);
    nothing there waits for the gateway pods' readiness. So the gateway replica holds its application
    short of RUNNING, after its /health first answers 200, as long as the kubelet can take to see that
    (a startup probe period, then a readiness one) and more: a pod whose readiness is /health carries
    that hold; no other Ray container does (the head's membership is KubeRay's own label)."""
    held = 0
    for node_type, group, c, _ in _ray_pods(helm_template(*CASES[case])):
        if c["readinessProbe"]["httpGet"]["path"] == "/health":
            held += 1
            hold = _hold(c)
            assert hold is not None, group.get("groupName")
            assert hold >= c["startupProbe"]["periodSeconds"] + c["readinessProbe"]["periodSeconds"] + 1
        else:
            assert _hold(c) is None, group.get("groupName", node_type)
    assert held == (1 if case.startswith("production") else 0)


def test_the_gateways_hold_follows_the_probe_timings() -> None:
    objs = helm_template("-f", PRODUCTION, "--set", "probes.startup.periodSeconds=4,probes.readiness.periodSeconds=3")
    assert [_hold(c) for _, group, c, _ in _ray_pods(objs) if _hosts_gateway(group)] == [9.0]
