"""The HTTP edge: OpenAI's routes mounted on the service layer (serve/gateway/service.py).

The edge parses (JSON once, the body capped by `BodyLimit`), authenticates (the API key), and maps
what comes back to HTTP: an `Answer` in `to_response`, an `APIError` in one exception handler. It
decides nothing about a request; the service does. A disconnecting client cancels the work; stream
timing (TTFT, TPOT) is measured here, where the client sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, Awaitable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.batch.store import BatchStore
from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.answer import Answer
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends
from serve.gateway.batch_api import BatchAPI
from serve.gateway.errors import APIError, model_not_found
from serve.gateway.lifecycle import load_adapter
from serve.gateway.limits import BodyLimit
from serve.gateway.metrics import Metrics
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.service import Gateway
from serve.gateway.upstream import Upstream
from serve.gateway.validate import json_object
from serve.gateway.version import version

logger = logging.getLogger("llmserve.gateway")


async def read_json(request: Request) -> tuple[bytes, dict[str, Any]]:
    raw = await request.body()  # BodyLimit (serve/gateway/limits.py) cuts it off at the limit
    return raw, json_object(raw)


def to_response(answer: Answer, timing: StreamTiming | None = None) -> Response | EventStream:
    """The one place an answer becomes HTTP."""
    if answer.chunks is not None:
        return EventStream(answer.chunks, answer.status, answer.headers, timing)
    return JSONResponse(answer.body, answer.status, headers=answer.headers)


class StreamTiming:
    """TTFT, TPOT and end-to-end latency of a stream, measured where the client sees it."""

    def __init__(self, metrics: Metrics, route: str, model: str, started: float) -> None:
        self.metrics, self.route, self.model, self.started = metrics, route, model, started

    def first(self, now: float) -> None:
        self.metrics.ttft.labels(self.route, self.model).observe(now - self.started)

    def end(self, now: float, first: float | None, n: int) -> None:
        self.metrics.latency.labels(self.route, self.model).observe(now - self.started)
        if first is not None and n > 2:
            # Chunks after the first approximate tokens (vLLM sends one chunk per decode step).
            self.metrics.tpot.labels(self.route, self.model).observe((now - first) / (n - 2))


class EventStream:
    """A streamed answer on the wire (text/event-stream). Starlette's StreamingResponse does the same
    with an anyio task group a stream (two tasks and a cancel scope, whose cancel formats a task's
    repr) and a generator around the chunks for their timing: together a tenth of the gateway's CPU
    a streamed request (issue 27). Here one watcher task waits for the client to leave and cancels
    the relay, which closes the chunks (and with them the engine connection, so vLLM aborts the
    request), as Starlette's task group does; the timing is taken in the relay's own loop."""

    def __init__(self, chunks: AsyncIterable[bytes], status: int, headers: dict[str, str],
                 timing: StreamTiming | None = None) -> None:
        self.chunks = chunks
        self.status_code = status
        self.headers = headers
        self.timing = timing
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
                              if k.lower() != "content-type")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        timing, first, n = self.timing, None, 0
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                if first is None and timing is not None:
                    first = time.perf_counter()
                    timing.first(first)
                n += 1
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: a normal end of the stream, not a cancelled server
        finally:  # cancelled before it runs again: a server answers every receive after the
            watcher.cancel()  # last byte with a disconnect, which must not cancel this task then
            if timing is not None:  # also when the client hangs up after the last chunk
                timing.end(time.perf_counter(), first, n)
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[Answer]) -> Answer:
    """Run `work`, cancelling it if the client goes away first. (Streams need no help: EventStream
    stops on disconnect, which closes the engine connection in turn.)"""
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


class Edge:
    """The HTTP handlers of one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def key(self, request: Request) -> Any:
        return self.gw.keys.authenticate(request.headers.get("authorization"))

    async def post(self, request: Request) -> Response | EventStream:
        """Every endpoint of the service's endpoint table."""
        started = time.perf_counter()
        key = self.key(request)
        ctype = request.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"Send the request body as JSON (Content-Type: application/json), not {ctype!r}.",
                           code="unsupported_media_type")
        raw, payload = await read_json(request)
        metrics = self.gw.metrics
        try:
            answer = await until_disconnect(request, self.gw.handle(key, request.url.path, payload, raw))
        except ClientGone:
            # Cancelling the call closed the engine connection, which makes vLLM abort the request.
            metrics.requests.labels("-", "-", "499").inc()
            return Response(status_code=499)
        route_name = answer.headers.get("x-llmserve-route", "-")
        answer.headers["x-llmserve-gateway"] = self.gw.instance
        if answer.chunks is not None:
            return to_response(answer, StreamTiming(metrics, route_name, answer.served_by, started))
        metrics.latency.labels(route_name, answer.served_by).observe(time.perf_counter() - started)
        return to_response(answer)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.gw.models(self.key(request))})

    async def get_model(self, request: Request) -> Response:
        key = self.key(request)
        name = request.path_params["model"]
        entry = self.gw.model_entry(name) if KeyStore.allows(key, name) else None
        if entry is None:
            raise model_not_found(name)
        return JSONResponse(entry)

    async def get_response(self, request: Request) -> Response:
        return JSONResponse(await self.gw.get_response(self.key(request), request.path_params["response_id"]))

    async def delete_response(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        await self.gw.delete_response(self.key(request), rid)
        return JSONResponse({"id": rid, "object": "response", "deleted": True})

    async def cancel_response(self, request: Request) -> Response:
        return JSONResponse(await self.gw.cancel_response(self.key(request), request.path_params["response_id"]))

    async def load_adapter(self, request: Request) -> Response:
        return await load_adapter(self.gw, request)

    async def metrics(self, request: Request) -> Response:
        gw = self.gw
        for m in gw.config.models:
            gw.metrics.replicas.labels(m.name).set(gw.backends.ready_count(m.name))
            gw.metrics.in_flight.labels(m.name).set(sum(e.in_flight for e in gw.backends.endpoints(m.name)))
        if gw.cache is not None:
            gw.metrics.cache_redis_up.set(1 if gw.cache.redis_up else 0)
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    async def health(self, request: Request) -> Response:
        """The pod's readiness probe: 200 once every model kept at one replica or more has one
        (serve/gateway/readiness.py), then while any model can be served, so one model's later
        outage does not take every gateway out of the Service (and the others' traffic with it).
        Which models have no replica is shown to admin keys only (a caller without a key must not
        learn the model names); the metrics listener's /health always shows it, to the operator."""
        status, ready = self.gw.health()
        body: dict[str, Any] = {"status": status}
        if not self.gw.keys.enabled or getattr(self.key_or_none(request), "admin", False):
            body["replicas"] = ready
        return JSONResponse(body, 503 if status == "starting" else 200)

    async def health_detail(self, request: Request) -> Response:
        status, ready = self.gw.health()
        return JSONResponse({"status": status, "replicas": ready}, 503 if status == "starting" else 200)

    def key_or_none(self, request: Request) -> Any:
        """The caller's key if it sent a valid one; None otherwise (a probe sends none)."""
        try:
            return self.key(request)
        except APIError:
            return None


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
    edge = Edge(gw)
    routes = [
        Route("/v1/models", edge.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", edge.get_model, methods=["GET"]),
        # One POST route per dialect of the endpoint table (serve/gateway/dialects/table.py).
        *(Route(path, edge.post, methods=["POST"]) for path in gw.endpoints),
        Route("/v1/responses/{response_id}", edge.get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", edge.delete_response, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/cancel", edge.cancel_response, methods=["POST"]),
        Route("/health", edge.health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),  # vLLM's; serve/gateway/version.py
        # Ray Serve proxies answer this; KubeRay and load balancers probe it.
        Route("/-/healthz", edge.health, methods=["GET"]),
        Route("/v1/llmserve/adapters", edge.load_adapter, methods=["POST"]),
    ]
    if batch_store is not None:
        # Files and batches spend the key's requests per minute, from the bucket admission uses.
        routes += BatchAPI(batch_store, edge.key, batch=gw.config.batch, auth=gw.config.auth,
                           limiter=gw.admission.limiter,
                           on_limited=lambda name: gw.metrics.rate_limited.labels(name, "requests").inc()).routes()
    config = gw.config

    def limit_for(path: str) -> int:
        return config.batch.max_upload_bytes if path == "/v1/files" else config.gateway.max_body_bytes

    app = Starlette(routes=routes, exception_handlers=_error_handlers(), lifespan=lifespan,
                    middleware=[Middleware(BodyLimit, limit_for=limit_for)])
    app.state.gateway = gw
    return app


def create_metrics_app(gw: Gateway) -> Starlette:
    """`/metrics` for Prometheus, and `/health` with every model's replica count, on the metrics
    listener (gateway.metrics_port), which only the operator's network reaches."""
    edge = Edge(gw)
    return Starlette(routes=[Route("/metrics", edge.metrics, methods=["GET"]),
                             Route("/health", edge.health_detail, methods=["GET"])],
                     exception_handlers=_error_handlers())
