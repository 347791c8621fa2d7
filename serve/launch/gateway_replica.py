"""The gateway replica's composition root: the gateway as a Ray Serve application (how it runs in a
RayService on Kubernetes).

Each gateway replica serves the same ASGI app `llmserve run` serves, on `gateway.port` of its node,
itself: no Serve proxy in the path. One replica per node (they share the port); a Kubernetes
Service in front spreads clients over them. The same application holds the batch worker: one
replica per cluster, restarted by Serve when it dies or fails its health check, so batches run
(and expire) on Kubernetes exactly as under `llmserve run`.

    - name: gateway
      import_path: serve.launch.gateway_replica:build
      args: {config: {...the whole configuration...}, replicas: 2}

With `gateway.autoscaling` in the configuration, Serve scales the gateway replicas between its
bounds instead (`replicas` is then unused), with the engines' policy (serve/policies/autoscaling.py)
fed by each replica's `record_autoscaling_stats`: the requests it received and holds open. With
`gateway.reuse_port`, replicas on one node share the port (SO_REUSEPORT), so one node may hold several.

Secrets never sit in the RayService: the pod's environment completes the configuration through the
`LLMSERVE__` overrides (serve/config.py), e.g. `LLMSERVE__CACHE__REDIS_URL` and
`LLMSERVE__BATCH__DATABASE_URL` from Kubernetes Secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from ray import serve

from serve.asgi import start_in_loop
from serve.config import GatewaySpec
from serve.contract.registry import get_registry
from serve.gateway.readiness import ready_hold_s, until_ready
from serve.gateway.server import ByPort, build_gateway, gateway_uvicorn_config, listen, ray_snapshot_source
from serve.launch.batch_worker import BatchWorkerServer, pod_config
from serve.policies.autoscaling import ONGOING, REQUESTS

logger = logging.getLogger("llmserve.gateway")


class GatewayServer:
    async def __init__(self, config: dict[str, Any], batch_worker: Any = None) -> None:  # type: ignore[misc]
        # batch_worker: the handle that makes Serve deploy the worker with this application; the
        # gateway never calls it (batches meet in the shared store).
        cfg = pod_config(config)
        app = build_gateway(cfg, ray_snapshot_source(get_registry(cfg.ray.namespace)))
        assert isinstance(app, ByPort)
        self._front = app
        self._server, self._task = await start_in_loop(gateway_uvicorn_config(app, cfg), listen(app, cfg))
        logger.info("gateway listening on %s:%s", cfg.gateway.host, cfg.gateway.port)
        # Serve calls this replica RUNNING when __init__ returns; KubeRay switches an upgrade's
        # Service on RUNNING: not before this pod's probes can have seen /health answer 200.
        gw = app.state.gateway
        await until_ready(lambda: gw.health()[0], ready_hold_s(os.environ))

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("gateway HTTP server stopped")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's replica hook for custom autoscaling metrics (as the engines', serve/engine/
        direct.py): Serve sees none of the gateway's requests, which reach its own port, so the
        policy scales it on these. Floats only, or Serve turns custom metrics off."""
        return {REQUESTS: float(self._front.received), ONGOING: float(self._front.ongoing)}

    async def __del__(self) -> None:
        # Graceful drain: stop accepting, let in-flight streams finish (uvicorn's graceful timeout).
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=35)


def gateway_options(spec: GatewaySpec, replicas: int) -> dict[str, Any]:
    """The gateway deployment's replica count (fixed, or Serve's autoscaling) and placement."""
    options: dict[str, Any] = {}
    if spec.autoscaling is None:
        options["num_replicas"] = replicas
    else:
        # No cap for the policy's "replicas full" signal: Serve's max_ongoing_requests bounds
        # requests through Serve's handles, and clients reach a gateway around them.
        options["autoscaling_config"] = spec.autoscaling.serve_autoscaling_config(max_ongoing_requests=None)
    if not spec.reuse_port:
        options["max_replicas_per_node"] = 1  # they bind the same port: one per node
    return options


def build(args: dict[str, Any]) -> Any:  # -> ray.serve.Application
    config = args["config"]
    spec = GatewaySpec.model_validate(config.get("gateway") or {})
    gateway = serve.deployment(
        GatewayServer, name="gateway", ray_actor_options={"num_cpus": 0}, health_check_period_s=5,
        graceful_shutdown_timeout_s=40, **gateway_options(spec, int(args.get("replicas", 1))),
    )
    if not config.get("batch", {}).get("enabled", True):
        return gateway.bind(config)
    worker = serve.deployment(
        BatchWorkerServer, name="batch-worker", num_replicas=1, ray_actor_options={"num_cpus": 0},
        health_check_period_s=10, graceful_shutdown_timeout_s=10,
    )
    return gateway.bind(config, worker.bind(config))
