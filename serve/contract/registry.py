"""Where the gateway learns which engine replicas are serving, and at what address.

Each engine replica serves vLLM's own OpenAI app on a port of its own and registers that address
here with a heartbeat; entries expire when the heartbeats stop (the replica died or was drained).
The gateway polls a snapshot off the request path, so no Ray call sits between a client and an
engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

REGISTRY_NAME = "llmserve-endpoint-registry"


@dataclass(frozen=True)
class Registration:
    model: str
    replica_id: str
    url: str
    expires_at: float


class EndpointTable:
    """The registry's state: pure, clock injected, so it is unit-testable."""

    def __init__(self) -> None:
        self._entries: dict[str, Registration] = {}

    def register(self, model: str, replica_id: str, url: str, ttl_s: float, now: float) -> None:
        self._entries[replica_id] = Registration(model, replica_id, url, now + ttl_s)

    def unregister(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    def snapshot(self, now: float) -> dict[str, list[tuple[str, str]]]:
        """model -> sorted [(replica_id, url)] of live replicas; expired entries are dropped."""
        for rid in [r for r, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[rid]
        out: dict[str, list[tuple[str, str]]] = {}
        for e in self._entries.values():
            out.setdefault(e.model, []).append((e.replica_id, e.url))
        return {m: sorted(v) for m, v in out.items()}


# A registry knows no engine until its heartbeats (every 2 s, serve/engine/direct.py) are in. Until
# its warm-up has passed its snapshot is None, "nothing known yet", and the gateways keep the
# replicas they last knew instead of dropping live ones (503s). WARMUP_S at a first start.
# RESTART_WARMUP_S once Ray has restarted it (on a new head after the old one was lost, with GCS
# fault tolerance): an engine's next heartbeat reaches the restarted registry only once the GCS has
# told that engine's worker where it now runs, and after a lost head on 2 cores the workers heard
# from the new GCS 13-30 s late (tests/cluster, test_a_lost_head_with_gcs_fault_tolerance: the
# first snapshots after 5 s named no engine, and every gateway answered 503).
WARMUP_S = 5.0
RESTART_WARMUP_S = 45.0


def _restarted() -> bool:
    """Whether this process is a Ray actor that Ray has restarted (False outside Ray)."""
    import ray

    return ray.is_initialized() and bool(ray.get_runtime_context().was_current_actor_reconstructed)


class EndpointRegistry:
    """The Ray actor around EndpointTable (wrapped with ray.remote by ``get_registry``)."""

    def __init__(self, clock: Any = time.monotonic, restarted: bool | None = None) -> None:
        self._table = EndpointTable()
        self._clock = clock
        self._started = clock()
        self._warmup_s = RESTART_WARMUP_S if (_restarted() if restarted is None else restarted) else WARMUP_S

    def register(self, model: str, replica_id: str, url: str, ttl_s: float) -> None:
        self._table.register(model, replica_id, url, ttl_s, self._clock())

    def unregister(self, replica_id: str) -> None:
        self._table.unregister(replica_id)

    def snapshot(self) -> dict[str, list[tuple[str, str]]] | None:
        now = self._clock()
        if now - self._started < self._warmup_s:
            return None
        return self._table.snapshot(now)


HEAD_NODE_RESOURCE = "node:__internal_head__"
# A tiny share of it: what pins the registry, and the task that creates it, to the head.
ON_HEAD = {HEAD_NODE_RESOURCE: 0.001}


def get_registry(namespace: str):  # -> ray.actor.ActorHandle
    """Get or create the registry actor. Detached, so a gateway restart does not lose it."""
    import ray

    try:
        return ray.get_actor(REGISTRY_NAME, namespace=namespace)
    except ValueError:  # not created yet
        pass
    # Created by a task on the head, not by the caller (an engine or gateway replica on a worker
    # pod): Ray restarts a detached actor by asking its creator's node first while that node lives.
    # With GCS fault tolerance, a worker's raylet still takes a lost head for alive for ~20 s after
    # the new GCS starts, and sent each such restart back to the dead head at once, the GCS straight
    # back to the creator's node: 20,311 leases in 18 s on 2 cores, both cores taken while the
    # cluster recovered (tests/cluster, test_a_lost_head_with_gcs_fault_tolerance). Created on the
    # head, a restart after its loss starts from a random live node, as Serve's controller's does
    # (placed in 0.1 s in that run; 20 leases in all).
    on_head = ray.remote(num_cpus=0, resources=ON_HEAD)(_create_registry)
    ray.get(on_head.remote(namespace))
    return ray.get_actor(REGISTRY_NAME, namespace=namespace)


def _create_registry(namespace: str) -> None:
    """Create the registry unless it exists (a task: run on the head by get_registry)."""
    import ray

    # On the head node (Ray's documented `node:__internal_head__` resource), as Serve's controller
    # is: a detached actor holds its node busy, so anywhere else it would keep an autoscaled
    # worker pod from ever being removed (found by tests/cluster/test_autoscaling_cluster.py).
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, resources=ON_HEAD)(EndpointRegistry)
    actor_cls.options(name=REGISTRY_NAME, namespace=namespace, get_if_exists=True, lifetime="detached").remote()
