"""The chart's own cluster, run the way KubeRay runs it (tests/cluster/kuberay.py says what is read
from KubeRay's controller source: ray-operator/controllers/ray/common/pod.go, common/service.go,
utils/dashboardclient/dashboard_httpclient.go, rayservice_controller.go).

`helm template` with the CPU values (helm/llmserve/values-cpu-dev.yaml) and a production-shaped
overlay (values-cluster.yaml: two gateway pods, a shared volume, PostgreSQL) gives the objects;
every pod is a network namespace running its container's own command, env and volumes: the Ray
nodes with the `ray start` KubeRay would build, the chart's Redis. serveConfigV2 goes to the head's
dashboard as KubeRay sends it. Then, as a client would: every pod Ready by its own probes, the
openai SDK through the chart's Service, a batch to completion, an adapter promoted before a new
engine replica starts and served by it, and a gateway pod lost with the other one serving.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.cluster.kuberay import KubeRay
from tests.k8s.support import CHART, run, tool

pytestmark = pytest.mark.cluster
HERE = Path(__file__).parent
RELEASE = "t"
DB_SECRET = "llmserve-batch-db"


def render() -> list[dict]:
    out = run([tool("helm"), "template", RELEASE, str(CHART), "-f", str(CHART / "values-cpu-dev.yaml"),
               "-f", str(HERE / "values-cluster.yaml")])
    return [d for d in yaml.safe_load_all(out) if d]


def timings_out(record: dict) -> None:
    """The measured times, for the closing note (and anyone reading a CI log)."""
    print("cluster timings:", json.dumps(record))
    path = os.environ.get("LLMSERVE_CLUSTER_TIMINGS")
    if path:
        Path(path).write_text(json.dumps(record, indent=1))


def test_chart_runs_as_kuberay_runs_it(tmp_path):
    from serve.config import ModelSpec
    from serve.engine.models import resolve_source
    from tests.integration.conftest import make_lora_adapter
    from tests.support import PostgresServer

    objects = render()
    times: dict[str, float] = {}
    with KubeRay(objects, tmp_path) as k:
        pg = PostgresServer(tmp_path / "pg", host=k.net.gateway_ip)
        pg.start()
        try:
            k.add({"kind": "Secret", "metadata": {"name": DB_SECRET},
                   "data": {"url": base64.b64encode(pg.url.encode()).decode()}})
            k.start()
            k.submit_serve_config()
            # 1. Ready: the RayService by KubeRay's rule, every pod by its own probes.
            times["submit_to_rayservice_ready_s"] = k.wait(k.rayservice_ready, 900, "RayService Ready", 2)
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
            app["args"]["model"]["deployment"]["autoscaling"]["min_replicas"] = 2
            t_scale = time.monotonic()
            k.update_serve_config(config)  # what `helm upgrade` of serveConfigV2 alone does
            # The model's args changed, so Serve rolls its replicas: two replicas, both started after
            # the promotion, each loading the adapter from the registration in Redis.
            seen: set[str] = set()  # every replica seen since the update, so each poll adds to it

            def two_new_replicas() -> bool:
                seen.update(served_by(client, "tiny-a-student", 6))
                return len(seen - before) == 2

            k.wait(two_new_replicas, 600, lambda: f"two tiny-a replicas started after the promotion serving the "
                   f"adapter; before {sorted(before)}, seen since {sorted(seen)}", 5)
            times["new_replica_serving_adapter_s"] = round(time.monotonic() - t_scale, 1)

            # 5. The worker node holding a gateway dies: the other gateway keeps serving.
            gateways = k.select({"llmserve.io/gateway": "true"})
            assert len(gateways) == 2 and all(g.kind == "worker" for g in gateways)
            k.kill(gateways[0])
            for i in range(6):
                r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"after {i}"}],
                                                   max_tokens=4)
                assert r.choices[0].message.content
            assert gateways[1].ready and not gateways[0].ready
        finally:
            timings_out(times)
            pg.stop()


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
