"""The chain stage: the route's target (or, after an escalation, the cascade's teacher), then its
fallback models, each tried only for a failure before the first byte (serve/policies/fallback.py).
The answer is relayed as it comes: a whole body billed from its usage, or a stream through its
dialect's tap, which bills the usage the stream reports."""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from serve.gateway.answer import Answer
from serve.gateway.context import Background, RequestContext
from serve.gateway.dialects.base import with_cost
from serve.gateway.dispatch import Dispatcher
from serve.gateway.errors import APIError, normalize
from serve.gateway.metrics import Metrics
from serve.gateway.stages.student import failure_of
from serve.gateway.upstream import UpstreamResponse
from serve.policies.cascade import choice_text
from serve.policies.fallback import FallbackPolicy, classify_status

logger = logging.getLogger("llmserve.routes")


class ChainStage:
    def __init__(self, dispatch: Dispatcher, metrics: Metrics, background: Background,
                 rng: random.Random | None = None) -> None:
        self.dispatch = dispatch
        self.metrics = metrics
        self.background = background
        self.rng = rng or random.Random()

    @staticmethod
    def chain(ctx: RequestContext) -> list[str]:
        route = ctx.route
        first = [route.cascade.teacher] if route.cascade is not None else [route.target] if route.target else []
        return first + [m for m in route.fallback if m not in first]

    async def run(self, ctx: RequestContext) -> Answer:
        route = ctx.route
        chain = self.chain(ctx)
        policy = FallbackPolicy(tuple(chain), route.max_attempts)
        stream = ctx.view.stream
        model: str | None = chain[0] if chain else None
        failures = 0
        last: Answer | None = None
        while model is not None:
            asked = ctx.sent_to(model)  # the client's request led by this model's tier prompt
            sent, strip_usage = ctx.dialect.stream_request(asked) if stream else (asked, False)
            if ctx.raw is not None and sent is ctx.payload and model == ctx.payload.get("model"):
                body = ctx.raw  # unchanged request: forward the client's own bytes
            else:
                body = json.dumps({**sent, "model": model}).encode()
            try:
                resp, ctx.replica = await self.dispatch.send_for(ctx, model, body, stream)
                failure = classify_status(resp.status)
            except APIError as e:
                failure = failure_of(e)
                last = Answer.error(e, ctx.headers())
                self.metrics.requests.labels(route.name, model, str(e.status)).inc()
            else:
                if failure is None:
                    # Only the primary's answer is the route's own: a fallback's answer is served
                    # but never cached, or it would stand in for the primary for the whole TTL.
                    return self._answer(ctx, model, resp, primary=model == chain[0], strip_usage=strip_usage,
                                        prompt_tokens=len(body) // 4)
                last = Answer.engine_error(resp.status, normalize(resp.status, resp.body), ctx.headers())
                self.metrics.requests.labels(route.name, model, str(resp.status)).inc()
            failures += 1
            nxt = policy.next_target(failures, failure, bytes_sent=False)
            if nxt is not None:
                self.metrics.fallbacks.labels(route.name, model, failure.value).inc()
                logger.info("route %s: %s failed (%s), falling back to %s", route.name, model, failure.value, nxt)
            model = nxt
        if last is None:
            last = Answer.error(APIError(503, f"Route `{route.name}` has no model to send to.",
                                         code="engine_unavailable"))
        return last

    def _answer(self, ctx: RequestContext, model: str, resp: UpstreamResponse, *, primary: bool,
                strip_usage: bool, prompt_tokens: int) -> Answer:
        ctx.served_by = model
        ctx.models.append(model)
        self.metrics.requests.labels(ctx.route.name, model, str(resp.status)).inc()
        store = ctx.store if primary else None
        if resp.chunks is None:
            body = json.loads(resp.body)
            self.dispatch.charge(ctx, model, ctx.dialect.usage(body))
            if store is not None and ctx.dialect.cacheable(body):
                # The same dict is then given its cost; harmless, a hit replaces `usage` anyway.
                store(body, model)
            self._maybe_shadow(ctx, body)
            return Answer(resp.status, with_cost(body, ctx.cost_usd), headers=ctx.headers())

        def keep(whole: dict[str, Any]) -> None:
            assert store is not None
            store(whole, model)

        tap = ctx.dialect.tap(lambda usage: self.dispatch.charge(ctx, model, usage),
                              keep if store is not None else None, strip_usage, prompt_tokens)
        return Answer(resp.status, chunks=self.dispatch.relay(resp, tap), headers=ctx.headers())

    def _maybe_shadow(self, ctx: RequestContext, answer: dict[str, Any]) -> None:
        """Mirror a share of answered requests to the route's candidate, off the request path.
        (Dialects whose answers are choices only: agreement is measured on them.)"""
        shadow = ctx.route.shadow
        if shadow is None or not ctx.dialect.shadowable or self.rng.random() >= shadow.fraction:
            return
        self.background.spawn(self._shadow(ctx, shadow.model, answer))

    async def _shadow(self, ctx: RequestContext, model: str, answer: dict[str, Any]) -> None:
        from serve.students.metrics import token_overlap

        route = ctx.route.name
        body = {k: v for k, v in ctx.sent_to(model).items() if k not in ("stream", "stream_options")}
        body["model"] = model
        try:
            resp, _ = await self.dispatch.send_json(ctx, model, body)
            if resp.status != 200:
                self.metrics.shadow.labels(route, model, "error").inc()
                return
            theirs = json.loads(resp.body)
        except Exception:  # a shadow never affects anything but its own counters
            self.metrics.shadow.labels(route, model, "error").inc()
            return
        agree = token_overlap(choice_text(theirs["choices"][0]), choice_text(answer["choices"][0]))
        self.metrics.shadow.labels(route, model, "ok").inc()
        self.metrics.shadow_agreement.labels(route, model).observe(agree)
