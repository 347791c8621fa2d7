"""What KubeRay and the kubelet do with the chart's rendered objects, done here with real processes:
every pod a network namespace of its own (tests/cluster/net.py) running its container's command
with its resolved environment and volumes; Ray, vLLM, Redis and the gateway are the real ones.

Read from KubeRay's source (ray-project/kuberay, ray-operator/controllers/ray/):
- common/pod.go: BuildPod, generateRayStartCommand, setMissingRayStartParams,
  updateRayStartParamsLabels: the `ray start` flags (rayStartParams sorted, `true` as a bare flag;
  num-cpus from the container's CPU limit else request, rounded up; memory from its memory limit;
  num-gpus from `nvidia.com/gpu`; --labels from the group's `labels`; --block;
  dashboard-agent-listen-port 52365; metrics-export-port 8080; dashboard-host 0.0.0.0 on the head;
  a worker's address is the head Service's FQDN:6379; no-monitor on the head when the in-tree
  autoscaler runs), run as `ulimit -n 65536; ray start ...`; `ray.io/serve` is "true" on RayService
  workers and "false" on the head; initLivenessAndReadinessProbe: a Ray container without probes
  gets httpGet /api/healthz on the agent port (Ray >= 2.53) and, on RayService workers, an exec
  readiness probe that also needs `localhost:<serve port>/-/healthz` to print "success".
- common/service.go BuildServeService: `<rayservice>-serve-svc` (or the RayService's `serveService`,
  its name and ports kept, its selector replaced) selects ray.io/cluster of the active cluster and
  ray.io/serve=true, on the head container's ports named `serve`; a named targetPort reaches only
  pods that declare that port (the EndpointSlice controller's FindPort).
- rayservice_controller.go updateHeadPodServeLabel: the head's ray.io/serve is "true" only while
  GET /-/healthz on its serve port answers 200, and "false" with excludeHeadPodFromServeSvc.
- common/pod.go configureRedisFT (gcsFaultToleranceOptions): the head gets RAY_REDIS_ADDRESS,
  REDIS_PASSWORD (and --redis-password=$REDIS_PASSWORD) and RAY_external_storage_namespace; workers
  RAY_gcs_rpc_server_reconnect_timeout_s=600. A lost head pod is created again (new IP, same Service).
- A worker pod evicted (tests/cluster/kubelet.py: PDBs, preStop, SIGTERM) is replaced in its group.
The kubelet's part (pods, probes, Services, eviction) is tests/cluster/kubelet.py.
- utils/dashboardclient/dashboard_httpclient.go: UpdateDeployments PUTs serveConfigV2 (as JSON) to
  the head's dashboard at /api/serve/applications/, GetServeDetails GETs it.
- rayservice_controller.go: serve config submitted once the head pod is Ready; the RayService is
  Ready when serve-svc has ready endpoints (calculateNumServeEndpointsFromSlices).
The in-tree autoscaler sidecar talks to the Kubernetes API and is not run (issue 15's test runs Ray's
autoscaler over the chart's groups).
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.kubelet import NAMESPACE, Kubelet, Pod, fqdn, quantity

AGENT_PORT = 52365


class KubeRay(Kubelet):
    """The rendered objects, run. Use as a context manager; everything it started is gone after."""

    def __init__(self, objects: list[dict[str, Any]], state: Path, cluster_suffix: str = "x7k2p") -> None:
        super().__init__(objects, state)
        self._suffix = cluster_suffix
        rs = self.one("RayService")
        self.rayservice = rs
        self.cluster = f"{rs['metadata']['name']}-{cluster_suffix}"
        self.head_svc = f"{self.cluster}-head-svc"
        custom = rs["spec"].get("serveService") or {}
        self.serve_svc = (custom.get("metadata") or {}).get("name") or f"{rs['metadata']['name']}-serve-svc"
        # One dict, which the serve Service's proxy reads on every connection: KubeRay switching
        # clusters is an update of ray.io/cluster here.
        self._serve_selector = {"ray.io/cluster": self.cluster, "ray.io/serve": "true"}
        self._restarts = 0

    def start(self) -> None:
        """Services first (their names resolve from the start), then every workload and the
        RayService's head; workers once the head's GCS answers (KubeRay's wait-gcs-ready)."""
        for svc in [o for o in self.objects if o.get("kind") == "Service"]:
            self._service(svc)
        self._kuberay_services()
        for kind in ("StatefulSet", "Deployment"):
            for wl in [o for o in self.objects if o.get("kind") == kind]:
                for i in range(int(wl["spec"].get("replicas", 1))):
                    base = wl["metadata"]["name"]
                    name = f"{base}-{i}" if kind == "StatefulSet" else f"{base}-{i}x"
                    self._launch(self._workload_pod(wl, name, i))
        self._prober = threading.Thread(target=self._probe_loop, name="kubelet", daemon=True)
        self._prober.start()
        self._start_cluster(self.cluster, self.rayservice["spec"]["rayClusterConfig"])

    def _start_cluster(self, cluster: str, spec: dict[str, Any]) -> None:
        """A RayCluster's pods: the head, then the workers once its GCS answers."""
        head = self._ray_pod(spec["headGroupSpec"], "head", "headgroup", f"{cluster}-head", spec, cluster)
        self._launch(head)
        for name in fqdn(f"{cluster}-head-svc"):
            self.net.resolve(name, head.ip)
        self.wait(lambda: self._http(head.ip, 8265, "/api/gcs_healthz") is not None, 180,
                  lambda: f"head GCS; its log: {head.log()[-2000:]}")
        for g in spec.get("workerGroupSpecs", []):
            for i in range(int(g.get("replicas", g.get("minReplicas", 1)))):
                name = f"{cluster}-{g['groupName']}-worker-{i}"
                self._launch(self._ray_pod(g, "worker", g["groupName"], name, spec, cluster))

    def upgrade(self, objects: list[dict[str, Any]], suffix: str = "n3w9q", deletion_delay_s: float = 5) -> dict:
        """`helm upgrade` with a change of the cluster spec, under upgradeStrategy NewCluster, as
        KubeRay 1.5-1.7 does it (ray-operator/controllers/ray/rayservice_controller.go):
        - shouldPrepareNewCluster / createRayClusterInstance: a pending RayCluster from the new
          RayService beside the active one (pods built by common/pod.go BuildPod: workers labelled
          ray.io/serve=true from the start, the head "false" until updateHeadPodServeLabel);
        - reconcileServe: nothing until the pending head pod is Ready (isHeadPodRunningAndReady),
          then updateServeDeployment PUTs serveConfigV2 to its dashboard;
        - Reconcile, every ServiceDefaultRequeueDuration (2 s): reconcileServe's isReady is
          getAndCheckServeStatus, every application RUNNING and nothing else (no look at the
          pending pods' readiness); in that same reconcile reconcileServicesToReadyCluster ->
          reconcileServices rebuilds the serve Service (common/service.go BuildServeService:
          selector ray.io/cluster=<pending>, ray.io/serve=true) and updates it, since the cluster
          label changed: the switch; the endpoints are then the pending cluster's Ready pods only;
        - reconcilePromotionAndServingStatus: the pending cluster is promoted, and the old one is
          deleted rayClusterDeletionDelaySeconds later (default 60 s; its pods terminate as on an
          eviction: out of every Service, preStop, SIGTERM).
        The other objects of the render are not applied (Secrets keep their values, as `helm
        upgrade` keeps them). Returns the monotonic time of each step."""
        rs = next(o for o in objects if o and o.get("kind") == "RayService")
        assert (rs["spec"].get("upgradeStrategy") or {}).get("type", "NewCluster") == "NewCluster"
        old, new = self.cluster, f"{rs['metadata']['name']}-{suffix}"
        spec = rs["spec"]["rayClusterConfig"]
        assert spec != self.rayservice["spec"]["rayClusterConfig"], "no cluster change: KubeRay updates in place"
        t = {"pending_created": time.monotonic()}
        self._start_cluster(new, spec)
        head = self.pod(f"{new}-head")
        self.wait(lambda: head.ready, 300, "pending head Ready")
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        self._put_serve_config(head, config)
        t["pending_submitted"] = time.monotonic()
        apps = [a["name"] for a in config["applications"]]
        # getAndCheckServeStatus, polled every 2 s; RUNNING alone is the switch (see above).
        self.wait(lambda: all(self.serve_status(new).get(a) == "RUNNING" for a in apps), 900,
                  lambda: f"the pending cluster's applications RUNNING: {self.serve_status(new)}", 2)
        t["pending_running"] = time.monotonic()
        self.rayservice, self.cluster, self.head_svc = rs, new, f"{new}-head-svc"
        self._serve_selector["ray.io/cluster"] = new
        t["switched"] = time.monotonic()
        time.sleep(deletion_delay_s)
        for p in [p for p in self.pods if p.labels.get("ray.io/cluster") == old and not p.killed]:
            self.delete(p)
        t["old_deleted"] = time.monotonic()
        return t

    def _put_serve_config(self, head: Pod, config: dict[str, Any]) -> None:
        req = urllib.request.Request(f"http://{head.ip}:8265/api/serve/applications/",
                                     data=json.dumps(config).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200, r.read()

    def submit_serve_config(self) -> float:
        """Once the head pod is Ready, PUT serveConfigV2 as KubeRay does; returns the time."""
        head = self.pod(f"{self.cluster}-head")
        self.wait(lambda: head.ready, 300, "head pod Ready")
        self._put_serve_config(head, yaml.safe_load(self.rayservice["spec"]["serveConfigV2"]))
        return time.monotonic()

    def update_serve_config(self, config: dict[str, Any]) -> None:
        """A serveConfigV2-only change (`helm upgrade`): KubeRay PUTs it to the running cluster."""
        self.rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        self._put_serve_config(self.pod(f"{self.cluster}-head"), config)

    def serve_status(self, cluster: str | None = None) -> dict[str, str]:
        head = self.pod(f"{cluster or self.cluster}-head")
        text = self._http(head.ip, 8265, "/api/serve/applications/")
        apps = (json.loads(text) if text else {}).get("applications") or {}
        return {name: a.get("status", "") for name, a in apps.items()}

    def serve_details(self, app: str) -> dict[str, Any]:
        """One application's deployments as Serve reports them (status, message, replica states),
        for a failure's message: what a timed-out wait was waiting on."""
        text = self._http(self.pod(f"{self.cluster}-head").ip, 8265, "/api/serve/applications/")
        a = ((json.loads(text) if text else {}).get("applications") or {}).get(app) or {}
        return {"status": a.get("status"), "message": a.get("message"), "deployments": {
            name: {"status": d.get("status"), "message": d.get("message"),
                   "replicas": [(r.get("replica_id", "")[:8], r.get("state")) for r in d.get("replicas") or []]}
            for name, d in (a.get("deployments") or {}).items()}}

    def rayservice_ready(self) -> bool:
        """KubeRay's condition: every Serve application RUNNING and serve-svc with a ready endpoint."""
        status = self.serve_status()
        apps = [a["name"] for a in yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])["applications"]]
        serving = self.endpoints(self.serve_svc_selector(), "serve")
        return all(status.get(a) == "RUNNING" for a in apps) and bool(serving)

    def recreate_head(self) -> Pod:
        """A lost head pod created again, as KubeRay does: a new pod (new IP) behind the same head
        Service; with GCS fault tolerance the new GCS reads the cluster's state back from Redis."""
        old = self.pod(f"{self.cluster}-head")
        assert old.killed
        self.pods.remove(old)
        self._gone.append(old)
        spec = self.rayservice["spec"]["rayClusterConfig"]
        head = self._ray_pod(spec["headGroupSpec"], "head", "headgroup", f"{self.cluster}-head", spec, self.cluster)
        self._launch(head)
        for name in fqdn(self.head_svc):
            self.net.resolve(name, head.ip)
        return head

    def serve_svc_selector(self) -> dict[str, str]:
        return self._serve_selector

    def service_url(self, name: str, port_name: str | None = None) -> tuple[str, int]:
        svc = self.one("Service", name)
        ports = svc["spec"]["ports"]
        port = next(p for p in ports if port_name is None or p.get("name") == port_name)
        return self.services[name], int(port["port"])

    def _service(self, svc: dict[str, Any]) -> None:
        name, spec = svc["metadata"]["name"], svc["spec"]
        selector = spec.get("selector") or {}
        if spec.get("clusterIP") == "None":
            return  # headless: resolved to pods when they start (KubeRay's head-svc below)
        ip = self.net.add_service_ip()
        self.services[name] = ip
        for n in fqdn(name):
            self.net.resolve(n, ip)
        assert self.proxies is not None
        for port in spec.get("ports", []):
            target = port.get("targetPort", port["port"])
            self.proxies.add(ip, int(port["port"]), lambda sel=selector, t=target: self.endpoints(sel, t))

    def _kuberay_services(self) -> None:
        """The serve Service KubeRay creates for a RayService (common/service.go BuildServeService):
        the head container's `serve*` ports, a user port of the same name taking their place."""
        head_ports = self.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        custom = self.rayservice["spec"].get("serveService") or {}
        user = {p["name"]: p for p in (custom.get("spec") or {}).get("ports", [])}
        ports = [user.get(p["name"], {"name": p["name"], "port": p["containerPort"]})
                 for p in head_ports.get("ports", []) if p.get("name", "").startswith("serve")]
        svc = {"kind": "Service", "metadata": {**(custom.get("metadata") or {}), "name": self.serve_svc},
               "spec": {"selector": self.serve_svc_selector(), "ports": ports}}
        self.objects.append(svc)
        self._service(svc)

    def _ray_pod(self, group: dict[str, Any], node_type: str, group_name: str, name: str,
                 cluster_spec: dict[str, Any], cluster: str) -> Pod:
        tmpl = group["template"]
        head_svc = f"{cluster}-head-svc"
        labels = {**(tmpl.get("metadata", {}).get("labels") or {}), "ray.io/cluster": cluster,
                  "ray.io/node-type": node_type, "ray.io/group": group_name, "ray.io/is-ray-node": "yes",
                  "ray.io/serve": "false" if node_type == "head" else "true"}
        pod = Pod(name, node_type, group_name, labels, tmpl["spec"], self._pod_dir(name))
        params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
        if group.get("labels"):
            params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(group["labels"].items()))
        if node_type == "head":
            params.setdefault("dashboard-host", "0.0.0.0")
            if cluster_spec.get("enableInTreeAutoscaling"):
                params["no-monitor"] = "true"
        else:
            params.setdefault("address", f"{head_svc}.{NAMESPACE}.svc.cluster.local:6379")
        params.setdefault("metrics-export-port", "8080")
        params["block"] = "true"
        params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
        if node_type == "head" and (cluster_spec.get("gcsFaultToleranceOptions") or {}).get("redisPassword"):
            params["redis-password"] = "$REDIS_PASSWORD"
        c0 = tmpl["spec"]["containers"][0]
        res = c0.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        if "num-cpus" not in params:
            cpu = limits.get("cpu") or requests.get("cpu")
            if cpu:
                params["num-cpus"] = str(math.ceil(quantity(cpu)))
        if "memory" not in params and limits.get("memory"):
            params["memory"] = str(int(quantity(limits["memory"])))
        if "num-gpus" not in params and limits.get("nvidia.com/gpu"):
            params["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
        flags = ""
        for k in sorted(params):
            v = params[k]
            if v.lower() in ("true", "false") and k not in ("log-color", "include-dashboard", "include-log-monitor"):
                flags += f" --{k} " if v.lower() == "true" else ""
            else:
                flags += f" --{k}={v} "
        ray_start = f"ray start --head {flags}" if node_type == "head" else f"ray start {flags}"
        cmd = " ".join([*c0.get("command", []), *c0.get("args", [])])
        script = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {ray_start}"
        if cmd and "ray start" not in cmd:
            script = f"{cmd} && {script}"
        extra_env = {"RAY_CLUSTER_NAME": cluster, "RAY_CLUSTER_NAMESPACE": NAMESPACE,
                     "RAY_CLOUD_INSTANCE_ID": name, "RAY_NODE_TYPE_NAME": group_name,
                     "KUBERAY_GEN_RAY_START_CMD": ray_start, "RAY_PORT": "6379",
                     "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        if node_type == "worker":
            extra_env["FQ_RAY_IP"] = f"{head_svc}.{NAMESPACE}.svc.cluster.local"
            extra_env["RAY_IP"] = head_svc
        ft = cluster_spec.get("gcsFaultToleranceOptions")
        if ft is not None:  # configureRedisFT, and the workers' GCS reconnect timeout
            if node_type == "worker":
                extra_env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "600"
            else:
                extra_env["RAY_external_storage_namespace"] = ft.get("externalStorageNamespace") or f"uid-{cluster}"
                extra_env["RAY_REDIS_ADDRESS"] = ft["redisAddress"]
                if ft.get("redisPassword"):
                    pw = ft["redisPassword"]
                    ref = (pw.get("valueFrom") or {}).get("secretKeyRef")
                    extra_env["REDIS_PASSWORD"] = self.secret_data(ref["name"])[ref["key"]] if ref else pw["value"]
        for i, c in enumerate(tmpl["spec"]["containers"]):
            argv = ["bash", "-c", script] if i == 0 else self._argv(c)
            probes = {k: c[f"{k}Probe"] for k in ("startup", "readiness", "liveness") if c.get(f"{k}Probe")}
            injected: list[str] = []
            if i == 0:
                # initLivenessAndReadinessProbe: only what the container leaves unset.
                agent = int(params["dashboard-agent-listen-port"])
                if "liveness" not in probes:
                    probes["liveness"] = {"httpGet": {"path": "/api/healthz", "port": agent}, "initialDelaySeconds": 30,
                                          "timeoutSeconds": 2, "periodSeconds": 5, "failureThreshold": 120}
                    injected.append("liveness")
                if "readiness" not in probes:
                    probes["readiness"] = {"httpGet": {"path": "/api/healthz", "port": agent},
                                           "initialDelaySeconds": 10, "timeoutSeconds": 2, "periodSeconds": 5,
                                           "failureThreshold": 10}
                    if node_type == "worker":
                        serve = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "serve"), 8000)
                        probes["readiness"] = {
                            "exec": {"command": ["bash", "-c",
                                                 f"wget --tries 1 -T 2 -q -O- http://localhost:{agent}/api/local_raylet_healthz"
                                                 f" | grep success && wget --tries 1 -T 10 -q -O- "
                                                 f"http://localhost:{serve}/-/healthz | grep success"]},
                            "initialDelaySeconds": 10, "timeoutSeconds": 2, "periodSeconds": 5, "failureThreshold": 1}
                    injected.append("readiness")
            pod.containers.append(self._container(pod, c, argv, probes, {**extra_env} if i == 0 else {}))
            pod.containers[-1].injected = injected
        # The template's own (BuildPod keeps them; KubeRay adds wait-gcs-ready to workers, which
        # _start_cluster stands in for by starting workers once the head's GCS answers).
        pod.init = self._init_containers(pod)
        return pod

    def _reconcile(self) -> None:
        self._head_serve_label()

    def _replace(self, pod: Pod) -> None:
        """A worker pod gone: the RayCluster's group is short of one, KubeRay creates another."""
        if pod.kind != "worker":
            return
        self._restarts += 1
        spec = self.rayservice["spec"]["rayClusterConfig"]
        group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == pod.group)
        name = f"{self.cluster}-{pod.group}-worker-r{self._restarts}"
        self._launch(self._ray_pod(group, "worker", pod.group, name, spec, self.cluster))

    def _head_serve_label(self) -> None:
        for head in [p for p in self.pods if p.kind == "head" and not p.killed]:
            self._head_serve_label_of(head)

    def _head_serve_label_of(self, head: Pod) -> None:
        healthy = False
        if not self.rayservice["spec"].get("excludeHeadPodFromServeSvc"):
            try:
                port = head.containers[0].port("serve")
            except KeyError:
                port = 8000
            healthy = self._http(head.ip, port, "/-/healthz", timeout=2) is not None
        head.labels["ray.io/serve"] = "true" if healthy else "false"

