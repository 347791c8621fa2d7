"""The gateway's HTTP surface: OpenAI's routes, forwarded by `model` to an engine replica.

The request path is deliberately thin: read the body, parse it once, decide, forward the original
bytes to one replica over a pooled connection, and pass the engine's answer (or its SSE stream)
back unchanged. Everything the gateway adds (routing, errors, headers) happens before the first
byte goes out, so streaming pays no per-chunk cost here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.batch.store import BatchStore
from serve.cache.store import HeadCache
from serve.config import ApiKey, Config, RouteSpec
from serve.gateway import responses
from serve.gateway.admission import ANONYMOUS, Admission
from serve.gateway.answer import Answer, to_response
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends, Endpoint
from serve.gateway.batch_api import BatchAPI
from serve.gateway.catalog import Catalog
from serve.gateway.errors import APIError, bad_request, model_not_found, normalize
from serve.gateway.lifecycle import load_adapter
from serve.gateway.limits import BodyLimit
from serve.gateway.metrics import Metrics
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.responses import RESPONSES
from serve.gateway.routes import Outcome, RouteRunner
from serve.gateway.upstream import EngineTimeout, EngineUnavailable, Upstream, UpstreamResponse
from serve.gateway.validate import TOKENIZER_PATHS
from serve.policies.affinity import prefix_key
from serve.policies.cost import cost_usd, usage_tokens

logger = logging.getLogger("llmserve.gateway")

def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON (and every engine) does not.
    raise ValueError(f"{name} is not valid JSON")


class Gateway:
    """State shared by the handlers; injected, never global."""

    def __init__(self, config: Config, backends: Backends, upstream: Upstream,
                 cache: HeadCache | None = None, metrics: Metrics | None = None,
                 keys: KeyStore | None = None, limiter: RateLimiter | None = None) -> None:
        self.config = config
        self.keys = keys or KeyStore(config.auth)
        self.lifecycle: Any = None  # the student lifecycle store (Redis), when configured
        self.backends = backends
        self.upstream = upstream
        self.metrics = metrics or Metrics()
        self.cache = cache
        self.created = int(time.time())
        # Which gateway answered (x-llmserve-gateway): the pod (hostname) and process. Several
        # gateways sit behind one Service; this is how an operator, or a test, tells them apart.
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.catalog = Catalog(config)
        self.admission = Admission(config, self.catalog, limiter or RateLimiter(None), self.metrics)
        self.runner = RouteRunner(self.send, self.bill, self.metrics, cache)
        self.response_store = responses.ResponseStore(config.cache.redis_url, config.gateway.responses_ttl_s)

    # ---- request parsing -------------------------------------------------------------------
    async def read_json(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        raw = await request.body()  # BodyLimit (serve/gateway/limits.py) cuts it off at the limit
        try:
            payload = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
        except RecursionError as e:
            raise bad_request("The JSON body of your request is nested too deeply.") from e
        if not isinstance(payload, dict):
            raise bad_request("The request body must be a JSON object.")
        return raw, payload

    # ---- I/O the policies ask for --------------------------------------------------------------
    async def send(self, model: str, path: str, body: bytes, stream: bool,
                   payload: dict[str, Any]) -> tuple[UpstreamResponse, str]:
        """Send to one replica of `model`; on a refused connection try another, since nothing was
        sent yet. Requests sharing a prompt prefix prefer one replica (its prefix cache is warm)."""
        spec = self.catalog.spec(model)
        assert spec is not None, model  # routes only name known models (config validation)
        tried: set[str] = set()
        timeout_s = self.config.gateway.request_timeout_s
        affinity = prefix_key(payload)
        while True:
            ep = self.backends.pick(spec.name, exclude=tried, affinity=affinity,
                                    max_in_flight=spec.deployment.max_ongoing_requests)
            if ep is None:
                if tried:
                    raise APIError(503, f"No replica of model `{spec.name}` could be reached.",
                                   code="engine_unavailable", headers={"Retry-After": "1"})
                if self.backends.ready_count(spec.name):
                    raise APIError(503, f"Model `{spec.name}` is at capacity; retry shortly.",
                                   code="overloaded", headers={"Retry-After": "1"})
                raise APIError(503, f"Model `{spec.name}` has no ready replica yet; try again shortly.",
                               code="model_not_ready", headers={"Retry-After": "5"})
            tried.add(ep.replica_id)
            ep.in_flight += 1
            try:
                resp = await self.upstream.post(ep.url, path, body, stream=stream, timeout_s=timeout_s)
            except EngineUnavailable:
                ep.in_flight -= 1
                self.backends.mark_down(ep)
                logger.warning("engine %s unreachable; trying another replica", ep.replica_id)
                continue
            except EngineTimeout as e:
                ep.in_flight -= 1
                raise APIError(504, f"Model `{spec.name}` did not answer within {timeout_s:.0f}s.",
                               code="timeout") from e
            except BaseException:
                ep.in_flight -= 1
                raise
            if resp.status == 401:
                # The engine refused *us* (engine secret missing or stale): never the client's key.
                ep.in_flight -= 1
                await resp.aclose()
                logger.error("engine %s refused the gateway's engine secret", ep.replica_id)
                raise APIError(502, f"Model `{spec.name}` refused the gateway (engine secret mismatch).",
                               code="engine_auth_failed")
            if resp.chunks is None:
                ep.in_flight -= 1
            else:
                resp.chunks = self._count_until_done(ep, resp.chunks)
            return resp, ep.replica_id

    @staticmethod
    async def _count_until_done(ep: Endpoint, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except (EngineUnavailable, EngineTimeout, OSError, asyncio.TimeoutError) as e:
            # Bytes are already out: the only honest thing left is an error event.
            err = json.dumps({"error": {"message": f"engine stream broke: {e}", "type": "server_error",
                                        "param": None, "code": "engine_error"}})
            yield f"data: {err}\n\n".encode()
        finally:
            ep.in_flight -= 1
            if hasattr(chunks, "aclose"):
                await chunks.aclose()

    def bill(self, out: Outcome, model: str, usage: Any) -> float:
        prompt, completion = usage_tokens(usage)
        self.metrics.tokens.labels(model, "prompt").inc(prompt)
        self.metrics.tokens.labels(model, "completion").inc(completion)
        cost = cost_usd(prompt, completion, self.catalog.price(model))
        self.metrics.cost.labels(out.route, model, out.key).inc(cost)
        return cost

    # ---- the one way in ------------------------------------------------------------------------
    async def handle(self, key: ApiKey | None, path: str, payload: dict[str, Any],
                     raw: bytes | None = None) -> Answer:
        """Admit a request with the caller's key, then run its route. Every entry calls this: an
        HTTP request, a batch line (with its owner's key), a replay. Errors come back as answers."""
        try:
            body_bytes = len(raw) if raw is not None else len(json.dumps(payload))
            ticket = await self.admission.admit(key, path, payload, body_bytes)
        except APIError as e:
            self.metrics.requests.labels("-", "-", str(e.status)).inc()
            return Answer.error(e)
        route, key_name = ticket.route, ticket.key_name
        if path == RESPONSES:
            answer = await responses.run(self.response_store, key_name, payload,
                                         lambda sent: self.runner.handle(route, path, sent, key_name, None))
        elif path in TOKENIZER_PATHS:
            answer = await self._tokenizer(route, path, payload, raw)
        else:
            answer = await self.runner.handle(route, path, payload, key_name, raw)
        answer.headers.update(ticket.headers)
        return answer

    async def _tokenizer(self, route: RouteSpec, path: str, payload: dict[str, Any], raw: bytes | None) -> Answer:
        """/tokenize and /detokenize, answered by the engine of the model that would answer the
        route first (a tokenizer belongs to a model; no cache, cascade, fallback or cost)."""
        model = route.cascade.student if route.cascade else str(route.target)
        body = raw if raw is not None and payload.get("model") == model else json.dumps({**payload, "model": model})
        try:
            resp, replica = await self.send(model, path, body.encode() if isinstance(body, str) else body, False,
                                            payload)
        except APIError as e:
            return Answer.error(e)
        headers = {"x-llmserve-route": route.name, "x-llmserve-served-by": model, "x-llmserve-replica": replica}
        if resp.status != 200:
            return Answer.engine_error(resp.status, normalize(resp.status, resp.body), headers)
        return Answer(200, json.loads(resp.body), headers=headers)

    # ---- HTTP edge -----------------------------------------------------------------------------
    async def proxy(self, request: Request) -> Response:
        started = time.perf_counter()
        key = self.keys.authenticate(request.headers.get("authorization"))
        ctype = request.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"Send the request body as JSON (Content-Type: application/json), not {ctype!r}.",
                           code="unsupported_media_type")
        raw, payload = await self.read_json(request)
        try:
            answer = await until_disconnect(request, self.handle(key, request.url.path, payload, raw))
        except ClientGone:
            # Cancelling the call closed the engine connection, which makes vLLM abort the request.
            self.metrics.requests.labels("-", "-", "499").inc()
            return Response(status_code=499)
        route_name = answer.headers.get("x-llmserve-route", "-")
        if answer.chunks is not None:
            answer.chunks = self._timed(answer.chunks, route_name, answer.served_by, started)
        else:
            self.metrics.latency.labels(route_name, answer.served_by).observe(time.perf_counter() - started)
        answer.headers["x-llmserve-gateway"] = self.instance
        return to_response(answer)

    async def _timed(self, chunks: AsyncIterable[Any], route: str, model: str, started: float
                     ) -> AsyncIterator[Any]:
        """TTFT, TPOT and end-to-end latency of a stream, measured where the client sees it."""
        first: float | None = None
        n = 0
        try:
            async for chunk in chunks:
                if first is None:
                    first = time.perf_counter()
                    self.metrics.ttft.labels(route, model).observe(first - started)
                n += 1
                yield chunk
        finally:  # also when the client hangs up after the last chunk
            end = time.perf_counter()
            self.metrics.latency.labels(route, model).observe(end - started)
            if first is not None and n > 2:
                # Chunks after the first approximate tokens (vLLM sends one chunk per decode step).
                self.metrics.tpot.labels(route, model).observe((end - first) / (n - 2))

    def _model_entry(self, name: str) -> dict[str, Any] | None:
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

    async def list_models(self, request: Request) -> Response:
        key = self.keys.authenticate(request.headers.get("authorization"))
        names = [*(r.name for r in self.config.routes), *self.catalog.model_names()]
        return JSONResponse({"object": "list", "data": [self._model_entry(n) for n in names
                                                        if KeyStore.allows(key, n)]})

    async def get_model(self, request: Request) -> Response:
        key = self.keys.authenticate(request.headers.get("authorization"))
        name = request.path_params["model"]
        entry = self._model_entry(name) if KeyStore.allows(key, name) else None
        if entry is None:
            raise model_not_found(name)
        return JSONResponse(entry)

    async def get_response(self, request: Request) -> Response:
        key = self.keys.authenticate(request.headers.get("authorization"))
        record = await self.response_store.get(request.path_params["response_id"], key.name if key else ANONYMOUS)
        return JSONResponse(record["response"])

    async def delete_response(self, request: Request) -> Response:
        key = self.keys.authenticate(request.headers.get("authorization"))
        rid = request.path_params["response_id"]
        await self.response_store.delete(rid, key.name if key else ANONYMOUS)
        return JSONResponse({"id": rid, "object": "response", "deleted": True})

    async def load_adapter(self, request: Request) -> Response:
        return await load_adapter(self, request)

    async def metrics_endpoint(self, request: Request) -> Response:
        for m in self.config.models:
            self.metrics.replicas.labels(m.name).set(self.backends.ready_count(m.name))
            self.metrics.in_flight.labels(m.name).set(sum(e.in_flight for e in self.backends.endpoints(m.name)))
        if self.cache is not None:
            self.metrics.cache_redis_up.set(1 if self.cache.redis_up else 0)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def health(self, request: Request) -> Response:
        # The pod's readiness probe: 200 once any model can be served, so one model's outage does
        # not take every gateway out of the Service (and the others' traffic with it); the body
        # says which models have no replica ("degraded").
        ready = {m.name: self.backends.ready_count(m.name) for m in self.config.models}
        status = "ok" if all(ready.values()) else "degraded" if any(ready.values()) else "starting"
        return JSONResponse({"status": status, "replicas": ready}, 503 if status == "starting" else 200)


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[Answer]) -> Answer:
    """Run `work`, cancelling it if the client goes away first. (Streams need no help: Starlette
    stops a StreamingResponse on disconnect, which closes the engine connection in turn.)"""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone


