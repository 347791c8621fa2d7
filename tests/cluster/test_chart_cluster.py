"""The chart's own cluster, run the way KubeRay runs it (tests/cluster/kuberay.py says what is read
from KubeRay's controller source: ray-operator/controllers/ray/common/pod.go, common/service.go,
utils/dashboardclient/dashboard_httpclient.go, rayservice_controller.go).

`helm template` with the CPU values (helm/llmserve/values-cpu-dev.yaml) and a production-shaped
overlay (values-cluster.yaml: two gateway pods, a shared volume, PostgreSQL) gives the objects;
every pod is a network namespace running its container's own command, env and volumes: the Ray
nodes with the `ray start` KubeRay would build, the chart's Redis. serveConfigV2 goes to the head's
dashboard as KubeRay sends it. Then, as a client would: every pod Ready by its own probes, the
openai SDK through the chart's Service (KubeRay's serve Service, from the RayService's
serveService), a batch to completion, an adapter promoted before a new engine replica starts and
served by it; then, with SDK clients running throughout and not one request failing, the head pod
lost and created again (GCS fault tolerance: the applications stay RUNNING, no model reloaded), and
a gateway pod drained through its PDB.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.cluster.kuberay import KubeRay
from tests.cluster.load import Load, timings_out
from tests.k8s.support import CHART, run, tool

pytestmark = pytest.mark.cluster
HERE = Path(__file__).parent
RELEASE = "t"
DB_SECRET = "llmserve-batch-db"


def render(*args: str) -> list[dict]:
    out = run([tool("helm"), "template", RELEASE, str(CHART), "-f", str(CHART / "values-cpu-dev.yaml"),
               "-f", str(HERE / "values-cluster.yaml"), *args])
    return [d for d in yaml.safe_load_all(out) if d]


@dataclass
class Cluster:
    k: KubeRay
    pg: Any
    tmp: Path
    times: dict[str, Any]
    base: str  # the API Service's URL, for the openai SDK


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One emulated cluster for every test of this module, in order (each goes on from where the
    one before left it): started here, stopped after the last."""
    from tests.support import PostgresServer

    tmp_path = tmp_path_factory.mktemp("chart-cluster")
    times: dict[str, Any] = {}
    with KubeRay(render(), tmp_path) as k:
        pg = PostgresServer(tmp_path / "pg", host=k.net.gateway_ip)
        pg.start()
        try:
            k.add({"kind": "Secret", "metadata": {"name": DB_SECRET},
                   "data": {"url": base64.b64encode(pg.url.encode()).decode()}})
            k.start()
            k.submit_serve_config()
            # Ready: the RayService by KubeRay's rule (every test starts from there).
            times["submit_to_rayservice_ready_s"] = k.wait(k.rayservice_ready, 900, "RayService Ready", 2)
            ip, port = k.service_url(f"{RELEASE}-llmserve")
            yield Cluster(k, pg, tmp_path, times, f"http://{ip}:{port}/v1")
        finally:
            times["container_restarts"] = {p.name: p.restarts for p in k.every_pod() if p.restarts}
            timings_out(times)
            pg.stop()


