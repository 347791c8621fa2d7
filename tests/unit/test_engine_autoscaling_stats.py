"""The engine replica's autoscaling metrics (serve/engine/direct.py, record_autoscaling_stats), from a
stand-in vLLM engine through Ray Serve 2.60's own replica and controller code to the chart's policy.

No Ray cluster and no vLLM engine: the replica class is DirectLLMServer with its __init__ (engine,
port, registry) replaced by the state the hook reads, built by the same DirectLLMServer._engine_app;
the engine is a stand-in AsyncLLM whose output loop reports to vLLM's own StatLoggerManager with
vLLM's own SchedulerStats and IterationStats. Serve's pieces are Ray's: UserCallableWrapper (finds
the hook), ReplicaMetricsManager (validates, records and pushes what it returns), the compressed
report, DeploymentAutoscalingState (builds the AutoscalingContext, runs the policy in Serve's
wrapper with its delays and bounds), driven by the harness in tests/autoscaler.py. Time is a fake
clock in all of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import yaml
from ray.serve._private import replica as ray_replica
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig
from vllm.v1.metrics.loggers import StatLoggerBase, StatLoggerManager
from vllm.v1.metrics.stats import IterationStats, PrefixCacheStats, SchedulerStats

from serve.config import ModelSpec
from serve.engine import direct
from serve.engine.direct import DirectLLMServer, EngineLoad
from serve.policies import autoscaling as slo
from tests.autoscaler import Serve, ServedReplica
from tests.fakes import FakeTime

ROOT = Path(__file__).resolve().parents[2]
SECRET = "unit-test-engine-secret-0123456789"
DEP = DeploymentID(name="engine:tiny", app_name="tiny")


# ---- stand-ins for vLLM's engine and app ---------------------------------------------------------
class FakeAsyncLLM:
    """What the replica reads of vLLM's AsyncLLM: the frontend's unfinished requests, and the stat
    logger manager its output loop reports every engine step to (vLLM's class and record())."""

    def __init__(self) -> None:
        self.unfinished = 0
        self.logger_manager = self.new_logger_manager()
        # The KV cache's size as vLLM's CacheConfig holds it once the engine profiled it.
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=192, block_size=16))

    @staticmethod
    def new_logger_manager() -> StatLoggerManager:
        manager = StatLoggerManager.__new__(StatLoggerManager)  # its loggers need a VllmConfig
        manager.engine_indexes, manager.stat_loggers = [0, 1], []
        return manager

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished

    def step(self, *, running: int, waiting: int, skipped: int = 0, kv: float = 0.0,
             ttfts: Iterable[float] = (), engine_idx: int = 0, prefix: tuple[int, int] = (0, 0)) -> None:
        """One engine step's stats, passed as AsyncLLM's output handler passes them (vllm 0.32,
        v1/engine/async_llm.py, output_handler)."""
        iteration = IterationStats()
        iteration.time_to_first_tokens_iter = list(ttfts)
        self.logger_manager.record(
            engine_idx=engine_idx, iteration_stats=iteration, mm_cache_stats=None,
            scheduler_stats=SchedulerStats(num_running_reqs=running, num_waiting_reqs=waiting,
                                           num_skipped_waiting_reqs=skipped, kv_cache_usage=kv,
                                           prefix_cache_stats=PrefixCacheStats(queries=prefix[0], hits=prefix[1])))


