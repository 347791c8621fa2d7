"""What an engine replica waits for while it starts (serve/engine/direct.py), less two waits of
Ray Serve LLM's that did nothing for it:

- node initialization runs only where it can do something (NodeInitOnlyToDownload): a local path
  or hub id on one node skips the task that would start a worker and import torch, transformers
  and Ray Serve LLM just to return the path unchanged;
- Ray's usage report (a new TelemetryAgent actor, waited for) goes from a thread after the engine
  is up, and not at all where Ray's usage stats are off.

The LLMConfig is Ray's own, built by llm_config_for; the callback is loaded by the name Ray loads
it by. Ray's runtime context, placement-group table and telemetry are stand-ins: no cluster starts.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from ray.llm._internal.common.utils.import_utils import load_class  # how Ray loads callback_class
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.llm._internal.serve.utils.node_initialization_utils import initialize_node

from serve.config import ModelSpec
from serve.engine import direct
from serve.engine.deployments import llm_config_for
from serve.engine.direct import DirectLLMServer, NodeInitOnlyToDownload, needs_node_init
from tests.unit.engine_replica_support import construct_until_engine_build

HERE = "node-a"


def test_node_init_runs_for_a_download_or_another_node_only():
    assert not needs_node_init("/models/llama", False, {HERE}, HERE)
    assert not needs_node_init("org/model", False, {HERE}, HERE)  # a hub id: vLLM fetches it itself
    assert needs_node_init("s3://bucket/llama", False, {HERE}, HERE)
    assert needs_node_init("gs://bucket/llama", False, {HERE}, HERE)
    assert needs_node_init("org/model", True, {HERE}, HERE)  # a mirror is downloaded by Ray
    assert needs_node_init("/models/llama", False, {HERE, "node-b"}, HERE)
    assert needs_node_init("/models/llama", False, {"node-b"}, HERE)


def _run_hook(monkeypatch, tmp_path, source: str, bundle_nodes: list[str]) -> Any:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: HERE))
    pg = object()
    monkeypatch.setattr(ray.util, "placement_group_table",
                        lambda g: {"bundles_to_node_id": dict(enumerate(bundle_nodes))} if g is pg else {})
    config = llm_config_for(ModelSpec(name="m", source=source), "ns")
    cls = load_class(config.callback_config.callback_class)
    assert cls is NodeInitOnlyToDownload
    callback = cls(llm_config=config, raise_error_on_callback=True, ctx_kwargs={"placement_group": pg},
                   **config.callback_config.callback_kwargs)
    asyncio.run(callback.run_callback("on_before_node_init"))
    return callback


def test_a_local_model_on_one_node_skips_node_init_and_still_gets_torchs_kernels_dir(monkeypatch, tmp_path):
    callback = _run_hook(monkeypatch, tmp_path, str(tmp_path / "model"), [HERE])
    assert callback.ctx.run_init_node is False
    assert (tmp_path / "torch" / "kernels").is_dir()


@pytest.mark.parametrize(("source", "nodes"), [("s3://bucket/model", [HERE]), ("/models/m", [HERE, "node-b"])])
def test_a_download_or_a_second_node_keeps_rays_node_init(monkeypatch, tmp_path, source, nodes):
    assert _run_hook(monkeypatch, tmp_path, source, nodes).ctx.run_init_node is True


def test_ray_reads_the_flag_the_hook_sets_after_running_it():
    """The installed Ray still runs on_before_node_init, then node init only if ctx.run_init_node
    (vllm_engine.py), and node init is still the per-node task the hook stands in for."""
    start = inspect.getsource(VLLMEngine.start)
    hook, flag = start.index('run_callback("on_before_node_init")'), start.index("if callback.ctx.run_init_node:")
    assert hook < flag < start.index("await initialize_node(self.llm_config)")
    assert "bundles_to_node_id" in inspect.getsource(initialize_node)


class _Engine:
    def __init__(self) -> None:
        self.started = False

    async def start(self) -> None:
        self.started = True


class _Replica(DirectLLMServer):
    def __del__(self) -> None:  # the real one unregisters and stops the port: neither exists here
        pass


def _replica(monkeypatch, usage_stats: bool) -> tuple[_Replica, threading.Event, threading.Event]:
    """A replica whose engine starts at once, and a telemetry push that blocks until released."""
    release, pushed = threading.Event(), threading.Event()

    def push(all_models: list[Any]) -> None:
        assert all_models == [replica._llm_config]
        release.wait(10)
        pushed.set()

    monkeypatch.setattr(direct, "push_telemetry_report_for_all_models", push)
    monkeypatch.setattr(direct, "record_extra_usage_tag", lambda key, value: None)
    monkeypatch.setattr(direct, "usage_stats_enabled", lambda: usage_stats)
    replica = _Replica.__new__(_Replica)
    replica.engine, replica._llm_config = _Engine(), object()
    return replica, release, pushed


def test_the_engine_start_does_not_wait_for_rays_usage_report(monkeypatch):
    replica, release, pushed = _replica(monkeypatch, usage_stats=True)

    async def start() -> None:
        await asyncio.wait_for(replica._start_engine(), 5)  # the push is still blocked
        assert replica.engine.started and not pushed.is_set()
        release.set()
        await asyncio.to_thread(pushed.wait, 5)  # the report still goes

    asyncio.run(start())
    assert pushed.is_set()


def test_no_usage_report_where_rays_usage_stats_are_off(monkeypatch):
    replica, release, pushed = _replica(monkeypatch, usage_stats=False)
    release.set()

    async def start() -> None:
        await replica._start_engine()
        await asyncio.sleep(0.2)

    asyncio.run(start())
    assert replica.engine.started and not pushed.is_set()


def test_rays_engine_start_is_still_what_the_override_does():
    """The installed LLMServer._start_engine: the engine's start, the usage report, the direct
    streaming tag, nothing else (a Ray upgrade that adds a step fails here, to be copied over)."""
    body = [ln.strip() for ln in inspect.getsource(LLMServer._start_engine).splitlines()[1:]]
    code = [ln for ln in body if ln and not ln.startswith("#")]
    assert code == ['if self.engine is None:', 'raise ValueError("Engine is not set")',
                    "await self.engine.start()",
                    "push_telemetry_report_for_all_models(all_models=[self._llm_config])",
                    "if RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:",
                    'record_extra_usage_tag(TagKey.LLM_SERVE_DIRECT_STREAMING_ENABLED, "1")']


def test_the_forward_pass_runs_in_the_engine_core_only_where_asked_and_on_one_process():
    assert direct.in_core({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, 1)
    assert not direct.in_core({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, 2)  # tensor parallel: workers
    assert not direct.in_core({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, 1)
    assert not direct.in_core({}, 1)  # a GPU model's environment: Ray's choice stands


@pytest.mark.parametrize(("env", "backend"), [("0", "uni"), ("1", "mp")])
def test_in_core_engine_replaces_rays_multiprocess_executor(monkeypatch, env, backend):
    config = SimpleNamespace(parallel_config=SimpleNamespace(world_size=1, distributed_executor_backend="mp"))
    args = SimpleNamespace(distributed_executor_backend="mp")
    monkeypatch.setattr(VLLMEngine, "_prepare_engine_config", lambda self, ctx: (args, "frontend", config))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", env)
    engine = direct.InCoreEngine.__new__(direct.InCoreEngine)
    assert engine._prepare_engine_config(None) == (args, "frontend", config)
    assert config.parallel_config.distributed_executor_backend == backend == args.distributed_executor_backend


def test_rays_cpu_engines_still_ask_for_the_multiprocess_executor_and_the_cpu_env_asks_for_one_process():
    """What InCoreEngine undoes (Ray Serve LLM's choice for every CPU engine), and the variable a
    CPU model's engines get (deployments.CPU_ENV), the one vLLM's CPU platform reads the same way."""
    from ray.llm._internal.serve.engines.vllm import vllm_models
    from vllm.platforms import cpu

    from serve.engine.deployments import CPU_ENV

    kwargs = inspect.getsource(vllm_models.VLLMEngineConfig.get_initialization_kwargs)
    assert "isinstance(self.accelerator, CPUAccelerator)" in kwargs
    assert "executor_backend = EXECUTOR_BACKEND_MP" in kwargs
    assert 'os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"' in inspect.getsource(cpu)
    assert CPU_ENV["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_the_replica_builds_its_engine_with_in_core_engine(monkeypatch):
    seen: dict[str, Any] = {}

    async def build(self, llm_config, engine_cls=None, **kwargs):
        seen["engine_cls"] = engine_cls

    construct_until_engine_build(monkeypatch, build)
    assert seen["engine_cls"] is direct.InCoreEngine