def test_chart_runs_as_kuberay_runs_it(cluster: Cluster) -> None:
    from serve.config import ModelSpec
    from serve.engine.models import resolve_source
    from tests.integration.conftest import make_lora_adapter

    k, pg, tmp_path, times = cluster.k, cluster.pg, cluster.tmp, cluster.times
    # 1. Ready: every pod by its own probes (the RayService by KubeRay's rule: the fixture).
    times["submit_to_all_pods_ready_s"] = k.wait(
        lambda: not k.unready(), 300, lambda: f"every pod Ready; not Ready: {k.unready()}", 1,
    ) + times["submit_to_rayservice_ready_s"]
    for p in k.pods:
        assert not p.problems, (p.name, p.problems, p.log())
        for c in p.containers:
            assert not c.injected, f"{p.name}/{c.name} leaves {c.injected} probes to KubeRay"
    ray_pods = [p for p in k.pods if p.kind != "workload"]
    assert len(ray_pods) == 4 and any(p.kind == "workload" for p in k.pods)

    # 2. The openai SDK through the chart's Service.
    ip, port = k.service_url(f"{RELEASE}-llmserve")
    client = OpenAI(base_url=f"http://{ip}:{port}/v1", api_key="sk-llmserve-dev", timeout=120)
    msgs = [{"role": "user", "content": "hello cluster"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny-b", messages=msgs, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {m.id for m in client.models.list()} >= {"tiny", "tiny-a", "tiny-b"}

    # 3. A batch to completion: uploaded through one gateway, run by the batch worker in
    # the gateway application, the store in PostgreSQL, the bytes on the shared volume.
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": f"batch {i}"}],
                       "max_tokens": 4}} for i in range(4)]
    f = client.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()),
                            purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    t_batch = time.monotonic()
    k.wait(lambda: client.batches.retrieve(b.id).status == "completed", 300, "batch completed", 2)
    times["batch_s"] = round(time.monotonic() - t_batch, 1)
    done = client.batches.retrieve(b.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["q0", "q1", "q2", "q3"]
    assert all(o["response"]["status_code"] == 200 for o in out)
    import psycopg

    with psycopg.connect(pg.url) as conn:  # the rows are in PostgreSQL, not in one pod's SQLite
        assert conn.execute("SELECT status FROM batches WHERE id = %s", (b.id,)).fetchone() == ("completed",)

    # 4. An adapter promoted at runtime reaches a replica started after the promotion.
    pvc = tmp_path / "pvc" / f"{RELEASE}-llmserve-model-cache"
    base = resolve_source(ModelSpec(name="x", source="builtin://tiny?seed=1"))
    make_lora_adapter(base, str(pvc / "adapters" / "tiny-a-student"), seed=3, std=1e-3)
    ops = httpx.Client(base_url=f"http://{ip}:{port}", headers={"Authorization": "Bearer sk-llmserve-ops"},
                       timeout=180)
    loaded = ops.post("/v1/llmserve/adapters", json={"name": "tiny-a-student", "base": "tiny-a",
                                                  "path": "/model-cache/adapters/tiny-a-student"})
    assert loaded.status_code == 200 and loaded.json()["replicas"] == 1, loaded.text
    # The other gateway learns the adapter from Redis within its discovery interval.
    k.wait(lambda: served_by(client, "tiny-a-student", 4), 60, "every gateway serving the adapter")
    before = served_by(client, "tiny-a-student", 4)
    assert len(before) == 1
    config = yaml.safe_load(k.rayservice["spec"]["serveConfigV2"])
    app = next(a for a in config["applications"] if a["name"] == "tiny-a")
    # Any change to an application's args rolls its replicas (Serve's code version hashes them):
    # room for a third replica changes nothing else, and the model keeps its one replica.
    app["args"]["model"]["deployment"]["autoscaling"]["max_replicas"] = 3
    t_scale = time.monotonic()
    k.update_serve_config(config)  # what `helm upgrade` of serveConfigV2 alone does
    # Serve stops the old replica, then starts one that loads the adapter from its registration in
    # Redis. One replica, so that which one answers is certain: with two, a gateway keeps an
    # adapter's requests on the replica it last sent that adapter to (serve/policies/routing.py,
    # vLLM batches few adapters at once), and a second new replica could hold the adapter unseen
    # (CI's failure at e3cb3a3: one of two new replicas seen in 600 s).
    now: set[str] = set()

    def only_a_new_replica_serving() -> bool:
        now.clear()
        now.update(served_by(client, "tiny-a-student", 4))
        return bool(now) and not now & before

    k.wait(only_a_new_replica_serving, 600, lambda: f"the adapter served only by a tiny-a replica started after "
           f"the promotion; before {sorted(before)}, now {sorted(now)}, {k.serve_details('tiny-a')}", 5)
    times["new_replica_serving_adapter_s"] = round(time.monotonic() - t_scale, 1)


def test_a_gateway_drain_goes_through_the_pdb(cluster: Cluster) -> None:
    """A drain of a gateway pod's node goes through the gateways' PDB (minAvailable 1 of 2): the
    eviction is allowed, a second one refused until the replacement pod KubeRay creates is Ready;
    the evicted pod leaves the Service, pauses (preStop), stops; no request fails meanwhile."""
    k, times = cluster.k, cluster.times
    gateway = {"llmserve.io/gateway": "true"}
    gateways = [g for g in k.select(gateway) if g.ready and not g.terminating]
    assert len(gateways) == 2 and all(g.kind == "worker" for g in gateways)
    assert sorted(ip for ip, _ in k.endpoints(k.serve_svc_selector(), "serve")) == sorted(g.ip for g in gateways), \
        "the Service reaches exactly the gateway pods"
    load = Load(cluster.base, "sk-llmserve-dev", model="tiny-b", retry=False)
    load.start(clients=2, pause_s=0.5)
    try:
        k.wait(lambda: load.ok >= 4, 60, lambda: f"requests under load: {load.failures[:3]}")
        ok_at_drain, t_drain = load.ok, time.monotonic()
        assert k.evict(gateways[0])
        assert not k.evict(gateways[1]), "the PDB must refuse a second gateway while one is out"
        k.wait(lambda: gateways[0].killed and len([g for g in k.select(gateway) if g.ready and not g.terminating]) == 2,
               300, lambda: f"a replacement gateway pod Ready: {k.unready()}", 2)
        times["drain_to_replacement_ready_s"] = round(time.monotonic() - t_drain, 1)
        times["evicted_pod_stopped_after_s"] = gateways[0].stopped_after_s
        assert k.pdb_allows(gateways[1])
        assert load.ok > ok_at_drain + 10, (ok_at_drain, load.ok)
    finally:
        load.stop()
    assert load.failures == [] and load.retried == [], (load.failures[:5], load.retried[:5])
    times["drain_requests_ok"] = load.ok


# A lost head cost every replica until four causes were fixed: uvicorn's and vLLM's dictConfig closed
# Serve's replica log handler (serve/asgi.py, serve/engine/direct.py log_handlers_kept); the new GCS
# restarted the endpoint registry through its creator's worker node in a tight loop (20,311 leases
# in 18 s; get_registry now creates it from the head: test_registry_owner.py); the replicas answered
# the restarted Serve controller 30.5 s after it started, past Ray's 30 s, so every one was replaced
# (the chart's gcsFaultTolerance.serveRecoveryTimeoutS), and a restarted registry answered before
# the engines' heartbeats could reach it, so the gateways dropped every engine (RESTART_WARMUP_S).
# Passes now (32.6 s to RUNNING, 104 requests, none failed), still opt-in: ~110 s of CI's budget.
@pytest.mark.skipif(not os.environ.get("LLMSERVE_CLUSTER_LOST_HEAD"), reason=(
    "a lost head and its recovery (~110 s on 2 cores) exceed the CI budget; LLMSERVE_CLUSTER_LOST_HEAD=1 runs it"))
def test_a_lost_head_with_gcs_fault_tolerance(cluster: Cluster) -> None:
    """The head pod lost, with GCS fault tolerance on (the chart's Redis): SDK requests through the
    Service keep succeeding (each on a new connection, never retried), the head comes back as a new
    pod, and the applications stay RUNNING with the same engine replica: nothing resubmitted (the
    emulation never resubmits), no model reloaded."""
    k, times = cluster.k, cluster.times
    # From a settled cluster: after the drain before it, the gateway application is UNHEALTHY until
    # Serve has replaced the evicted pod's replica (the full module's run found it so).
    k.wait(lambda: set(k.serve_status().values()) == {"RUNNING"}, 180,
           lambda: f"every application RUNNING before the head is lost: {k.serve_status()}", 2)
    apps = set(k.serve_status())
    assert apps >= {"tiny-a", "tiny-b", "gateway"}
    load = Load(cluster.base, "sk-llmserve-dev", model="tiny-b", retry=False)
    load.start(clients=2, pause_s=0.5)
    try:
        k.wait(lambda: load.ok >= 4, 60, lambda: f"requests under load: {load.failures[:3]}")
        engines_before = set(load.engines)
        head = k.pod(f"{k.cluster}-head")
        k.kill(head)
        t_head, ok_at_kill = time.monotonic(), load.ok
        time.sleep(5)  # the pod gone a while before KubeRay creates the next one
        new_head = k.recreate_head()
        assert new_head.ip != head.ip
        k.wait(lambda: new_head.ready and k.serve_status() == dict.fromkeys(apps, "RUNNING"), 300,
               lambda: f"the new head Ready with {sorted(apps)} RUNNING: {k.serve_status()}, "
                       f"{k.unready()}, {new_head.log()[-1500:]}")
        times["head_lost_to_apps_running_s"] = round(time.monotonic() - t_head, 1)
        assert load.ok > ok_at_kill + 10, (ok_at_kill, load.ok, load.failures[:3])
    finally:
        load.stop()
    assert load.failures == [] and load.retried == [], (load.failures[:5], load.retried[:5])
    assert set(load.engines) == engines_before, (engines_before, dict(load.engines))
    times["head_lost_requests_ok"] = load.ok


# KubeRay switches the Service when the new cluster's applications are RUNNING, whatever its pods'
# readiness; a gateway replica reaches RUNNING only after its pod can be Ready (serve/gateway/
# readiness.py until_ready, the chart's LLMSERVE_GATEWAY_READY_HOLD_S): before that, 17 of 510
# requests failed in the 2 s after the switch. Passes now (134.7 s on 2 cores), still opt-in: CI budget.
@pytest.mark.skipif(not os.environ.get("LLMSERVE_CLUSTER_UPGRADE"), reason=(
    "a second cluster (~2.5 min on 2 cores) exceeds the CI budget; LLMSERVE_CLUSTER_UPGRADE=1 runs it"))
def test_a_new_cluster_upgrade_sends_traffic_only_to_the_active_cluster(cluster: Cluster) -> None:
    """A serve-config change that makes a new cluster (serve.gateway.adapter_roots reaches the pod
    template: upgradeStrategy NewCluster): every SDK request during the switch succeeds, and no
    connection through the API Service reaches a pod of the new cluster before every application
    there is RUNNING; after the switch, every one does."""
    k, times = cluster.k, cluster.times
    new = render("--set", "serve.gateway.adapter_roots={/model-cache/adapters,/model-cache/adapters-v2}")
    svc_ip = k.services[k.serve_svc]
    loads = [Load(cluster.base, "sk-llmserve-dev", model=m, retry=False) for m in ("tiny-a", "tiny-b")]
    for load in loads:
        load.start(clients=1, pause_s=0.5)
    old = k.cluster
    try:
        t = k.upgrade(new)
        time.sleep(5)  # requests after the old cluster is gone
        ok_after = sum(load.ok for load in loads)
        time.sleep(5)
        assert sum(load.ok for load in loads) > ok_after
    finally:
        for load in loads:
            load.stop()
    times["upgrade_pending_created_to_running_s"] = round(t["pending_running"] - t["pending_created"], 1)
    times["upgrade_requests_ok"] = sum(load.ok for load in loads)
    for load in loads:
        assert load.failures == [] and load.retried == [], (load.model, load.failures[:5], load.retried[:5])
    cluster_of = {p.ip: p.labels.get("ray.io/cluster") for p in k.every_pod()}
    assert k.proxies is not None
    picks = [(when, cluster_of.get(ep)) for when, ip, _, ep in k.proxies.picks if ip == svc_ip]
    running = t["pending_running"]
    early = [round(running - when, 1) for when, c in picks if c == k.cluster and when < running]
    assert early == [], f"connections reached the new cluster before its applications ran: {early[:5]}"
    after = [c for when, c in picks if when > t["switched"]]
    assert after and set(after) == {k.cluster}, (old, k.cluster, set(after))
    assert any(c == old for when, c in picks if t["pending_created"] < when < t["switched"])


def served_by(client: OpenAI, model: str, n: int) -> set[str]:
    """The replicas that answered n requests for `model` (every one must succeed).

    Every prompt is new: the gateway sends a prompt prefix to its rendezvous replica, so a fixed
    set of prompts lands on one of two replicas every time with probability 2/2**n, and a wait
    polling the same prompts could never see the other replica (the failure at 03cbc17)."""
    seen = set()
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"who {uuid.uuid4().hex}"}], max_tokens=2)
        assert raw.http_response.status_code == 200
        seen.add(raw.headers["x-llmserve-replica"])
    return seen
