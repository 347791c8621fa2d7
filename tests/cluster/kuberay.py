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
- common/service.go BuildServeService: `<rayservice>-serve-svc` selects ray.io/cluster and
  ray.io/serve=true, on the head container's ports named `serve`.
- utils/dashboardclient/dashboard_httpclient.go: UpdateDeployments PUTs serveConfigV2 (as JSON) to
  the head's dashboard at /api/serve/applications/, GetServeDetails GETs it.
- rayservice_controller.go: serve config submitted once the head pod is Ready; the RayService is
  Ready when serve-svc has ready endpoints (calculateNumServeEndpointsFromSlices).
The in-tree autoscaler sidecar talks to the Kubernetes API and is not run (issue 15's test runs Ray's
autoscaler over the chart's groups).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.net import ClusterDNS, PodNetwork, ServiceProxies

NAMESPACE = "default"
AGENT_PORT = 52365
# The image's entrypoint, for containers that give only args (the official images' CMD/ENTRYPOINT).
IMAGE_COMMANDS = {"redis": ["redis-server"]}
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(q: Any) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    for suf, mul in _SUFFIX.items():
        if s.endswith(suf):
            return float(s[: -len(suf)]) * mul
    return float(s)


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion (env values, command, args): a name not defined (yet)
    stays as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def fqdn(name: str) -> list[str]:
    return [name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"]


@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    argv: list[str]
    env: dict[str, str]
    mounts: list[tuple[str, str, str]]  # (kind, host source, mount path); kind: bind or tmpfs:<size>
    probes: dict[str, dict[str, Any]]
    injected: list[str] = field(default_factory=list)  # probes KubeRay would have added

    def port(self, ref: Any) -> int:
        if isinstance(ref, int) or str(ref).isdigit():
            return int(ref)
        for p in self.spec.get("ports", []):
            if p.get("name") == ref:
                return int(p["containerPort"])
        raise KeyError(f"container {self.name} has no port named {ref}")


@dataclass
class Pod:
    name: str
    kind: str  # head, worker (Ray) or workload
    group: str
    labels: dict[str, str]
    spec: dict[str, Any]
    dir: Path
    containers: list[Container] = field(default_factory=list)
    ns: str = ""
    ip: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: float = 0.0
    startup_ok: dict[str, bool] = field(default_factory=dict)
    ready_c: dict[str, bool] = field(default_factory=dict)
    fails: dict[tuple[str, str], int] = field(default_factory=dict)
    passes: dict[tuple[str, str], int] = field(default_factory=dict)
    last: dict[tuple[str, str], float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    killed: bool = False

    @property
    def ready(self) -> bool:
        return not self.killed and all(self.ready_c.get(c.name) for c in self.containers)

    def log(self, container: str = "") -> str:
        p = self.dir / f"{container or self.containers[0].name}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""


class KubeRay:
    """The rendered objects, run. Use as a context manager; everything it started is gone after."""

    def __init__(self, objects: list[dict[str, Any]], state: Path, cluster_suffix: str = "x7k2p") -> None:
        self.objects = [o for o in objects if o]
        self.state = state
        self.net = PodNetwork(str(os.getpid() % 100000))
        self.proxies: ServiceProxies | None = None
        self.dns: ClusterDNS | None = None
        self.pods: list[Pod] = []
        self.services: dict[str, str] = {}  # Service name -> ClusterIP
        self._suffix = cluster_suffix
        self._made_dirs: list[Path] = []
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(8)
        self._n = 0
        rs = self.one("RayService")
        self.rayservice = rs
        self.cluster = f"{rs['metadata']['name']}-{cluster_suffix}"
        self.head_svc = f"{self.cluster}-head-svc"
        self.serve_svc = f"{rs['metadata']['name']}-serve-svc"

    # -- objects -----------------------------------------------------------------------------
    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]
        assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
        return found[0]

    def add(self, obj: dict[str, Any]) -> None:
        """An object the operator creates beside the chart (e.g. an external database's Secret)."""
        self.objects.append(obj)

    def secret_data(self, name: str) -> dict[str, str]:
        s = self.one("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        return {**data, **(s.get("stringData") or {})}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> KubeRay:
        self.net.up()
        self.proxies = ServiceProxies()
        self.dns = ClusterDNS(self.net.gateway_ip, self.net.hosts)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._prober is not None:
            self._prober.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for pod in self.pods:
            self.net.kill_all(pod.ns)
            for p in pod.procs:
                with contextlib.suppress(Exception):
                    p.wait(5)
        if self.proxies is not None:
            self.proxies.close()
        if self.dns is not None:
            self.dns.close()
        self.net.down()
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

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
        spec = self.rayservice["spec"]["rayClusterConfig"]
        head = self._ray_pod(spec["headGroupSpec"], "head", "headgroup", f"{self.cluster}-head", spec)
        self._launch(head)
        for name in fqdn(self.head_svc):
            self.net.resolve(name, head.ip)
        self._prober = threading.Thread(target=self._probe_loop, name="kubelet", daemon=True)
        self._prober.start()
        self.wait(lambda: self._http(head.ip, 8265, "/api/gcs_healthz") is not None, 180, "head GCS")
        for g in spec.get("workerGroupSpecs", []):
            for i in range(int(g.get("replicas", g.get("minReplicas", 1)))):
                name = f"{self.cluster}-{g['groupName']}-worker-{i}"
                self._launch(self._ray_pod(g, "worker", g["groupName"], name, spec))

    def submit_serve_config(self) -> float:
        """Once the head pod is Ready, PUT serveConfigV2 as KubeRay does; returns the time."""
        head = self.pod(f"{self.cluster}-head")
        self.wait(lambda: head.ready, 300, "head pod Ready")
        body = json.dumps(yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])).encode()
        req = urllib.request.Request(f"http://{head.ip}:8265/api/serve/applications/", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200, r.read()
        return time.monotonic()

    def update_serve_config(self, config: dict[str, Any]) -> None:
        """A serveConfigV2-only change (`helm upgrade`): KubeRay PUTs it to the running cluster."""
        self.rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        head = self.pod(f"{self.cluster}-head")
        req = urllib.request.Request(f"http://{head.ip}:8265/api/serve/applications/",
                                     data=json.dumps(config).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200, r.read()

    def serve_status(self) -> dict[str, str]:
        head = self.pod(f"{self.cluster}-head")
        text = self._http(head.ip, 8265, "/api/serve/applications/")
        apps = (json.loads(text) if text else {}).get("applications") or {}
        return {name: a.get("status", "") for name, a in apps.items()}

    def rayservice_ready(self) -> bool:
        """KubeRay's condition: every Serve application RUNNING and serve-svc with a ready endpoint."""
        status = self.serve_status()
        apps = [a["name"] for a in yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])["applications"]]
        return all(status.get(a) == "RUNNING" for a in apps) and bool(self.endpoints(self.serve_svc_selector(), None))

    def kill(self, pod: Pod) -> None:
        pod.killed = True
        self.net.kill_all(pod.ns)

    # -- lookups -----------------------------------------------------------------------------
    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def select(self, selector: dict[str, str]) -> list[Pod]:
        return [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]

    def serve_svc_selector(self) -> dict[str, str]:
        return {"ray.io/cluster": self.cluster, "ray.io/serve": "true"}

    def endpoints(self, selector: dict[str, str], target: Any) -> list[tuple[str, int]]:
        out = []
        for p in self.select(selector):
            if p.ready:
                out.append((p.ip, p.containers[0].port(target) if target is not None else 0))
        return out

    def service_url(self, name: str, port_name: str | None = None) -> tuple[str, int]:
        svc = self.one("Service", name)
        ports = svc["spec"]["ports"]
        port = next(p for p in ports if port_name is None or p.get("name") == port_name)
        return self.services[name], int(port["port"])

    def unready(self) -> dict[str, Any]:
        """Pods not Ready, with their probe failures and problems (for a failing test's message)."""
        return {p.name: {"fails": {f"{c}/{k}": n for (c, k), n in p.fails.items() if n}, "problems": p.problems}
                for p in self.pods if not p.ready and not p.killed}

    @staticmethod
    def wait(cond: Any, timeout_s: float, what: Any, every_s: float = 1.0) -> float:
        """Seconds until cond() holds; `what` (a string, or a callable for a late message) names it."""
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                if cond():
                    return time.monotonic() - t0
            if time.monotonic() - t0 >= timeout_s:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")
            time.sleep(every_s)

    @staticmethod
    def _http(ip: str, port: int, path: str, timeout: float = 3) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout) as r:
                return r.read().decode() if 200 <= r.status < 400 else None
        except Exception:
            return None

    # -- Services ----------------------------------------------------------------------------
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
        """The serve Service KubeRay creates for a RayService (common/service.go)."""
        head_ports = self.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["containerPort"]}
                 for p in head_ports.get("ports", []) if p.get("name", "").startswith("serve")]
        svc = {"kind": "Service", "metadata": {"name": self.serve_svc},
               "spec": {"selector": self.serve_svc_selector(), "ports": ports}}
        self.objects.append(svc)
        self._service(svc)

    # -- pods --------------------------------------------------------------------------------
    def _ray_pod(self, group: dict[str, Any], node_type: str, group_name: str, name: str,
                 cluster_spec: dict[str, Any]) -> Pod:
        tmpl = group["template"]
        labels = {**(tmpl.get("metadata", {}).get("labels") or {}), "ray.io/cluster": self.cluster,
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
            params.setdefault("address", f"{self.head_svc}.{NAMESPACE}.svc.cluster.local:6379")
        params.setdefault("metrics-export-port", "8080")
        params["block"] = "true"
        params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
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
        extra_env = {"RAY_CLUSTER_NAME": self.cluster, "RAY_CLUSTER_NAMESPACE": NAMESPACE,
                     "RAY_CLOUD_INSTANCE_ID": name, "RAY_NODE_TYPE_NAME": group_name,
                     "KUBERAY_GEN_RAY_START_CMD": ray_start, "RAY_PORT": "6379",
                     "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        if node_type == "worker":
            extra_env["FQ_RAY_IP"] = f"{self.head_svc}.{NAMESPACE}.svc.cluster.local"
            extra_env["RAY_IP"] = self.head_svc
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
        return pod

    def _workload_pod(self, wl: dict[str, Any], name: str, index: int) -> Pod:
        tmpl = wl["spec"]["template"]
        pod = Pod(name, "workload", wl["metadata"]["name"], dict(tmpl["metadata"].get("labels") or {}),
                  tmpl["spec"], self._pod_dir(name))
        claims = {t["metadata"]["name"]: f"{t['metadata']['name']}-{name}"
                  for t in wl["spec"].get("volumeClaimTemplates", [])}
        pod.spec = {**tmpl["spec"], "volumes": [*tmpl["spec"].get("volumes", []),
                                                 *({"name": t, "persistentVolumeClaim": {"claimName": c}}
                                                   for t, c in claims.items())]}
        for c in tmpl["spec"]["containers"]:
            probes = {k: c[f"{k}Probe"] for k in ("startup", "readiness", "liveness") if c.get(f"{k}Probe")}
            pod.containers.append(self._container(pod, c, self._argv(c), probes, {}))
        return pod

    @staticmethod
    def _argv(c: dict[str, Any]) -> list[str]:
        image = c["image"].split("/")[-1].split(":")[0]
        return [*(c.get("command") or IMAGE_COMMANDS.get(image, [])), *(c.get("args") or [])]

    def _pod_dir(self, name: str) -> Path:
        d = self.state / "pods" / name
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        (d / "home").mkdir(parents=True, exist_ok=True)
        return d

    def _container(self, pod: Pod, c: dict[str, Any], argv: list[str], probes: dict[str, Any],
                   extra_env: dict[str, str]) -> Container:
        return Container(c["name"], c, argv, {**extra_env, **self._env(pod, c)}, self._mounts(pod, c), probes)

    def _env(self, pod: Pod, c: dict[str, Any]) -> dict[str, str]:
        """The container's env as the kubelet resolves it: Secret and ConfigMap keys, the downward
        API, and `$(VAR)` references to variables defined before."""
        env: dict[str, str] = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
                continue
            src = e["valueFrom"]
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                env[e["name"]] = self.secret_data(ref["name"])[ref["key"]]
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                env[e["name"]] = self.one("ConfigMap", ref["name"])["data"][ref["key"]]
            elif "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                env[e["name"]] = {"status.podIP": "<pod-ip>", "metadata.name": pod.name,
                                  "metadata.namespace": NAMESPACE}[path]
            else:
                raise NotImplementedError(f"env source {src}")
        return env

    def _mounts(self, pod: Pod, c: dict[str, Any]) -> list[tuple[str, str, str]]:
        vols = {v["name"]: v for v in pod.spec.get("volumes", [])}
        out = []
        for m in c.get("volumeMounts", []):
            v = vols[m["name"]]
            if "emptyDir" in v and v["emptyDir"].get("medium") == "Memory":
                out.append((f"tmpfs:{v['emptyDir'].get('sizeLimit', '1Gi')}", "", m["mountPath"]))
                continue
            if "emptyDir" in v:
                src = pod.dir / "vol" / m["name"]
            elif "persistentVolumeClaim" in v:
                src = self.state / "pvc" / v["persistentVolumeClaim"]["claimName"]  # shared: ReadWriteMany
            elif "configMap" in v or "secret" in v:
                src = pod.dir / "vol" / m["name"]
                if "configMap" in v:
                    data = dict(self.one("ConfigMap", v["configMap"]["name"]).get("data") or {})
                else:
                    data = self.secret_data(v["secret"]["secretName"])
                items = (v.get("configMap") or v.get("secret") or {}).get("items")
                src.mkdir(parents=True, exist_ok=True)
                for key, text in data.items():
                    rel = next((i["path"] for i in items if i["key"] == key), None) if items else key
                    if rel:
                        (src / rel).parent.mkdir(parents=True, exist_ok=True)
                        (src / rel).write_text(text)
            else:
                raise NotImplementedError(f"volume {v}")
            src.mkdir(parents=True, exist_ok=True)
            if m.get("subPath"):
                src = src / m["subPath"]
                src.mkdir(parents=True, exist_ok=True)
            out.append(("bind", str(src), m["mountPath"]))
        return out

    def _launch(self, pod: Pod) -> None:
        self._n += 1
        pod.ns, pod.ip = self.net.add_pod(self._n)
        self.pods.append(pod)
        for c in pod.containers:
            c.env = {k: v.replace("<pod-ip>", pod.ip) for k, v in c.env.items()}
            # The kubelet expands $(VAR) in command and args too, from the container's env.
            c.argv = [expand(a, c.env) for a in c.argv]
            pod.ready_c[c.name] = False
            pod.startup_ok[c.name] = "startup" not in c.probes
            pod.procs.append(self._run(pod, c))
        pod.started = time.monotonic()

    def _run(self, pod: Pod, c: Container) -> subprocess.Popen[bytes]:
        lines = ["set -e"]
        for kind, src, dst in c.mounts:
            self._mkdir_host(Path(dst))
            if kind.startswith("tmpfs:"):
                size = int(quantity(kind.split(":", 1)[1]))
                lines.append(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(dst)}")
            else:
                lines.append(f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}")
        # The pod's own /tmp/ray (Ray's session dir and sockets: every node has its own). Only that
        # directory: the rest of /tmp stays the host's, where the checkout and its venv may live.
        lines.append(f"mkdir -p /tmp/ray && mount --bind {shlex.quote(str(pod.dir / 'tmp'))} /tmp/ray")
        lines.append(f"cd {shlex.quote(c.spec.get('workingDir') or str(Path.cwd()))}")
        lines.append('exec env -i "$@"')
        venv_bin = str(Path(sys.executable).parent)
        image_env = {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "HOME": str(pod.dir / "home"), "LANG": "C.UTF-8", "HOSTNAME": pod.name}
        env = {**image_env, **c.env}
        argv = ["ip", "netns", "exec", pod.ns, "bash", "-c", "\n".join(lines), pod.name,
                *(f"{k}={v}" for k, v in env.items()), *c.argv]
        log = open(pod.dir / f"{c.name}.log", "ab")  # noqa: SIM115 - the child holds it
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _mkdir_host(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made_dirs.append(d)

    # -- the kubelet's probes ----------------------------------------------------------------
    def _probe_loop(self) -> None:
        running: dict[tuple[str, str, str], Any] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            for pod in list(self.pods):
                if pod.killed:
                    continue
                for c in pod.containers:
                    for kind, probe in c.probes.items():
                        key = (pod.name, c.name, kind)
                        if kind != "startup" and not pod.startup_ok[c.name]:
                            continue
                        if kind == "startup" and pod.startup_ok[c.name]:
                            continue
                        if now - pod.started < probe.get("initialDelaySeconds", 0):
                            continue
                        if now - pod.last.get((c.name, kind), -1e9) < probe.get("periodSeconds", 10):
                            continue
                        if key in running and not running[key].done():
                            continue
                        pod.last[(c.name, kind)] = now
                        running[key] = self._pool.submit(self._probe_once, pod, c, kind, probe)
            self._stop.wait(0.5)

    def _probe_once(self, pod: Pod, c: Container, kind: str, probe: dict[str, Any]) -> None:
        ok = self._check(pod, c, probe)
        k = (c.name, kind)
        if ok:
            pod.passes[k] = pod.passes.get(k, 0) + 1
            pod.fails[k] = 0
        else:
            pod.fails[k] = pod.fails.get(k, 0) + 1
            pod.passes[k] = 0
        failed = pod.fails[k] >= probe.get("failureThreshold", 3)
        if kind == "startup":
            if ok:
                pod.startup_ok[c.name] = True
            elif failed:
                pod.problems.append(f"{c.name}: startup probe failed {pod.fails[k]} times (the kubelet restarts it)")
        elif kind == "liveness" and failed:
            pod.problems.append(f"{c.name}: liveness probe failed {pod.fails[k]} times (the kubelet restarts it)")
        elif kind == "readiness":
            if ok and pod.passes[k] >= probe.get("successThreshold", 1):
                pod.ready_c[c.name] = True
            elif failed:
                pod.ready_c[c.name] = False
        if "readiness" not in c.probes and pod.startup_ok[c.name]:
            pod.ready_c[c.name] = True

    def _check(self, pod: Pod, c: Container, probe: dict[str, Any]) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            g = probe["httpGet"]
            url = f"http://{pod.ip}:{c.port(g['port'])}{g.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return 200 <= r.status < 400
            except Exception:
                return False
        if "tcpSocket" in probe:
            import socket

            try:
                with socket.create_connection((pod.ip, c.port(probe["tcpSocket"]["port"])), timeout=timeout):
                    return True
            except OSError:
                return False
        if "exec" in probe:
            env = [f"{k}={v}" for k, v in {"PATH": os.environ["PATH"], **c.env}.items()]
            try:
                r = subprocess.run(["ip", "netns", "exec", pod.ns, "env", "-i", *env, *probe["exec"]["command"]],
                                   capture_output=True, timeout=timeout + 5)
                return r.returncode == 0
            except subprocess.TimeoutExpired:
                return False
        raise NotImplementedError(f"probe {probe}")