async def _api_error(request: Request, exc: Exception) -> Response:
    """The one place an APIError raised by any handler becomes its HTTP answer."""
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


def _error_handlers() -> dict[Any, Any]:
    async def not_found(request: Request, exc: Exception) -> Response:
        return await _api_error(request, APIError(404, f"Unknown route {request.method} {request.url.path}.",
                                                  code="unknown_route"))

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return await _api_error(request, APIError(405, f"Method {request.method} is not allowed on "
                                                       f"{request.url.path}."))

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return await _api_error(request, APIError(500, "The gateway failed to handle the request; it has "
                                                       "been logged.", code="internal_error"))

    return {APIError: _api_error, 404: not_found, 405: method_not_allowed, 500: server_error}


def create_app(config: Config, backends: Backends, upstream: Upstream, *, cache: HeadCache | None = None,
               metrics: Metrics | None = None, keys: KeyStore | None = None, limiter: RateLimiter | None = None,
               batch_store: BatchStore | None = None, lifespan: Any = None) -> Starlette:
    """The public app (OpenAI API, health). Metrics are served by `create_metrics_app` on a listener
    of their own: they name keys and per-key spend, which the public port must not show."""
    gw = Gateway(config, backends, upstream, cache=cache, metrics=metrics, keys=keys, limiter=limiter)
    return app_for(gw, batch_store=batch_store, lifespan=lifespan)


