"""When a gateway is Ready: what its readiness probe (`/health`, and `/-/healthz`, which KubeRay's
proxy health check calls on the head) answers.

A gateway of a new cluster (a NewCluster upgrade, a new pod) becomes Ready only once every model it
must serve has a running replica: before that it would take its share of the Service's traffic and
fail every request for a model still loading. Models scaled to zero (min_replicas 0) do not hold it:
they have no replica by design until traffic starts one, so waiting for them would keep the gateway
out forever. Once complete, the gateway stays Ready while any model can be served, as before: one
model's later outage must not take every gateway out of the Service, and the other models' traffic
with it (those requests get a 503 with Retry-After instead).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def required_models(models: Collection[Any]) -> frozenset[str]:
    """The models a gateway waits for: every one whose deployment keeps at least one replica
    (fixed replicas, or autoscaling with min_replicas >= 1)."""
    out = set()
    for m in models:
        scaling = m.deployment.autoscaling
        if (scaling.min_replicas if scaling is not None else m.deployment.replicas) >= 1:
            out.add(m.name)
    return frozenset(out)


def decide(ready: Mapping[str, int], required: Collection[str], was_complete: bool) -> tuple[str, bool]:
    """(status, complete) from each model's ready replica count.

    complete: every required model has had a replica at once, now or before (it latches).
    status: "starting" (503, not Ready) until complete, and after it when no model at all can be
    served while some model is required; "ok" when every required model has a replica; "degraded"
    (200) when some required model has none but another model can still be served."""
    complete = was_complete or all(ready.get(m, 0) > 0 for m in required)
    if not complete:
        return "starting", False
    if all(ready.get(m, 0) > 0 for m in required):
        return "ok", True
    return ("degraded" if any(ready.values()) else "starting"), True


class Readiness:
    """decide() with its latch, for one gateway process."""

    def __init__(self, models: Collection[Any]) -> None:
        self.required = required_models(models)
        self.complete = False

    def __call__(self, ready: Mapping[str, int]) -> str:
        status, self.complete = decide(ready, self.required, self.complete)
        return status
