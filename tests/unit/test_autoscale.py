"""bench/autoscale (the simulation) and serve/policies/autoscaling.py (our Serve policy), no Ray cluster."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ray.serve import autoscaling_policy as ray_policy
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from bench.autoscale import __main__ as cli
from bench.autoscale.cluster import Cluster, ClusterConfig
from bench.autoscale.metrics import figures
from bench.autoscale.profiles import CPU_TINY
from bench.autoscale.runner import cluster_config, needed, oracle_plan, serve_config
from bench.autoscale.serve_bridge import Sample, ServeAutoscaler, serve_clock, serve_policy
from bench.autoscale.simulator import REQUEST_TIMEOUT_S, Fixed, Planned, Serve, simulate
from serve.config import Autoscaling
from serve.policies import autoscaling as slo

RATE = CPU_TINY.max_rate()  # requests/s one CPU replica sustains with a full batch


def step_load(levels: list[tuple[int, float]], seed: int = 1) -> np.ndarray:
    """Poisson arrivals per second: `levels` is [(seconds, replicas' worth of load), ...]."""
    rate = np.concatenate([np.full(n, units * RATE) for n, units in levels])
    return np.random.default_rng(seed).poisson(rate).astype(float)


def slo_autoscaler(**kw) -> ServeAutoscaler:
    spec = {"min_replicas": 1, "max_replicas": 64, "policy": "slo", "target_requests_per_s": 0.87 * RATE,
            "replica_start_s": CPU_TINY.cold_start_s, **kw}
    return ServeAutoscaler(serve_config(spec))


# ---- the simulator -------------------------------------------------------------------------------
@pytest.mark.parametrize("controller, initial, max_in_flight", [
    (lambda: Fixed(6), 6, math.inf),  # enough replicas
    (lambda: Fixed(1), 1, math.inf),  # far too few: requests wait past the gateway timeout
    (lambda: Fixed(1), 1, 128.0),  # far too few, and the gateway answers 503 past 128 a replica
    (lambda: Serve(slo_autoscaler()), 2, 128.0),
])
def test_every_arrival_finishes_or_fails(controller, initial, max_in_flight):
    arrivals = step_load([(300, 1.5), (900, 5.0), (600, 1.0)])
    out = simulate(arrivals, CPU_TINY, controller(), initial, cluster_config(CPU_TINY, 60), max_in_flight)
    assert out.arrivals == arrivals.sum()
    # Every arrival was admitted (then finished or still decoding at the end) or failed.
    assert out.admitted + out.timed_out + out.rejected + out.left_queued == pytest.approx(out.arrivals, rel=1e-9)
    assert out.completed + out.left_running == pytest.approx(out.admitted, rel=1e-9)
    assert out.left_running < 1e-5 and out.left_queued < 1e-6  # the drain after the trace emptied it
    # The per-request samples stand for exactly the admitted requests.
    assert sum(c[0] for c in out.chunks) == pytest.approx(out.admitted, rel=1e-9)


@pytest.mark.parametrize("max_in_flight", [math.inf, 64.0])
def test_failed_requests_count_as_slo_misses(max_in_flight):
    arrivals = step_load([(1500, 4.0)])
    out = simulate(arrivals, CPU_TINY, Fixed(1), 1, cluster_config(CPU_TINY, 60), max_in_flight)
    failed = (out.timed_out + out.rejected + out.left_queued) / out.arrivals
    assert failed > 0.5  # one replica for four replicas' load
    # Past its limit the gateway answers 503 at once instead of queueing to the timeout.
    assert (out.rejected > 0, out.timed_out > 0) == (max_in_flight < math.inf, max_in_flight == math.inf)
    f = figures(out, CPU_TINY)
    assert f.slo_attainment <= 1 - failed + 1e-9
    assert f.ttft_p99_s == REQUEST_TIMEOUT_S


def test_oracle_beats_static_on_gpu_hours_at_equal_attainment():
    arrivals = step_load([(1800, 2.0), (1800, 12.0), (1800, 3.0)])
    cfg = cluster_config(CPU_TINY, idle_timeout_s=0)
    need = needed(arrivals, CPU_TINY, 0.9)
    plan = oracle_plan(need, math.ceil(CPU_TINY.cold_start_s))
    oracle = figures(simulate(arrivals, CPU_TINY, Planned(plan), int(plan[0]), cfg), CPU_TINY)
    peak = int(need.max())
    static = figures(simulate(arrivals, CPU_TINY, Fixed(peak), peak, cfg), CPU_TINY)
    assert oracle.slo_attainment >= 0.99 and static.slo_attainment >= 0.99
    assert abs(oracle.slo_attainment - static.slo_attainment) < 0.01
    assert oracle.gpu_hours < 0.75 * static.gpu_hours
    # Billing: static holds `peak` GPUs for the whole trace.
    assert static.gpu_hours == pytest.approx(peak * len(arrivals) / 3600)


def test_nodes_are_billed_from_request_to_removal_and_idle_ones_are_reused():
    cluster = Cluster(ClusterConfig(cold_start_s=100, warm_start_s=10, node_ready_s=60, idle_timeout_s=50))
    cluster.set_target(0, 1)
    for t in range(1, 151):
        cluster.advance(t, 1.0)
    assert cluster.running == 1 and cluster.gpu_seconds == 150  # billed while it started, too
    cluster.set_target(150, 0)  # the replica stops; its node idles
    for t in range(151, 171):
        cluster.advance(t, 1.0)
    assert (cluster.running, cluster.nodes, cluster.gpu_seconds) == (0, 1, 170)
    cluster.set_target(170, 1)  # the idle node takes it: only the model load (10 s)
    for t in range(171, 182):
        cluster.advance(t, 1.0)
    assert cluster.running == 1 and cluster.nodes == 1
    cluster.set_target(181, 0)
    for t in range(182, 300):
        cluster.advance(t, 1.0)
    assert cluster.nodes == 0 and cluster.gpu_seconds == 181 + 50  # removed after the idle timeout


# ---- Serve's own code in the loop --------------------------------------------------------------
def test_ray_default_is_rays_own_function_through_serves_wrapper():
    config = AutoscalingConfig(min_replicas=1, max_replicas=64, target_ongoing_requests=32)
    fn = serve_policy(config)
    # The controller's wrapper (ray.serve.autoscaling_policy._apply_autoscaling_config) ...
    assert fn.__code__.co_filename == ray_policy.__file__
    assert fn.__qualname__ == ray_policy.default_autoscaling_policy.__qualname__
    # ... around Ray's default policy, resolved from its import path as the controller does
    # (cloudpickled by value, so equal code rather than the same object).
    inner = fn.__wrapped__  # type: ignore[attr-defined]
    assert config.policy.policy_function == "ray.serve.autoscaling_policy:default_autoscaling_policy"
    assert inner.__module__ == "ray.serve.autoscaling_policy"
    assert inner.__code__.co_code == ray_policy.default_autoscaling_policy.__code__.co_code
    # And it behaves as Ray's: 320 ongoing at 32 per replica is 10 replicas, after the 30 s delay.
    clock = [1000.0]
    with serve_clock(lambda: clock[0]):
        state: dict = {}
        decisions = []
        for t in (1000.0, 1015.0, 1030.0):
            clock[0] = t
            n, state = fn(context(now=t, target=2, ongoing=320.0, state=state, config=config))
            decisions.append(n)
    assert decisions == [2, 2, 10]


class Recorder:
    """A policy that notes what Serve's wrapper hands it (in its state: the class is cloudpickled
    by value, so module globals would be a copy)."""

    def __call__(self, ctx):
        return ctx.target_num_replicas, {"ctx": type(ctx).__qualname__, "module": type(ctx).__module__,
                                         "config": type(ctx.config).__qualname__}


def test_the_simulation_calls_a_policy_with_serves_context_and_config():
    config = AutoscalingConfig(min_replicas=1, max_replicas=4,
                               policy={"policy_function": "tests.unit.test_autoscale:Recorder"})
    autoscaler = ServeAutoscaler(config)
    simulate(step_load([(120, 1.0)]), CPU_TINY, Serve(autoscaler), 1, cluster_config(CPU_TINY, 60))
    assert autoscaler.state["ctx"] == AutoscalingContext.__qualname__
    assert autoscaler.state["module"] == AutoscalingContext.__module__
    assert autoscaler.state["config"] == "AutoscalingConfig"


# ---- our policy ----------------------------------------------------------------------------------
DEP = DeploymentID(name="engine", app_name="llm")


def context(*, now: float, target: int, rate: float | None = None, ongoing: float = 0.0, waiting: float = 0.0,
            kv: float | None = None, ttft: float | None = None, replicas: int = 4, state: dict | None = None,
            config: AutoscalingConfig | None = None) -> AutoscalingContext:
    """A context as Serve builds it, with the engines' metrics as per-replica time series."""
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(replicas)]
    raw: dict = {slo.ONGOING: {r: [TimeStampedValue(now, ongoing / replicas)] for r in ids},
                 slo.WAITING: {r: [TimeStampedValue(now, waiting / replicas)] for r in ids}}
    if rate is not None:  # each replica's counter rose by its share over the last 24 s
        raw[slo.REQUESTS] = {r: [TimeStampedValue(now - 24, 100.0), TimeStampedValue(now, 100 + 24 * rate / replicas)]
                             for r in ids}
    if kv is not None:
        raw[slo.KV_USAGE] = {r: [TimeStampedValue(now, kv)] for r in ids}
    if ttft is not None:
        raw[slo.TTFT] = {r: [TimeStampedValue(now, ttft)] for r in ids}
    config = config or AutoscalingConfig(min_replicas=1, max_replicas=64, target_ongoing_requests=16)
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=replicas,
        target_num_replicas=target, running_replicas=ids, total_num_requests=ongoing, total_queued_requests=waiting,
        aggregated_metrics={}, raw_metrics=raw, capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=config)