async def inference_app(scope: Any, receive: Any, send: Any) -> None:
    """Stands in for vLLM's OpenAI app: every route answers 200."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class EngineReplica(DirectLLMServer):
    """DirectLLMServer with a stand-in engine and app (its real __init__ loads vLLM and binds a port)."""

    def __init__(self, engine: FakeAsyncLLM) -> None:
        self.engine = SimpleNamespace(_engine_client=engine)
        self.app = self._engine_app(inference_app, SECRET)
        self._replica_id, self._model_name = "tiny#test", "tiny"

    def __del__(self) -> None:  # the real one unregisters and stops the port: neither exists here
        pass


async def call(app: Any, method: str, path: str, secret: str | None = SECRET) -> int:
    headers = [(b"authorization", f"Bearer {secret}".encode())] if secret else []
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app({"type": "http", "method": method, "path": path, "headers": headers}, receive, send)
    return status[0]


class ReadNames(dict):
    """raw_metrics that notes every metric name the policy looks up."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __bool__(self) -> bool:
        return True

    def get(self, key: Any, default: Any = None) -> Any:
        self.names.add(key)
        return super().get(key, default)


def names_the_policy_reads() -> set[str]:
    raw = ReadNames()
    slo.read_signals(SimpleNamespace(raw_metrics=raw, total_num_requests=0.0, total_queued_requests=0.0))
    return raw.names


# ---- the hook's values -----------------------------------------------------------------------------
async def test_counts_the_inference_requests_that_reach_the_engine():
    replica = EngineReplica(FakeAsyncLLM())
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        assert await call(replica.app, "POST", path) == 200
    # Not inference: reads, LoRA loading, the probe; refused without the secret: never reached vLLM.
    assert await call(replica.app, "GET", "/v1/models") == 200
    assert await call(replica.app, "POST", "/v1/load_lora_adapter") == 200
    assert await call(replica.app, "POST", "/v1/unload_lora_adapter") == 200
    assert await call(replica.app, "GET", "/health", secret=None) == 200
    assert await call(replica.app, "POST", "/v1/chat/completions", secret=None) == 401
    assert await call(replica.app, "POST", "/v1/chat/completions", secret="x" * 40) == 401
    assert (await replica.record_autoscaling_stats())[slo.REQUESTS] == 4.0


async def test_reports_exactly_what_the_policy_reads_from_the_engines_state():
    engine = FakeAsyncLLM()
    replica = EngineReplica(engine)
    await replica.record_autoscaling_stats()  # joins the engine's stat loggers, as on Serve's first call
    for _ in range(3):
        await call(replica.app, "POST", "/v1/chat/completions")
    engine.unfinished = 7
    engine.step(running=4, waiting=2, skipped=1, kv=0.5, ttfts=[0.2, 0.4])
    stats = await replica.record_autoscaling_stats()
    assert set(stats) == names_the_policy_reads()
    assert stats == {slo.REQUESTS: 3.0, slo.ONGOING: 7.0, slo.WAITING: 3.0, slo.KV_USAGE: 0.5,
                     slo.TTFT: pytest.approx(0.3)}
    # What Ray's replica accepts (ReplicaMetricsManager._fetch_custom_autoscaling_metrics): anything
    # else on the first call turns custom metrics off for the replica's life.
    assert all(type(v) in (int, float) for v in stats.values())


async def test_an_idle_engine_reads_idle_even_if_its_last_step_was_busy():
    engine = FakeAsyncLLM()
    replica = EngineReplica(engine)
    await replica.record_autoscaling_stats()
    engine.step(running=8, waiting=5, kv=0.9, ttfts=[2.0])
    engine.unfinished = 0  # the frontend saw them finish; no engine step has reported since
    stats = await replica.record_autoscaling_stats()
    assert (stats[slo.ONGOING], stats[slo.WAITING], stats[slo.KV_USAGE]) == (0.0, 0.0, 0.0)


async def test_sums_waiting_and_averages_kv_over_data_parallel_engine_cores():
    engine = FakeAsyncLLM()
    replica = EngineReplica(engine)
    await replica.record_autoscaling_stats()
    engine.unfinished = 40
    engine.step(running=10, waiting=6, kv=0.8, engine_idx=0)
    engine.step(running=10, waiting=4, kv=0.4, engine_idx=1)
    engine.step(running=12, waiting=3, kv=0.6, engine_idx=0)  # engine 0's newer step replaces its last
    stats = await replica.record_autoscaling_stats()
    assert stats[slo.WAITING] == 7.0
    assert stats[slo.KV_USAGE] == pytest.approx(0.5)


