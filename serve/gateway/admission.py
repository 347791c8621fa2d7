"""One admission step for every way a request enters: an HTTP request, a batch line, a replay.

Given the caller's key and the parsed request it decides, in this order: which route `model`
names, whether the key may use it (404 as for an unknown model, so a key learns nothing about
models it may not use), whether the request is well-formed (400 naming `param`), and whether the
key's request and token budgets allow it now (429 with Retry-After). A batch line passes the same
checks with its owner's key, so a batch can neither reach another model nor skip a limit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from serve.config import ApiKey, Config, RouteSpec
from serve.gateway.auth import KeyStore
from serve.gateway.catalog import Catalog
from serve.gateway.dialects.base import Dialect, View
from serve.gateway.errors import APIError, bad_request, model_not_found
from serve.gateway.lease import Lease
from serve.gateway.metrics import Metrics
from serve.gateway.ratelimit import LimitResult, RateLimiter
from serve.gateway.validate import default_model
from serve.policies.cache_key import apply_cache_salt
from serve.policies.ratelimit import reserve_tokens
from serve.policies.tier_prompt import revealing

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

    def check_engine_support(self, route: RouteSpec, payload: dict[str, Any]) -> None:
        """What the route's engines cannot do safely is refused here, not crashed into: vLLM's CPU
        engine core dies on `prompt_logprobs` once prompts are batched (an einsum broadcast error
        in its prompt-logprobs path, seen with two prompts in one request), taking every tenant's
        requests on that replica with it."""
        if payload.get("prompt_logprobs") is None:
            return
        names = [route.target, *(([route.cascade.student, route.cascade.teacher]) if route.cascade else []),
                 *route.fallback]
        cpu = [n for n in names if n and (spec := self.catalog.spec(n)) is not None and spec.accelerator == "cpu"]
        if cpu:
            raise bad_request(f"`prompt_logprobs` is not served by CPU engines ({', '.join(cpu)}): vLLM's CPU "
                              f"engine fails on it.", param="prompt_logprobs", code="unsupported_on_cpu")

    async def admit(self, key: ApiKey | None, dialect: Dialect, payload: dict[str, Any],
                    prepaid: bool = False) -> Ticket:
        """Route, access, shape and the key's request rate. Its tokens and concurrency are taken
        by `reserve` once the request is what will be sent. `prepaid`: the request's budget was
        charged when it was submitted (a background response): checked again for access and
        shape, not charged twice."""
        # vLLM's type coercions, and its one served model when `model` is left out (gateway.default_model).
        rewritten = dialect.coerce(payload) | default_model(self.config, payload)
        # The key's own prefix-cache salt on what vLLM generates for (serve/policies/cache_key.py).
        rewritten |= dialect.task == "generate" and apply_cache_salt(payload, key.cache_salt if key else None)
        route = self.resolve(payload)
        # Access first: a key learns nothing, not even a model's task, about models it may not use.
        if not KeyStore.allows(key, route.name):
            raise model_not_found(route.name)
        self.check_task(route, dialect)
        self.check_engine_support(route, payload)
        if (field := revealing(route, payload)) is not None:
            raise bad_request(f"`{field}` is not served on route `{route.name}`: its answer would show the prompt "
                              "the route sends with the request.", param=field)
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("`stream` must be a boolean.", param="stream")
        dialect.validate(payload, self.config.gateway.max_messages)
        view = dialect.view(payload)
        if key is None:
            return Ticket(route, ANONYMOUS, view, rewritten=rewritten)
        if prepaid:
            return Ticket(route, key.name, view, rewritten=rewritten)
        rpm = key.requests_per_minute or self.config.auth.default_requests_per_minute
        if rpm is None:
            return Ticket(route, key.name, view, rewritten=rewritten)
        verdict = await self.limiter.check(key.name, rpm, None, 0)
        self._refused(key, verdict)
        return Ticket(route, key.name, view, verdict.headers, rewritten)

    def _refused(self, key: ApiKey, verdict: LimitResult) -> None:
        if not verdict.allowed:
            self.metrics.rate_limited.labels(key.name, verdict.limit_name).inc()
            raise APIError(429, f"Rate limit reached for {verdict.limit_name} per minute on key `{key.name}`. "
                                f"Retry after {verdict.headers['Retry-After']}s.",
                           code="rate_limit_exceeded", headers=verdict.headers)

    def reservation(self, ticket: Ticket, prompt_bytes: int) -> int:
        """The most tokens the request may spend (serve/policies/ratelimit.py `reserve_tokens`):
        the prompt as sent (a Responses conversation expanded), every choice, the rest of the
        context when no maximum is given, and a cascade's student besides."""
        route, view = ticket.route, ticket.view
        first = route.cascade.student if route.cascade else route.target
        spec = self.catalog.spec(first) if first else None
        context = (spec.engine.max_model_len if spec is not None else None) or self.config.auth.assumed_context_tokens
        prompt = prompt_bytes // 4  # about 4 bytes a token
        student: int | None = None
        cs = route.cascade
        if cs is not None and view.choices:
            out = view.max_output_tokens or max(1, context - prompt)
            student = cs.decide_after_tokens if cs.decide_after_tokens is not None else min(out, cs.max_student_tokens)
        return reserve_tokens(prompt, view.choices, view.max_output_tokens, context, student)

    async def reserve(self, key: ApiKey | None, ticket: Ticket, prompt_bytes: int, prepaid: bool = False) -> Lease:
        """Take the request's token reservation and a concurrency slot of its key (400 when it
        could never fit a minute's budget, 429 when it does not fit now)."""
        if key is None or prepaid:
            return Lease()
        auth = self.config.auth
        tpm = key.tokens_per_minute or auth.default_tokens_per_minute
        limit = key.max_concurrent_requests or auth.default_max_concurrent_requests
        lease = Lease(self.limiter, key.name, tpm, max_stream_s=key.max_stream_s or auth.default_max_stream_s)
        if tpm is not None:
            tokens = self.reservation(ticket, prompt_bytes)
            if tokens > tpm:
                # No wait would ever admit it (a bucket holds at most a minute's tokens): say so,
                # rather than a 429 that a client (or a batch line) would retry forever.
                field = ticket.view.max_tokens_field
                raise APIError(400, f"This request may use up to {tokens} tokens (its prompt, every choice and "
                                    f"{field} or the rest of the context), more than key `{key.name}` may use in a "
                                    f"minute ({tpm}). Lower {field}, n or the prompt.",
                               param=field, code="request_exceeds_token_limit")
            verdict = await self.limiter.check(key.name, None, tpm, tokens)
            ticket.headers.update(verdict.headers)
            self._refused(key, verdict)
            lease.reserved = tokens
        if limit is not None:
            slot = uuid.uuid4().hex
            hold_s = (lease.max_stream_s or 0) + self.config.gateway.request_timeout_s * 4
            if not await self.limiter.acquire(key.name, limit, slot, hold_s):
                await lease.end(0)  # nothing ran: the reservation goes back
                self.metrics.rate_limited.labels(key.name, "concurrency").inc()
                raise APIError(429, f"Key `{key.name}` already has {limit} requests in flight; retry when one "
                                    f"ends.", code="too_many_concurrent_requests", headers={"Retry-After": "1"})
            lease.slot = slot
        return lease