POLICY = slo.SLOPolicy(target_requests_per_s=9.0, replica_start_s=420, drain_s=120)


def test_sizes_the_fleet_from_the_request_rate():
    assert POLICY(context(now=100, target=4, rate=90.0))[0] == 10
    assert POLICY(context(now=100, target=4, rate=89.0))[0] == 10  # 9.9 replicas: round up
    assert POLICY(context(now=100, target=4, rate=27.0))[0] == 4  # 3 needed, but no history yet: held


def test_adds_replicas_to_drain_a_queue_at_once():
    calm, _ = POLICY(context(now=100, target=10, rate=90.0, replicas=10))
    queued, _ = POLICY(context(now=100, target=10, rate=90.0, replicas=10, waiting=2160.0))
    # 2160 waiting, drained in 120 s at 9 req/s a replica: 2 replicas more, in this very call.
    assert (calm, queued) == (10, 12)


@pytest.mark.parametrize("signal", [{"ttft": 3.0}, {"kv": 0.95}, {"ongoing": 0.95 * 64 * 4}])
def test_a_lasting_overload_grows_the_serving_replicas_once_per_start(signal):
    policy = slo.SLOPolicy(target_requests_per_s=9.0, max_ongoing_requests=64, overload_hold_s=60)
    # The gateway lets through only what 4 replicas hold, so the rate reads 4 replicas' worth;
    # late first tokens, a full KV cache or replicas at the gateway's limit say the demand is more,
    # by how much the engines cannot see. A busy moment is what headroom is for ...
    n, state = policy(context(now=100, target=4, replicas=4, rate=36.0, **signal))
    assert n == 4
    n, state = policy(context(now=150, target=4, replicas=4, rate=36.0, state=state, **signal))
    assert n == 4
    # ... an overload that lasts 60 s doubles what serves ...
    n, state = policy(context(now=160, target=4, replicas=4, rate=36.0, state=state, **signal))
    assert n == 8
    # ... and not again while those asked for are still starting (4 serve, 8 targeted).
    n, state = policy(context(now=170, target=8, replicas=4, rate=36.0, state=state, **signal))
    assert n == 8
    # Once calm, the clock starts over.
    n, state = policy(context(now=180, target=8, replicas=8, rate=36.0, state=state))
    assert state[slo.OVERLOADED_SINCE] is None


