"""Start (or join) Ray, deploy one Serve application per configured model, and tear them down.

The driver (`llmserve run`, which also runs the gateway) never imports vLLM or torch: each model
is deployed by import path (`serve.launch.engine_replica:build`) through Serve's declarative config, the way
KubeRay deploys the chart's serveConfigV2, so only Serve's build task (one short-lived worker per
application, max_calls=1) and the replicas import them. Building the apps here instead cost the
gateway process ~20 s of CPU and ~500 MB of RSS it never used (issue 17).

This is the driver side's one module on Ray's less public surface (each name listed in
serve/engine/private.py):
``ray.init(_node_ip_address=...)`` (connect_ray) and Serve's controller client
(``ray.serve.context._get_global_client``, ``deploy_apps``, ``get_serve_details``:
_apply_serve_config), what `serve deploy` reaches through the dashboard, which `llmserve run`
does not start. (serve/engine/direct.py is the replica side's.)"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from serve.config import REDIS_URL_ENV, Config
from serve.contract.registry import get_registry
from serve.contract.secret import ensure_engine_secret
from serve.engine import private
from serve.engine.head import start_head, stop_head

logger = logging.getLogger("llmserve.cluster")

# The engine replica's builder (serve/launch/engine_replica.py IMPORT_PATH), by name: Serve's build
# task imports it, the driver never does (tests/unit/test_launch.py checks the two agree).
ENGINE_APP = "serve.launch.engine_replica:build"


def connect_ray(config: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"namespace": config.ray.namespace, "log_to_driver": False}
    if config.ray.address:
        kwargs["address"] = config.ray.address
    else:
        head: dict[str, Any] = {
            "num_cpus": config.ray.num_cpus or max(8, os.cpu_count() or 1),
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
        }
        if not config.ray.observability:
            # Every Ray process records metrics and task events for readers a local run does not
            # have (Prometheus, the dashboard): the dashboard agent alone spent ~1 ms of CPU per
            # request at 64 streams on 2 cores, taken from the engine (issue 17, bench/README.md).
            head["_system_config"] = {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}
        # In its own session, not ray.init's children: a signal to this process's whole group
        # must not kill Ray's daemons under a driver that still has engines to stop (head.py).
        kwargs.update(address=start_head(head), _node_ip_address="127.0.0.1")
    ray.init(**kwargs)


def serve_deploy_config(config: Config) -> dict[str, Any]:
    """Serve's declarative config (a ServeDeploySchema) for every model: what deploy_models
    submits, in the chart's serveConfigV2 shape (helm/llmserve/templates/_helpers.tpl). Pure."""
    ns = config.ray.namespace
    apps = []
    for spec in config.models:
        args: dict[str, Any] = {"model": spec.model_dump(mode="json"), "namespace": ns,
                                "adapter_roots": [str(r) for r in config.gateway.adapter_roots]}
        # route_prefix None: no engine is reached through a Serve proxy (our gateway is the entry).
        apps.append({"name": spec.name, "import_path": ENGINE_APP, "route_prefix": None, "args": args})
    # Our gateway is the only HTTP entry; Serve's own proxy would only add a hop and take a port.
    return {"proxy_location": "Disabled", "applications": apps}


def start_ray(config: Config) -> None:
    """Start (or join) Ray with the engine secret in this process's environment first: a cluster
    started here hands it to every worker it starts (engines, the batch worker). The Redis URL
    travels the same way, never in Serve's args or a runtime_env (Serve logs both, the dashboard
    shows them); a joined cluster's nodes need it in their own environment, as the chart's pods."""
    ensure_engine_secret()
    if config.cache.redis_url:
        os.environ[REDIS_URL_ENV] = config.cache.redis_url
    connect_ray(config)


