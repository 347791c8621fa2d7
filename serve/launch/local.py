"""The local driver's composition root: a whole local stack, assembled in one place: the engines
(serve/engine) and the batch worker (serve/launch/batch_worker.py), started and stopped together.
What `llmserve run`, the demo and the integration tests start; the packages below it never import
each other upward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from serve.config import Config
from serve.engine.cluster import deploy_models, shutdown, start_ray


def _quiet(phase: str) -> None:
    pass


def start_stack(config: Config, progress: Callable[[str], None] = _quiet) -> Any:
    """Start Ray, deploy every model and start the batch worker; returns the registry gateways
    discover engines through. Returns before the engines are ready. `progress` hears each phase
    as it ends (`llmserve run` prints them with the time taken)."""
    start_ray(config)
    progress("Ray started")
    registry = deploy_models(config)
    progress(f"models deployed: {', '.join(m.name for m in config.models)} (Serve builds and loads them now)")
    if config.batch.enabled:
        from serve.launch.batch_worker import start_batch_worker

        start_batch_worker(config)
        progress("batch worker started")
    return registry


def stop_stack(config: Config) -> None:
    """Stop the batch worker, then the engines and (for a cluster started here) Ray."""
    import ray

    if config.batch.enabled and ray.is_initialized():
        from serve.launch.batch_worker import WORKER_NAME

        with contextlib.suppress(ValueError):  # ValueError: it is not running
            ray.kill(ray.get_actor(WORKER_NAME, namespace=config.ray.namespace))
    shutdown(config)
