"""Traffic during a NewCluster upgrade goes only to the active cluster's gateways (issue 28).

KubeRay runs the old and the new RayCluster side by side until every Serve application of the new
one is RUNNING, then points its serve Service at the new cluster (ray.io/cluster) and deletes the
old one (rayservice_controller.go: reconcileServicesToReadyCluster). A Service of the chart's own,
selecting gateway pods by the chart's labels, would reach the gateways of both clusters, the new
one's while its models still load. So the API Service is KubeRay's, from the RayService's
serveService, with a named target port that only gateway pods declare (KubeRay labels every
RayService worker ray.io/serve=true, engine-only ones too).
"""

from __future__ import annotations

import pytest

from tests.k8s.support import CASES, by_kind, helm_template, one, pod_templates, values_of


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("case", list(CASES))
def test_the_api_service_follows_the_active_cluster(case: str) -> None:
    objs = helm_template(*CASES[case], release="rel")
    values = values_of(case)
    rs = one(objs, "RayService")
    serve_svc = rs["spec"]["serveService"]
    assert serve_svc["metadata"]["name"] == "rel-llmserve"
    [port] = serve_svc["spec"]["ports"]
    # KubeRay keeps a user port only under a `serve*` name, and a named target port reaches only
    # the pods that declare it.
    assert (port["name"], port["targetPort"], port["port"]) == ("serve", "serve", values["service"]["port"])
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is (not values["head"]["gateway"])
    gateway_port = values["serve"]["gateway"]["port"]
    metrics_port = values["serve"]["gateway"].get("metrics_port", 9464)
    gateway_pods = []
    for group, tpl in pod_templates(rs["spec"]["rayClusterConfig"]):
        ports = {p.get("name"): p["containerPort"] for p in tpl["spec"]["containers"][0].get("ports", [])}
        is_head = "groupName" not in group
        hosts = bool(values["head"]["gateway"]) if is_head else bool(
            next(g for g in values["workerGroups"] if g["name"] == group["groupName"])["gateway"])
        if hosts:
            assert ports.get("serve") == gateway_port, group.get("groupName", "head")
            gateway_pods.append(tpl["metadata"]["labels"])
        elif not is_head:  # an engine-only worker: out of the Service by the port it lacks
            assert "serve" not in ports, group["groupName"]
    assert gateway_pods
    # No Service of the chart's own reaches the gateways' API port (it would select both clusters'
    # pods); the metrics Service does, for Prometheus, on the metrics port only.
    for svc in by_kind(objs, "Service"):
        if any(_matches(svc["spec"].get("selector") or {}, labels) for labels in gateway_pods):
            assert [p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]] == [metrics_port], \
                svc["metadata"]["name"]
    # What clients are told to reach is that Service.
    for ingress in by_kind(objs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert (backend["name"], backend["port"]) == ("rel-llmserve", {"name": "serve"})
    script = one(objs, "Pod")["spec"]["containers"][0]["args"][0]
    assert f'base="http://rel-llmserve:{values["service"]["port"]}"' in script
