"""Autoscaling through the chart's own worker groups, with Ray's own autoscaler, on one machine.

The node types are not written here: the RayCluster spec `helm template` renders (values-cpu-dev.yaml
plus values-autoscaling.yaml: a gateway group and an engine group, each 1..2 pods) goes through the
function KubeRay's autoscaler sidecar runs on it (`_derive_autoscaling_config_from_ray_cr`): node
resources, labels, min/max, idle timeout and upscaling speed. Ray's autoscaler (v1, what KubeRay runs
unless told otherwise) then scales a cluster of real Ray nodes through Ray's fake multi-node provider
(`ray.cluster_utils.AutoscalingCluster`, what Ray's own autoscaler tests use): a node it adds is a
real raylet on this machine, as a pod would be. serveConfigV2 goes to the head's dashboard as KubeRay
sends it; the engines are real vLLM, the clients the openai SDK.

What it shows, with no failed request throughout:
1. A burst raises the engine replicas and the gateway replicas past what the minimum pods hold; the
   autoscaler adds a pod of each group; the new replicas register and serve (the answers name them).
2. After the burst, replicas go back to their minimum, then the idle pods are removed.

What a Kubernetes cluster adds and this does not have: pod scheduling and image pulls (the start
delays), and a Service in front of the gateways. Here every gateway listens on one port with
SO_REUSEPORT (gateway.reuse_port), so the kernel spreads connections over them as a Service spreads
them over pods; the clients close each connection, as many clients behind a Service would.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.load import Load, timings_out
from tests.k8s.support import CHART, run, tool

pytestmark = pytest.mark.cluster
HERE = Path(__file__).parent
DASHBOARD = "http://127.0.0.1:8265"


def render() -> list[dict[str, Any]]:
    out = run([tool("helm"), "template", "t", str(CHART), "-f", str(CHART / "values-cpu-dev.yaml"),
               "-f", str(HERE / "values-autoscaling.yaml")])
    return [d for d in yaml.safe_load_all(out) if d]


def autoscaling_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """What KubeRay's autoscaler sidecar builds from the RayService's cluster spec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    return _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "t", "namespace": "llm"}, "spec": svc["spec"]["rayClusterConfig"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(path: str) -> Any:
    """A dashboard read; {} while it is too busy to answer (it is polled, like KubeRay polls it)."""
    try:
        with urllib.request.urlopen(DASHBOARD + path, timeout=30) as r:
            return json.loads(r.read() or b"{}")
    except OSError:
        return {}


def put_serve_config(config: dict[str, Any]) -> None:
    req = urllib.request.Request(f"{DASHBOARD}/api/serve/applications/", data=json.dumps(config).encode(),
                                 method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200, r.read()


class ChartCluster:
    """Ray's AutoscalingCluster with KubeRay's autoscaling config, only the provider swapped for the
    fake multi-node one. (AutoscalingCluster builds its config from fake_multi_node/example.yaml,
    which the Ray wheel does not ship; start() and shutdown() are what it runs.)"""

    def __new__(cls, kuberay_config: dict[str, Any]) -> Any:
        from ray.cluster_utils import AutoscalingCluster

        config = json.loads(json.dumps(kuberay_config))
        config["provider"] = {"type": "fake_multinode", "use_node_id_as_ip": True,
                              "disable_node_updaters": True, "disable_launch_config_check": True}
        for t in config["available_node_types"].values():
            # Every fake node is this machine: no node may claim the pod's GiBs of memory, and
            # each gets a small object store (engines pass almost nothing through it).
            t["resources"].pop("memory", None)
            t["resources"]["object_store_memory"] = 200 * 1024 * 1024
        # The fake provider tags its head node with its own head type name.
        types = config["available_node_types"]
        types["ray.head.default"] = types.pop(config["head_node_type"])
        config["head_node_type"] = "ray.head.default"
        head = config["available_node_types"]["ray.head.default"]["resources"]
        cluster = object.__new__(AutoscalingCluster)
        cluster._head_resources = {k: v for k, v in head.items() if k != "object_store_memory"}
        cluster._config = config
        cluster._autoscaler_v2 = False
        return cluster


class Fleet:
    """The cluster as an operator reads it: Serve replicas (dashboard) and alive Ray nodes by group."""

    def replicas(self) -> dict[str, int]:
        apps = get("/api/serve/applications/").get("applications") or {}
        out = {}
        for app, dep in (("tiny-a", None), ("gateway", "gateway")):
            deps = (apps.get(app) or {}).get("deployments") or {}
            for name, d in deps.items():
                if dep is None or name == dep:
                    out[app] = sum(1 for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
        return out

    def nodes(self) -> Counter[str]:
        from ray.util.state import list_nodes

        groups: Counter[str] = Counter()
        try:
            nodes = list_nodes(address=DASHBOARD, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        except Exception:  # the dashboard busy; polled again
            return groups
        for n in nodes:
            res = n.resources_total or {}
            groups["head" if n.is_head_node else "gateway" if "llmserve_gateway" in res else "cpu"] += 1
        return groups


def wait_for(what: str, cond: Any, timeout_s: float, describe: Any = None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if cond():
            return time.monotonic() - t0
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s ({describe() if describe else ''})")


def test_chart_groups_scale_up_and_down_with_rays_autoscaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render()
    config = autoscaling_config(objs)
    types = config["available_node_types"]
    assert set(types) == {config["head_node_type"], "gateway", "cpu"}
    assert types["gateway"]["resources"]["llmserve_gateway"] == 1
    assert types["gateway"]["labels"] == {"llmserve.io/gateway": "true"}
    assert (types["cpu"]["resources"]["CPU"], types["cpu"]["min_workers"], types["cpu"]["max_workers"]) == (2, 1, 2)
    assert config["idle_timeout_minutes"] == pytest.approx(10 / 60)

    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (keys,) = [o for o in objs if o["kind"] == "Secret" and "keys.yaml" in (o.get("data") or {})]
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_bytes(base64.b64decode(keys["data"]["keys.yaml"]))
    port, metrics_port = free_port(), free_port()
    # The pod environment the chart gives every Ray container, for this machine (values and the
    # Secrets' contents): the gateways take the rest of their configuration from serveConfigV2.
    env = {
        "LLMSERVE_BIND_HOST": "127.0.0.1",
        "LLMSERVE_ENGINE_SECRET": secrets.token_urlsafe(24),
        "LLMSERVE__AUTH__KEYS_FILE": str(keys_file),
        "LLMSERVE__GATEWAY__PORT": str(port),
        "LLMSERVE__GATEWAY__METRICS_PORT": str(metrics_port),
        # A pod's own HOME, as in tests/cluster/kuberay.py: not this machine's ~/.ray (a token
        # there turns on Ray's token auth) nor its model cache (the tiny model is built on start).
        "HOME": str(tmp_path / "home"),
    }
    # AutoscalingCluster runs the `ray` CLI of this environment.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cluster = ChartCluster(config)
    fleet = Fleet()
    load = Load(f"http://127.0.0.1:{port}/v1", "sk-llmserve-dev")
    times: dict[str, float] = {}
    cluster.start(override_env=env)
    try:
        wait_for("the dashboard", lambda: _answers(f"{DASHBOARD}/api/version"), 120)
        wait_for("the minimum pods", lambda: fleet.nodes() == {"head": 1, "gateway": 1, "cpu": 1}, 180, fleet.nodes)
        put_serve_config(serve_config)
        times["deploy_to_serving_s"] = wait_for(
            "one engine and one gateway serving",
            lambda: fleet.replicas() == {"tiny-a": 1, "gateway": 1} and _answers(f"http://127.0.0.1:{port}/health"),
            600, fleet.replicas)

        # 1. The burst.
        t0 = time.monotonic()
        load.start(clients=12)
        wait_for("two engine replicas and two gateways answering",
                 lambda: len(load.engines) >= 2 and len(load.gateways) >= 2, 480,
                 lambda: (fleet.replicas(), fleet.nodes(), dict(load.engines), dict(load.gateways), load.failures[:3]))
        assert fleet.nodes() == {"head": 1, "gateway": 2, "cpu": 2}
        assert fleet.replicas() == {"tiny-a": 2, "gateway": 2}
        first = sorted(load.first_seen.items(), key=lambda kv: kv[1])
        times["burst_to_second_engine_serving_s"] = max(v for k, v in first if k.startswith("engine:")) - t0
        times["burst_to_second_gateway_serving_s"] = max(v for k, v in first if k.startswith("gateway:")) - t0
        time.sleep(5)  # both of each serve for a while
        load.stop()
        assert min(load.engines.values()) > 0 and min(load.gateways.values()) > 0
        burst_ok = load.ok

        # 2. Back down, with a trickle of clients the whole time.
        t1 = time.monotonic()
        load.start(clients=1, pause_s=1.0)
        times["burst_end_to_min_replicas_s"] = wait_for(
            "replicas back to their minimum", lambda: fleet.replicas() == {"tiny-a": 1, "gateway": 1}, 240,
            fleet.replicas)
        times["burst_end_to_min_pods_s"] = wait_for(
            "idle pods removed", lambda: fleet.nodes() == {"head": 1, "gateway": 1, "cpu": 1}, 240,
            fleet.nodes) + times["burst_end_to_min_replicas_s"]
        time.sleep(3)
        load.stop()
        assert load.ok > burst_ok + 10, (burst_ok, load.ok)
        assert load.failures == [], load.failures[:10]
        # Two gateway scale-downs at most, one racing connection each at a 1-client trickle, a few
        # during the burst's end: more means connections are lost outside a scale-down.
        assert len(load.retried) <= 3, load.retried
        times["connection_errors_retried"] = len(load.retried)
        times["requests_ok"] = load.ok
        timings_out({"autoscaling": times, "engines": dict(load.engines), "gateways": dict(load.gateways),
                     "scale_down_window_s": round(time.monotonic() - t1, 1)})
    finally:
        load.stop()
        cluster.shutdown()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False