def deploy_models(config: Config) -> Any:
    """Deploy every model as its own Serve application (named after the model) and return the
    registry actor the gateway discovers engines through. Returns before engines are ready: a
    model whose build or engine fails shows as DEPLOY_FAILED (wait_for_engines).

    Engines answer only callers holding the engine secret: it is generated into this process's
    environment here if it has none, before Ray starts, so a gateway built in this process and
    every Ray worker of a cluster started here (the batch worker and Serve's build tasks
    included) hold it too."""
    start_ray(config)
    registry = get_registry(config.ray.namespace)
    # One config for all models so their engines load in parallel rather than one after another.
    _apply_serve_config(serve_deploy_config(config))
    return registry


def with_other_apps(deploy_config: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """`deploy_config` plus the declaratively deployed applications of another owner that Serve
    reports (`details`: ServeInstanceDetails as a dict), and Serve's current target_capacity.

    A declarative config replaces the whole set of declaratively deployed applications: without
    this, `llmserve run` joining a cluster (`ray.address`) would delete every other one. Pure."""
    ours = {app["name"] for app in deploy_config["applications"]}
    kept = [app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if name not in ours and app.get("source") == "declarative" and app.get("deployed_app_config")
            and app.get("status") != "DELETING"]
    return {**deploy_config, "applications": [*deploy_config["applications"], *kept],
            "target_capacity": details.get("target_capacity")}


def _apply_serve_config(deploy_config: dict[str, Any]) -> None:
    """Submit a declarative config to Serve's controller without waiting for the applications
    (what `serve deploy` does through the dashboard). Imperatively deployed applications and
    plain actors (the batch worker, the registry) are not touched by it."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    serve.start(proxy_location=deploy_config["proxy_location"])
    client = private.SERVE_CONTROLLER_CLIENT.load()()
    schema = ServeDeploySchema.model_validate(with_other_apps(deploy_config, client.get_serve_details()))
    client.deploy_apps(schema, _blocking=False)


class EngineStartError(RuntimeError):
    """An engine deployment failed to start (bad engine arguments, missing weights...)."""


def _serve_apps() -> dict[str, Any]:
    from ray import serve

    return dict(serve.status().applications)


def failed_engines(models: list[str], apps: dict[str, Any] | None = None) -> dict[str, str]:
    """Models whose Serve application gave up starting, with Serve's message: the build task's
    traceback (serve.launch.engine_replica:build raised: a bad model spec, a tiny model that cannot be
    built), or a replica that kept crashing (Serve retries it a few times first)."""
    apps = _serve_apps() if apps is None else apps
    return {m: apps[m].message for m in models if m in apps and apps[m].status == "DEPLOY_FAILED"}


def wait_for_engines(registry: Any, models: list[str], timeout_s: float = 600,
                     on_built: Callable[[str], None] | None = None) -> dict[str, list]:
    """Block until each model has at least one registered replica (its engine is loaded).

    on_built hears each model once Serve has built its application (its deployments exist):
    Serve's build task, which imports vLLM and on a first start builds the tiny model, is done
    and the engine is loading. Raises EngineStartError as soon as Serve reports a model's
    deployment failed, rather than waiting out the timeout on an engine that will never come up."""
    import ray

    deadline = time.monotonic() + timeout_s
    built: set[str] = set()
    while True:
        snap = ray.get(registry.snapshot.remote()) or {}  # None: a registry still warming up
        missing = [m for m in models if not snap.get(m)]
        apps = _serve_apps()
        for m in models:
            if on_built is not None and m not in built and m in apps and apps[m].deployments:
                built.add(m)
                on_built(m)
        if not missing:
            return snap
        failed = failed_engines(missing, apps)
        if failed:
            raise EngineStartError("; ".join(f"{m}: {msg}" for m, msg in failed.items()))
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines not ready after {timeout_s:.0f}s: {', '.join(missing)}")
        time.sleep(1.0)


def shutdown(config: Config) -> None:
    import ray
    from ray import serve

    try:
        if not ray.is_initialized():
            return
        try:
            for spec in config.models:
                serve.delete(spec.name)
            serve.shutdown()
        finally:
            if not config.ray.address:
                ray.shutdown()
    finally:
        stop_head()  # the head this process started, if any (also after a start that failed half-way)
