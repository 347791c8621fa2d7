"""Cache-, load- and LoRA-aware replica choice: send a request where its prompt's prefix is most
likely still in the engine's prefix cache, unless that replica is clearly busier.

What each replica's cache holds is *approximated* from what this gateway routed there (the
SGLang / vllm-router design): the prompt text is cut into fixed-size blocks of characters whose
hashes are chained, as vLLM chains its KV block hashes, so a block matches only when everything
before it matched too (a shared prefix). Each replica's index is an LRU bounded by that replica's
KV-cache capacity, so it models what the replica *still* holds, not only what it was ever sent:
blocks are touched last-block-first, so, like vLLM's free-block queue, a prefix's tail is evicted
before its head. vLLM keys cached blocks by LoRA adapter too, so an adapter's chain starts from
another seed.

The score of a replica is its matched-prefix share (matched blocks / blocks hashed, 0..1; under
``min_match`` it counts as none, so a short header every prompt shares does not pull all traffic
to one replica) minus ``load_weight`` per request it has in flight beyond the least busy replica,
plus ``lora_weight`` when the request's adapter was recently routed there (vLLM batches few
adapters at once: ``max_loras``). A prefix no replica is known to hold goes to the rendezvous
replica of its *key* among those within ``slack`` requests of the least loaded (default 4; 0, the
least loaded with the rendezvous only breaking ties, cut bench-routing's uniform TTFT, where a slack
of 4 queued unique prompts behind a busier replica, but lets an engine load read up to a discovery
interval ago send every new prefix to one replica until the next read): the first
``min_match`` share of its hashed text, the part another request must share to count as holding
the same prefix. Not a fixed number of characters: requests sharing only an app's system prompt
(chats that each open with their own material) would all hash alike and pile onto one replica,
which is what ``prefix_affinity``'s first 256 characters do.

Several gateways: each keeps its own index from its own traffic; nothing is shared. A *new*
prefix goes to the same replica from every gateway (the rendezvous hash of its key is the same
everywhere while their load views tie, or stay within ``slack``), so the prefix's first
requests, from whichever gateway, warm one replica, and each gateway then learns it holds the
prefix from its own requests there. What one gateway cannot see is another's traffic: a prefix
another gateway moved elsewhere under load, or blocks another gateway's requests evicted. So an
index errs both ways (a believed hit already evicted by another gateway's traffic; a hit it
never saw), and the error grows with the number of gateways; vLLM's KV-cache events
(``kv_events_config``) would make it exact and shared, at the cost of a subscriber per engine.

Pure and cheap: no I/O, a few dict operations per block, at most ``max_blocks`` blocks hashed a
request. The gateway's Backends holds one router and feeds it the loads it counts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve.policies.affinity import rendezvous


def prefix_digest(prefix: str) -> str:
    """A new prefix's rendezvous key: one digest, so the per-replica rendezvous hashes 16
    characters instead of up to 4 KB each. blake2b, not Python's salted hash: every gateway
    process must compute the same."""
    return hashlib.blake2b(prefix.encode(), digest_size=8).hexdigest()


@dataclass
class _Replica:
    """What one replica's prefix cache is believed to hold, most recently used last."""
    capacity: int  # blocks
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)
    adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)


