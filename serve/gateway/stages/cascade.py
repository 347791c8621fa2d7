"""The cascade stage: the route's student answers unless the cascade policy (serve/policies/
cascade.py, pure) escalates; then the request goes on to the teacher (the chain stage).

The student is asked with logprobs. By default its answer is buffered (bounded by
`max_student_tokens`) and judged whole; a streamed request on a route with `decide_after_tokens`
is judged on the student's first tokens instead (serve/gateway/stages/prefix.py).
"""

from __future__ import annotations

import json

from serve.gateway.answer import Answer
from serve.gateway.context import RequestContext
from serve.gateway.dialects.base import with_cost
from serve.gateway.dispatch import Dispatcher
from serve.gateway.errors import APIError
from serve.gateway.metrics import Metrics
from serve.gateway.schema_check import SchemaChecker
from serve.gateway.stages.prefix import stream_student
from serve.gateway.stages.student import policy_of, student_failed
from serve.policies.cascade import CascadePolicy, decide, prefix_decidable, schema_checks


class CascadeStage:
    def __init__(self, dispatch: Dispatcher, metrics: Metrics) -> None:
        self.dispatch = dispatch
        self.metrics = metrics
        # A tenant's JSON Schema is checked in worker processes, never on this event loop.
        self.schemas = SchemaChecker()

    def on_a_prefix(self, ctx: RequestContext, policy: CascadePolicy) -> bool:
        """Decided on k tokens, then streamed: a route with decide_after_tokens, a dialect whose
        stream the relay can follow, and no check that needs the whole answer (a schema)."""
        cs = ctx.route.cascade
        return cs is not None and cs.decide_after_tokens is not None and ctx.dialect.prefix_decidable(ctx.view) \
            and prefix_decidable(policy, ctx.payload)

    async def run(self, ctx: RequestContext) -> Answer | None:
        """The student's answer, or None when the request must go on to the teacher."""
        cs = ctx.route.cascade
        if cs is None or not ctx.dialect.cascades:
            return None
        policy = policy_of(cs)
        on_prefix = self.on_a_prefix(ctx, policy)
        # The student gets its own tier's prompt (often only the client's short input); an
        # escalation sends the teacher the client's request with the teacher's (the chain stage).
        req, asked_logprobs = ctx.dialect.student_request(ctx.sent_to(cs.student), ctx.view, cs.student,
                                                          None if on_prefix else cs.max_student_tokens)
        if on_prefix:
            return await stream_student(self.dispatch, self.metrics, ctx, req, policy, asked_logprobs)
        try:
            resp, replica = await self.dispatch.send_json(ctx, cs.student, req)
        except APIError as e:
            return student_failed(self.metrics, ctx, cs.student, e)
        if resp.status >= 400:
            return student_failed(self.metrics, ctx, cs.student, resp)
        body = json.loads(resp.body)
        self.dispatch.charge(ctx, cs.student, ctx.dialect.usage(body))
        ctx.models.append(cs.student)
        judged_req, judged = ctx.dialect.judged(ctx.payload, body)
        checks = schema_checks(policy, judged_req, judged)  # empty unless a schema was asked for
        decision = decide(policy, judged_req, judged, await self.schemas.check(checks) if checks else None)
        self.metrics.cascade.labels(ctx.route.name, "escalate" if decision.escalate else "accept",
                                    decision.reason).inc()
        if decision.escalate:
            ctx.escalated = decision.reason
            self.metrics.escalations.labels(ctx.route.name, decision.reason).inc()
            return None
        if not asked_logprobs:
            ctx.dialect.strip_logprobs(body)
        ctx.served_by, ctx.replica = cs.student, replica
        if ctx.store is not None and ctx.dialect.cacheable(body):
            # An accepted student answer is the route's own answer (what the route serves for this
            # request), so it may be cached. (Its cost is added to the same dict below; harmless,
            # a hit replaces `usage` anyway.)
            ctx.store(body, cs.student)
        with_cost(body, ctx.cost_usd)
        self.metrics.requests.labels(ctx.route.name, cs.student, "200").inc()
        return ctx.dialect.whole(body, ctx.view, ctx.headers())
