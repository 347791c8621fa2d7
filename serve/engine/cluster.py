"""Start (or join) Ray, deploy one Serve application per configured model, and tear them down."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from serve.config import Config
from serve.engine.deployments import build_engine_app
from serve.engine.registry import get_registry
from serve.engine.secret import ensure_engine_secret

logger = logging.getLogger("llmserve.cluster")


def connect_ray(config: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"namespace": config.ray.namespace, "log_to_driver": False}
    if config.ray.address:
        kwargs["address"] = config.ray.address
    else:
        kwargs.update(
            num_cpus=config.ray.num_cpus or max(8, os.cpu_count() or 1),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    ray.init(**kwargs)


def deploy_models(config: Config) -> Any:
    """Deploy every model as its own Serve application (named after the model) and return the
    registry actor the gateway discovers engines through. Returns before engines are ready.

    Engines answer only callers holding the engine secret: it is generated into this process's
    environment here if it has none, before Ray starts, so a gateway built in this process and
    every Ray worker of a cluster started here (the batch worker included) hold it too."""
    from ray import serve

    ensure_engine_secret()
    connect_ray(config)
    # Our gateway is the only HTTP entry; Serve's own proxy would only add a hop and take a port.
    serve.start(proxy_location="Disabled")
    registry = get_registry(config.ray.namespace)
    # One call for all models so their engines load in parallel rather than one after another.
    serve.run_many(
        [
            serve.RunTarget(build_engine_app(spec, config.ray.namespace, config.cache.redis_url,
                                             config.gateway.adapter_roots), name=spec.name, route_prefix=None)
            for spec in config.models
        ],
        wait_for_applications_running=False,
    )
    return registry


class EngineStartError(RuntimeError):
    """An engine deployment failed to start (bad engine arguments, missing weights...)."""


def failed_engines(models: list[str]) -> dict[str, str]:
    """Models whose Serve application gave up starting, with Serve's message (it retries a
    crashing replica a few times before it marks the application DEPLOY_FAILED)."""
    from ray import serve

    apps = serve.status().applications
    return {m: apps[m].message for m in models if m in apps and apps[m].status == "DEPLOY_FAILED"}


def wait_for_engines(registry: Any, models: list[str], timeout_s: float = 600) -> dict[str, list]:
    """Block until each model has at least one registered replica (its engine is loaded).

    Raises EngineStartError as soon as Serve reports a model's deployment failed, rather than
    waiting out the timeout on an engine that will never come up."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        snap = ray.get(registry.snapshot.remote())
        missing = [m for m in models if not snap.get(m)]
        if not missing:
            return snap
        failed = failed_engines(missing)
        if failed:
            raise EngineStartError("; ".join(f"{m}: {msg}" for m, msg in failed.items()))
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines not ready after {timeout_s:.0f}s: {', '.join(missing)}")
        time.sleep(1.0)


def shutdown(config: Config) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        for spec in config.models:
            serve.delete(spec.name)
        serve.shutdown()
    finally:
        if not config.ray.address:
            ray.shutdown()