async def test_ttft_is_the_mean_of_the_last_window_and_holds_while_requests_remain(monkeypatch):
    clock = FakeTime(1000.0)
    monkeypatch.setattr(direct, "time", clock)
    engine = FakeAsyncLLM()
    replica = EngineReplica(engine)
    await replica.record_autoscaling_stats()
    engine.unfinished = 5
    engine.step(running=5, waiting=0, ttfts=[1.0])
    clock.now += 5
    engine.step(running=5, waiting=0, ttfts=[3.0, 2.0])
    assert (await replica.record_autoscaling_stats())[slo.TTFT] == pytest.approx(2.0)
    clock.now += direct.TTFT_WINDOW_S - 2  # the first one left the window
    assert (await replica.record_autoscaling_stats())[slo.TTFT] == pytest.approx(2.5)
    clock.now += 30  # none since: the last first token still stands while requests are in the engine
    assert (await replica.record_autoscaling_stats())[slo.TTFT] == 2.0
    engine.unfinished = 0
    assert (await replica.record_autoscaling_stats())[slo.TTFT] == 0.0


async def test_joins_the_engines_stat_loggers_once_and_again_when_vllm_replaces_them():
    engine = FakeAsyncLLM()
    replica = EngineReplica(engine)
    for _ in range(3):
        await replica.record_autoscaling_stats()
    assert [type(x) for x in engine.logger_manager.stat_loggers] == [EngineLoad]
    engine.logger_manager = FakeAsyncLLM.new_logger_manager()  # AsyncLLM.scale_elastic_ep
    await replica.record_autoscaling_stats()
    engine.unfinished = 9
    engine.step(running=4, waiting=5)
    assert (await replica.record_autoscaling_stats())[slo.WAITING] == 5.0
    # An engine without stats (disable_log_stats): what the replica knows, no made-up zeros.
    engine.logger_manager = None  # type: ignore[assignment]
    assert set(await replica.record_autoscaling_stats()) == {slo.REQUESTS, slo.ONGOING}


def test_engine_load_is_a_vllm_stat_logger_taking_what_vllm_passes():
    assert issubclass(EngineLoad, StatLoggerBase)
    ours = inspect.signature(EngineLoad.record).parameters
    assert list(ours) == list(inspect.signature(StatLoggerBase.record).parameters)
    assert not inspect.isabstract(EngineLoad)


