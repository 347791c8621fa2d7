"""SLO-aware autoscaling for the engine deployments: a Ray Serve 2.60 custom autoscaling policy.

Serve calls the policy on its controller every control-loop tick with an ``AutoscalingContext`` and
takes ``(replicas, state)`` back (``ray.serve.config.AutoscalingPolicy``: a class is instantiated
once with ``policy_kwargs``). Serve then applies the deployment's scaling factors, upscale and
downscale delays and [min_replicas, max_replicas] around it, as it does for its own policy.

Why not Serve's default (replicas = ongoing requests / target_ongoing_requests): for an LLM
engine, ongoing requests are not proportional to load. A lightly loaded replica finishes each
request in about output_tokens x 6.5 ms; near its batch limit every decode step is slower, so the
same request rate holds several times more requests; saturated, the queue grows without bound.
Scaled proportionally, a fleet that is too large reads its load as a fraction of what it is and
shrinks below what it needs; a saturated one reads its queue and jumps to max_replicas (the
simulation in bench/autoscale shows both). And a GPU replica needs minutes (node, image pull,
weights) before it serves. This policy:

- sizes the fleet from the request rate the engines receive (``target_requests_per_s`` per
  replica, measured for the model: the rate one replica serves within the TTFT target), falling
  back to ongoing requests when the engines report no rate;
- reads the newest sample of each replica, not the look-back mean, and asks at once (the chart
  sets upscale_delay_s to 0);
- when the engines queue, adds capacity to drain the backlog within ``drain_s``; when they are
  overloaded (first tokens later than ``ttft_target_s``, KV cache above ``kv_high``, or as many
  requests as the gateway sends one, ``max_ongoing_requests``) for ``overload_hold_s``, at least
  ``saturated_growth`` times the serving replicas, as overloaded engines see only what the
  gateway lets through;
  it never shrinks while either holds;
- gives a replica back only when the load has not needed it for ``replica_start_s`` (getting it
  back would take that long); on ongoing requests alone, by at most ``max_down_step`` a decision.

Signals come from the engines' ``record_autoscaling_stats`` (names below, per replica). Pure: no
I/O, no clock of its own (``ctx.current_time``), state only in the returned dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Custom metrics an engine replica reports (record_autoscaling_stats), per replica.
REQUESTS = "llmserve_requests_total"  # requests received since the replica started (a counter)
ONGOING = "llmserve_ongoing_requests"  # requests the engine holds: running + waiting
WAITING = "llmserve_waiting_requests"  # of those, not yet scheduled (no batch slot / KV blocks)
KV_USAGE = "llmserve_kv_cache_usage"  # share of KV-cache blocks in use, 0..1
TTFT = "llmserve_ttft_s"  # mean time to first token of recent requests
HISTORY = "llmserve_demand"  # policy state: [[time, demand in replicas], ...] over replica_start_s
OVERLOADED_SINCE = "llmserve_overloaded_since"  # policy state: when the current overload began


@dataclass(frozen=True)
class Signals:
    rate: float | None  # requests/s arriving at the engines, all replicas
    ongoing: float
    waiting: float
    kv_usage: float | None
    ttft_s: float | None


def _latest(per_replica: dict[Any, Any] | None) -> list[float]:
    """Newest value of each replica's time series (lists of TimeStampedValue)."""
    return [float(series[-1].value) for series in (per_replica or {}).values() if series]


def _rate(per_replica: dict[Any, Any] | None) -> float | None:
    """Sum over replicas of each counter's rise per second over its series (Serve keeps the last
    look_back_period_s). A counter that went down (replica restarted) counts as 0."""
    total, seen = 0.0, False
    for series in (per_replica or {}).values():
        if len(series) >= 2 and series[-1].timestamp > series[0].timestamp:
            rise = float(series[-1].value) - float(series[0].value)
            total += max(0.0, rise) / (series[-1].timestamp - series[0].timestamp)
            seen = True
    return total if seen else None


def read_signals(ctx: Any) -> Signals:
    raw = ctx.raw_metrics or {}
    ongoing, waiting = _latest(raw.get(ONGOING)), _latest(raw.get(WAITING))
    kv, ttft = _latest(raw.get(KV_USAGE)), _latest(raw.get(TTFT))
    return Signals(
        rate=_rate(raw.get(REQUESTS)),
        ongoing=sum(ongoing) if ongoing else float(ctx.total_num_requests or 0.0),
        waiting=sum(waiting) if waiting else float(ctx.total_queued_requests or 0.0),
        kv_usage=sum(kv) / len(kv) if kv else None,
        ttft_s=max(ttft) if ttft else None,
    )


