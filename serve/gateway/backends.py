"""The gateway's view of engine replicas: which are up for each model, and which to use next.

Pure bookkeeping (no I/O): discovery feeds it snapshots, the app asks it for an endpoint and tells
it when one failed. The choice is `gateway.routing.policy` (serve/model/routing.py): cache_aware
(serve/policies/routing.py), prefix_affinity (a rendezvous hash of the prompt's first characters,
load permitting), round_robin, or least_loaded: fewest requests in flight with a random tie-break,
which is what continuous batching wants, the replica with the fewest running sequences having the
most free batch slots.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from serve.model.routing import RoutingSpec
from serve.policies.affinity import AFFINITY_CHARS, rendezvous
from serve.policies.routing import CacheAwareRouter


@dataclass
class Endpoint:
    model: str
    replica_id: str
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    engine_load: int = 0  # requests its engine held at the last stats read (every gateway's)


class Backends:
    def __init__(
        self,
        down_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        routing: RoutingSpec | None = None,
    ) -> None:
        routing = routing or RoutingSpec()
        self.policy = routing.policy
        self._affinity_slack = routing.slack
        self._by_model: dict[str, dict[str, Endpoint]] = {}
        self._down_s = down_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._turn: dict[str, int] = {}  # round_robin: requests picked per model
        self._chars_per_token = routing.chars_per_token
        self.router = CacheAwareRouter(
            block_chars=routing.block_chars, max_blocks=routing.max_blocks,
            capacity_chars=int(routing.capacity_tokens * routing.chars_per_token),
            min_match=routing.min_match, load_weight=routing.load_weight, lora_weight=routing.lora_weight,
            lora_slots=routing.lora_slots, slack=routing.new_prefix_slack)
        # How much of a prompt the gateway hands to pick (serve/policies/affinity.py prefix_key).
        self.affinity_chars = (routing.block_chars * routing.max_blocks if self.policy == "cache_aware"
                               else AFFINITY_CHARS)

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
        self.router.retain({model: set(eps) for model, eps in fresh.items()})

    def models(self) -> list[str]:
        return list(self._by_model)

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
        adapter: str | None = None,
    ) -> Endpoint | None:
        """A replica for the next request, or None when none is live (or all are saturated).

        `affinity` is the prompt's text as far as routing reads it (serve/policies/affinity.py
        prefix_key), `adapter` the LoRA adapter it asks for. prefix_affinity prefers the
        rendezvous replica of its first 256 characters unless that one has ``slack`` more requests
        in flight than the least busy one; cache_aware scores each replica's believed prefix-cache
        hit against its load and records the request where it goes."""
        now = self._clock()
        live = [e for e in self.endpoints(model) if e.down_until <= now and e.replica_id not in exclude]
        if max_in_flight is not None:
            live = [e for e in live if e.in_flight < max_in_flight]
        if not live:
            return None
        policy = self.policy
        if policy == "cache_aware" and affinity is not None and len(self._by_model[model]) > 1:
            # Even with one replica left to choose, what it is sent is what its cache will hold.
            # Load: what this gateway has in flight there, or what the engine last reported if more
            # (other gateways' requests; a second old at most).
            loads = [max(e.in_flight, e.engine_load) for e in live]
            return live[self.router.choose(model, [e.replica_id for e in live], loads, affinity, adapter)]
        if policy == "prefix_affinity" and affinity is not None and len(live) > 1:
            least = min(e.in_flight for e in live)
            by_id = {e.replica_id: e for e in live}
            preferred = by_id[rendezvous(affinity[:AFFINITY_CHARS], sorted(by_id))]
            if preferred.in_flight <= least + self._affinity_slack:
                return preferred
        if policy == "round_robin":
            turn = self._turn.get(model, 0)
            self._turn[model] = turn + 1
            return sorted(live, key=lambda e: e.replica_id)[turn % len(live)]
        least = min(e.in_flight for e in live)
        return self._rng.choice([e for e in live if e.in_flight == least])

    def engine_report(self, endpoint: Endpoint, unfinished: int, kv_cache_tokens: int) -> None:
        """What a replica's engine says of itself (serve/gateway/server.py engine_stats_loop): the
        requests it holds and its KV cache's size, which bounds what its prefix cache can keep."""
        endpoint.engine_load = max(0, unfinished)
        if kv_cache_tokens > 0:
            self.router.set_capacity(endpoint.model, endpoint.replica_id, int(kv_cache_tokens * self._chars_per_token))

    def mark_down(self, endpoint: Endpoint) -> None:
        """Stop sending to a replica that refused a connection, until discovery or time says otherwise."""
        endpoint.down_until = self._clock() + self._down_s