def test_the_engine_internals_the_stand_ins_copy_are_the_installed_ones():
    """FakeAsyncLLM and EngineReplica copy what direct.py reads of Ray's engine wrapper and vLLM's
    AsyncLLM; an upgrade that renames any of it must fail here, not in a cluster."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from vllm.v1.engine.async_llm import AsyncLLM

    assert "self._engine_client = self._start_async_llm_engine(" in inspect.getsource(VLLMEngine)
    assert callable(AsyncLLM.get_num_unfinished_requests)
    init, loop = inspect.getsource(AsyncLLM.__init__), inspect.getsource(AsyncLLM._run_output_handler)
    assert "self.logger_manager = StatLoggerManager(" in init
    assert "self._logger_ref = [self.logger_manager]" in loop and "logger_ref[0].record(" in loop
    manager = inspect.getsource(StatLoggerManager)
    assert "self.stat_loggers: list[AggregateStatLoggerBase] = []" in manager
    assert "for stat_logger in self.stat_loggers:" in inspect.getsource(StatLoggerManager.record)


async def test_the_stats_route_shows_what_the_replica_reports():
    engine = FakeAsyncLLM()
    replica = EngineReplica(engine)
    await replica.record_autoscaling_stats()
    await call(replica.app, "POST", "/v1/completions")
    engine.unfinished = 2
    engine.step(running=1, waiting=1, kv=0.25, ttfts=[0.5], prefix=(100, 64))
    engine.step(running=1, waiting=1, kv=0.25, prefix=(40, 32))
    stats = await replica._stats()
    assert stats["unfinished_requests"] == 2
    # What cache_aware routing reads (serve/gateway/server.py): vLLM's prefix-cache token counts,
    # summed over steps, and the KV cache's size in tokens (192 blocks of 16).
    assert stats["prefix_cache_tokens"] == {"queries": 140, "hits": 96}
    assert stats["kv_cache_tokens"] == 192 * 16
    assert stats["autoscaling"] == {slo.REQUESTS: 1.0, slo.ONGOING: 2.0, slo.WAITING: 1.0, slo.KV_USAGE: 0.25,
                                    slo.TTFT: 0.5}


# ---- through Ray Serve's replica and controller -----------------------------------------------------
def chart_autoscaling(**change: Any) -> tuple[AutoscalingConfig, int]:
    """Serve's autoscaling_config for the chart's default model, built as deployments.py builds it."""
    values = yaml.safe_load((ROOT / "helm/llmserve/values.yaml").read_text())
    model = values["serve"]["models"][0]
    model["deployment"]["autoscaling"].update(change)
    dep = ModelSpec(**model).deployment
    assert dep.autoscaling is not None and dep.autoscaling.policy == "slo"
    config = AutoscalingConfig(**dep.autoscaling.serve_autoscaling_config(dep.max_ongoing_requests))
    assert config.policy.policy_function == "serve.policies.autoscaling:SLOPolicy"
    return config, dep.max_ongoing_requests


class ServedEngine(ServedReplica):
    """One engine replica as Ray runs it (tests/autoscaler.py), over its own stand-in engine."""

    def __init__(self, replica_id: ReplicaID, config: AutoscalingConfig, max_ongoing: int) -> None:
        self.engine = FakeAsyncLLM()
        super().__init__(replica_id, EngineReplica, (self.engine,), config, max_ongoing)

    async def serve(self, requests: int, request_s: float) -> None:
        """`requests` arrive this second through the port's app, each in the engine for `request_s`."""
        for _ in range(requests):
            assert await call(self.user.app, "POST", "/v1/chat/completions") == 200
        self.engine.unfinished = ongoing = round(requests * request_s)
        self.engine.step(running=ongoing, waiting=0, kv=ongoing / 256, ttfts=[0.1] * requests)


def serve_engines(config: AutoscalingConfig, max_ongoing: int, monkeypatch: pytest.MonkeyPatch) -> Serve:
    return Serve(monkeypatch, DEP, config, lambda rid: ServedEngine(rid, config, max_ongoing), max_ongoing,
                 clock_modules=[direct])


