"""A route's stages, in order: cache, cascade, chain (target, fallback). Each reads and records on
the request context and calls only down, into the dispatch layer; the first to answer ends the
route. Endpoints that are not routed (tokenizers) take the direct stage instead."""

from __future__ import annotations

from serve.cache.store import HeadCache
from serve.gateway.answer import Answer
from serve.gateway.context import Background, RequestContext
from serve.gateway.dispatch import Dispatcher
from serve.gateway.metrics import Metrics
from serve.gateway.stages.cache import CacheStage
from serve.gateway.stages.cascade import CascadeStage
from serve.gateway.stages.chain import ChainStage
from serve.gateway.stages.direct import DirectStage


class RouteRunner:
    def __init__(self, dispatch: Dispatcher, metrics: Metrics, cache: HeadCache | None,
                 background: Background) -> None:
        self.cache = CacheStage(cache, metrics, background, dispatch.catalog.adapter_digest)
        self.cascade = CascadeStage(dispatch, metrics)
        self.chain = ChainStage(dispatch, metrics, background)
        self.direct = DirectStage(dispatch)

    async def run(self, ctx: RequestContext) -> Answer:
        if not ctx.dialect.routed:
            return await self.direct.run(ctx)
        for stage in (self.cache, self.cascade):
            answer = await stage.run(ctx)
            if answer is not None:
                return answer
        return await self.chain.run(ctx)
