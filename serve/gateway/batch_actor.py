"""The batch worker as a Ray actor: restarted by Ray when it dies, resuming from the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from serve.batch.store import open_store
from serve.batch.worker import BatchRunner, response_json
from serve.config import AuthSpec, Config

logger = logging.getLogger("llmserve.batch")
WORKER_NAME = "llmserve-batch-worker"


def make_call(gateway: Any) -> Any:
    """Batch lines take the gateway's own path: routes, cache, cascade, fallback and cost."""
    from serve.gateway.errors import APIError
    from serve.gateway.validate import validate

    async def call(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            route = gateway.resolve(body, path)
            validate(path, body, gateway.config.gateway.max_messages)
        except APIError as e:
            return e.status, e.body()
        return response_json(await gateway.runner.handle(route, path, body, "batch"))

    return call


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
        from serve.cache.store import HeadCache
        from serve.engine.registry import get_registry
        from serve.gateway.app import Gateway
        from serve.gateway.auth import KeyStore
        from serve.gateway.backends import Backends
        from serve.gateway.server import discovery_loop, ray_snapshot_source
        from serve.gateway.upstream import HttpUpstream

        cfg = self._config
        backends = Backends()
        cache = HeadCache(cfg.cache.redis_url, lru_size=cfg.cache.lru_size, op_timeout_s=cfg.cache.op_timeout_s)
        gw = Gateway(cfg, backends, HttpUpstream(cfg.gateway.connect_timeout_s), cache=cache,
                     keys=KeyStore(AuthSpec(enabled=False)))
        fetch = ray_snapshot_source(get_registry(cfg.ray.namespace))
        with contextlib.suppress(Exception):  # start with the replicas known, not an empty pool
            backends.update(await fetch())
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(discovery_loop(fetch, backends, cfg.gateway.discovery_interval_s))]
        if cfg.cache.redis_url:  # adapters and routes changed at runtime apply to batches too
            from serve.gateway.lifecycle import lifecycle_loop
            from serve.students.registry import LifecycleStore

            tasks.append(loop.create_task(
                lifecycle_loop(gw, LifecycleStore(cfg.cache.redis_url), cfg.gateway.discovery_interval_s)))
        runner = BatchRunner(open_store(cfg), make_call(gw), concurrency=cfg.batch.concurrency)
        try:
            await runner.run_forever()
        finally:
            for task in tasks:
                task.cancel()

    def alive(self) -> bool:
        return self._thread.is_alive()


def start_batch_worker(config: Config) -> Any:
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BatchWorker)
    handle = actor.options(name=WORKER_NAME, namespace=config.ray.namespace, get_if_exists=True,
                           lifetime="detached").remote(config.model_dump(mode="json"))
    with contextlib.suppress(Exception):
        ray.get(handle.alive.remote(), timeout=60)
    return handle