async def run(config: AutoscalingConfig, max_ongoing: int, load: list[tuple[int, int, float]],
              monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Ticks of one second: the gateway spreads `rate` requests over the serving replicas, each
    replica records and pushes its metrics at Serve's intervals, the controller decides, replicas
    start or stop at once. `load`: [(seconds, requests/s, seconds a request is in the engine)].
    Returns the target at each second."""
    serve = serve_engines(config, max_ongoing, monkeypatch)
    begin = 0
    for seconds, rate, request_s in load:
        for t in range(begin, begin + seconds):
            await serve.scale(t)
            replicas = serve.replicas
            for i, replica in enumerate(replicas):
                assert isinstance(replica, ServedEngine)
                await replica.serve(rate // len(replicas) + (i < rate % len(replicas)), request_s)
            await serve.report_and_decide(t)
        begin += seconds
    assert serve.custom_metrics_on_everywhere()
    return serve.targets


async def test_load_through_serve_scales_the_chart_deployment_up_and_back_down(monkeypatch):
    config, max_ongoing = chart_autoscaling()
    assert (config.min_replicas, config.max_replicas, config.upscale_delay_s) == (1, 2, 0)
    start_s = config.policy.policy_kwargs["replica_start_s"]
    rate = int(1.5 * config.policy.policy_kwargs["target_requests_per_s"])  # 1.5 replicas' worth
    # Short requests: ~10 in the engine, under target_ongoing_requests; the rate alone says 2 replicas.
    targets = await run(config, max_ongoing, [(60, rate, 0.1), (200, 0, 0.0)], monkeypatch)
    assert targets[0] == 1  # one sample of the counter: no rate yet
    # Up at the first push whose window holds two samples of the counter.
    assert min(t for t, n in targets.items() if n == 2) <= 2 * config.metrics_interval_s
    # Down only after the load was gone for replica_start_s and then the downscale delay, to min_replicas.
    assert all(n == 2 for t, n in targets.items() if 20 <= t < 60 + start_s + config.downscale_delay_s)
    assert targets[259] == 1


async def test_without_a_measured_rate_it_scales_on_the_engines_ongoing_requests(monkeypatch):
    config, max_ongoing = chart_autoscaling(target_requests_per_s=None)
    assert config.policy.policy_kwargs["target_requests_per_s"] is None
    # 40 requests in the engine, 16 a replica: more than one replica; nothing reaches Serve's handles.
    targets = await run(config, max_ongoing, [(40, 40, 1.0), (80, 0, 0.0)], monkeypatch)
    assert min(t for t, n in targets.items() if n == 2) <= 2 * config.metrics_interval_s
    assert targets[119] == 1


async def test_serve_hands_the_policy_each_replicas_series_of_what_the_hook_returned(monkeypatch):
    config, max_ongoing = chart_autoscaling()
    serve = serve_engines(config, max_ongoing, monkeypatch)
    await serve.scale(0)
    (replica,) = serve.replicas
    assert isinstance(replica, ServedEngine)
    for t, (requests, waiting) in enumerate([(30, 0), (50, 2), (60, 4)]):
        serve.clock.now = 6.0 * t
        for _ in range(requests):
            await call(replica.user.app, "POST", "/v1/completions")
        replica.engine.unfinished = 20 + waiting
        replica.engine.step(running=20, waiting=waiting, kv=0.7, ttfts=[0.25])
        await replica.metrics._add_autoscaling_metrics_point_async()
    replica.metrics._push_autoscaling_metrics()
    ctx = serve.controller.state.get_autoscaling_context(1)
    assert ctx.raw_metrics[slo.REQUESTS][replica.id] == [
        TimeStampedValue(0.0, 30.0), TimeStampedValue(6.0, 80.0), TimeStampedValue(12.0, 140.0)]
    signals = slo.read_signals(ctx)
    assert signals == slo.Signals(rate=pytest.approx(110 / 12), ongoing=24.0, waiting=4.0, kv_usage=0.7, ttft_s=0.25)


async def test_rays_replica_finds_the_hook_by_the_name_it_looks_up_and_keeps_its_values(monkeypatch):
    config, max_ongoing = chart_autoscaling()
    monkeypatch.setattr(ray, "get_actor", lambda *a, **k: None)
    monkeypatch.setattr(ray_replica.ReplicaMetricsManager, "start_metrics_pusher", lambda self: None)
    replica = ServedEngine(ReplicaID(unique_id="r0", deployment_id=DEP), config, max_ongoing)
    await replica.start()
    # UserCallableWrapper.initialize_callable: getattr(callable, "record_autoscaling_stats", None).
    assert replica.wrapper._user_autoscaling_stats.__func__ is DirectLLMServer.record_autoscaling_stats
    stats = await replica.metrics._fetch_custom_autoscaling_metrics()
    assert stats is not None and set(stats) == names_the_policy_reads()
    assert replica.metrics._custom_metrics_enabled and replica.metrics._checked_custom_metrics
