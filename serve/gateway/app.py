"""The gateway's HTTP surface: OpenAI's routes, forwarded by `model` to an engine replica.

The request path is deliberately thin: read the body, parse it once, decide, forward the original
bytes to one replica over a pooled connection, and pass the engine's answer (or its SSE stream)
back unchanged. Everything the gateway adds (routing, errors, headers) happens before the first
byte goes out, so streaming pays no per-chunk cost here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.config import Config, ModelSpec
from serve.gateway.backends import Backends, Endpoint
from serve.gateway.errors import APIError, bad_request, model_not_found, normalize
from serve.gateway.upstream import EngineTimeout, EngineUnavailable, Upstream, UpstreamResponse

logger = logging.getLogger("llmserve.gateway")

# Which engine task serves which route: a generate model has no /v1/embeddings and vice versa.
ROUTE_TASK = {"/v1/chat/completions": "generate", "/v1/completions": "generate", "/v1/embeddings": "embed"}


class Gateway:
    """State shared by the handlers; injected, never global."""

    def __init__(self, config: Config, backends: Backends, upstream: Upstream) -> None:
        self.config = config
        self.backends = backends
        self.upstream = upstream
        self.created = int(time.time())
        # Adapter name -> its base model spec: an adapter is served by its base model's replicas.
        self.names: dict[str, ModelSpec] = {}
        for m in config.models:
            self.names[m.name] = m
            for a in m.adapters:
                self.names[a.name] = m

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
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
        if not isinstance(payload, dict):
            raise bad_request("The request body must be a JSON object.")
        return raw, payload

    def resolve(self, payload: dict[str, Any], path: str) -> ModelSpec:
        model = payload.get("model")
        if model is None:
            raise bad_request("You must provide a model parameter.", param="model")
        if not isinstance(model, str):
            raise bad_request("`model` must be a string.", param="model")
        spec = self.names.get(model)
        if spec is None:
            raise model_not_found(model)
        if spec.task != ROUTE_TASK[path]:
            raise bad_request(
                f"The model `{model}` does not support {path} (it is a {spec.task} model).",
                param="model", code="model_not_supported",
            )
        stream = payload.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("`stream` must be a boolean.", param="stream")
        return spec

    # ---- forwarding --------------------------------------------------------------------------
    async def forward(self, spec: ModelSpec, path: str, raw: bytes, stream: bool) -> Response:
        """Send to one replica of `spec`; on a refused connection try another, since nothing was
        sent yet. Engine errors come back normalized; a stream is passed through untouched."""
        tried: set[str] = set()
        timeout_s = self.config.gateway.request_timeout_s
        while True:
            ep = self.backends.pick(spec.name, exclude=tried)
            if ep is None:
                if tried:
                    raise APIError(503, f"No replica of model `{spec.name}` could be reached.",
                                   code="engine_unavailable", headers={"Retry-After": "1"})
                raise APIError(503, f"Model `{spec.name}` has no ready replica yet; try again shortly.",
                               code="model_not_ready", headers={"Retry-After": "5"})
            tried.add(ep.replica_id)
            ep.in_flight += 1
            try:
                resp = await self.upstream.post(ep.url, path, raw, stream=stream, timeout_s=timeout_s)
            except EngineUnavailable:
                self.backends.mark_down(ep)
                logger.warning("engine %s unreachable; trying another replica", ep.replica_id)
                ep.in_flight -= 1
                continue
            except EngineTimeout as e:
                ep.in_flight -= 1
                raise APIError(504, f"Model `{spec.name}` did not answer within {timeout_s:.0f}s.",
                               code="timeout") from e
            except BaseException:
                ep.in_flight -= 1
                raise
            headers = {"x-llmserve-served-by": spec.name, "x-llmserve-replica": ep.replica_id}
            if resp.chunks is None:
                ep.in_flight -= 1
                body = normalize(resp.status, resp.body) if resp.status >= 400 else resp.body
                return Response(body, resp.status, media_type="application/json", headers=headers)
            return StreamingResponse(self._relay(ep, resp), 200, media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})

    @staticmethod
    async def _relay(ep: Endpoint, resp: UpstreamResponse) -> AsyncIterator[bytes]:
        assert resp.chunks is not None
        try:
            async for chunk in resp.chunks:
                yield chunk
        except (EngineUnavailable, EngineTimeout, OSError, asyncio.TimeoutError) as e:
            # Bytes are already out: the only honest thing left is an error event.
            err = json.dumps({"error": {"message": f"engine stream broke: {e}", "type": "server_error",
                                        "param": None, "code": "engine_error"}})
            yield f"data: {err}\n\n".encode()
        finally:
            ep.in_flight -= 1
            await resp.aclose()

    # ---- handlers ----------------------------------------------------------------------------
    async def proxy(self, request: Request) -> Response:
        try:
            raw, payload = await self.read_json(request)
            spec = self.resolve(payload, request.url.path)
            return await self.forward(spec, request.url.path, raw, bool(payload.get("stream")))
        except APIError as e:
            return JSONResponse(e.body(), e.status, headers=e.headers)

    async def list_models(self, request: Request) -> Response:
        data = []
        for m in self.config.models:
            data.append({"id": m.name, "object": "model", "created": self.created, "owned_by": "llmserve"})
            for a in m.adapters:
                data.append({"id": a.name, "object": "model", "created": self.created,
                             "owned_by": "llmserve", "parent": m.name})
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        spec = self.names.get(name)
        if spec is not None:
            entry = {"id": name, "object": "model", "created": self.created, "owned_by": "llmserve"}
            if name != spec.name:
                entry["parent"] = spec.name
            return JSONResponse(entry)
        e = model_not_found(name)
        return JSONResponse(e.body(), e.status)

    async def health(self, request: Request) -> Response:
        ready = {m.name: self.backends.ready_count(m.name) for m in self.config.models}
        ok = all(ready.values())
        return JSONResponse({"status": "ok" if ok else "starting", "replicas": ready}, 200 if ok else 503)


def create_app(config: Config, backends: Backends, upstream: Upstream, *, lifespan: Any = None) -> Starlette:
    gw = Gateway(config, backends, upstream)

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
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
