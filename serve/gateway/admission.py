"""One admission step for every way a request enters: an HTTP request, a batch line, a replay.

Given the caller's key and the parsed request it decides, in this order: which route `model`
names, whether the key may use it (404 as for an unknown model, so a key learns nothing about
models it may not use), whether the request is well-formed (400 naming `param`), and whether the
key's request and token budgets allow it now (429 with Retry-After). A batch line passes the same
checks with its owner's key, so a batch can neither reach another model nor skip a limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve.config import ApiKey, Config, RouteSpec
from serve.gateway.auth import KeyStore
from serve.gateway.catalog import Catalog
from serve.gateway.dialects.base import Dialect, View
from serve.gateway.errors import APIError, bad_request, model_not_found
from serve.gateway.metrics import Metrics
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.validate import default_model
from serve.policies.ratelimit import estimate_tokens

ANONYMOUS = "anonymous"  # the key name when auth is off


@dataclass(frozen=True)
class Ticket:
    """An admitted request: the route it takes, whom it is billed to, the rate-limit headers."""

    route: RouteSpec
    key_name: str
    view: View
    headers: dict[str, str] = field(default_factory=dict)
    rewritten: bool = False  # admission changed the payload (coerced, default model): forward it, not raw


class Admission:
    def __init__(self, config: Config, catalog: Catalog, limiter: RateLimiter, metrics: Metrics) -> None:
        self.config = config
        self.catalog = catalog
        self.limiter = limiter
        self.metrics = metrics

    def resolve(self, payload: dict[str, Any]) -> RouteSpec:
        model = payload.get("model")
        if model is None:
            raise bad_request("You must provide a model parameter.", param="model")
        if not isinstance(model, str):
            raise bad_request("`model` must be a string.", param="model")
        route = self.catalog.route(model)
        if route is None:
            raise model_not_found(model)
        return route

    def check_task(self, route: RouteSpec, dialect: Dialect) -> None:
        """A generate model has no /v1/embeddings and vice versa (tokenizers: any model)."""
        first = route.cascade.student if route.cascade else route.target
        spec = self.catalog.spec(first) if first else None
        if spec is not None and dialect.task is not None and spec.task != dialect.task:
            raise bad_request(
                f"The model `{route.name}` does not support {dialect.path} (it is a {spec.task} model).",
                param="model", code="model_not_supported",
            )

    async def admit(self, key: ApiKey | None, dialect: Dialect, payload: dict[str, Any], body_bytes: int,
                    prepaid: bool = False) -> Ticket:
        """`prepaid`: the request's budget was charged when it was submitted (a background
        response): checked again for access and shape, not charged twice."""
        # vLLM's type coercions, and its one served model when `model` is left out (gateway.default_model).
        rewritten = dialect.coerce(payload) | default_model(self.config, payload)
        route = self.resolve(payload)
        # Access first: a key learns nothing, not even a model's task, about models it may not use.
        if not KeyStore.allows(key, route.name):
            raise model_not_found(route.name)
        self.check_task(route, dialect)
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("`stream` must be a boolean.", param="stream")
        dialect.validate(payload, self.config.gateway.max_messages)
        view = dialect.view(payload)
        if key is None:
            return Ticket(route, ANONYMOUS, view, rewritten=rewritten)
        if prepaid:
            return Ticket(route, key.name, view, rewritten=rewritten)
        auth = self.config.auth
        rpm = key.requests_per_minute or auth.default_requests_per_minute
        tpm = key.tokens_per_minute or auth.default_tokens_per_minute
        if rpm is None and tpm is None:
            return Ticket(route, key.name, view, rewritten=rewritten)
        tokens = estimate_tokens(body_bytes, view.max_output_tokens)
        if tpm is not None and tokens > tpm:
            # No wait would ever admit it (a bucket holds at most a minute's tokens): say so, rather
            # than a 429 that a client (or a batch line) would retry forever.
            raise APIError(400, f"This request needs about {tokens} tokens, more than key `{key.name}` may "
                                f"use in a minute ({tpm}). Lower {view.max_tokens_field} or the prompt.",
                           param=view.max_tokens_field, code="request_exceeds_token_limit")
        verdict = await self.limiter.check(key.name, rpm, tpm, tokens)
        if not verdict.allowed:
            self.metrics.rate_limited.labels(key.name, verdict.limit_name).inc()
            raise APIError(429, f"Rate limit reached for {verdict.limit_name} per minute on key `{key.name}`. "
                                f"Retry after {verdict.headers['Retry-After']}s.",
                           code="rate_limit_exceeded", headers=verdict.headers)
        return Ticket(route, key.name, view, verdict.headers, rewritten)
