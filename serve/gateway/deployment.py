"""The gateway as a Ray Serve application (how it runs in a RayService on Kubernetes).

Each gateway replica serves the same ASGI app `llmserve run` serves, on `gateway.port` of its node,
itself: no Serve proxy in the path. One replica per node (they share the port); a Kubernetes
Service in front spreads clients over them. The same application holds the batch worker: one
replica per cluster, restarted by Serve when it dies or fails its health check, so batches run
(and expire) on Kubernetes exactly as under `llmserve run`.

    - name: gateway
      import_path: serve.gateway.deployment:build
      args: {config: {...the whole configuration...}, replicas: 2}

Secrets never sit in the RayService: the pod's environment completes the configuration through the
`LLMSERVE__` overrides (serve/config.py), e.g. `LLMSERVE__CACHE__REDIS_URL` and
`LLMSERVE__BATCH__DATABASE_URL` from Kubernetes Secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
from typing import Any

from ray import serve

from serve.asgi import start_in_loop
from serve.config import Config, apply_env_overrides
from serve.engine.registry import get_registry
from serve.gateway.server import build_gateway, listen, ray_snapshot_source

logger = logging.getLogger("llmserve.gateway")


def pod_config(config: dict[str, Any]) -> Config:
    """The configuration the chart rendered, completed from this pod's environment."""
    return Config.model_validate(apply_env_overrides(copy.deepcopy(config), os.environ))


class GatewayServer:
    async def __init__(self, config: dict[str, Any], batch_worker: Any = None) -> None:  # type: ignore[misc]
        # batch_worker: the handle that makes Serve deploy the worker with this application; the
        # gateway never calls it (batches meet in the shared store).
        cfg = pod_config(config)
        app = build_gateway(cfg, ray_snapshot_source(get_registry(cfg.ray.namespace)))
        self._server, self._task = await start_in_loop(app, listen(app, cfg), graceful_s=30)
        logger.info("gateway listening on %s:%s", cfg.gateway.host, cfg.gateway.port)

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("gateway HTTP server stopped")

    async def __del__(self) -> None:
        # Graceful drain: stop accepting, let in-flight streams finish (uvicorn's graceful timeout).
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=35)


class BatchWorkerServer:
    """The batch worker as a Serve replica: Serve keeps exactly one and replaces it when its
    runner stops; the runner resumes from the store (in-progress lines are redone)."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        from serve.gateway.batch_actor import run_batch_worker

        self._task = asyncio.get_running_loop().create_task(run_batch_worker(pod_config(config)))

    async def check_health(self) -> None:
        if self._task.done():
            why = "cancelled" if self._task.cancelled() else repr(self._task.exception())
            raise RuntimeError(f"batch worker stopped: {why}")

    async def __del__(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def build(args: dict[str, Any]) -> Any:  # -> ray.serve.Application
    config = args["config"]
    gateway = serve.deployment(
        GatewayServer, name="gateway", num_replicas=int(args.get("replicas", 1)),
        ray_actor_options={"num_cpus": 0}, max_replicas_per_node=1, health_check_period_s=5,
        graceful_shutdown_timeout_s=40,
    )
    if not config.get("batch", {}).get("enabled", True):
        return gateway.bind(config)
    worker = serve.deployment(
        BatchWorkerServer, name="batch-worker", num_replicas=1, ray_actor_options={"num_cpus": 0},
        health_check_period_s=10, graceful_shutdown_timeout_s=10,
    )
    return gateway.bind(config, worker.bind(config))
