"""Runtime changes to what the gateway serves: adapters loaded after start, routes moved to a
promoted student (with the cascade threshold calibrated for it, when the promotion carries one).
Applied from the lifecycle store (Redis) by every gateway replica.

Loading an adapter at run time makes every engine replica read files, so it is an admin action
(with auth on, a non-admin key gets 403) and the path must lie under `gateway.adapter_roots` once
symlinks and `..` are resolved, or be the configured path of the adapter of that name. With auth off there is no
key to check: the roots are then the only guard, and with no roots nothing new can be loaded.

What is hashed and loaded is a copy: the directory is copied into a content-addressed store that
only the gateway writes (serve/contract/paths.py `snapshot_adapter`, `<first root>/.llmserve-adapters/
<digest>`), refusing a symlink anywhere inside it, and engines load that copy. Files a tenant can
still change under the root after the check are neither hashed nor loaded.

An adapter is tied to its weights by a content digest. A name already loaded from other weights
is reloaded (vLLM's unload, then load), never kept: vLLM refuses to load a name it holds, and an
unload + load gives the adapter a new internal id, so no prefix-cache block computed with the old
weights is reused (vLLM's in-place reload keeps the id and those blocks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Literal, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.config import Config
from serve.contract.paths import UnsafeAdapter, adapter_store, path_under_roots, snapshot_adapter
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends
from serve.gateway.catalog import Catalog
from serve.gateway.errors import APIError, bad_request
from serve.gateway.upstream import Upstream
from serve.gateway.validate import json_object
from serve.students.registry import THRESHOLD, LifecycleStore

logger = logging.getLogger("llmserve.lifecycle")


class GatewayState(Protocol):
    """What the lifecycle reads and changes of a gateway (serve/gateway/service.py Gateway), as a
    protocol so this module need not import the class that calls it."""

    @property
    def config(self) -> Config: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def keys(self) -> KeyStore: ...

    @property
    def backends(self) -> Backends: ...

    @property
    def upstream(self) -> Upstream: ...

    @property
    def lifecycle(self) -> LifecycleStore | None: ...


def apply(gw: GatewayState, adapters: dict[str, dict[str, str]], overrides: dict[str, dict[str, str]]) -> None:
    """Register runtime adapters under their base model (or record their new weights), point
    overridden routes at their new model, and put routes whose override was rolled back as
    configured (the catalog swaps each route whole)."""
    catalog = gw.catalog
    for name, meta in adapters.items():
        path, digest = meta.get("path", ""), meta.get("digest") or None
        if catalog.adapter_path(name) != path or catalog.adapter_digest(name) != digest:
            catalog.add_adapter(name, meta.get("base", ""), path, digest)
    for route_name, change in overrides.items():
        field: Literal["student", "target"] = "student" if "student" in change else "target"
        model = change.get(field, "")
        if catalog.spec(model) is None:
            logger.warning("route %s override names unknown model %s; ignored", route_name, model)
            continue
        threshold = change.get(THRESHOLD)
        if catalog.override_route(route_name, field, model, None if threshold is None else float(threshold)):
            logger.info("route %s now uses %s%s", route_name, model,
                        "" if threshold is None else f" (cascade threshold {float(threshold):.4f})")
    for route in catalog.config.routes:
        if route.name not in overrides and catalog.reset_route(route.name):
            logger.info("route %s is back to its configuration", route.name)


async def lifecycle_loop(gw: GatewayState, store: LifecycleStore, interval_s: float) -> None:
    while True:
        try:
            apply(gw, await store.adapters(), await store.overrides())
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("lifecycle refresh failed; keeping current routes", exc_info=True)
        await asyncio.sleep(interval_s)


def allowed_path(path: str, roots: list[str], configured: str | None) -> str:
    """The real path of `path` if runtime loading may read it: inside one of `roots` once symlinks
    and `..` are resolved (the test a replica applies to registered adapters when it starts), or
    the adapter's own configured path. Raises a 400 or 403 otherwise."""
    if not os.path.isabs(path):
        raise bad_request("`path` must be an absolute path.", param="path")
    real = os.path.realpath(path)
    if path_under_roots(real, roots) or (configured is not None and real == os.path.realpath(configured)):
        return real
    if not roots:
        raise APIError(403, "Runtime adapter loading is off: no `gateway.adapter_roots` are configured.",
                       param="path", code="adapter_loading_disabled")
    raise bad_request(f"`path` must lie under one of the adapter roots {roots}.", param="path")


async def _known_digest(gw: GatewayState, name: str) -> tuple[dict[str, str] | None, str | None]:
    """(runtime registration, digest of the weights `name` is served from) or (None, None) when
    nothing says. The lifecycle store is the truth shared by every gateway; this gateway's catalog
    stands in without one."""
    if gw.lifecycle is not None:
        try:
            registered = await gw.lifecycle.adapter(name)
        except Exception as e:
            raise APIError(503, f"The lifecycle store is unavailable: {e}", code="lifecycle_store_unavailable") from e
        if registered is not None:
            return registered, registered.get("digest") or None
    return None, gw.catalog.adapter_digest(name)


