"""The dispatch layer: pick a replica of a model, send it the request, relay what comes back, and
bill the usage it reports. The route's stages call down into it; it never calls back up.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from serve.config import Config
from serve.gateway.backends import Backends, Endpoint
from serve.gateway.catalog import Catalog
from serve.gateway.context import RequestContext
from serve.gateway.dialects.base import StreamTap
from serve.gateway.errors import APIError
from serve.gateway.metrics import Metrics
from serve.gateway.upstream import EngineTimeout, EngineUnavailable, Upstream, UpstreamResponse
from serve.policies.cost import cost_usd, usage_tokens

logger = logging.getLogger("llmserve.dispatch")


class Dispatcher:
    def __init__(self, config: Config, catalog: Catalog, backends: Backends, upstream: Upstream,
                 metrics: Metrics) -> None:
        self.catalog = catalog
        self.backends = backends
        self.upstream = upstream
        self.metrics = metrics
        self.timeout_s = config.gateway.request_timeout_s

    async def send(self, model: str, path: str, body: bytes, stream: bool,
                   affinity: str | None) -> tuple[UpstreamResponse, str]:
        """Send to one replica of `model`; on a refused connection try another, since nothing was
        sent yet. Requests sharing a prompt prefix prefer one replica (its prefix cache is warm), and
        requests for a LoRA adapter the replicas it was sent to last."""
        spec = self.catalog.spec(model)
        assert spec is not None, model  # routes only name known models (config validation)
        tried: set[str] = set()
        while True:
            ep = self.backends.pick(spec.name, exclude=tried, affinity=affinity,
                                    max_in_flight=spec.deployment.max_ongoing_requests,
                                    adapter=model if model != spec.name else None)
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
                resp = await self.upstream.post(ep.url, path, body, stream=stream, timeout_s=self.timeout_s)
            except EngineUnavailable:
                ep.in_flight -= 1
                self.backends.mark_down(ep)
                logger.warning("engine %s unreachable; trying another replica", ep.replica_id)
                continue
            except EngineTimeout as e:
                ep.in_flight -= 1
                raise APIError(504, f"Model `{spec.name}` did not answer within {self.timeout_s:.0f}s.",
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

    async def send_for(self, ctx: RequestContext, model: str, body: bytes,
                       stream: bool) -> tuple[UpstreamResponse, str]:
        """`send` for a request: while it waits for a whole answer, the context says which model is
        working on it (a client that leaves then is billed for its prompt there)."""
        ctx.sending = model
        try:
            sent = await self.send(model, ctx.path, body, stream, ctx.affinity)
        except Exception:  # it did not work on it (a cancel, a BaseException, leaves it named)
            ctx.sending = None
            raise
        ctx.sending = None
        return sent

    async def send_json(self, ctx: RequestContext, model: str, request: dict[str, Any],
                        stream: bool = False) -> tuple[UpstreamResponse, str]:
        return await self.send_for(ctx, model, json.dumps(request).encode(), stream)

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

    def charge(self, ctx: RequestContext, model: str, usage: Any) -> float:
        """Bill `usage` of `model` to the request's key; returns the request's cost so far."""
        prompt, completion = usage_tokens(usage)
        self.metrics.tokens.labels(model, "prompt").inc(prompt)
        self.metrics.tokens.labels(model, "completion").inc(completion)
        cost = cost_usd(prompt, completion, self.catalog.price(model))
        self.metrics.cost.labels(ctx.route.name, model, ctx.key).inc(cost)
        ctx.cost_usd += cost
        ctx.tokens += prompt + completion
        return ctx.cost_usd

    @staticmethod
    async def relay(resp: UpstreamResponse, tap: StreamTap) -> AsyncIterator[bytes]:
        """Pass an engine's stream through its dialect's tap (usage billed, answer kept)."""
        assert resp.chunks is not None
        try:
            async for chunk in resp.chunks:
                out = tap.feed(chunk)
                if out:
                    yield out
            if rest := tap.end():
                yield rest
        finally:
            tap.close()  # a stream that ended before its usage (the client left) is billed as far as it went
            await resp.aclose()
