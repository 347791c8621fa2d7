"""The batch worker's composition root: a gateway of its own (the same admission as online requests)
and the runner over the shared store. Run as a Ray actor under `llmserve run` (restarted by Ray when it
dies, resuming from the store) or as a Serve replica on Kubernetes (BatchWorkerServer, deployed with
the gateway by serve/launch/gateway_replica.py)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import threading
from typing import Any

from serve.batch.backends import open_store
from serve.batch.worker import BatchRunner, Call
from serve.config import Config, apply_env_overrides
from serve.gateway.service import Gateway

logger = logging.getLogger("llmserve.batch")
WORKER_NAME = "llmserve-batch-worker"


def owner_call(gateway: Gateway) -> Call:
    """A batch line enters like the same request online, with its owner's key: the same
    admission (model access, validation, rate limits), routes, cache, cascade, fallback and cost,
    billed to the owner (`Gateway.call_as`). A key removed since the batch was created stops its
    remaining lines."""

    async def call(owner: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return await gateway.call_as(owner, path, body)

    return call


async def run_batch_worker(cfg: Config) -> None:
    """The worker's whole life: a gateway of its own (the same admission as online requests) and
    the runner over the shared store, until cancelled."""
    from serve.contract.registry import get_registry
    from serve.gateway.server import GatewayParts, ray_snapshot_source

    parts = GatewayParts(cfg, ray_snapshot_source(get_registry(cfg.ray.namespace)), runs_background=True)
    async with parts.running() as gateway:
        runner = BatchRunner(open_store(cfg), owner_call(gateway), concurrency=cfg.batch.concurrency,
                             max_lines=cfg.batch.max_lines, max_line_bytes=cfg.gateway.max_body_bytes,
                             retention_s=cfg.batch.retention_s)
        await runner.run_forever()


class BatchWorker:
    """Runs BatchRunner on its own thread's event loop, so it starts again on every Ray restart
    (Ray re-runs only the constructor)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = Config.model_validate(config)
        self._thread = threading.Thread(target=self._main, name="batch-worker", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        await run_batch_worker(self._config)

    def alive(self) -> bool:
        return self._thread.is_alive()


def start_batch_worker(config: Config) -> Any:
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BatchWorker)
    # The worker talks to engines with the engine secret from its raylet's environment (never in
    # runtime_env, which Ray logs and its dashboard shows; serve/engine/deployments.py).
    handle = actor.options(name=WORKER_NAME, namespace=config.ray.namespace, get_if_exists=True,
                           lifetime="detached").remote(config.model_dump(mode="json"))
    with contextlib.suppress(Exception):
        ray.get(handle.alive.remote(), timeout=60)
    return handle


def pod_config(config: dict[str, Any]) -> Config:
    """The configuration the chart rendered, completed from this pod's environment."""
    return Config.model_validate(apply_env_overrides(copy.deepcopy(config), os.environ))


class BatchWorkerServer:
    """The batch worker as a Serve replica: Serve keeps exactly one and replaces it when its
    runner stops; the runner resumes from the store (in-progress lines are redone)."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        self._task = asyncio.get_running_loop().create_task(run_batch_worker(pod_config(config)))

    async def check_health(self) -> None:
        if self._task.done():
            why = "cancelled" if self._task.cancelled() else repr(self._task.exception())
            raise RuntimeError(f"batch worker stopped: {why}")

    async def __del__(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
