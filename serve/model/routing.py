"""How the gateway chooses among a model's replicas (`gateway.routing`); the policies themselves are
in serve/policies/routing.py (cache_aware) and serve/policies/affinity.py (prefix_affinity)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from serve.model.spec import StrictModel


class RoutingSpec(StrictModel):
    policy: Literal["cache_aware", "prefix_affinity", "round_robin", "least_loaded"] = Field(
        "cache_aware",
        description="cache_aware: the replica whose prefix cache most likely holds the prompt's prefix "
                    "(an LRU index per replica of what was routed there), weighed against its load, with "
                    "a bonus where the request's LoRA adapter was routed last; prefix_affinity: a "
                    "rendezvous hash of the prompt's first 256 characters, unless that replica has "
                    "`slack` more requests in flight; round_robin; least_loaded: fewest in flight.",
    )
    block_chars: int = Field(
        256, gt=0,
        description="cache_aware: characters of prompt per hashed block (some 64-90 tokens; vLLM caches "
                    "16-token blocks, but a coarser index costs less per request and routes as well).")
    max_blocks: int = Field(
        32, gt=0, description="cache_aware: most blocks of a prompt hashed and matched (bounds per-request work).")
    capacity_tokens: int = Field(
        262_144, gt=0,
        description="cache_aware: tokens of prompt each replica's prefix cache is assumed to keep (its KV "
                    "cache), where the engine does not report its own size; older blocks are forgotten first.",
    )
    chars_per_token: float = Field(4.0, gt=0, description="cache_aware: characters per token, to size the index.")
    min_match: float = Field(
        0.5, ge=0, le=1,
        description="cache_aware: least share of a prompt's hashed blocks a replica must hold to count as "
                    "holding its prefix; less (a header every prompt shares) is routed as a new prefix.",
    )
    load_weight: float = Field(
        0.25, ge=0,
        description="cache_aware: score lost per request in flight beyond the least busy replica; a whole "
                    "prefix matched scores 1, so 0.25 trades a full hit against 4 requests.",
    )
    lora_weight: float = Field(
        0.5, ge=0, description="cache_aware: score gained where the request's LoRA adapter was routed recently.")
    lora_slots: int = Field(
        1, gt=0, description="cache_aware: adapters a replica is assumed to keep active (vLLM's max_loras).")
    slack: int = Field(
        4, ge=0,
        description="prefix_affinity: the rendezvous replica is used while it has at most this many more "
                    "requests in flight than the least busy one.",
    )
    new_prefix_slack: int = Field(
        4, ge=0,
        description="cache_aware, a prefix no replica holds: its rendezvous replica among those with at most "
                    "this many more requests in flight than the least busy one (0: the least busy, the "
                    "rendezvous only breaking ties). More keeps a new prefix on one replica across gateways "
                    "whose load views differ, and absorbs a stale engine load (read once a discovery "
                    "interval), at the price of queueing unique prompts behind busier replicas.",
    )
