"""Ray Serve's autoscaling, driven from the simulation exactly as Serve's controller drives it.

The controller (ray/serve/_private/autoscaling_state.py, Ray 2.60) resolves the configured policy
with ``_resolve_policy_callable`` (a class is instantiated once with ``policy_kwargs``), wraps it
with ``autoscaling_policy._apply_autoscaling_config`` (scaling factors, upscale/downscale delays,
the cold-start path) and, every control-loop tick, calls it with an ``AutoscalingContext`` and
clips the answer to [min_replicas, max_replicas]. We use the same three pieces. The context's
``total_num_requests`` is what Serve would compute: replicas record their ongoing requests every
``look_back_period_s * 0.2`` s, push every 10 s, and the controller takes the time-weighted mean
over ``look_back_period_s``. Custom metrics (``record_autoscaling_stats``) come the same way, per
replica, as ``raw_metrics`` (time series) and ``aggregated_metrics`` (window means).

The delays in ``_apply_delay_logic`` are measured with ``time.time()`` (2.60 compares wall-clock
timestamps, not tick counts), so ``serve_clock`` points that module's ``time`` at the simulated
clock while a simulation runs. Because delays are timestamps, the policy need not run every
CONTROL_LOOP_INTERVAL_S (0.1 s): it runs when its input changes and when a delay ends
(``wants_decision``), on the simulated second.
"""

from __future__ import annotations

import contextlib
import math
import time as real_time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ray.serve import autoscaling_policy as ray_policy
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve._private.constants import (
    RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR,
    RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S,
    SERVE_AUTOSCALING_DECISION_COUNTERS_KEY,
    SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY,
)
from ray.serve.config import AutoscalingConfig, AutoscalingContext

RAY_DEFAULT_POLICY = "ray.serve.autoscaling_policy:default_autoscaling_policy"
SLO_POLICY = "serve.policies.autoscaling:SLOPolicy"
DEPLOYMENT = DeploymentID(name="engine", app_name="llm")
PolicyFn = Callable[[AutoscalingContext], tuple[int, dict[str, Any]]]


class _SimTime:
    """Stands in for the `time` module inside ray.serve.autoscaling_policy."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def time(self) -> float:
        return self._now()

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


@contextlib.contextmanager
def serve_clock(now: Callable[[], float]) -> Iterator[None]:
    """Make Serve's autoscaling delays read the simulated clock `now` for the duration."""
    saved = ray_policy.time
    ray_policy.time = _SimTime(now)
    try:
        yield
    finally:
        ray_policy.time = saved


def serve_policy(config: AutoscalingConfig) -> PolicyFn:
    """The callable Serve's controller runs for `config` (AutoscalingState.register)."""
    return ray_policy._apply_autoscaling_config(_resolve_policy_callable(config.policy))


@dataclass
class Sample:
    ts: float
    running: float  # requests the engines hold and work on, all replicas
    queued: float  # requests waiting for a batch slot
    replicas: int
    kv_usage: float  # share of KV-cache blocks in use, mean over replicas
    ttft_s: float  # mean TTFT of the requests admitted since the last sample
    received: float  # requests one replica has received since it started (replicas are alike)


