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
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.batch.store import BatchStore
from serve.cache.store import HeadCache
from serve.config import Config, RouteSpec
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends, Endpoint
from serve.gateway.batch_api import BatchAPI
from serve.gateway.catalog import Catalog
from serve.gateway.errors import APIError, bad_request, model_not_found
from serve.gateway.lifecycle import load_adapter
from serve.gateway.metrics import Metrics
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.routes import Outcome, RouteRunner
from serve.gateway.upstream import EngineTimeout, EngineUnavailable, Upstream, UpstreamResponse
from serve.gateway.validate import validate
from serve.policies.affinity import prefix_key
from serve.policies.cost import cost_usd, usage_tokens
from serve.policies.ratelimit import estimate_tokens

logger = logging.getLogger("llmserve.gateway")

# Which engine task serves which route: a generate model has no /v1/embeddings and vice versa.
ROUTE_TASK = {"/v1/chat/completions": "generate", "/v1/completions": "generate", "/v1/embeddings": "embed"}


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
        self.limiter = limiter or RateLimiter(None)
        self.backends = backends
        self.upstream = upstream
        self.metrics = metrics or Metrics()
        self.cache = cache
        self.created = int(time.time())
        self.catalog = Catalog(config)
        self.runner = RouteRunner(self.send, self.bill, self.metrics, cache)

    # ---- request parsing -------------------------------------------------------------------
    async def read_json(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        limit = self.config.gateway.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
        try:
            payload = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
        except RecursionError as e:
            raise bad_request("The JSON body of your request is nested too deeply.") from e
        if not isinstance(payload, dict):
            raise bad_request("The request body must be a JSON object.")
        return raw, payload

    def resolve(self, payload: dict[str, Any], path: str) -> RouteSpec:
        model = payload.get("model")
        if model is None:
            raise bad_request("You must provide a model parameter.", param="model")
        if not isinstance(model, str):
            raise bad_request("`model` must be a string.", param="model")
        route = self.catalog.route(model)
        if route is None:
            raise model_not_found(model)
        first = route.cascade.student if route.cascade else route.target
        spec = self.catalog.spec(first) if first else None
        if spec is not None and spec.task != ROUTE_TASK[path]:
            raise bad_request(
                f"The model `{model}` does not support {path} (it is a {spec.task} model).",
                param="model", code="model_not_supported",
            )
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("`stream` must be a boolean.", param="stream")
        return route

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

    # ---- handlers ----------------------------------------------------------------------------
    async def admit(self, request: Request) -> tuple[bytes, dict[str, Any], RouteSpec, str, dict[str, str]]:
        """Everything before an engine is involved: key, body, validation, model access, limits."""
        key = self.keys.authenticate(request.headers.get("authorization"))
        raw, payload = await self.read_json(request)
        route = self.resolve(payload, request.url.path)
        if not KeyStore.allows(key, route.name):
            raise model_not_found(route.name)
        validate(request.url.path, payload, self.config.gateway.max_messages)
        if key is None:
            return raw, payload, route, "anonymous", {}
        auth = self.config.auth
        rpm = key.requests_per_minute or auth.default_requests_per_minute
        tpm = key.tokens_per_minute or auth.default_tokens_per_minute
        if rpm is None and tpm is None:
            return raw, payload, route, key.name, {}
        tokens = estimate_tokens(len(raw), payload.get("max_tokens") or payload.get("max_completion_tokens"))
        verdict = await self.limiter.check(key.name, rpm, tpm, tokens)
        if not verdict.allowed:
            self.metrics.rate_limited.labels(key.name, verdict.limit_name).inc()
            raise APIError(429, f"Rate limit reached for {verdict.limit_name} per minute on key `{key.name}`. "
                                f"Retry after {verdict.headers['Retry-After']}s.",
                           code="rate_limit_exceeded", headers=verdict.headers)
        return raw, payload, route, key.name, verdict.headers

    async def proxy(self, request: Request) -> Response:
        started = time.perf_counter()
        route_name = "-"
        try:
            raw, payload, route, key_name, limit_headers = await self.admit(request)
            route_name = route.name
            resp = await until_disconnect(
                request, self.runner.handle(route, request.url.path, payload, key_name, raw))
        except APIError as e:
            self.metrics.requests.labels(route_name, "-", str(e.status)).inc()
            return JSONResponse(e.body(), e.status, headers=e.headers)
        except ClientGone:
            # Cancelling the call closed the engine connection, which makes vLLM abort the request.
            self.metrics.requests.labels(route_name, "-", "499").inc()
            return Response(status_code=499)
        resp.headers.update(limit_headers)
        served = resp.headers.get("x-llmserve-served-by", "-")
        if isinstance(resp, StreamingResponse):
            resp.body_iterator = self._timed(resp.body_iterator, route_name, served, started)
        else:
            self.metrics.latency.labels(route_name, served).observe(time.perf_counter() - started)
        return resp

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
        """One `/v1/models` object: a route, a model, or an adapter (with its base as parent)."""
        entry: dict[str, Any] = {"id": name, "object": "model", "created": self.created, "owned_by": "llmserve"}
        if self.catalog.is_configured_route(name):
            return {**entry, "llmserve_route": True}
        spec = self.catalog.spec(name)
        if spec is None:
            return None
        return {**entry, "parent": spec.name} if name != spec.name else entry

    async def list_models(self, request: Request) -> Response:
        names = [*(r.name for r in self.config.routes), *self.catalog.model_names()]
        return JSONResponse({"object": "list", "data": [self._model_entry(n) for n in names]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        entry = self._model_entry(name)
        if entry is None:
            e = model_not_found(name)
            return JSONResponse(e.body(), e.status)
        return JSONResponse(entry)

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
        ready = {m.name: self.backends.ready_count(m.name) for m in self.config.models}
        ok = all(ready.values())
        return JSONResponse({"status": "ok" if ok else "starting", "replicas": ready}, 200 if ok else 503)


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
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


def create_app(config: Config, backends: Backends, upstream: Upstream, *, cache: HeadCache | None = None,
               metrics: Metrics | None = None, keys: KeyStore | None = None, limiter: RateLimiter | None = None,
               batch_store: BatchStore | None = None, lifespan: Any = None) -> Starlette:
    gw = Gateway(config, backends, upstream, cache=cache, metrics=metrics, keys=keys, limiter=limiter)

    async def not_found(request: Request, exc: Exception) -> Response:
        e = APIError(404, f"Unknown route {request.method} {request.url.path}.", code="unknown_route")
        return JSONResponse(e.body(), 404)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        e = APIError(405, f"Method {request.method} is not allowed on {request.url.path}.")
        return JSONResponse(e.body(), 405)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        e = APIError(500, "The gateway failed to handle the request; it has been logged.",
                     code="internal_error")
        return JSONResponse(e.body(), 500)

    routes = [
        Route("/v1/models", gw.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.get_model, methods=["GET"]),
        Route("/v1/chat/completions", gw.proxy, methods=["POST"]),
        Route("/v1/completions", gw.proxy, methods=["POST"]),
        Route("/v1/embeddings", gw.proxy, methods=["POST"]),
        Route("/health", gw.health, methods=["GET"]),
        # Ray Serve proxies answer this; KubeRay and load balancers probe it.
        Route("/-/healthz", gw.health, methods=["GET"]),
        Route("/v1/llmserve/adapters", gw.load_adapter, methods=["POST"]),
        Route("/metrics", gw.metrics_endpoint, methods=["GET"]),
    ]
    if batch_store is not None:
        routes += BatchAPI(batch_store, lambda r: gw.keys.authenticate(r.headers.get("authorization"))).routes()
    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
