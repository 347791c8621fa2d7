"""The kubelet, kube-proxy and the disruption controller for tests/cluster/kuberay.py: pods as
network namespaces (tests/cluster/net.py) running their containers' own command, env and volumes,
their probes, ClusterIP Services to Ready endpoints, and eviction through PodDisruptionBudgets
(allowed while the Ready pods a PDB selects exceed its minAvailable; the evicted pod leaves every
Service at once, runs its preStop, then gets SIGTERM and, after terminationGracePeriodSeconds,
SIGKILL)."""

from __future__ import annotations

import base64
import contextlib
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

from tests.cluster.net import ClusterDNS, PodNetwork, ServiceProxies

NAMESPACE = "default"
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
    init: list[Container] = field(default_factory=list)  # initContainers, run in order before them
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
    terminating: bool = False
    restarts: int = 0  # container restarts by the kubelet (restartPolicy Always)
    exited_at: float = 0.0
    stopped_after_s: float = 0.0

    @property
    def ready(self) -> bool:
        return not self.killed and all(self.ready_c.get(c.name) for c in self.containers)

    def log(self, container: str = "") -> str:
        p = self.dir / f"{container or self.containers[0].name}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""


class Kubelet:
    """Pods, their probes and their Services; the owner of the pods (KubeRay) subclasses it."""

    def __init__(self, objects: list[dict[str, Any]], state: Path) -> None:
        self.objects = [o for o in objects if o]
        self.state = state
        self.net = PodNetwork(str(os.getpid() % 100000))
        self.proxies: ServiceProxies | None = None
        self.dns: ClusterDNS | None = None
        self.pods: list[Pod] = []
        self.services: dict[str, str] = {}  # Service name -> ClusterIP
        self._made_dirs: list[Path] = []
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(8)
        self._gone: list[Pod] = []  # pods replaced (their namespaces are removed on exit too)
        self._n = 0

    def __enter__(self) -> Any:
        self.net.up()
        self.proxies = ServiceProxies()
        self.dns = ClusterDNS(self.net.gateway_ip, self.net.hosts)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._prober is not None:
            self._prober.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for pod in [*self.pods, *self._gone]:
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

    def _reconcile(self) -> None:
        """The owner's periodic work (every 2 s, on the kubelet's thread pool)."""

    def _replace(self, pod: Pod) -> None:
        """The owner's answer to a pod gone for good (an eviction)."""

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

    def kill(self, pod: Pod) -> None:
        pod.killed = True
        self.net.kill_all(pod.ns)

    def pdb_allows(self, pod: Pod) -> bool:
        """The Eviction API's check: every PDB selecting the pod must keep minAvailable Ready pods."""
        for pdb in [o for o in self.objects if o.get("kind") == "PodDisruptionBudget"]:
            sel = pdb["spec"]["selector"]["matchLabels"]
            if not all(pod.labels.get(k) == v for k, v in sel.items()):
                continue
            assert "maxUnavailable" not in pdb["spec"], "RayCluster pods: only an integer minAvailable works"
            healthy = sum(1 for p in self.select(sel) if p.ready and not p.terminating)
            if healthy - int(pdb["spec"]["minAvailable"]) <= 0:
                return False
        return True

    def every_pod(self) -> list[Pod]:
        """The pods now and those replaced since (a recreated head's predecessor)."""
        return [*self.pods, *self._gone]

    def delete(self, pod: Pod) -> None:
        """The pod deleted by its owner (no PDB consulted, not replaced): terminates as on eviction."""
        pod.terminating = True
        threading.Thread(target=self._terminate, args=(pod, False), name=f"delete-{pod.name}", daemon=True).start()

    def evict(self, pod: Pod) -> bool:
        """`kubectl drain` of the pod's node: False (HTTP 429) when a PDB forbids it; otherwise the
        pod terminates (out of every Service at once, preStop, SIGTERM, SIGKILL after the grace
        period) in the background, then its owner replaces it (`_replace`)."""
        if not self.pdb_allows(pod):
            return False
        pod.terminating = True
        threading.Thread(target=self._terminate, args=(pod,), name=f"terminate-{pod.name}", daemon=True).start()
        return True

    def _terminate(self, pod: Pod, replace: bool = True) -> None:
        t0 = time.monotonic()
        grace = float(pod.spec.get("terminationGracePeriodSeconds", 30))
        c = pod.containers[0]
        pre = ((c.spec.get("lifecycle") or {}).get("preStop") or {}).get("exec")
        if pre:
            # `ray stop` finds Ray's processes machine-wide, which here would be every pod's: on
            # this machine it is the pod's own processes getting SIGTERM (below), what it does in a
            # container; the `ray` the hook runs is a no-op shim, the rest of the hook (its pause) runs.
            shim = pod.dir / "prestop-bin"
            shim.mkdir(exist_ok=True)
            (shim / "ray").write_text("#!/bin/sh\nexit 0\n")
            (shim / "ray").chmod(0o755)
            env = [f"{k}={v}" for k, v in {**c.env, "PATH": f"{shim}:{os.environ['PATH']}"}.items()]
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["ip", "netns", "exec", pod.ns, "env", "-i", *env, *pre["command"]],
                               capture_output=True, timeout=grace)
        for pid in self.net.pids(pod.ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        while self.net.pids(pod.ns) and time.monotonic() - t0 < grace:
            time.sleep(0.5)
        self.kill(pod)
        pod.stopped_after_s = round(time.monotonic() - t0, 1)
        if replace and not self._stop.is_set():
            self._replace(pod)

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def select(self, selector: dict[str, str]) -> list[Pod]:
        return [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]

    def endpoints(self, selector: dict[str, str], target: Any) -> list[tuple[str, int]]:
        """Ready, not terminating pods the selector matches; a named target port only on the pods
        that declare it."""
        out = []
        for p in self.select(selector):
            if p.ready and not p.terminating:
                try:
                    out.append((p.ip, p.containers[0].port(target) if target is not None else 0))
                except KeyError:
                    continue
        return out

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
        pod.init = self._init_containers(pod)
        return pod

    def _init_containers(self, pod: Pod) -> list[Container]:
        return [self._container(pod, c, self._argv(c), {}, {}) for c in pod.spec.get("initContainers", [])]

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

    def _launch(self, pod: Pod, init_timeout_s: float = 300) -> None:
        self._n += 1
        pod.ns, pod.ip = self.net.add_pod(self._n)
        # Init containers first, each to a zero exit, in order; the pod is not Running before.
        for c in pod.init:
            c.env = {k: v.replace("<pod-ip>", pod.ip) for k, v in c.env.items()}
            c.argv = [expand(a, c.env) for a in c.argv]
            rc = self._run(pod, c).wait(init_timeout_s)
            assert rc == 0, f"{pod.name}: init container {c.name} exited {rc}: {pod.log(c.name)}"
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

    def _probe_loop(self) -> None:
        running: dict[tuple[str, str, str], Any] = {}
        last_label = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            for pod in list(self.pods):
                if pod.killed:
                    continue
                self._restart_exited(pod, now)
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
            if now - last_label >= 2:  # the operator's reconcile loop, beside the kubelet's
                last_label = now
                self._pool.submit(self._reconcile)
            self._stop.wait(0.5)

    def _restart_exited(self, pod: Pod, now: float) -> None:
        """restartPolicy Always: a container whose process exited is started again after the
        kubelet's back-off (10 s, doubling, at most 5 min). E.g. a head whose GCS could not reach
        Redis yet (its Service has no Ready endpoint in the first seconds) exits, then comes up."""
        if pod.terminating or all(p.poll() is None for p in pod.procs):
            pod.exited_at = 0.0
            return
        if not pod.exited_at:
            pod.exited_at = now
            return
        if now - pod.exited_at < min(10 * 2**pod.restarts, 300):
            return
        pod.restarts += 1
        pod.exited_at = 0.0
        for i, c in enumerate(pod.containers):
            if pod.procs[i].poll() is not None:
                pod.ready_c[c.name] = False
                pod.startup_ok[c.name] = "startup" not in c.probes
                for k in [k for k in pod.fails if k[0] == c.name]:
                    pod.fails[k] = pod.passes[k] = 0
                pod.procs[i] = self._run(pod, c)
        pod.started = now

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

