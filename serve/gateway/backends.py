"""The gateway's view of engine replicas: which are up for each model, and which to use next.

Pure bookkeeping (no I/O): discovery feeds it snapshots, the app asks it for an endpoint and tells
it when one failed. Picking is least-in-flight with a random tie-break, which is what continuous
batching wants: the replica with the fewest running sequences has the most free batch slots.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from serve.policies.affinity import rendezvous


@dataclass
class Endpoint:
    model: str
    replica_id: str
    url: str
    in_flight: int = 0
    down_until: float = 0.0


class Backends:
    def __init__(
        self,
        down_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        affinity_slack: int = 4,
    ) -> None:
        self._affinity_slack = affinity_slack
        self._by_model: dict[str, dict[str, Endpoint]] = {}
        self._down_s = down_s
        self._clock = clock
        self._rng = rng or random.Random()

    def update(self, snapshot: Mapping[str, Iterable[tuple[str, str]]]) -> None:
        """Replace the set of replicas, keeping in-flight counts and down marks of known ones."""
        fresh: dict[str, dict[str, Endpoint]] = {}
        for model, entries in snapshot.items():
            known = self._by_model.get(model, {})
            fresh[model] = {
                rid: known[rid] if rid in known and known[rid].url == url else Endpoint(model, rid, url)
                for rid, url in entries
            }
        self._by_model = fresh

    def endpoints(self, model: str) -> list[Endpoint]:
        return list(self._by_model.get(model, {}).values())

    def ready_count(self, model: str) -> int:
        now = self._clock()
        return sum(1 for e in self.endpoints(model) if e.down_until <= now)

    def pick(
        self,
        model: str,
        exclude: set[str] | frozenset[str] = frozenset(),
        affinity: str | None = None,
        max_in_flight: int | None = None,
    ) -> Endpoint | None:
        """A replica for the next request, or None when none is live (or all are saturated).

        With an affinity key (a prompt prefix) the key's rendezvous replica is preferred unless it
        has ``affinity_slack`` more requests in flight than the least busy one."""
        now = self._clock()
        live = [e for e in self.endpoints(model) if e.down_until <= now and e.replica_id not in exclude]
        if max_in_flight is not None:
            live = [e for e in live if e.in_flight < max_in_flight]
        if not live:
            return None
        least = min(e.in_flight for e in live)
        if affinity is not None and len(live) > 1:
            by_id = {e.replica_id: e for e in live}
            preferred = by_id[rendezvous(affinity, sorted(by_id))]
            if preferred.in_flight <= least + self._affinity_slack:
                return preferred
        return self._rng.choice([e for e in live if e.in_flight == least])

    def mark_down(self, endpoint: Endpoint) -> None:
        """Stop sending to a replica that refused a connection, until discovery or time says otherwise."""
        endpoint.down_until = self._clock() + self._down_s
