"""Run the gateway: discovery of engine replicas in the background, uvicorn in front."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette

from serve.batch.store import open_store
from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends
from serve.gateway.lifecycle import lifecycle_loop
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.upstream import HttpUpstream, Upstream
from serve.students.registry import LifecycleStore

logger = logging.getLogger("llmserve.gateway")

Snapshot = dict[str, list[tuple[str, str]]]


def ray_snapshot_source(registry: Any) -> Callable[[], Awaitable[Snapshot]]:
    """Discovery through the registry actor (ObjectRefs are awaitable)."""

    async def fetch() -> Snapshot:
        return await registry.snapshot.remote()

    return fetch


async def discovery_loop(fetch: Callable[[], Awaitable[Snapshot]], backends: Backends, interval_s: float) -> None:
    while True:
        try:
            backends.update(await fetch())
        except asyncio.CancelledError:
            raise
        except Exception:  # keep the last known set: a registry hiccup must not empty the pool
            logger.warning("engine discovery failed; keeping the last known replicas", exc_info=True)
        await asyncio.sleep(interval_s)


def build_gateway(
    config: Config,
    fetch: Callable[[], Awaitable[Snapshot]],
    upstream: Upstream | None = None,
    backends: Backends | None = None,
) -> Starlette:
    backends = backends or Backends()
    upstream = upstream or HttpUpstream(connect_timeout_s=config.gateway.connect_timeout_s)
    cache = HeadCache(config.cache.redis_url, lru_size=config.cache.lru_size,
                      op_timeout_s=config.cache.op_timeout_s)
    limiter = RateLimiter(config.cache.redis_url, op_timeout_s=config.cache.op_timeout_s)
    keys = KeyStore(config.auth)
    batch_store = open_store(config) if config.batch.enabled else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with contextlib.suppress(Exception):
            backends.update(await fetch())
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(discovery_loop(fetch, backends, config.gateway.discovery_interval_s))]
        lifecycle = LifecycleStore(config.cache.redis_url) if config.cache.redis_url else None
        app.state.gateway.lifecycle = lifecycle
        if lifecycle is not None:
            tasks.append(loop.create_task(
                lifecycle_loop(app.state.gateway, lifecycle, config.gateway.discovery_interval_s)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if lifecycle is not None:
                await lifecycle.close()
            await upstream.close()
            await cache.close()
            await limiter.close()

    return create_app(config, backends, upstream, cache=cache, keys=keys, limiter=limiter,
                      batch_store=batch_store, lifespan=lifespan)


def uvicorn_config(app: Starlette, config: Config) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=config.gateway.host,
        port=config.gateway.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,
        # Graceful drain: on SIGTERM stop accepting and give in-flight streams this long.
        timeout_graceful_shutdown=config.gateway.drain_timeout_s,
    )
