"""The time-stepped fluid model: one step per second, requests as fluid, first-token times per request.

Each second: the trace's arrivals join a FIFO (the gateway and the engines' waiting queues as one);
running replicas admit from its head as far as batch slots (max_num_seqs, or what the KV cache
holds) and prefill time (at most ``max_prefill_share`` of each replica's second) allow; admitted
requests prefill and join the decode batch, which the replicas share evenly (the gateway
balances); decode runs at ``(1 - prefill share) / step(b)`` tokens per second per sequence, and a
sequence finishes at that rate over its output length. Admissions and completions flow together
through the second (dB/dt = a - kB, integrated exactly), so a slot freed early in the second is
filled again in it, as continuous batching does.
The gateway sends a replica at most ``max_in_flight`` requests (deployment.max_ongoing_requests
per gateway, serve/gateway/backends.py) and answers the rest 503 at once; requests older than its
request timeout leave the queue. Both are failures. The engines see (and count) only what was sent.

Every admission is recorded as a chunk: so many requests of the cohort that arrived in second
``a`` (quantiles q0..q1 of it, arrivals spread evenly over the second) admitted during second
``t`` (fractions x0..x1 of that second's admission capacity). ``metrics.ttft_samples`` draws
requests from each chunk: waiting time from the two cumulative curves (FIFO: the q-th arrival is
the q-th admitted), plus its own prefill at the replica's load that second, plus fixed costs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bench.autoscale.cluster import Cluster, ClusterConfig
from bench.autoscale.profiles import Profile
from bench.autoscale.serve_bridge import Sample, ServeAutoscaler, serve_clock

REQUEST_TIMEOUT_S = 600.0  # values-production.yaml serve.gateway.request_timeout_s
DRAIN_LIMIT_S = 3600  # after the trace: keep serving (no arrivals, no billing) until empty


@dataclass
class Outcome:
    duration_s: int
    arrivals: float = 0.0
    admitted: float = 0.0
    completed: float = 0.0
    timed_out: float = 0.0
    rejected: float = 0.0  # 503 at the gateway: every replica had max_in_flight requests
    left_queued: float = 0.0  # still waiting when the drain limit hit (counted as SLO misses)
    left_running: float = 0.0
    gpu_seconds: float = 0.0
    # Admitted requests in FIFO chunks: (count, arrival second, admission second, q0, q1, x0, x1,
    # decode step s, prefill share) -- see metrics.ttft_samples.
    chunks: list[tuple[float, ...]] = field(default_factory=list)
    running: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nodes: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Controller(Protocol):
    """(now, running replicas, current target, the fleet's state on demand) -> new replica target."""

    def __call__(self, now: float, running: int, target: int, observe: Callable[[], Sample]) -> int: ...


class Fixed:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, now: float, running: int, target: int, observe: Callable[[], Sample]) -> int:
        return self.n


class Planned:
    def __init__(self, plan: np.ndarray) -> None:
        self.plan = [int(x) for x in plan]

    def __call__(self, now: float, running: int, target: int, observe: Callable[[], Sample]) -> int:
        return self.plan[min(int(now), len(self.plan) - 1)]


class Serve:
    """Serve's controller; it samples the fleet only when replicas would record a metric."""

    def __init__(self, autoscaler: ServeAutoscaler) -> None:
        self.autoscaler = autoscaler

    def __call__(self, now: float, running: int, target: int, observe: Callable[[], Sample]) -> int:
        a = self.autoscaler
        if a.wants_sample(now):
            a.record(now, observe())
        return a.decide(now, running, target) if a.wants_decision(now, running, target) else target


