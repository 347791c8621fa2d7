"""Runtime changes to what the gateway serves: adapters loaded after start, routes moved to a
promoted student. Applied from the lifecycle store (Redis) by every gateway replica."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.gateway.errors import APIError, bad_request

logger = logging.getLogger("llmserve.lifecycle")


def apply(gw: Any, adapters: dict[str, dict[str, str]], overrides: dict[str, dict[str, str]]) -> None:
    """Register runtime adapters under their base model, then point overridden routes at their
    new model (the catalog swaps each route whole)."""
    catalog = gw.catalog
    for name, meta in adapters.items():
        if catalog.spec(name) is None:
            catalog.add_adapter(name, meta.get("base", ""), meta.get("path", ""))
    for route_name, change in overrides.items():
        field = "student" if "student" in change else "target"
        model = change.get(field, "")
        if catalog.spec(model) is None:
            logger.warning("route %s override names unknown model %s; ignored", route_name, model)
            continue
        if catalog.override_route(route_name, field, model):
            logger.info("route %s now uses %s", route_name, model)


async def lifecycle_loop(gw: Any, store: Any, interval_s: float) -> None:
    while True:
        try:
            apply(gw, await store.adapters(), await store.overrides())
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("lifecycle refresh failed; keeping current routes", exc_info=True)
        await asyncio.sleep(interval_s)


async def load_adapter(gw: Any, request: Request) -> Response:
    """POST /v1/llmserve/adapters {name, path, base}: load a LoRA adapter into every replica of its
    base model through vLLM's runtime-LoRA endpoint, and serve it from this gateway at once."""
    try:
        key = gw.keys.authenticate(request.headers.get("authorization"))
        if key is not None and not key.admin:
            raise APIError(403, "This key may not load adapters.", code="not_admin")
        try:
            body = await request.json()
        except ValueError as e:
            raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
        name, path, base = (body.get(k) if isinstance(body, dict) else None for k in ("name", "path", "base"))
        if not all(isinstance(v, str) and v for v in (name, path, base)):
            raise bad_request("`name`, `path` and `base` are required strings.")
        spec = gw.catalog.spec(base)
        if spec is None or spec.name != base:
            raise bad_request(f"`base` must be a served model, not {base!r}.", param="base")
        payload = json.dumps({"lora_name": name, "lora_path": path}).encode()
        eps = gw.backends.endpoints(base)
        if not eps:
            raise APIError(503, f"Model `{base}` has no ready replica.", code="model_not_ready")
        results = await asyncio.gather(*(gw.upstream.post(e.url, "/v1/load_lora_adapter", payload, stream=False,
                                                          timeout_s=120) for e in eps), return_exceptions=True)
        failed = []
        for ep, r in zip(eps, results, strict=True):
            text = getattr(r, "body", b"").decode("utf-8", "replace")
            if isinstance(r, BaseException) or (r.status != 200 and "already" not in text):
                failed.append({"replica": ep.replica_id, "error": str(r) if isinstance(r, BaseException) else text})
        if failed:
            raise APIError(502, f"Loading {name} failed on {len(failed)} of {len(eps)} replicas: {failed}",
                           code="adapter_load_failed")
        apply(gw, {str(name): {"base": str(base), "path": str(path)}}, {})
        if gw.lifecycle is not None:  # every gateway, the batch worker and future replicas learn it
            await gw.lifecycle.register_adapter(str(name), str(base), str(path))
        return JSONResponse({"name": name, "base": base, "replicas": len(eps)})
    except APIError as e:
        return JSONResponse(e.body(), e.status, headers=e.headers)
