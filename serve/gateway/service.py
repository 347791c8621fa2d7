"""The service layer: one way in for every request (an HTTP request, a batch line with its owner's
key, a replay), whatever API it speaks.

    admission (route, access, validation, limits)
      -> the dialect's `before` (state the request continues)
      -> the route's stages (serve/gateway/stages: cache, cascade, chain), which dispatch
      -> the dialect's `after` (state the answer leaves)

It knows nothing of HTTP: it takes the caller's key and the parsed body and returns an `Answer`,
which the HTTP edge (serve/gateway/app.py) or the batch worker turns into what its caller needs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from serve.cache.store import HeadCache
from serve.config import ApiKey, Config
from serve.gateway.admission import ANONYMOUS, Admission
from serve.gateway.answer import Answer
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends
from serve.gateway.background import BackgroundQueue, BackgroundRunner
from serve.gateway.catalog import Catalog
from serve.gateway.context import Background, RequestContext
from serve.gateway.dialects.base import Dialect
from serve.gateway.dialects.table import endpoint_table
from serve.gateway.dispatch import Dispatcher
from serve.gateway.errors import APIError
from serve.gateway.metrics import Metrics
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.readiness import Readiness
from serve.gateway.response_store import ResponseStore
from serve.gateway.stages.runner import RouteRunner
from serve.gateway.upstream import Upstream
from serve.policies.affinity import prefix_key
from serve.students.registry import LifecycleStore


class Gateway:
    """State shared by the handlers; injected, never global."""

    def __init__(self, config: Config, backends: Backends, upstream: Upstream,
                 cache: HeadCache | None = None, metrics: Metrics | None = None,
                 keys: KeyStore | None = None, limiter: RateLimiter | None = None,
                 lifecycle: LifecycleStore | None = None) -> None:
        self.config = config
        self.keys = keys or KeyStore(config.auth)
        self.lifecycle = lifecycle  # the student lifecycle store (Redis), when configured
        self.backends = backends
        self.upstream = upstream
        self.metrics = metrics or Metrics()
        self.cache = cache
        self.created = int(time.time())
        # Which gateway answered (x-llmserve-gateway): the pod (hostname) and process. Several
        # gateways sit behind one Service; this is how an operator, or a test, tells them apart.
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.catalog = Catalog(config)
        self.readiness = Readiness(config.models)  # what /health answers; latches once complete
        self.admission = Admission(config, self.catalog, limiter or RateLimiter(None), self.metrics)
        self.dispatch = Dispatcher(config, self.catalog, backends, upstream, self.metrics)
        self.background = Background()  # work started off the request path, held until done
        self.runner = RouteRunner(self.dispatch, self.metrics, cache, self.background)
        gwc = config.gateway
        self.response_store = ResponseStore(
            config.cache.redis_url, gwc.responses_ttl_s, max_bytes=gwc.responses_max_bytes,
            max_turns=gwc.responses_max_turns, max_local=gwc.responses_max_local,
            ttl_by_key={k.name: k.responses_ttl_s for k in self.keys.all() if k.responses_ttl_s})
        self.queue = BackgroundQueue(self.response_store)
        self.endpoints: dict[str, Dialect] = endpoint_table(self.response_store, self.queue)

    async def handle(self, key: ApiKey | None, path: str, payload: dict[str, Any],
                     raw: bytes | None = None, prepaid: bool = False) -> Answer:
        """Admit a request with the caller's key, then run its route. Every entry calls this: an
        HTTP request, a batch line or a background response (with its owner's key), a replay.
        Errors come back as answers."""
        dialect = self.endpoints.get(path)
        try:
            if dialect is None:
                raise APIError(404, f"Unknown route POST {path}.", code="unknown_route")
            ticket = await self.admission.admit(key, dialect, payload, prepaid)
            sent, conversation = await dialect.before(payload, ticket.key_name)
            # The reservation counts the prompt as it will be sent (a Responses conversation whole).
            size = len(raw) if raw is not None and sent is payload else len(json.dumps(sent))
            lease = await self.admission.reserve(key, ticket, size, prepaid)
        except APIError as e:
            self.metrics.requests.labels("-", "-", str(e.status)).inc()
            return Answer.error(e)
        try:
            later = await dialect.deferred(payload, ticket.key_name)
        except APIError as e:
            await lease.end(0)  # nothing was queued
            return Answer.error(e, ticket.headers)
        if later is not None:
            # A background response keeps its reservation (its runner is not charged again) and
            # frees the slot: the submit is done.
            await lease.end(None)
            later.headers.update(ticket.headers)
            return later
        ctx = RequestContext(route=ticket.route, dialect=dialect, payload=sent, view=ticket.view,
                             key=ticket.key_name, raw=raw if sent is payload and not ticket.rewritten else None,
                             affinity=prefix_key(sent, self.backends.affinity_chars), conversation=conversation,
                             admin=key is not None and key.admin)
        try:
            answer = await self.runner.run(ctx)
            answer = await dialect.after(conversation, ticket.key_name, answer)
        except BaseException:
            # Cancelled (the client of a non-streamed request left) or failed: the engine computed
            # the prompt and is then aborted, so its prompt is billed; what it generated meanwhile
            # is unknown, so the key's reservation stays spent.
            if ctx.sending is not None:
                self.dispatch.charge(ctx, ctx.sending, {"prompt_tokens": size // 4, "completion_tokens": 0})
            self.background.spawn(lease.end(None))
            raise
        answer.headers.update(ticket.headers)
        if answer.chunks is None:
            await lease.end(ctx.tokens)
        else:
            answer.chunks = lease.guard(answer.chunks, lambda: ctx.tokens, self.background.spawn)
        return answer

    async def call_as(self, owner: str, path: str, body: dict[str, Any],
                      prepaid: bool = False) -> tuple[int, dict[str, Any]]:
        """A request run as its owner's, without HTTP (a batch line, a background response): the
        same admission (model access, validation, limits), routes, cache, cascade, fallback and
        cost, billed to the owner. A key removed since stops its work."""
        key = None
        if self.keys.enabled:
            key = self.keys.by_name(owner)
            if key is None:
                e = APIError(401, f"The API key `{owner}` that owns this request no longer exists.",
                             code="invalid_api_key")
                return e.status, e.body()
        answer = await self.handle(key, path, {**body, "stream": False}, prepaid=prepaid)
        assert answer.body is not None, "a request run without HTTP is never streamed"
        if answer.status == 429 and "Retry-After" in answer.headers:
            # A batch runner waits this long for the owner's budget instead of polling.
            return 429, {**answer.body, "retry_after_s": float(answer.headers["Retry-After"])}
        return answer.status, answer.body

    def background_runner(self, concurrency: int) -> BackgroundRunner:
        return BackgroundRunner(self.queue, self.call_as, concurrency=concurrency)

    async def cancel_response(self, key: ApiKey | None, rid: str) -> dict[str, Any]:
        return await self.queue.cancel(rid, self.owner(key))

    @staticmethod
    def owner(key: ApiKey | None) -> str:
        return key.name if key else ANONYMOUS

    async def get_response(self, key: ApiKey | None, rid: str) -> dict[str, Any]:
        record = await self.response_store.get(rid, self.owner(key))
        body: dict[str, Any] = record["response"]
        return body

    async def delete_response(self, key: ApiKey | None, rid: str) -> None:
        await self.response_store.delete(rid, self.owner(key))

    def health(self) -> tuple[str, dict[str, int]]:
        """What /health answers (its status, and each model's ready replicas), and what a gateway
        replica waits on before Serve calls it RUNNING (serve/launch/gateway_replica.py)."""
        ready = {m.name: self.backends.ready_count(m.name) for m in self.config.models}
        return self.readiness(ready), ready

    def model_entry(self, name: str) -> dict[str, Any] | None:
        """One `/v1/models` object: a route, a model, or an adapter (with its base as parent).
        `max_model_len` is the context of the model that answers (clients size prompts from it)."""
        entry: dict[str, Any] = {"id": name, "object": "model", "created": self.created, "owned_by": "llmserve"}
        route = self.catalog.route(name) if self.catalog.is_configured_route(name) else None
        first = (route.cascade.student if route.cascade else route.target) if route is not None else name
        spec = self.catalog.spec(first or "")
        if spec is None:
            return None
        if spec.engine.max_model_len is not None:
            entry["max_model_len"] = spec.engine.max_model_len
        if route is not None:
            return {**entry, "llmserve_route": True}
        return {**entry, "parent": spec.name} if name != spec.name else entry

    def models(self, key: ApiKey | None) -> list[dict[str, Any]]:
        names = [*(r.name for r in self.config.routes), *self.catalog.model_names()]
        return [e for n in names if KeyStore.allows(key, n) and (e := self.model_entry(n)) is not None]
