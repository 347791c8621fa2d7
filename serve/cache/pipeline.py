"""The head-cache pipeline: pick the most frequent queries of a log, have the teacher answer them
in a batch, and load the answers into a route's cache with provenance.

Keys are computed exactly as the gateway computes them online (serve/policies/cache_key.py), from
the logged request bodies, so a cached head query is a hit the next time a client sends it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from serve.cache.store import CacheEntry
from serve.config import Config, TierPrompt
from serve.policies.cache_key import Normalization, cache_key, endpoint_for
from serve.policies.cost import Price, cost_usd, usage_tokens
from serve.policies.tier_prompt import apply_any
from serve.policies.tier_prompt import digest as prompts_digest

TOPICS = ["order", "refund", "password", "delivery", "invoice", "warranty", "address", "payment", "login",
          "account", "shipping", "return", "subscription", "coupon", "store hours"]


def route_normalization(config: Config, route: str) -> Normalization:
    """How `route` normalises requests before keying them, as the gateway does online (none: the
    route has no cache)."""
    r = config.route(route)
    if r is None or r.cache is None:
        return Normalization()
    return Normalization(whitespace=r.cache.normalize_whitespace, case=r.cache.normalize_case)


@dataclass(frozen=True)
class HeadQuery:
    key: str
    count: int
    request: dict[str, Any]  # one representative logged body


def read_log(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """Logged request bodies; lines that are not JSON objects with messages or a prompt are skipped."""
    out = []
    for raw in lines:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict) and (isinstance(obj.get("messages"), list) or "prompt" in obj):
            out.append(obj)
    return out


def route_prompts(config: Config, route: str) -> str | None:
    """The digest of the route's per-tier prompts, part of its cache keys as the gateway makes them."""
    return prompts_digest(config.route(route))


def select_head(requests: list[dict[str, Any]], route: str, top: int, norm: Normalization | None = None,
                prompts: str | None = None, skip: int = 0) -> tuple[list[HeadQuery], int]:
    """The `top` most frequent normalised queries (ties: first seen first) after the `skip` most
    frequent, and the log's size. `prompts`: the route's prompt digest (`route_prompts`)."""
    counts: Counter[str] = Counter()
    first: dict[str, dict[str, Any]] = {}
    for r in requests:
        k = cache_key(route, endpoint_for(r), r, norm or Normalization(), prompts=prompts)
        counts[k] += 1
        first.setdefault(k, r)
    order = {k: i for i, k in enumerate(first)}
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], order[kv[0]]))[skip:skip + top]
    return [HeadQuery(k, n, first[k]) for k, n in ranked], len(requests)


def coverage(requests: list[dict[str, Any]], route: str, cached: set[str], norm: Normalization | None = None,
             prompts: str | None = None) -> float:
    """Share of logged traffic whose key is in the cache."""
    if not requests:
        return 0.0
    n = norm or Normalization()
    hits = sum(1 for r in requests if cache_key(route, endpoint_for(r), r, n, prompts=prompts) in cached)
    return hits / len(requests)


def batch_lines(head: list[HeadQuery], model: str, prompt: TierPrompt | None = None) -> list[str]:
    """Batch API input: each head query, sent to `model` (the teacher, or a trained student) led by
    that model's tier prompt on the route, exactly as the gateway would send it, with the key as
    custom_id."""
    lines = []
    for q in head:
        body = {k: v for k, v in apply_any(q.request, prompt).items() if k not in ("stream", "stream_options", "model")}
        body["model"] = model
        lines.append(json.dumps({"custom_id": q.key, "method": "POST", "url": endpoint_for(q.request), "body": body}))
    return lines


# Fields of a batch line's answer that belong to the line's run, not to the answer (as the chat
# dialect's `for_cache` empties them online); provenance is the entry's own, never the body's.
RUN_FIELDS = ("kv_transfer_params", "ec_transfer_params")


def batch_entries(output: Iterable[str], route: str, model: str, digest: str | None, batch_id: str,
                  now: float, price: Price | None = None, batch_factor: float = 1.0) -> list[tuple[str, CacheEntry]]:
    """(key, entry) for every answered line of a batch output file (custom_id is the key): each
    entry records the model and the weights digest that produced it, so a gateway stops serving
    it once the route is no longer served by them, exactly as an entry stored online; and, with
    `price`, what it cost: the model's own price x `batch_factor` (a student's fill is billed at the
    student's price, not the teacher's)."""
    items = []
    for raw in output:
        rec = json.loads(raw)
        resp = rec.get("response") or {}
        if resp.get("status_code") != 200:
            continue
        body = {k: None if k in RUN_FIELDS else v for k, v in resp["body"].items() if k != "llmserve_provenance"}
        billed: dict[str, Any] = {}
        if price is not None:
            p, c = usage_tokens(body.get("usage"))
            billed = {"price": {"input_per_million": price.input_per_million,
                                "output_per_million": price.output_per_million, "batch_factor": batch_factor},
                      "cost_usd": round(cost_usd(p, c, price) * batch_factor, 12)}
        items.append((rec["custom_id"], CacheEntry(response=body, model=model, created_at=now, batch_id=batch_id,
                                                   route=route, digest=digest, **billed)))
    return items


def synth_log(requests: int, distinct: int, s: float = 1.1, seed: int = 0, max_tokens: int = 16,
              model: str = "assistant") -> list[dict[str, Any]]:
    """A Zipf-distributed query log: query rank r is drawn with weight 1/r^s (head-heavy traffic).
    Whitespace and case vary between repeats, as real users type them."""
    rng = random.Random(seed)
    weights = [1.0 / (r ** s) for r in range(1, distinct + 1)]
    out = []
    for rank in rng.choices(range(distinct), weights=weights, k=requests):
        text = f"How do I change my {TOPICS[rank % len(TOPICS)]} (case {rank})?"
        if rng.random() < 0.3:
            text = "  " + text.replace(" ", "  ") + " "
        out.append({"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                    "max_tokens": max_tokens})
    return out
