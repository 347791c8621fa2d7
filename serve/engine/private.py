"""Every private or undocumented Ray, Ray Serve, Ray Serve LLM and vLLM name the project touches,
each with why, and the only module that imports them (the others ask here).

An upgrade of Ray or vLLM is checked in one place: tests/unit/test_private_surface.py loads every
entry of NAMES from the installed versions, and fails on one that moved or was renamed.

Nothing is imported when this module is: each name is loaded on first use (`load`), because the
driver (serve/engine/cluster.py) must not import vLLM and a Ray worker's setup hook
(serve/engine/forkserver.py) must not import Ray Serve on its thread.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Private:
    """`module`'s attribute `name` (dotted: a class's method or constant; empty: the module itself).
    `in_source`: text the named object's source must hold, for what is no name of its own (a private
    keyword argument read from **kwargs, an attribute set on instances)."""

    module: str
    name: str
    why: str
    in_source: str | None = None

    def load(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in filter(None, self.name.split(".")):
            obj = getattr(obj, part)
        return obj

    def owner(self) -> Any:
        """What holds the last part of `name` (to patch it there)."""
        return Private(self.module, self.name.rpartition(".")[0], self.why).load()

    def check(self) -> None:
        """Raise if the installed version no longer has it (test_private_surface)."""
        obj = self.load()
        if self.in_source is not None and self.in_source not in inspect.getsource(obj):
            raise AttributeError(f"{self.module}:{self.name} no longer holds {self.in_source!r}")


# ---- the driver (serve/engine/cluster.py): no vLLM here ----------------------------------------
RAY_INIT_NODE_IP = Private(
    "ray", "init", "keyword `_node_ip_address`: a local cluster on 127.0.0.1, not the host's address",
    in_source='"_node_ip_address"')
RAY_INIT_SYSTEM_CONFIG = Private(
    "ray", "init", "keyword `_system_config`: metrics and task events off for a local run (issue 17)",
    in_source='"_system_config"')
RAY_TOKEN_AUTH_DEFAULT = Private(
    "ray._private.authentication.authentication_token_setup", "enable_token_auth_by_default",
    "what ray.init does for a new local cluster (token auth on unless RAY_AUTH_MODE says otherwise, in "
    "this process and its children): called by the driver whose head runs in a keeper (engine/head.py)")
SERVE_CONTROLLER_CLIENT = Private(
    "ray.serve.context", "_get_global_client",
    "Serve's controller client: a declarative deploy (what `serve deploy` does through the dashboard, "
    "which `llmserve run` does not start)")
SERVE_DEPLOY_APPS = Private(
    "ray.serve._private.client", "ServeControllerClient.deploy_apps",
    "submit the declarative config; keyword `_blocking=False` returns before the engines load",
    in_source="_blocking")
SERVE_DETAILS = Private(
    "ray.serve._private.client", "ServeControllerClient.get_serve_details",
    "the other owners' declarative apps, kept when ours are deployed (cluster.with_other_apps)")

# ---- a Ray worker's setup hook (serve/engine/forkserver.py) --------------------------------------
WORKER_SETUP_HOOK_ENV = Private(
    "ray._private.ray_constants", "WORKER_PROCESS_SETUP_HOOK_ENV_VAR",
    "the variable naming the hook that starts a CPU replica's engine-core fork server")
SERVE_REPLICA_PREFIX = Private(
    "ray.serve._private.common", "REPLICA_ID_FULL_ID_STR_PREFIX",
    "how a Serve replica's actor name starts; forkserver.py keeps a copy (it may not import Ray Serve on "
    "the hook's thread), which test_private_surface holds equal to this")

# ---- the engine replica (serve/engine/direct.py) -------------------------------------------------
LLM_SERVER_BUILD_ASGI_APP = Private(
    "ray.serve.llm", "LLMServer.__serve_build_asgi_app__",
    "vLLM's FastAPI app with LoRA resolution attached, served on the replica's own port")
LLM_SERVER_START_ENGINE = Private(
    "ray.serve.llm", "LLMServer._start_engine",
    "overridden: Ray's usage report moves off the replica's start")
VLLM_ENGINE = Private(
    "ray.llm._internal.serve.engines.vllm.vllm_engine", "VLLMEngine",
    "Ray Serve LLM's engine wrapper; subclassed (InCoreEngine); its `_engine_client` is vLLM's AsyncLLM",
    in_source="self._engine_client")
VLLM_ENGINE_PREPARE_CONFIG = Private(
    "ray.llm._internal.serve.engines.vllm.vllm_engine", "VLLMEngine._prepare_engine_config",
    "overridden: the forward pass in the engine core on one-process CPU engines")
CALLBACK_BASE = Private(
    "ray.llm._internal.common.callbacks.base", "CallbackBase",
    "the node-init callback (NodeInitOnlyToDownload, named in LLMConfig.callback_config)")
IS_REMOTE_PATH = Private(
    "ray.llm._internal.common.utils.cloud_utils", "is_remote_path",
    "whether a model source needs Ray's download step on each node")
DIRECT_STREAMING = Private(
    "ray.llm._internal.serve.constants", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING",
    "Ray's direct-streaming flag, recorded in its usage tags as Ray itself does")
PUSH_TELEMETRY = Private(
    "ray.llm._internal.serve.observability.usage_telemetry.usage", "push_telemetry_report_for_all_models",
    "Ray Serve LLM's usage report, sent off the replica's start")
USAGE_TAG_KEY = Private("ray._common.usage.usage_lib", "TagKey", "the direct-streaming usage tag's key")
RECORD_USAGE_TAG = Private("ray._common.usage.usage_lib", "record_extra_usage_tag", "records that tag")
USAGE_STATS_ENABLED = Private("ray._common.usage.usage_lib", "usage_stats_enabled", "whether to report at all")
AGGREGATE_STAT_LOGGER = Private(
    "vllm.v1.metrics.loggers", "AggregateStatLoggerBase",
    "base of EngineLoad, the stat logger that reads queue, KV cache and TTFT for autoscaling")
ASYNC_LLM_LOGGER_MANAGER = Private(
    "vllm.v1.engine.async_llm", "AsyncLLM",
    "its `logger_manager` is where EngineLoad joins the engine's stat loggers after the engine is built",
    in_source="self.logger_manager")

# ---- engine cores (serve/engine/lifeline.py) -----------------------------------------------------
ENGINE_CORE_RUN = Private(
    "vllm.v1.engine.core", "EngineCoreProc.run_engine_core",
    "the engine core's entry point, wrapped so an engine core exits with its replica")
ENGINE_CORE_MP_CONTEXT = Private(
    "vllm.v1.engine.utils", "get_mp_context",
    "the multiprocessing context vLLM's launcher starts engine cores with: the fork server's on CPU")

# ---- the CLI (serve/cli/batch.py) ----------------------------------------------------------------
VLLM_RUN_BATCH = Private(
    "vllm.entrypoints.openai.run_batch", "",
    "vLLM's offline batch runner, run as `python -m` (deprecated in vLLM 0.32 for `vllm run_batch`)")

NAMES: tuple[Private, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Private))
