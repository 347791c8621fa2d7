"""The gateway as a Ray Serve deployment (how it runs in a RayService on Kubernetes).

Each replica serves the same ASGI app `llmserve run` serves, on `gateway.port` of its node,
itself: no Serve proxy in the path. One replica per node (they share the port); a Kubernetes
Service in front spreads clients over them.

    - name: gateway
      import_path: serve.gateway.deployment:build
      args: {config: {...the whole configuration...}, replicas: 2}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ray import serve

from serve.asgi import start_in_loop
from serve.config import Config
from serve.engine.registry import get_registry
from serve.gateway.server import build_gateway, listen, ray_snapshot_source

logger = logging.getLogger("llmserve.gateway")


class GatewayServer:
    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        cfg = Config.model_validate(config)
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


def build(args: dict[str, Any]) -> Any:  # -> ray.serve.Application
    deployment = serve.deployment(
        GatewayServer, name="gateway", num_replicas=int(args.get("replicas", 1)),
        ray_actor_options={"num_cpus": 0}, max_replicas_per_node=1, health_check_period_s=5,
        graceful_shutdown_timeout_s=40,
    )
    return deployment.bind(args["config"])