def app_for(gw: Gateway, *, batch_store: BatchStore | None = None, lifespan: Any = None) -> Starlette:
    routes = [
        Route("/v1/models", gw.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.get_model, methods=["GET"]),
        Route("/v1/chat/completions", gw.proxy, methods=["POST"]),
        Route("/v1/completions", gw.proxy, methods=["POST"]),
        Route("/v1/embeddings", gw.proxy, methods=["POST"]),
        Route("/v1/responses", gw.proxy, methods=["POST"]),
        Route("/v1/responses/{response_id}", gw.get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", gw.delete_response, methods=["DELETE"]),
        Route("/tokenize", gw.proxy, methods=["POST"]),
        Route("/detokenize", gw.proxy, methods=["POST"]),
        Route("/health", gw.health, methods=["GET"]),
        # Ray Serve proxies answer this; KubeRay and load balancers probe it.
        Route("/-/healthz", gw.health, methods=["GET"]),
        Route("/v1/llmserve/adapters", gw.load_adapter, methods=["POST"]),
    ]
    if batch_store is not None:
        routes += BatchAPI(batch_store, lambda r: gw.keys.authenticate(r.headers.get("authorization")),
                           max_upload_bytes=gw.config.batch.max_upload_bytes).routes()
    config = gw.config

    def limit_for(path: str) -> int:
        return config.batch.max_upload_bytes if path == "/v1/files" else config.gateway.max_body_bytes

    app = Starlette(routes=routes, exception_handlers=_error_handlers(), lifespan=lifespan,
                    middleware=[Middleware(BodyLimit, limit_for=limit_for)])
    app.state.gateway = gw
    return app


def create_metrics_app(gw: Gateway) -> Starlette:
    """`/metrics` for Prometheus, on the metrics listener (gateway.metrics_port)."""
    return Starlette(routes=[Route("/metrics", gw.metrics_endpoint, methods=["GET"])],
                     exception_handlers=_error_handlers())