class CacheAwareRouter:
    def __init__(self, block_chars: int = 256, max_blocks: int = 32, capacity_chars: int = 1 << 20,
                 min_match: float = 0.5, load_weight: float = 0.25, lora_weight: float = 0.5,
                 lora_slots: int = 1, slack: int = 4) -> None:
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.capacity_chars = capacity_chars
        self.min_match = min_match
        self.load_weight = load_weight
        self.lora_weight = lora_weight
        self.lora_slots = lora_slots
        self.slack = slack
        self._models: dict[str, dict[str, _Replica]] = {}

    def blocks(self, text: str, adapter: str | None = None) -> list[int]:
        """Chained hashes of the text's full blocks (the first `max_blocks`): block i's hash covers
        blocks 0..i. Python's own str hash: an index lives in one process, so its salt is fine."""
        size = self.block_chars
        h = hash(adapter)
        out = []
        for start in range(0, min(len(text) // size, self.max_blocks) * size, size):
            h = hash((h, text[start:start + size]))
            out.append(h)
        return out

    def new_prefix_key(self, text: str) -> str:
        """What a new prefix's replica is hashed by, alike on every gateway: the first `min_match`
        share of the text's hashed blocks (at least one block; all of a text shorter than one).
        Requests that share it are the ones that would match each other's blocks."""
        size = self.block_chars
        blocks = min(len(text) // size, self.max_blocks)
        chars = max(1, int(blocks * self.min_match)) * size if blocks else len(text)
        return prefix_digest(text[:chars])

    def choose(self, model: str, replica_ids: Sequence[str], loads: Sequence[float], text: str,
               adapter: str | None = None) -> int:
        """Index (into `replica_ids`) of the replica for a request with prompt `text`, recorded
        there as routed. `loads`: each replica's requests in flight (or queued at its engine)."""
        least = min(loads)
        hashes = self.blocks(text, adapter)
        index = self._models.setdefault(model, {})
        best, best_score, matched_any = 0, float("-inf"), False
        scores = []
        for i, rid in enumerate(replica_ids):
            rep = index.get(rid)
            score = -self.load_weight * (loads[i] - least)
            if rep is not None:
                held, matched = rep.blocks, 0
                for h in hashes:
                    if h not in held:
                        break
                    matched += 1
                if matched and matched >= self.min_match * len(hashes):
                    matched_any = True
                    score += matched / len(hashes)
                if adapter is not None and adapter in rep.adapters:
                    score += self.lora_weight
            scores.append(score)
            if score > best_score:
                best, best_score = i, score
        if not matched_any:
            best = self._new_prefix(replica_ids, loads, least, text, adapter, index)
        elif scores.count(best_score) > 1:  # equals everywhere: the choice every gateway makes
            ties = [rid for rid, s in zip(replica_ids, scores, strict=True) if s == best_score]
            best = replica_ids.index(rendezvous(self.new_prefix_key(text), ties))
        self._record(index, replica_ids[best], hashes, adapter)
        return best

    def _new_prefix(self, replica_ids: Sequence[str], loads: Sequence[float], least: float, text: str,
                    adapter: str | None, index: dict[str, _Replica]) -> int:
        """A prefix no replica is known to hold: its rendezvous replica among the lightly loaded
        (those holding the adapter first), which every gateway computes alike."""
        near = [rid for rid, load in zip(replica_ids, loads, strict=True) if load <= least + self.slack]
        if adapter is not None:
            with_adapter = [rid for rid in near if rid in index and adapter in index[rid].adapters]
            near = with_adapter or near
        return replica_ids.index(rendezvous(self.new_prefix_key(text), near))

    def _record(self, index: dict[str, _Replica], rid: str, hashes: list[int], adapter: str | None) -> None:
        rep = index.get(rid)
        if rep is None:
            rep = index[rid] = _Replica(max(1, self.capacity_chars // self.block_chars))
        held = rep.blocks
        for h in reversed(hashes):  # the head last: most recently used, evicted last
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
        while len(held) > rep.capacity:
            held.popitem(last=False)
        if adapter is not None:
            adapters = rep.adapters
            adapters[adapter] = None
            adapters.move_to_end(adapter)
            while len(adapters) > self.lora_slots:
                adapters.popitem(last=False)

    def set_capacity(self, model: str, replica_id: str, chars: int) -> None:
        """A replica's prefix-cache size as its engine reports it (KV blocks x block size, in
        characters), instead of the configured default."""
        index = self._models.setdefault(model, {})
        rep = index.get(replica_id)
        if rep is None:
            rep = index[replica_id] = _Replica(0)
        rep.capacity = max(1, chars // self.block_chars)
        while len(rep.blocks) > rep.capacity:
            rep.blocks.popitem(last=False)

    def retain(self, live: dict[str, set[str]]) -> None:
        """Forget replicas (and models) that are gone: a restarted replica starts with an empty cache."""
        for model in [m for m in self._models if m not in live]:
            del self._models[model]
        for model, index in self._models.items():
            for rid in [r for r in index if r not in live[model]]:
                del index[rid]

    def held_blocks(self, model: str, replica_id: str) -> int:
        rep = self._models.get(model, {}).get(replica_id)
        return len(rep.blocks) if rep is not None else 0
