"""Run the gateway: discovery of engine replicas in the background, uvicorn in front."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from starlette.applications import Starlette

from serve.asgi import bind_socket, uvicorn_config
from serve.batch.backends import open_store
from serve.cache.store import HeadCache
from serve.config import Config
from serve.contract.secret import engine_secret
from serve.gateway.app import app_for, create_metrics_app
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends, Endpoint
from serve.gateway.lifecycle import lifecycle_loop
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.service import Gateway
from serve.gateway.upstream import HttpUpstream, Upstream
from serve.students.registry import LifecycleStore

logger = logging.getLogger("llmserve.gateway")

Snapshot = dict[str, list[tuple[str, str]]]
T = TypeVar("T")


def ray_snapshot_source(registry: Any) -> Callable[[], Awaitable[Snapshot | None]]:
    """Discovery through the registry actor (ObjectRefs are awaitable)."""

    async def fetch() -> Snapshot | None:
        return await registry.snapshot.remote()

    return fetch


async def discovery_loop(fetch: Callable[[], Awaitable[Snapshot | None]], backends: Backends,
                         interval_s: float) -> None:
    while True:
        try:
            snapshot = await fetch()
            if snapshot is not None:  # None: a registry just (re)started, still learning the replicas
                backends.update(snapshot)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep the last known set: a registry hiccup must not empty the pool
            logger.warning("engine discovery failed; keeping the last known replicas", exc_info=True)
        await asyncio.sleep(interval_s)


async def engine_stats_loop(backends: Backends, interval_s: float, timeout_s: float = 2.0) -> None:
    """cache_aware routing's view of each engine, refreshed beside discovery: the requests it holds
    (other gateways' too) and its KV cache's size (GET /llmserve/stats on the replica: open, a few
    hundred bytes of JSON). Only models with several replicas, where a choice is made."""
    import aiohttp

    async def read(session: aiohttp.ClientSession, ep: Endpoint) -> None:
        try:
            async with session.get(ep.url + "/llmserve/stats") as r:
                stats = await r.json()
            backends.engine_report(ep, int(stats["unfinished_requests"]), int(stats.get("kv_cache_tokens") or 0))
        except asyncio.CancelledError:
            raise
        except Exception:  # a replica that does not answer: dispatch marks it down when it matters
            ep.engine_load = 0
            logger.debug("engine stats of %s unreadable", ep.replica_id, exc_info=True)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        while True:
            several = [eps for eps in map(backends.endpoints, backends.models()) if len(eps) > 1]
            await asyncio.gather(*(read(session, ep) for eps in several for ep in eps))
            await asyncio.sleep(interval_s)


class GatewayParts:
    """Everything one gateway process holds, assembled in one place for every launch path: the
    HTTP gateway (`llmserve run`, `llmserve gateway`, the Serve deployment, tests) and the batch
    worker, which runs batch lines through the same Gateway.handle without HTTP."""

    def __init__(self, config: Config, fetch: Callable[[], Awaitable[Snapshot | None]],
                 upstream: Upstream | None = None, backends: Backends | None = None,
                 runs_background: bool | None = None) -> None:
        self.config = config
        # Background responses run where batch lines run (the batch worker); a gateway runs them
        # itself when there is no batch worker, or no Redis to share their state with one.
        self.runs_background = runs_background if runs_background is not None else (
            config.cache.redis_url is None or not config.batch.enabled)
        self.fetch = fetch
        self.backends = backends or Backends(routing=config.gateway.routing)
        # Engines answer only holders of the engine secret (serve/contract/secret.py).
        self.upstream = upstream or HttpUpstream(connect_timeout_s=config.gateway.connect_timeout_s,
                                                 secret=engine_secret())
        self.cache = HeadCache(config.cache.redis_url, lru_size=config.cache.lru_size,
                               lru_max_bytes=config.cache.lru_max_bytes,
                               op_timeout_s=config.cache.op_timeout_s)
        self.limiter = RateLimiter(config.cache.redis_url, op_timeout_s=config.cache.op_timeout_s)
        # Runtime adapters and promoted routes, shared by every gateway through Redis.
        self.lifecycle = LifecycleStore(config.cache.redis_url) if config.cache.redis_url else None
        self.gateway = Gateway(config, self.backends, self.upstream, cache=self.cache,
                               keys=KeyStore(config.auth), limiter=self.limiter, lifecycle=self.lifecycle)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Background work while the gateway runs (replica discovery, runtime adapters and routes),
        then every client closed."""
        config, gw = self.config, self.gateway
        with contextlib.suppress(Exception):  # start with the replicas known, not an empty pool
            snapshot = await self.fetch()
            if snapshot is not None:
                self.backends.update(snapshot)
        loop = asyncio.get_running_loop()
        interval = config.gateway.discovery_interval_s
        tasks = [loop.create_task(discovery_loop(self.fetch, self.backends, interval)),
                 # `llmserve cache invalidate` on any host reaches this gateway's LRU within a second.
                 loop.create_task(self.cache.follow_invalidations())]
        if self.backends.policy == "cache_aware" and isinstance(self.upstream, HttpUpstream):
            tasks.append(loop.create_task(engine_stats_loop(self.backends, interval)))
        lifecycle = self.lifecycle
        if lifecycle is not None:
            tasks.append(loop.create_task(lifecycle_loop(gw, lifecycle, interval)))
        if self.runs_background:
            tasks.append(loop.create_task(gw.background_runner(config.batch.concurrency).run_forever()))
        try:
            yield gw
        finally:
            for task in tasks:
                task.cancel()
            if lifecycle is not None:
                await lifecycle.close()
            await self.upstream.close()
            await gw.response_store.close()
            await self.cache.close()
            await self.limiter.close()


def build_gateway(
    config: Config,
    fetch: Callable[[], Awaitable[Snapshot | None]],
    upstream: Upstream | None = None,
    backends: Backends | None = None,
) -> Starlette:
    """The gateway's ASGI app: the public API, and `/metrics` for connections that arrive on the
    metrics listener (see `listen`)."""
    parts = GatewayParts(config, fetch, upstream, backends)
    batch_store = open_store(config) if config.batch.enabled else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with parts.running():
            yield

    public = app_for(parts.gateway, batch_store=batch_store, lifespan=lifespan)
    return ByPort(public, create_metrics_app(parts.gateway))  # type: ignore[return-value]


# Probes: not load (a kubelet or load balancer calls them every few seconds whatever the traffic).
UNCOUNTED_PATHS = frozenset({"/health", "/-/healthz"})


class ByPort:
    """Dispatch a connection by the local port it arrived on: metrics on the metrics listener,
    everything else to the public app. (uvicorn serves one app on several sockets.)

    Counts the public HTTP requests, probes aside: `received` since start and `ongoing`, those
    whose response (a stream included) has not ended; what the gateway reports to Serve's
    autoscaler (serve/launch/gateway_replica.py). Two int updates a request on the event loop: no lock."""

    def __init__(self, public: Starlette, metrics: Starlette) -> None:
        self.public = public
        self.metrics = metrics
        self.metrics_ports: set[int] = set()
        self.state = public.state  # tests and callers reach the Gateway as app.state.gateway
        self.received = 0
        self.ongoing = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.public(scope, receive, send)  # lifespan
            return
        server = scope.get("server") or (None, None)
        if server[1] in self.metrics_ports:
            await self.metrics(scope, receive, send)
            return
        if scope["path"] in UNCOUNTED_PATHS:
            await self.public(scope, receive, send)
            return
        self.received += 1
        self.ongoing += 1
        try:  # the app returns once the response's last byte is sent or the client has gone
            await self.public(scope, receive, send)
        finally:
            self.ongoing -= 1


def listen(app: Any, config: Config) -> list[socket.socket]:
    """Bind the public and the metrics listener; returns the sockets for uvicorn's serve()."""
    gw = config.gateway
    public = bind_socket(gw.host, gw.port, reuse_port=gw.reuse_port)
    metrics = bind_socket(gw.metrics_host or gw.host, gw.metrics_port, reuse_port=gw.reuse_port)
    if isinstance(app, ByPort):
        app.metrics_ports.add(metrics.getsockname()[1])
    return [public, metrics]


def gateway_uvicorn_config(app: Starlette, config: Config) -> Any:
    """The gateway's server, under Serve and under `llmserve run` alike: on SIGTERM in-flight
    streams get the configured drain; keep-alive 75 s, longer than the 60 s idle timeout of the
    usual load balancer in front, so the balancer, not the gateway, closes an idle connection
    (never one it is about to reuse)."""
    return uvicorn_config(app, graceful_s=config.gateway.drain_timeout_s, keep_alive_s=75)


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop (uvicorn[standard] brings it), the loop a gateway has everywhere else:
    uvicorn's own run() and Ray's actors (ray._private.async_compat) both pick it. `llmserve run`
    serves on a loop of its own, and asyncio's default one spent more of the two cores per
    relayed chunk, cycles the engine beside it lost (issue 17)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class GatewayStartError(RuntimeError):
    """The gateway's HTTP server did not come up (a port taken, a failed lifespan)."""


@contextlib.contextmanager
def serving_on_thread(app: Any, config: Config, start_timeout_s: float = 30) -> Iterator[Any]:
    """Serve a gateway app (public and metrics listeners) on a thread of this process, as
    `llmserve run` serves it on its main one; yields the uvicorn server once it listens, and drains
    it on exit. For a process that has its own work on the main thread (the demo, the tests)."""
    import uvicorn

    server = uvicorn.Server(gateway_uvicorn_config(app, config))
    sockets = listen(app, config)
    thread = threading.Thread(target=lambda: run_event_loop(server.serve(sockets=sockets)), daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise GatewayStartError(f"the gateway did not start on {config.gateway.host}:{config.gateway.port}")
        time.sleep(0.1)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=config.gateway.drain_timeout_s + 10)