class SLOPolicy:
    """See the module docstring. Parameters come from ``policy_kwargs``."""

    def __init__(self, target_requests_per_s: float | None = None, ttft_target_s: float = 1.0,
                 replica_start_s: float = 420.0, max_ongoing_requests: int | None = None,
                 saturated_growth: float = 2.0, overload_hold_s: float = 60.0, drain_s: float = 120.0,
                 max_down_step: float = 0.25, kv_high: float = 0.9, sample_every_s: float = 10.0) -> None:
        self.target_requests_per_s = target_requests_per_s
        self.ttft_target_s = ttft_target_s
        self.replica_start_s = replica_start_s
        self.max_ongoing_requests = max_ongoing_requests
        self.saturated_growth = saturated_growth
        self.overload_hold_s = overload_hold_s
        self.drain_s = drain_s
        self.max_down_step = max_down_step
        self.kv_high = kv_high
        self.sample_every_s = sample_every_s

    def rate_based(self, sig: Signals) -> bool:
        return sig.rate is not None and bool(self.target_requests_per_s)

    def demand(self, sig: Signals, target_ongoing: float) -> float:
        """Replicas the arriving load needs now."""
        if sig.rate is not None and self.target_requests_per_s:
            return sig.rate / self.target_requests_per_s
        return sig.ongoing / target_ongoing

    def overloaded(self, sig: Signals, replicas: int) -> bool:
        """Serving less than arrives: first tokens late, KV cache full, or as many requests as the
        gateway sends a replica (max_ongoing_requests; past it the gateway answers 503 and the
        engines may look calm)."""
        full = bool(self.max_ongoing_requests) and sig.ongoing >= 0.9 * replicas * (self.max_ongoing_requests or 0)
        return (full or (sig.kv_usage is not None and sig.kv_usage >= self.kv_high)
                or (sig.ttft_s is not None and sig.ttft_s > self.ttft_target_s))

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        sig = read_signals(ctx)
        target_ongoing = float(ctx.config.get_target_ongoing_requests())
        now = float(ctx.current_time or 0.0)
        target = int(ctx.target_num_replicas)
        desired = demand = self.demand(sig, target_ongoing)
        history = [list(p) for p in ctx.policy_state.get(HISTORY, []) if now - p[0] <= self.replica_start_s]
        if not history or now - history[-1][0] >= self.sample_every_s:
            history.append([now, demand])
        serving = int(ctx.current_num_replicas)
        overloaded = self.overloaded(sig, max(serving, 1))
        saturated = overloaded or sig.waiting >= 1.0
        if saturated:
            # The queue must drain as well as new arrivals be served.
            per_replica = self.target_requests_per_s * self.drain_s if self.target_requests_per_s else target_ongoing
            desired += sig.waiting / per_replica
        since = ctx.policy_state.get(OVERLOADED_SINCE) if overloaded else None
        since = now if overloaded and since is None else since
        if since is not None and now - since >= self.overload_hold_s:
            # What overloaded engines receive is capped by what they hold, so the demand may be any
            # multiple of it: grow the serving replicas by saturated_growth (once per start time:
            # the replicas asked for and still starting count already). Only an overload that
            # lasts: a few busy seconds are what the replica's headroom is for.
            desired = max(desired, serving * self.saturated_growth)
        if desired < target:
            if saturated:
                desired = target
            elif self.rate_based(sig):
                # A replica given back now takes replica_start_s to return: keep what the load
                # needed at its peak over that long (the oracle's rule, looking back). Until the
                # history is that long (a new controller or config), keep them all.
                known = now - history[0][0] >= self.replica_start_s - self.sample_every_s
                desired = max(desired, max(p[1] for p in history)) if known else target
            else:
                # Ongoing requests under-read the load of a fleet that is too large (requests
                # finish faster on an idle replica): shrink by at most max_down_step a decision.
                desired = max(desired, min(target - 1, math.floor(target * (1 - self.max_down_step))))
        return math.ceil(desired - 1e-9), {HISTORY: history, OVERLOADED_SINCE: since}