class ServeAutoscaler:
    """Serve's controller for one deployment: metrics in, a replica target out."""

    def __init__(self, config: AutoscalingConfig, reported: frozenset[str] | None = None) -> None:
        """`reported`: the custom metrics the engines report (names in serve.policies.autoscaling);
        None: all of them."""
        self.config = config
        self.policy = serve_policy(config)
        self.state: dict[str, Any] = {}
        self.record_every_s = config.look_back_period_s * RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR
        self.push_every_s = RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S
        self.reported = reported
        self._samples: deque[Sample] = deque()
        self._next_record = 0.0
        self._visible_until = -1.0
        self.last_up: float | None = None
        self.last_down: float | None = None
        self._last_seen = (-1, -1)
        self._deadline = math.inf

    def wants_sample(self, now: float) -> bool:
        return now >= self._next_record

    def record(self, now: float, sample: Sample) -> None:
        """A replica-side sample, taken at Serve's record interval."""
        self._samples.append(sample)
        self._next_record = now + self.record_every_s
        horizon = now - self.config.look_back_period_s - self.push_every_s
        while self._samples and self._samples[0].ts < horizon:
            self._samples.popleft()

    def wants_decision(self, now: float, running: int, target: int) -> bool:
        """Whether a control-loop tick now could decide differently from the last one: a metrics push
        (every push_every_s), a change in replicas, or a pending upscale/downscale delay that ends.
        Between those, Serve's policy sees the same input and its delays have not elapsed, so
        skipping those ticks yields the decisions a 0.1 s control loop makes (to within the drift of
        the window mean between pushes), at a fraction of the cost."""
        pushed = now - self._visible_until >= self.push_every_s
        if pushed:
            self._visible_until = now
        return pushed or (running, target) != self._last_seen or now >= self._deadline

    def _visible(self, now: float) -> list[Sample]:
        start = now - self.config.look_back_period_s
        return [s for s in self._samples if start <= s.ts <= self._visible_until]

    @staticmethod
    def _mean(points: list[tuple[float, float]], now: float) -> float:
        """Time-weighted mean; the last point holds until now (Serve's last_window_s)."""
        if not points:
            return 0.0
        total = dur = 0.0
        for i, (ts, v) in enumerate(points):
            end = points[i + 1][0] if i + 1 < len(points) else max(now, ts + 1e-3)
            total += v * (end - ts)
            dur += end - ts
        return total / dur

    def _custom(self, visible: list[Sample]) -> tuple[dict[str, Any], dict[str, Any]]:
        from serve.policies import autoscaling as ours

        if not visible:
            return {}, {}
        n = max(visible[-1].replicas, 1)
        ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(n)]
        series = {
            ours.REQUESTS: [(s.ts, s.received) for s in visible],
            ours.ONGOING: [(s.ts, (s.running + s.queued) / max(s.replicas, 1)) for s in visible],
            ours.WAITING: [(s.ts, s.queued / max(s.replicas, 1)) for s in visible],
            ours.KV_USAGE: [(s.ts, s.kv_usage) for s in visible],
            ours.TTFT: [(s.ts, s.ttft_s) for s in visible],
        }
        if self.reported is not None:
            series = {k: v for k, v in series.items() if k in self.reported}
        raw = {k: {r: [TimeStampedValue(ts, v) for ts, v in pts] for r in ids} for k, pts in series.items()}
        now = visible[-1].ts
        agg = {k: dict.fromkeys(ids, self._mean(pts, now)) for k, pts in series.items()}
        return agg, raw

    def _delay_ends(self) -> float:
        """When the delay Serve's wrapper is counting (state it keeps for itself) would elapse."""
        since = self.state.get(SERVE_AUTOSCALING_DECISION_TIMESTAMP_KEY)
        if since is None:
            return math.inf
        up = self.state.get(SERVE_AUTOSCALING_DECISION_COUNTERS_KEY, 0) > 0
        delay = self.config.upscale_delay_s if up else self.config.downscale_delay_s
        if not up and self.config.downscale_to_zero_delay_s is not None:
            delay = min(delay, self.config.downscale_to_zero_delay_s)
        return float(since) + delay

    def decide(self, now: float, running: int, target: int) -> int:
        visible = self._visible(now)
        total = self._mean([(s.ts, s.running + s.queued) for s in visible], now)
        queued = self._mean([(s.ts, s.queued) for s in visible], now)
        custom: dict[str, Any] = {}
        if self.reported is None or self.reported:
            def lazy(i: int) -> Callable[[], dict[str, Any]]:
                return lambda: (custom.setdefault("v", self._custom(visible)))[i]
            agg_fn, raw_fn = lazy(0), lazy(1)
        else:
            agg_fn, raw_fn = dict, dict
        ctx = AutoscalingContext(
            deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=DEPLOYMENT.app_name,
            current_num_replicas=running, target_num_replicas=target, running_replicas=[],
            total_num_requests=total, total_queued_requests=queued,
            aggregated_metrics=agg_fn, raw_metrics=raw_fn,
            capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas,
            policy_state=dict(self.state), last_scale_up_time=self.last_up,
            last_scale_down_time=self.last_down, current_time=now, config=self.config,
        )
        decision, self.state = self.policy(ctx)
        decision = max(self.config.min_replicas, min(self.config.max_replicas, math.ceil(decision)))
        self._last_seen = (running, target)
        self._deadline = self._delay_ends()
        if decision > target:
            self.last_up = now
        elif decision < target:
            self.last_down = now
        return decision
