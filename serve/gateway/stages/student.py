"""What the cascade's two ways of asking the student share: its policy, and what a failed
student means for the request."""

from __future__ import annotations

from serve.config import CascadeSpec
from serve.gateway.answer import Answer
from serve.gateway.context import RequestContext
from serve.gateway.errors import APIError, normalize
from serve.gateway.metrics import Metrics
from serve.gateway.upstream import UpstreamResponse
from serve.policies.cascade import DEFAULT_REFUSALS, CascadePolicy
from serve.policies.fallback import Failure, classify_status


def failure_of(e: APIError) -> Failure:
    return {"model_not_ready": Failure.UNAVAILABLE, "engine_unavailable": Failure.UNAVAILABLE,
            "overloaded": Failure.OVERLOADED, "timeout": Failure.TIMEOUT}.get(
        e.code or "", classify_status(e.status) or Failure.ENGINE_ERROR)


def policy_of(cs: CascadeSpec) -> CascadePolicy:
    return CascadePolicy(min_mean_logprob=cs.min_mean_logprob, escalate_on_length=cs.escalate_on_length,
                         escalate_on_schema_failure=cs.escalate_on_schema_failure,
                         refusal_patterns=tuple(cs.refusal_patterns or DEFAULT_REFUSALS))


def student_failed(metrics: Metrics, ctx: RequestContext, student: str,
                   err: APIError | UpstreamResponse) -> Answer | None:
    """The student could not answer: escalate (None), unless the request itself is wrong (the
    teacher would say so too), which is the answer."""
    if isinstance(err, APIError):
        ctx.escalated = f"student_{failure_of(err).value}"
    else:
        failure = classify_status(err.status)
        if failure == Failure.CLIENT_ERROR:
            metrics.requests.labels(ctx.route.name, student, str(err.status)).inc()
            return Answer.engine_error(err.status, normalize(err.status, err.body), ctx.headers())
        ctx.escalated = f"student_{failure.value if failure else 'error'}"
    metrics.cascade.labels(ctx.route.name, "escalate", ctx.escalated).inc()
    metrics.escalations.labels(ctx.route.name, ctx.escalated).inc()
    return None
