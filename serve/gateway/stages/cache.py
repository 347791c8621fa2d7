"""The head-cache stage: a deterministic request whose answer is stored is answered from it
(usage 0, cost 0); on a miss the stage leaves the route a way to store its own answer
(`ctx.store`).

What one tenant's request leaves in the cache must tell another tenant nothing about it: an entry
is stored without the fields that belonged to the request that made it (the dialect's
`for_cache`) and a hit gets the replaying request's own (`for_request`); how and when an entry was
made (`llmserve_provenance`) is shown to admin keys only; a route whose cache is scoped per key
keeps each key's entries apart, and so does a key's `cache_salt` (it is part of the request).

An entry records the model and the weights that produced it. A hit counts only while the route
would still be served by that model from those weights: after a promotion or a rollback moves the
route's student (or target), or an adapter is reloaded from other weights, its old entries miss
(and the route's new answer replaces them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from serve.cache.store import CacheEntry, HeadCache
from serve.config import RouteSpec
from serve.gateway.answer import Answer
from serve.gateway.context import Background, RequestContext
from serve.gateway.metrics import Metrics
from serve.policies.cache_key import Normalization, cache_key, is_deterministic
from serve.policies.tier_prompt import digest as prompts_digest

# model name -> the content digest of the weights it is served from now (None: never hashed).
Digest = Callable[[str], str | None]


def route_models(route: RouteSpec) -> tuple[str, ...]:
    """The models whose answers are the route's own as it stands now (never its fallbacks)."""
    if route.cascade is not None:
        return route.cascade.student, route.cascade.teacher
    return (route.target,) if route.target else ()


def current(entry: CacheEntry, route: RouteSpec, digest: Digest) -> bool:
    """Whether the route would still answer with the entry's model, from the same weights."""
    return entry.model in route_models(route) and entry.digest == digest(entry.model)


class CacheStage:
    def __init__(self, cache: HeadCache | None, metrics: Metrics, background: Background,
                 digest: Digest = lambda model: None) -> None:
        self.cache = cache
        self.metrics = metrics
        self.background = background
        self.digest = digest

    def key(self, ctx: RequestContext) -> str | None:
        spec = ctx.route.cache
        if spec is None or not spec.enabled or ctx.view.n != 1:
            return None
        if not (ctx.dialect.deterministic or is_deterministic(ctx.payload, spec.cacheable)):
            return None
        norm = Normalization(whitespace=spec.normalize_whitespace, case=spec.normalize_case)
        return cache_key(ctx.route.name, ctx.path, ctx.payload, norm, ctx.key if spec.scope == "key" else None,
                         prompts_digest(ctx.route))

    async def run(self, ctx: RequestContext) -> Answer | None:
        route = ctx.route
        ckey = self.key(ctx)
        if ckey is None or self.cache is None:
            if route.cache is not None:
                self.metrics.cache.labels(route.name, "bypass").inc()
            return None
        cache = self.cache
        entry = await cache.get(route.name, ckey)
        if entry is not None and not current(entry, route, self.digest):
            entry = None  # made by a model or weights the route no longer serves: the new answer replaces it
        self.metrics.cache_redis_up.set(1 if cache.redis_up else 0)
        if cache.redis_configured:  # off the request path: the answer does not wait for it
            self.background.spawn(cache.record(route.name, entry is not None))
        if entry is not None:
            ctx.cache, ctx.served_by = "hit", f"cache:{entry.model}"
            self.metrics.cache.labels(route.name, "hit").inc()
            return self._hit(entry, ctx)
        ctx.cache = "miss"
        self.metrics.cache.labels(route.name, "miss").inc()
        if route.cache is not None and route.cache.store_online:
            ttl = route.cache.ttl_s

            def store(body: dict[str, Any], model: str) -> None:
                entry = CacheEntry(response=ctx.dialect.for_cache(body), model=model, created_at=time.time(),
                                   route=route.name, digest=self.digest(model))
                self.background.spawn(cache.put(route.name, ckey, entry, ttl))

            ctx.store = store
        return None

    def _hit(self, entry: CacheEntry, ctx: RequestContext) -> Answer:
        body = dict(entry.response)
        if ctx.admin:  # when and by which batch an entry was made is the operator's to know
            body["llmserve_provenance"] = {"model": entry.model, "created_at": entry.created_at,
                                           "batch_id": entry.batch_id, "digest": entry.digest,
                                           "price": entry.price, "cost_usd": entry.cost_usd}
        self.metrics.requests.labels(ctx.route.name, ctx.served_by, "200").inc()
        # A hit spends no model tokens: usage and cost are zero.
        ctx.dialect.refresh(body)
        ctx.dialect.for_request(body, ctx.payload, ctx.conversation)
        body["usage"] = ctx.dialect.zero_usage()
        return ctx.dialect.whole(body, ctx.view, ctx.headers())
