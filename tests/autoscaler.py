"""Ray Serve 2.60's own autoscaling path for one deployment, without a Ray cluster, on a fake clock.

Shared by the engine's and the gateway's autoscaling tests (tests/unit/test_engine_autoscaling_stats.py,
tests/unit/test_gateway_autoscaling.py). Every piece is Ray's: UserCallableWrapper (finds the
replica's `record_autoscaling_stats` hook), ReplicaMetricsManager (validates, records and pushes what
the hook returns), the compressed report, DeploymentAutoscalingState (builds the AutoscalingContext,
runs the policy in Serve's wrapper with its delays and bounds). What is ours: the controller actor is
a plain object, and the pusher's periodic tasks are driven tick by tick at the intervals Ray uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import ray
from ray.serve import autoscaling_policy as ray_policy
from ray.serve._private import autoscaling_state as ray_state
from ray.serve._private import replica as ray_replica
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.config import DeploymentConfig, ReplicaConfig
from ray.serve._private.constants import RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR
from ray.serve._private.deployment_info import DeploymentInfo
from ray.serve._private.utils import decompress_metric_report
from ray.serve.config import AutoscalingConfig

from tests.fakes import FakeTime


class Noop:
    """The deployment's registered user class: the controller never calls it."""


class Controller:
    """Serve's controller for one deployment: Ray's DeploymentAutoscalingState, fed the replicas'
    compressed reports as ServeController.record_autoscaling_metrics_from_replica feeds it."""

    def __init__(self, dep: DeploymentID, config: AutoscalingConfig, max_ongoing: int | None = None) -> None:
        self.state = ray_state.DeploymentAutoscalingState(dep)
        deployment = (DeploymentConfig(autoscaling_config=config) if max_ongoing is None
                      else DeploymentConfig(autoscaling_config=config, max_ongoing_requests=max_ongoing))
        info = DeploymentInfo(deployment_config=deployment, replica_config=ReplicaConfig.create(Noop),
                              start_time_ms=0, deployer_job_id="test")
        self.target = self.state.register(info, config.min_replicas)
        self.record_autoscaling_metrics_from_replica = SimpleNamespace(remote=self._receive)

    def _receive(self, compressed: bytes) -> object:
        self.state.record_request_metrics_for_replica(decompress_metric_report(compressed))
        return object()  # the push's ObjectRef


class ServedReplica:
    """One replica as Ray runs it: the user callable in Ray's wrapper, Ray's metrics manager."""

    def __init__(self, replica_id: ReplicaID, user_class: type, args: tuple[Any, ...], config: AutoscalingConfig,
                 max_ongoing: int) -> None:
        self.id = replica_id
        self.config, self.max_ongoing = config, max_ongoing
        self.wrapper = ray_replica.UserCallableWrapper(
            user_class, args, {}, deployment_id=replica_id.deployment_id, run_sync_methods_in_threadpool=False,
            run_user_code_in_separate_thread=False, local_testing_mode=True,
            deployment_config=DeploymentConfig(autoscaling_config=config), actor_id=f"actor-{replica_id.unique_id}")

    @property
    def user(self) -> Any:
        """The user callable's instance, as the wrapper constructed it."""
        return self.wrapper._callable

    async def start(self) -> None:
        await self.wrapper.initialize_callable()
        self.metrics = ray_replica.ReplicaMetricsManager(self.id, asyncio.get_running_loop(), self.config,
                                                         False, self.max_ongoing)
        # What Replica.initialize does once the user callable is up (ray/serve/_private/replica.py).
        has_hook = getattr(self.wrapper, "_user_autoscaling_stats", None) is not None
        self.metrics.enable_custom_autoscaling_metrics(
            custom_metrics_enabled=has_hook, record_autoscaling_stats_fn=self.wrapper.call_record_autoscaling_stats)


class Serve:
    """A controller and its replicas, one second a tick: `scale` starts or stops replicas to the
    controller's target at once, `report_and_decide` records and pushes each replica's metrics at
    Serve's intervals and lets the controller decide. `time` is the fake clock in Ray's replica, state
    and policy modules and in `clock_modules`; `pushers` lists each replica whose metrics pusher Serve
    asked to start (it starts only when custom metrics are on)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dep: DeploymentID, config: AutoscalingConfig,
                 new_replica: Callable[[ReplicaID], ServedReplica], max_ongoing: int | None = None,
                 clock_modules: Iterable[ModuleType] = ()) -> None:
        self.dep, self.config, self.new_replica = dep, config, new_replica
        self.clock = FakeTime(0.0)
        for module in (ray_replica, ray_state, ray_policy, *clock_modules):
            monkeypatch.setattr(module, "time", self.clock)
        self.pushers: list[ReplicaID] = []
        # The pusher's two periodic tasks are driven by report_and_decide on the fake clock instead.
        monkeypatch.setattr(ray_replica.ReplicaMetricsManager, "start_metrics_pusher",
                            lambda manager: self.pushers.append(manager._replica_id))
        monkeypatch.setattr(ray_replica, "check_obj_ref_ready_nowait", lambda ref: True)
        self.controller = Controller(dep, config, max_ongoing)
        monkeypatch.setattr(ray, "get_actor", lambda *a, **k: self.controller)
        self.record_every = min(config.look_back_period_s * RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR,
                                config.metrics_interval_s)
        self.replicas: list[ServedReplica] = []
        self.made = 0
        self.targets: dict[int, int] = {}

    def replica_id(self, n: int) -> ReplicaID:
        return ReplicaID(unique_id=f"r{n}", deployment_id=self.dep)

    async def scale(self, t: int) -> None:
        self.clock.now = float(t)
        state = self.controller.state
        while len(self.replicas) < self.controller.target:
            replica = self.new_replica(self.replica_id(self.made))
            self.made += 1
            await replica.start()
            self.replicas.append(replica)
        while len(self.replicas) > self.controller.target:
            state.on_replica_stopped(self.replicas.pop().id)
        state.update_running_replica_ids([r.id for r in self.replicas])

    async def report_and_decide(self, t: int) -> int:
        for replica in self.replicas:
            if t % self.record_every < 1:
                await replica.metrics._add_autoscaling_metrics_point_async()
            if t % self.config.metrics_interval_s < 1:
                replica.metrics._push_autoscaling_metrics()
        state = self.controller.state
        decision = state.get_decision_num_replicas(self.controller.target)
        if decision != self.controller.target:
            (state.record_scale_up if decision > self.controller.target else state.record_scale_down)()
        self.controller.target = self.targets[t] = decision
        return decision

    def custom_metrics_on_everywhere(self) -> bool:
        """Every replica's hook was found and its pusher asked for: custom metrics on, on each."""
        return (self.pushers == [self.replica_id(n) for n in range(self.made)]
                and all(r.metrics._custom_metrics_enabled and r.metrics._checked_custom_metrics
                        for r in self.replicas))
