"""The gateway application of the RayService path: the batch worker is a Serve replica whose health
check fails once its runner stops (so Serve replaces it), and the pod's environment completes the
configuration the chart rendered (URLs from Secrets never sit in the RayService)."""

from __future__ import annotations

import asyncio

import pytest

import serve.launch.batch_worker as batch_actor
from serve.launch.batch_worker import BatchWorkerServer, pod_config
from serve.launch.gateway_replica import build

CONFIG = {"models": [{"name": "m", "source": "builtin://tiny?seed=1", "accelerator": "cpu"}],
          "ray": {"address": "auto"}}


@pytest.mark.filterwarnings("ignore:coroutine .*__del__.* was never awaited")
def test_batch_worker_health_fails_once_its_runner_stops(monkeypatch):
    gate = asyncio.Event()

    async def runner(cfg):
        await gate.wait()
        raise RuntimeError("store unreachable")

    monkeypatch.setattr(batch_actor, "run_batch_worker", runner)

    async def main():
        server = BatchWorkerServer.__new__(BatchWorkerServer)
        await BatchWorkerServer.__init__(server, CONFIG)
        await server.check_health()  # running: healthy
        gate.set()
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="store unreachable"):
            await server.check_health()
        await server.__del__()

    asyncio.run(main())


def test_pod_env_completes_the_rendered_config(monkeypatch):
    monkeypatch.setenv("LLMSERVE__CACHE__REDIS_URL", "redis://:pw@r:6379/0")
    monkeypatch.setenv("LLMSERVE__BATCH__DATABASE_URL", "postgresql://u:pw@pg:5432/llmserve")
    cfg = pod_config(CONFIG)
    assert cfg.cache.redis_url == "redis://:pw@r:6379/0"
    assert cfg.batch.database_url == "postgresql://u:pw@pg:5432/llmserve"
    assert "cache" not in CONFIG  # the Serve args are not changed in place


def test_the_gateway_application_holds_one_batch_worker_unless_batches_are_off():
    app = build({"config": CONFIG, "replicas": 2})
    gateway = app._bound_deployment
    worker = gateway.init_args[1]._bound_deployment
    assert (gateway.name, gateway.num_replicas) == ("gateway", 2)
    assert (worker.name, worker.num_replicas) == ("batch-worker", 1)
    off = build({"config": {**CONFIG, "batch": {"enabled": False}}, "replicas": 1})
    assert len(off._bound_deployment.init_args) == 1
