"""Replicas and the nodes under them: what the Ray autoscaler and the cloud do with a replica target.

One replica per GPU node (the chart's GPU worker groups hold one engine each). Scaling up, a
replica takes an idle node if one is left (it then pays only the model load), otherwise the Ray
autoscaler asks for a node (cold start: autoscaler delay, provisioning, image pull, model load).
KubeRay's ``upscalingMode: Conservative`` (upscaling_speed 1) allows at most as many pending nodes
as running ones; ``Default`` and ``Aggressive`` (upscaling_speed 1000) do not limit
(ray/autoscaler/_private/kuberay/autoscaling_config.py). Scaling down, Serve stops replicas that
are not running yet first, then running ones; a freed node idles until the autoscaler's
``idleTimeoutSeconds`` removes it. A node is billed from the moment it is asked for to its removal.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClusterConfig:
    cold_start_s: float
    warm_start_s: float
    node_ready_s: float  # of cold_start_s, the part before the node can take a replica
    idle_timeout_s: float = 600.0
    conservative: bool = False
    gpus_per_node: int = 1


@dataclass
class Cluster:
    cfg: ClusterConfig
    running: int = 0
    starting: list[float] = field(default_factory=list)  # ready times, sorted
    starting_node_ready: dict[float, list[float]] = field(default_factory=dict)
    pending: int = 0  # replicas waiting for the autoscaler to allow a node
    orphans: list[float] = field(default_factory=list)  # nodes still provisioning, replica cancelled
    idle: deque[float] = field(default_factory=deque)  # idle-since times, oldest first
    gpu_seconds: float = 0.0

    @property
    def replicas(self) -> int:
        return self.running + len(self.starting) + self.pending

    @property
    def nodes(self) -> int:
        return self.running + len(self.starting) + len(self.orphans) + len(self.idle)

    def _node_limit_ok(self, now: float) -> bool:
        if not self.cfg.conservative:
            return True
        provisioning = len(self.orphans) + sum(r > now for rs in self.starting_node_ready.values() for r in rs)
        return provisioning < max(self.nodes - provisioning, 1)

    def _start(self, now: float) -> bool:
        if self.idle:
            self.idle.pop()  # the most recently freed node: image cached, model files warm
            ready, node_ready = now + self.cfg.warm_start_s, now
        elif self._node_limit_ok(now):
            ready, node_ready = now + self.cfg.cold_start_s, now + self.cfg.node_ready_s
        else:
            return False
        bisect.insort(self.starting, ready)
        self.starting_node_ready.setdefault(ready, []).append(node_ready)
        return True

    def _cancel_latest(self, now: float) -> None:
        ready = self.starting.pop()
        node_ready = self.starting_node_ready[ready].pop()
        if not self.starting_node_ready[ready]:
            del self.starting_node_ready[ready]
        if node_ready > now:
            bisect.insort(self.orphans, node_ready)
        else:
            self.idle.append(now)

    def set_target(self, now: float, target: int) -> None:
        while self.replicas > target:
            if self.pending:
                self.pending -= 1
            elif self.starting:
                self._cancel_latest(now)
            else:
                self.running -= 1
                self.idle.append(now)
        while self.replicas < target:
            if not self._start(now):
                self.pending += target - self.replicas
        while self.pending and self._start(now):
            self.pending -= 1

    def advance(self, now: float, dt: float) -> None:
        """Bill the nodes held over the last `dt`; then replicas and nodes that became ready by `now`
        join, and idle nodes past the timeout go."""
        self.gpu_seconds += self.nodes * self.cfg.gpus_per_node * dt
        while self.starting and self.starting[0] <= now:
            ready = self.starting.pop(0)
            self.starting_node_ready[ready].pop()
            if not self.starting_node_ready[ready]:
                del self.starting_node_ready[ready]
            self.running += 1
        while self.orphans and self.orphans[0] <= now:
            self.idle.append(self.orphans.pop(0))
        while self.idle and now - self.idle[0] >= self.cfg.idle_timeout_s:
            self.idle.popleft()
        while self.pending and self._start(now):
            self.pending -= 1