def simulate(arrivals: np.ndarray, profile: Profile, controller: Controller, initial: int,
             cluster_cfg: ClusterConfig, max_in_flight: float = math.inf) -> Outcome:
    """Run one trace (requests per second) through one controller; see the module docstring."""
    duration = len(arrivals)
    out = Outcome(duration_s=duration, running=np.zeros(duration, np.int16), nodes=np.zeros(duration, np.int16))
    chunks = out.chunks
    cluster = Cluster(cluster_cfg, running=initial)
    target = initial
    # Hoisted out of the loop: the loop runs once per simulated second, ~100k times a trace.
    ctx, o_mean = profile.ctx_tokens, profile.output.mean()
    per_req = profile.prompt.mean() * profile.prefill_s_per_token
    d0 = profile.decode_base_s
    d1 = profile.decode_per_seq_s + profile.decode_per_kv_token_s * ctx
    seats, kv_seats = float(profile.max_num_seqs), profile.kv_capacity_tokens * 0.98 / ctx
    max_share, fixed_s = profile.max_prefill_share, profile.ttft_fixed_s
    queue: deque[list[float]] = deque()  # [arrival second, cohort size, still waiting]
    queued = decoding = 0.0
    clock = [0.0]
    state: dict[str, float] = {"received": 0.0}

    def observe() -> Sample:
        r = state["r"]
        return Sample(state["now"], decoding, queued, int(r),
                      decoding * ctx / (r * profile.kv_capacity_tokens) if r else 1.0, state["ttft"],
                      state["received"])

    with serve_clock(lambda: clock[0]):
        t = 0
        while t < duration or ((queued > 1e-9 or decoding > 1e-6) and t < duration + DRAIN_LIMIT_S):
            now = clock[0] = float(t)
            cluster.advance(now, 1.0 if t < duration else 0.0)
            r = cluster.running
            n = float(arrivals[t]) if t < duration else 0.0
            if n > 0:
                out.arrivals += n
                # The gateway forwards at once; the engines queue. Replicas are alike, so one
                # counter stands for each replica's.
                state["received"] += n / max(r, 1)
                queue.append([now, n, n])
                queued += n
            while queue and now - queue[0][0] >= REQUEST_TIMEOUT_S:
                out.timed_out += queue[0][2]
                queued -= queue.popleft()[2]
            # Within the second, admissions a and completions k*B both flow: B' = a - k B. The batch
            # may not exceed its cap at the end of the second, so a <= k (cap - B e^-k) / (1 - e^-k).
            cap = admit = share = step = k = 0.0
            if r:
                cap_b = r * min(seats, kv_seats)
                step = d0 + d1 * min(cap_b, decoding + queued) / r
                k = 1 / step / o_mean
                decay = math.exp(-k)
                cap = max(0.0, min(k * (cap_b - decoding * decay) / (1 - decay), max_share * r / per_req))
                admit = min(cap, queued)
                share = admit * per_req / r
                k *= 1 - share  # prefill takes its share of every replica's second
            used = wait_sum = 0.0
            while admit - used > 1e-12 and queue:
                cohort = queue[0]
                take = min(cohort[2], admit - used)
                q0 = 1 - cohort[2] / cohort[1]
                dq = take / cohort[1]
                chunks.append((take, cohort[0], now, q0, q0 + dq, used / cap, (used + take) / cap, step, share))
                wait_sum += take * max(0.0, now + (used + take / 2) / cap - cohort[0] - q0 - dq / 2)
                cohort[2] -= take
                used += take
                if cohort[2] <= 1e-9:
                    queue.popleft()
            queued = max(0.0, queued - admit)
            out.admitted += admit
            if r:
                decay = math.exp(-k)
                after = decoding * decay + admit * (1 - decay) / k
                out.completed += decoding + admit - after
                decoding = after
            excess = queued + decoding - r * max_in_flight
            if excess > 0 and queue:
                # In flight past the gateway's limit at the end of the second: those last to come
                # were answered 503 instead (never sent, so the engines do not count them).
                drop = min(excess, queued)
                out.rejected += drop
                queued -= drop
                state["received"] -= drop / max(r, 1)
                while drop > 1e-12 and queue:
                    take = min(queue[-1][2], drop)
                    queue[-1][2] -= take
                    drop -= take
                    if queue[-1][2] <= 1e-9:
                        queue.pop()
            if t < duration:
                state["now"], state["r"] = now, r
                state["ttft"] = max((wait_sum / admit if admit else 0.0) + fixed_s + per_req / max(0.05, 1 - share),
                                    now - queue[0][0] if queue else 0.0)
                new = controller(now, r, target, observe)
                if new != target:
                    target = new
                    cluster.set_target(now, target)
                out.running[t] = r
                out.nodes[t] = cluster.nodes
            t += 1
    out.left_queued = queued
    out.left_running = decoding
    out.gpu_seconds = cluster.gpu_seconds
    return out