async def _engine(gw: GatewayState, url: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    r = await gw.upstream.post(url, path, json.dumps(body).encode(), stream=False, timeout_s=120)
    return r.status, r.body.decode("utf-8", "replace")


async def _load_on(gw: GatewayState, url: str, name: str, path: str, same_weights: bool) -> bool:
    """Load `name` from `path` on one replica; True if it had to unload other weights first.
    Raises RuntimeError with the engine's answer when the replica refuses."""
    load = {"lora_name": name, "lora_path": path}
    status, text = await _engine(gw, url, "/v1/load_lora_adapter", load)
    if status == 200:
        return False
    if status == 400 and "already" in text:
        if same_weights:  # it holds exactly these weights (same digest): nothing to do
            return False
        status, text = await _engine(gw, url, "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):  # 404: gone meanwhile, which is what we wanted
            raise RuntimeError(f"unload: {status} {text}")
        status, text = await _engine(gw, url, "/v1/load_lora_adapter", load)
        if status == 200:
            return True
    raise RuntimeError(f"load: {status} {text}")


async def load(gw: GatewayState, name: str, base: str, path: str, digest: str | None) -> dict[str, Any]:
    """Load adapter `name` on every replica of `base` from `path` (checked against the roots and,
    when given, `digest`), and serve it from this gateway at once. Raises APIError."""
    from serve.students.registry import AdapterError, adapter_digest

    spec = gw.catalog.spec(base)
    if spec is None or spec.name != base:
        raise bad_request(f"`base` must be a served model, not {base!r}.", param="base")
    taken = gw.catalog.spec(name)
    if taken is not None and (gw.catalog.adapter_path(name) is None or taken.name != base):
        raise bad_request(f"`{name}` is already a model or an adapter of another base model.", param="name")
    configured = next((a.path for m in gw.config.models for a in m.adapters if a.name == name), None)
    roots = list(gw.config.gateway.adapter_roots)
    real = allowed_path(path, roots, configured)
    try:  # copying and hashing read every weight file: off the event loop
        stored, actual = await asyncio.to_thread(snapshot_adapter, real, adapter_store(roots), adapter_digest)
    except (AdapterError, UnsafeAdapter, OSError, RecursionError) as e:  # RecursionError: nested past reason
        raise bad_request(f"`path` is not a loadable adapter: {e}", param="path") from e
    if digest is not None and digest != actual:
        raise APIError(409, f"The adapter at {path} has digest {actual}, not the {digest} you asked for: its "
                            "files changed since they were evaluated.", param="digest", code="digest_mismatch")
    eps = gw.backends.endpoints(base)
    if not eps:
        raise APIError(503, f"Model `{base}` has no ready replica.", code="model_not_ready")
    registered, known = await _known_digest(gw, name)
    results = await asyncio.gather(*(_load_on(gw, e.url, name, stored, known == actual) for e in eps),
                                   return_exceptions=True)
    failed = [{"replica": ep.replica_id, "error": str(r)}
              for ep, r in zip(eps, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        if registered is not None and gw.lifecycle is not None:
            # Some replicas may now hold other weights than registered: forget the digest, so the
            # next load of this name reloads everywhere instead of trusting "already loaded".
            await gw.lifecycle.register_adapter(name, registered.get("base", base), registered.get("path", ""), "")
        loaded_from = gw.catalog.adapter_path(name)
        if loaded_from is not None:
            gw.catalog.add_adapter(name, base, loaded_from, None)
        raise APIError(502, f"Loading {name} failed on {len(failed)} of {len(eps)} replicas: {failed}",
                       code="adapter_load_failed")
    gw.catalog.add_adapter(name, base, stored, actual)
    if gw.lifecycle is not None:  # every gateway, the batch worker and future replicas learn it
        await gw.lifecycle.register_adapter(name, base, stored, actual)
    reloaded = sum(1 for r in results if r is True)
    if reloaded:
        logger.info("adapter %s reloaded from %s (%s) on %d replicas", name, stored, actual[:12], reloaded)
    # `path` is where the engines load it from: the content-addressed copy, not the tenant's directory.
    return {"name": name, "base": base, "path": stored, "source": real, "digest": actual, "replicas": len(eps),
            "reloaded": reloaded}


async def load_adapter(gw: GatewayState, request: Request) -> Response:
    """POST /v1/llmserve/adapters {name, path, base, digest?}: load a LoRA adapter into every replica
    of its base model through vLLM's runtime-LoRA endpoint, and serve it from this gateway at once.
    Raises APIError, which the app's one exception handler turns into the HTTP answer."""
    key = gw.keys.authenticate(request.headers.get("authorization"))
    if key is not None and not key.admin:
        raise APIError(403, "This key may not load adapters.", code="not_admin")
    body = json_object(await request.body())
    name, path, base = (body.get(k) for k in ("name", "path", "base"))
    if not all(isinstance(v, str) and v for v in (name, path, base)):
        raise bad_request("`name`, `path` and `base` are required strings.")
    digest = body.get("digest")
    if digest is not None and not isinstance(digest, str):
        raise bad_request("`digest` must be a string.", param="digest")
    return JSONResponse(await load(gw, str(name), str(base), str(path), digest))
