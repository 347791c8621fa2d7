"""The head-cache stage: a deterministic request whose answer is stored is answered from it
(usage 0, cost 0, provenance attached); on a miss the stage leaves the route a way to store its
own answer (`ctx.store`)."""

from __future__ import annotations

import time
from typing import Any

from serve.cache.store import CacheEntry, HeadCache
from serve.gateway.answer import Answer
from serve.gateway.context import Background, RequestContext
from serve.gateway.metrics import Metrics
from serve.policies.cache_key import Normalization, cache_key, is_deterministic


class CacheStage:
    def __init__(self, cache: HeadCache | None, metrics: Metrics, background: Background) -> None:
        self.cache = cache
        self.metrics = metrics
        self.background = background

    def key(self, ctx: RequestContext) -> str | None:
        spec = ctx.route.cache
        if spec is None or not spec.enabled or ctx.view.n != 1:
            return None
        if not (ctx.dialect.deterministic or is_deterministic(ctx.payload, spec.cacheable)):
            return None
        norm = Normalization(whitespace=spec.normalize_whitespace, case=spec.normalize_case)
        return cache_key(ctx.route.name, ctx.path, ctx.payload, norm)

    async def run(self, ctx: RequestContext) -> Answer | None:
        route = ctx.route
        ckey = self.key(ctx)
        if ckey is None or self.cache is None:
            if route.cache is not None:
                self.metrics.cache.labels(route.name, "bypass").inc()
            return None
        cache = self.cache
        entry = await cache.get(route.name, ckey)
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
                entry = CacheEntry(response=body, model=model, created_at=time.time(), route=route.name)
                self.background.spawn(cache.put(route.name, ckey, entry, ttl))

            ctx.store = store
        return None

    def _hit(self, entry: CacheEntry, ctx: RequestContext) -> Answer:
        body = dict(entry.response)
        body["llmserve_provenance"] = {"model": entry.model, "created_at": entry.created_at,
                                       "batch_id": entry.batch_id}
        self.metrics.requests.labels(ctx.route.name, ctx.served_by, "200").inc()
        # A hit spends no model tokens: usage and cost are zero; provenance says who produced it.
        ctx.dialect.refresh(body)
        body["usage"] = ctx.dialect.zero_usage()
        return ctx.dialect.whole(body, ctx.view, ctx.headers())