def test_saturated_replicas_are_never_given_back():
    # The rate has said 3 replicas for longer than a start time, so calm engines shrink to 3 ...
    quiet = {slo.HISTORY: [[t, 3.0] for t in range(4580, 5000, 10)]}
    assert POLICY(context(now=5000, target=8, rate=27.0, state=quiet))[0] == 3
    # ... but engines whose first tokens are late or whose KV cache is full keep all 8.
    assert POLICY(context(now=5000, target=8, rate=27.0, ttft=2.5, state=quiet))[0] == 8
    assert POLICY(context(now=5000, target=8, rate=27.0, kv=0.97, state=quiet))[0] == 8


def test_gives_a_replica_back_only_after_the_load_left_it_for_a_start_time():
    state: dict = {}
    n, state = POLICY(context(now=0, target=10, rate=90.0, state=state))
    assert n == 10
    for t in range(10, 420, 10):  # load drops to a third; 10 were needed at t=0
        n, state = POLICY(context(now=t, target=10, rate=30.0, state=state))
        assert n == 10, t
    n, state = POLICY(context(now=430, target=10, rate=30.0, state=state))
    assert n == 4  # the peak left the 420 s window: 30 / 9 = 3.33 -> 4


def test_through_serves_wrapper_it_respects_min_max_and_the_downscale_delay():
    config = serve_config({"min_replicas": 2, "max_replicas": 6, "policy": "slo", "target_requests_per_s": 9.0,
                           "replica_start_s": 60, "upscale_delay_s": 0, "downscale_delay_s": 30})
    autoscaler = ServeAutoscaler(config)
    clock = [0.0]
    received = [0.0]
    targets: dict[int, int] = {}
    target = 2

    def run(seconds: range, rate: float) -> None:
        nonlocal target
        for t in seconds:
            clock[0] = float(t)
            received[0] += rate / max(target, 1)
            if autoscaler.wants_sample(t):
                autoscaler.record(t, Sample(t, 0.0, 0.0, target, 0.2, 0.1, received[0]))
            if autoscaler.wants_decision(t, target, target):
                target = autoscaler.decide(t, target, target)
            targets[t] = target

    with serve_clock(lambda: clock[0]):
        run(range(0, 120), 900.0)  # 100 replicas' worth
        assert max(targets.values()) == 6  # max_replicas
        first_six = min(t for t, n in targets.items() if n == 6)
        assert first_six <= 20  # no upscale delay: at the first push with a rate
        run(range(120, 400), 0.0)
    assert targets[399] == 2  # min_replicas, not 0
    # Not before the load was gone for replica_start_s (60) plus the downscale delay (30).
    assert all(n == 6 for t, n in targets.items() if 120 <= t < 120 + 60 + 30)


