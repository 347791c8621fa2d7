"""Endpoints that belong to one model rather than to a route's answer (tokenizers): sent to the
model that would answer the route first, with no cache, cascade, fallback or cost."""

from __future__ import annotations

import json

from serve.gateway.answer import Answer
from serve.gateway.context import RequestContext
from serve.gateway.dispatch import Dispatcher
from serve.gateway.errors import APIError, normalize


class DirectStage:
    def __init__(self, dispatch: Dispatcher) -> None:
        self.dispatch = dispatch

    async def run(self, ctx: RequestContext) -> Answer:
        route = ctx.route
        model = route.cascade.student if route.cascade else str(route.target)
        body = ctx.raw if ctx.raw is not None and ctx.payload.get("model") == model \
            else json.dumps({**ctx.payload, "model": model}).encode()
        try:
            resp, replica = await self.dispatch.send(model, ctx.path, body, False, ctx.affinity)
        except APIError as e:
            return Answer.error(e)
        headers = {"x-llmserve-route": route.name, "x-llmserve-served-by": model, "x-llmserve-replica": replica}
        if resp.status != 200:
            return Answer.engine_error(resp.status, normalize(resp.status, resp.body), headers)
        return Answer(200, json.loads(resp.body), headers=headers)
