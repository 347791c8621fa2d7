"""When a gateway is Ready: what its readiness probe (`/health`, and `/-/healthz`, which KubeRay's
proxy health check calls on the head) answers.

A gateway of a new cluster (a NewCluster upgrade, a new pod) becomes Ready only once every model it
must serve has a running replica: before that it would take its share of the Service's traffic and
fail every request for a model still loading. Models scaled to zero (min_replicas 0) do not hold it:
they have no replica by design until traffic starts one, so waiting for them would keep the gateway
out forever. Once complete, the gateway stays Ready while any model can be served, as before: one
model's later outage must not take every gateway out of the Service, and the other models' traffic
with it (those requests get a 503 with Retry-After instead).

A gateway replica on Kubernetes also holds its Serve application short of RUNNING until its pod can
be Ready (`until_ready`): in a NewCluster upgrade KubeRay moves the API Service to the new cluster in
the reconcile that first sees every application there RUNNING (rayservice_controller.go, Reconcile:
reconcileServe -> getAndCheckServeStatus, then reconcileServicesToReadyCluster, every 2 s), and
nothing there waits for the new gateway pods' readiness probes. Had the gateway replica gone RUNNING
when it started listening, the Service would have selected pods whose probes had not yet seen /health
answer 200 (up to a probe period later): no ready endpoint, connection errors for a few seconds
(17 of 510 requests in tests/cluster's upgrade before this).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

logger = logging.getLogger("llmserve.gateway")

# Seconds a gateway pod's kubelet may take, at most, from /health's first 200 to the pod Ready:
# set by the chart on pods whose readiness is the gateway's /health (templates/_helpers.tpl).
READY_HOLD_ENV = "LLMSERVE_GATEWAY_READY_HOLD_S"


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


def ready_hold_s(environ: Mapping[str, str]) -> float:
    """The hold the pod's probes need (READY_HOLD_ENV); 0 where nothing probes /health (`llmserve
    run`, a gateway on the head, whose Service membership KubeRay sets in the same reconcile that
    switches, before it: updateHeadPodServeLabel)."""
    return max(0.0, float(environ.get(READY_HOLD_ENV) or 0))


async def until_ready(status: Callable[[], str], hold_s: float, poll_s: float = 0.5,
                      sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                      clock: Callable[[], float] = time.monotonic) -> float:
    """Return once `status()` (what /health answers) has left "starting", and `hold_s` after that:
    by then the kubelet has probed a 200 and the pod is Ready. Returns the seconds waited."""
    start = clock()
    while status() == "starting":
        await sleep(poll_s)
    logger.info("gateway ready to serve after %.1f s; holding %.1f s for the pod's readiness probes",
                clock() - start, hold_s)
    if hold_s > 0:
        await sleep(hold_s)
    return clock() - start