def test_without_a_rate_it_scales_on_ongoing_requests_and_shrinks_by_steps():
    policy = slo.SLOPolicy(target_requests_per_s=None)
    assert policy(context(now=10, target=2, ongoing=160.0))[0] == 10  # 16 ongoing a replica
    # A fleet too large under-reads its load: a quarter at most per decision.
    assert policy(context(now=10, target=20, ongoing=16.0))[0] == 15
    assert policy(context(now=10, target=2, ongoing=0.0))[0] == 1


def test_config_builds_serves_autoscaling_config_with_the_policy():
    spec = Autoscaling(min_replicas=1, max_replicas=8, policy="slo", target_requests_per_s=9.0, replica_start_s=300)
    config = AutoscalingConfig(**spec.serve_autoscaling_config(max_ongoing_requests=256))
    assert config.policy.policy_function == "serve.policies.autoscaling:SLOPolicy"
    assert config.policy.policy_kwargs == {"target_requests_per_s": 9.0, "ttft_target_s": 1.0, "replica_start_s": 300,
                                           "max_ongoing_requests": 256}
    assert (config.upscale_delay_s, config.downscale_delay_s) == (0, 30)
    # model_dump() (what deployments.py passes today) stays a config Serve accepts.
    AutoscalingConfig(**spec.model_dump())
    assert "policy" not in spec.model_dump()
    ray_default = Autoscaling(policy="ray_default").serve_autoscaling_config()
    assert "policy" not in ray_default and AutoscalingConfig(**ray_default).policy.is_default_policy_function()


# ---- the command ---------------------------------------------------------------------------------
def test_cli_writes_exactly_the_figures_per_policy_and_trace(tmp_path):
    assert cli.main(["--out", str(tmp_path), "--profiles", "cpu-tiny", "--traces", "azure_conv", "--jobs", "1"]) == 0
    data = json.loads((tmp_path / "autoscale.json").read_text())
    assert list(data) == ["cpu-tiny"] and list(data["cpu-tiny"]) == ["azure_conv"]
    policies = data["cpu-tiny"]["azure_conv"]
    assert list(policies) == ["static", "ray_default", "slo", "oracle"]
    for entry in policies.values():
        assert set(entry) == {"slo_attainment", "ttft_p99_s", "gpu_hours", "gpu_hours_vs_oracle"}
        assert 0 <= entry["slo_attainment"] <= 1 and entry["gpu_hours"] > 0
    assert policies["oracle"]["gpu_hours_vs_oracle"] == 1.0
    assert (tmp_path / "autoscale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
