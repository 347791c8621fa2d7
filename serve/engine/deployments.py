"""Turn configured models into Ray Serve LLM deployments (public ``ray.serve.llm`` API only)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from serve.config import REDIS_URL_ENV, ModelSpec
from serve.contract import paths, secret
from serve.engine import forkserver
from serve.engine.models import resolve_source

# What vLLM needs on a CPU host (see docs/operations.md): a KV cache size it can actually get,
# no network probing, spawn so the engine core does not fork a Ray worker, and the forward pass
# inside the engine core, as on a GPU with one device. (vLLM's CPU platform otherwise moves it
# to a worker process of its own, platforms/cpu.py, for OpenMP's thread binding, which one
# OpenMP thread does not need: that worker and the engine core spin on their shared-memory queue
# and keep two cores busy whatever the load, took a fifth import of vLLM's stack to start, and
# left nothing of the machine to the gateway and Ray beside them; issue 17, bench/README.md.)
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
}


def llm_config_for(spec: ModelSpec, namespace: str, adapter_roots: Sequence[str] = ()) -> Any:  # -> LLMConfig
    from ray.serve.llm import LLMConfig

    source = resolve_source(spec)
    engine_kwargs = spec.engine.to_kwargs()
    if spec.task == "embed":
        engine_kwargs.setdefault("runner", "pooling")
        engine_kwargs.setdefault("convert", "embed")
    if spec.adapters:
        engine_kwargs["enable_lora"] = True
        engine_kwargs.setdefault("max_loras", max(4, len(spec.adapters)))  # room for promoted ones
    if spec.tokenizer:
        engine_kwargs["tokenizer"] = spec.tokenizer

    dep = spec.deployment
    deployment_config: dict[str, Any] = {
        "max_ongoing_requests": dep.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": dep.num_cpus},
        # An engine that stops answering its health check is restarted by Serve.
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 30,
    }
    if dep.autoscaling is not None:
        deployment_config["autoscaling_config"] = dep.autoscaling.serve_autoscaling_config(dep.max_ongoing_requests)
    else:
        deployment_config["num_replicas"] = dep.replicas

    # On CPU the replica's engine core forks from a server that imports vLLM beside the replica's
    # own import rather than after it: ~15 s off every start (serve/engine/forkserver.py). A
    # model's env may turn it off (LLMSERVE_ENGINE_FORKSERVER: "0").
    cpu_env = {**CPU_ENV, **forkserver.worker_environment()} if spec.accelerator == "cpu" else {}
    env = {**cpu_env, **spec.env, "LLMSERVE_NAMESPACE": namespace}
    if spec.adapters or spec.engine.enable_lora:
        # Adapters are loaded through vLLM's own /v1/load_lora_adapter once the engine is up, the
        # same call a later promotion uses to swap adapters without a restart.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if adapter_roots:
        # Where adapters registered at runtime may be loaded from by a new replica (direct.py).
        env[paths.ADAPTER_ROOTS_ENV] = os.pathsep.join(adapter_roots)
    # The engine secret and the Redis URL (its password) never go into runtime_env: Serve logs a
    # deployment's options (env vars included) and the dashboard shows them. Ray 2.60 starts a worker with the raylet's
    # environment (ray._private.runtime_env.context.RuntimeEnvContext.exec_worker), which has it:
    # `llmserve run` exports it before it starts Ray, the chart's pods get it from a Secret, and a
    # cluster joined with `ray.address` needs it in its nodes' environment. Nor may a model's env
    # replace it (engines and gateways would then disagree). The replica reads the Redis URL of
    # runtime-promoted adapters from that environment too (direct.py).
    env.pop(secret.ENV, None)
    env.pop(REDIS_URL_ENV, None)
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.name, "model_source": source},
        "engine_kwargs": engine_kwargs,
        "deployment_config": deployment_config,
        "runtime_env": {"env_vars": env},
        "log_engine_metrics": True,
        # Loaded by name in the replica: the driver must not import vLLM (serve/engine/direct.py).
        "callback_config": {"callback_class": "serve.engine.direct.NodeInitOnlyToDownload"},
    }
    if spec.accelerator == "cpu":
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["placement_group_config"] = {"bundles": [{"CPU": 1}]}
    elif dep.accelerator_type:
        kwargs["accelerator_type"] = dep.accelerator_type
    return LLMConfig(**kwargs)


def build_engine_app(spec: ModelSpec, namespace: str, adapter_roots: Sequence[str] = ()) -> Any:  # -> Application
    from ray.serve.llm import build_llm_deployment

    from serve.engine.direct import DirectLLMServer

    return build_llm_deployment(
        llm_config_for(spec, namespace, adapter_roots),
        name_prefix="engine:",
        deployment_cls=DirectLLMServer,
        bind_kwargs={"adapters": [a.model_dump(include={"name", "path"}) for a in spec.adapters]},
    )
