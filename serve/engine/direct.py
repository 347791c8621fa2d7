"""The engine replica: Ray Serve LLM's LLMServer, plus vLLM's own OpenAI app on a port of its own.

The replica side of Ray Serve LLM's and vLLM's less public surface (every such name is listed, and
imported, in serve/engine/private.py): ``LLMServer.__serve_build_asgi_app__`` (which Ray 2.60's
direct streaming uses to get vLLM's FastAPI app with LoRA resolution attached), Ray's engine
wrapper's ``_engine_client`` (vLLM's AsyncLLM: ``_engine_client()``), AsyncLLM's ``logger_manager``
(where ``EngineLoad``, a vLLM stat logger, joins the engine's own: ``_engine_load()``), Ray Serve
LLM's node-init callback (``NodeInitOnlyToDownload``, named in ``callback_config``),
``LLMServer._start_engine`` (its usage report moved off the start) and
``VLLMEngine._prepare_engine_config`` (``InCoreEngine``: the executor on CPU). The driver's side has
its own (serve/engine/cluster.py: Serve's controller client for a declarative deploy, and
``ray.init(_node_ip_address=...)``), kept apart because the driver must not import vLLM.

The port is closed to everyone without the engine secret (serve/contract/secret.py): the app is
served wrapped in RequireEngineSecret rather than with vLLM's --api-key, whose middleware guards
only /v1, /v2, /inference and /cohere and so leaves /invocations (inference) and SageMaker's
/adapters (LoRA loading) open in vLLM 0.32.

Why: a request that goes proxy -> ingress replica -> LLMServer handle pays two Ray hops and
per-chunk object transfers; on 2 cores that served ~0.3x bare vLLM. Serving vLLM's app straight
from the replica lets the gateway forward bytes over one keep-alive HTTP connection, while Ray
Serve still owns placement, replica restarts, health checks and autoscaling.

Autoscaling: the gateways bypass Serve's handles, so Serve's own count of a replica's ongoing
requests stays near 0. The replica reports its load itself through Serve's custom-metrics hook,
``record_autoscaling_stats`` (the metric names serve/policies/autoscaling.py reads, per replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

from ray.serve.llm import LLMServer

from serve.asgi import bind_socket, start_in_loop, uvicorn_config
from serve.config import REDIS_URL_ENV
from serve.contract.paths import adapter_roots, runtime_adapters_for
from serve.contract.registry import get_registry
from serve.contract.secret import ENV as SECRET_ENV
from serve.contract.secret import ASGIApp, Receive, RequireEngineSecret, Scope, Send, engine_secret
from serve.engine import private
from serve.engine.lifeline import tie_engine_cores_to_replica
from serve.policies.autoscaling import KV_USAGE, ONGOING, REQUESTS, TTFT, WAITING

logger = logging.getLogger("llmserve.engine")

# Ray Serve LLM's and vLLM's less public names, from the one module that lists them (private.py).
TagKey: Any = private.USAGE_TAG_KEY.load()
record_extra_usage_tag = private.RECORD_USAGE_TAG.load()
usage_stats_enabled = private.USAGE_STATS_ENABLED.load()
CallbackBase: Any = private.CALLBACK_BASE.load()
is_remote_path = private.IS_REMOTE_PATH.load()
RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING = private.DIRECT_STREAMING.load()
VLLMEngine: Any = private.VLLM_ENGINE.load()
push_telemetry_report_for_all_models = private.PUSH_TELEMETRY.load()
AggregateStatLoggerBase: Any = private.AGGREGATE_STAT_LOGGER.load()

HEARTBEAT_S = 2.0
TTL_S = 8.0
# The TTFT reported is the mean of the first tokens of this long: about one of Serve's samples of a
# replica (every min(look_back_period_s x 0.2, metrics_interval_s), 6 s with the chart's defaults).
TTFT_WINDOW_S = 10.0


class CountRequests:
    """ASGI middleware: counts the inference requests the engine's app receives (POST under /v1/,
    vLLM's LoRA load/unload excluded), when they arrive: the autoscaler's request rate."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("method") == "POST" and scope["path"].startswith("/v1/")
                and not scope["path"].endswith("_lora_adapter")):
            self.received += 1
        await self.app(scope, receive, send)


class EngineLoad(AggregateStatLoggerBase):
    """A vLLM stat logger keeping what the autoscaler needs from the stats the engine already
    makes: each engine core's newest scheduler stats (waiting requests, KV-cache use) and recent
    times to first token. vLLM calls record() from its output loop after each engine step, on the
    replica's event loop, where the hook reads it: nothing is computed or locked per read."""

    def __init__(self, vllm_config: Any = None, engine_indexes: list[int] | None = None) -> None:
        self._waiting: dict[int, int] = {}
        self._kv: dict[int, float] = {}
        self._ttft: deque[tuple[float, float]] = deque()  # (monotonic time, seconds)
        self._last_ttft = 0.0
        # vLLM's own prefix-cache counts (tokens), as its Prometheus logger adds them to
        # vllm:prefix_cache_queries/_hits, which Ray's stat logger keeps off the replica's /metrics.
        self.prefix_queries = 0
        self.prefix_hits = 0

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            # Deferred ("skipped") requests wait too: vLLM's own log counts them as waiting.
            self._waiting[engine_idx] = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            self._kv[engine_idx] = float(scheduler_stats.kv_cache_usage)
            self.prefix_queries += scheduler_stats.prefix_cache_stats.queries
            self.prefix_hits += scheduler_stats.prefix_cache_stats.hits
        if iteration_stats is not None and iteration_stats.time_to_first_tokens_iter:
            now = time.monotonic()
            self._ttft.extend((now, t) for t in iteration_stats.time_to_first_tokens_iter)
            self._last_ttft = float(iteration_stats.time_to_first_tokens_iter[-1])
            self._prune(now)

    def log_engine_initialized(self) -> None:
        pass

    def _prune(self, now: float) -> None:
        while self._ttft and now - self._ttft[0][0] > TTFT_WINDOW_S:
            self._ttft.popleft()

    def waiting(self) -> int:
        return sum(self._waiting.values())

    def kv_usage(self) -> float:
        return sum(self._kv.values()) / len(self._kv) if self._kv else 0.0

    def ttft_s(self, busy: bool) -> float:
        """Mean TTFT of the first tokens of the last TTFT_WINDOW_S. None in it: the last one seen
        while requests are still in the engine (all decoding, or none scheduled yet), 0 when idle."""
        self._prune(time.monotonic())
        if self._ttft:
            return sum(t for _, t in self._ttft) / len(self._ttft)
        return self._last_ttft if busy else 0.0


def needs_node_init(source: str, mirrored: bool, bundle_nodes: set[str], here: str) -> bool:
    """Whether Ray Serve LLM's node initialization can do anything for this engine: fetch files
    (a remote source or a mirror) or prepare another node of its placement group."""
    return mirrored or is_remote_path(source) or bundle_nodes != {here}


class NodeInitOnlyToDownload(CallbackBase):
    """Ray Serve LLM's node-init hook (``LLMConfig.callback_config``): skip node initialization
    when it has nothing to do. Ray runs it as one task per node of the engine's placement group
    (ray/llm/_internal/serve/utils/node_initialization_utils.py), in a fresh worker that imports
    torch, transformers and Ray Serve LLM only for ``download_model_files`` to return a local path
    or hub id unchanged: 14 s of a 90 s warm start on 2 cores. What that task does besides,
    creating torch's kernels directory, is done here, on the one node."""

    async def on_before_node_init(self) -> None:
        import ray
        import torch

        engine = self.llm_config.get_engine_config()
        pg = self.ctx.placement_group
        nodes = set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values()) if pg is not None else set()
        here = ray.get_runtime_context().get_node_id()
        if not needs_node_init(engine.actual_hf_model_id, engine.mirror_config is not None, nodes or {here}, here):
            os.makedirs(os.path.join(os.path.dirname(torch.hub.get_dir()), "kernels"), exist_ok=True)
            self.ctx.run_init_node = False


class InCoreEngine(VLLMEngine):
    """Ray Serve LLM's vLLM engine, with the forward pass in the engine core where the engine's
    environment asks for it (VLLM_ENABLE_V1_MULTIPROCESSING=0, serve/engine/deployments.py CPU_ENV)
    and one process is all it needs: as vLLM runs one GPU, and as vLLM's CPU platform itself does
    under that variable (platforms/cpu.py). Ray asks for the multiprocess executor on every CPU
    engine (vllm_models.py), which puts the model in a worker process of its own: it spins on its
    queue with the engine core and keeps a second core busy whatever the load (issue 17)."""

    def _prepare_engine_config(self, callback_ctx: Any) -> Any:
        args, frontend, config = super()._prepare_engine_config(callback_ctx)
        if in_core(os.environ, config.parallel_config.world_size):
            config.parallel_config.distributed_executor_backend = "uni"
            args.distributed_executor_backend = "uni"
        return args, frontend, config


def in_core(environ: Any, world_size: int) -> bool:
    return environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and world_size == 1


@contextlib.contextmanager
def log_handlers_kept() -> Iterator[None]:
    """Buffering log handlers that the block closes get their targets back when it ends.

    vLLM applies its logging config while the engine is built in this process (AsyncLLM's and
    EngineArgs.create_engine_config's configure_logging_if_needed, vllm/logger.py), with a
    non-incremental logging.config.dictConfig, which closes every handler of the process first
    (_clearExistingHandlers). Serve's replica log handler is a MemoryHandler: closed, its target is
    None, so the replica's own log records pile up unwritten, and after a lost head Serve's
    recovering controller calls is_allocated on each live replica, which reads that target's file
    name (get_component_logger_file_path), raises, and the replica is replaced: every engine
    reloaded its model despite GCS fault tolerance (issue 28). vLLM's config itself is kept as vLLM
    applies it (so are its logs, here and in its engine cores, which apply it again themselves); only
    what it closed is given back. A closed FileHandler reopens its file (append) on its next record.
    Generic, not Serve's logger by name: no private Serve name is needed for it."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger))]
    targets = {h: h.target for lg in loggers for h in lg.handlers
               if isinstance(h, logging.handlers.MemoryHandler) and h.target is not None}
    try:
        yield
    finally:
        for handler, target in targets.items():
            if handler.target is None:
                handler.setTarget(target)


class DirectLLMServer(LLMServer):
    """LLMServer that also listens for HTTP itself and registers its address for the gateway."""

    async def __init__(  # type: ignore[misc]
        self, llm_config: Any, adapters: list[dict[str, str]] | None = None, **kwargs: Any
    ) -> None:
        # Checked before the (slow) engine load: without a secret the port would be open to anyone.
        secret = engine_secret()
        if secret is None:
            raise RuntimeError(f"{SECRET_ENV} is not set: an engine serves only callers holding the engine "
                               "secret (`llmserve run` generates one; the Helm chart keeps it in a Secret)")
        self._secret = secret
        # Before the engine starts: its engine core must not outlive this replica (lifeline.py).
        tie_engine_cores_to_replica()
        with log_handlers_kept():  # vLLM configures its logging while the engine is built: see there
            await super().__init__(llm_config, engine_cls=kwargs.pop("engine_cls", None) or InCoreEngine, **kwargs)
        self._model_name: str = llm_config.model_id
        self._namespace = os.environ.get("LLMSERVE_NAMESPACE", "llmserve")
        bind_host = os.environ.get("LLMSERVE_BIND_HOST", "127.0.0.1")
        advertise = os.environ.get("LLMSERVE_ADVERTISE_HOST") or self._node_ip(bind_host)
        self._replica_id = f"{self._model_name}#{uuid.uuid4().hex[:8]}"
        self._sock = bind_socket(bind_host)
        self.url = f"http://{advertise}:{self._sock.getsockname()[1]}"
        app = await self.__serve_build_asgi_app__()
        app.add_api_route("/llmserve/stats", self._stats, methods=["GET"])
        # Keep-alive 300 s: the gateways' pooled connections to this port outlive their idle gaps.
        config = uvicorn_config(self._engine_app(app, secret), graceful_s=30, keep_alive_s=300)
        self._server, self._serve_task = await start_in_loop(config, self._sock)
        # A name reloaded at run time (other weights under a configured name) wins over the config:
        # loading both would fail on the second ("already been loaded") and the replica never start.
        wanted = {a["name"]: a for a in [*(adapters or []), *self._runtime_adapters()]}
        for adapter in wanted.values():
            await self.load_adapter(adapter["name"], adapter["path"])
        self._registry = get_registry(self._namespace)
        await self._registry.register.remote(self._model_name, self._replica_id, self.url, TTL_S)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        logger.info("engine %s serving at %s", self._replica_id, self.url)

    async def _start_engine(self) -> None:
        """LLMServer._start_engine with Ray's usage report off the start. Ray sends it with ray.get
        on a detached TelemetryAgent actor it creates on first use, a new worker process, while the
        replica's event loop waits: 3.5 to 4.5 s of a warm start on 2 cores. The report still goes,
        from a thread once the engine is up, wherever Ray's usage stats are on (nothing reads it
        where they are off)."""
        if self.engine is None:
            raise ValueError("Engine is not set")
        await self.engine.start()
        if usage_stats_enabled():
            asyncio.get_running_loop().run_in_executor(None, self._report_usage)

    def _report_usage(self) -> None:
        push_telemetry_report_for_all_models(all_models=[self._llm_config])  # never raises
        if RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:
            try:
                record_extra_usage_tag(TagKey.LLM_SERVE_DIRECT_STREAMING_ENABLED, "1")
            except Exception:  # usage telemetry never affects serving
                logger.warning("recording Ray's usage tag failed", exc_info=True)

    def _engine_app(self, app: ASGIApp, secret: str) -> ASGIApp:
        """vLLM's app as the port serves it, and the load it reports to the autoscaler. The request
        counter sits inside the secret check: only requests that reach the engine count."""
        self._requests = CountRequests(app)
        self._load = EngineLoad()
        return RequireEngineSecret(self._requests, secret)

    @staticmethod
    def _node_ip(bind_host: str) -> str:
        if bind_host not in ("0.0.0.0", "::"):
            return bind_host
        import ray

        return str(ray.util.get_node_ip_address())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._registry.register.remote(self._model_name, self._replica_id, self.url, TTL_S)
            except Exception:  # the registry restarts on its own; keep beating
                logger.warning("registry heartbeat failed", exc_info=True)

    def _engine_client(self) -> Any:
        """vLLM's AsyncLLM, behind Ray's engine wrapper (None before the engine started)."""
        return getattr(self.engine, "_engine_client", None)

    def _engine_load(self, client: Any) -> EngineLoad | None:
        """self._load, among the engine's stat loggers (AsyncLLM takes custom ones only when built,
        and Ray builds it). Checked on every read: vLLM replaces its logger manager when it rescales
        (scale_elastic_ep). None when the engine makes no stats (disable_log_stats)."""
        manager = getattr(client, "logger_manager", None)
        if manager is None:
            return None
        if not any(logger is self._load for logger in manager.stat_loggers):
            manager.stat_loggers.append(self._load)
        return self._load

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's replica hook for custom autoscaling metrics (Ray 2.60, ray/serve/_private/
        replica.py: looked up by this name on the replica's instance, awaited on its event loop
        every min(look_back_period_s x 0.2, metrics_interval_s); ints and floats only, or Serve
        turns custom metrics off for good). Serve's controller hands the values to the policy per
        replica as time series (AutoscalingContext.raw_metrics[name][replica])."""
        client = self._engine_client()
        if client is None:  # not after __init__; an error here is counted and logged by Serve
            raise RuntimeError("the engine has not started")
        ongoing = int(client.get_num_unfinished_requests())
        stats = {REQUESTS: float(self._requests.received), ONGOING: float(ongoing)}
        load = self._engine_load(client)
        if load is not None:
            # Scheduler stats come after each engine step; the frontend's count is current, so an
            # idle engine reads idle even if its last stats were sent mid-step.
            stats[WAITING] = float(min(load.waiting(), ongoing))
            stats[KV_USAGE] = load.kv_usage() if ongoing else 0.0
            stats[TTFT] = load.ttft_s(busy=ongoing > 0)
        return stats

    async def _stats(self) -> dict[str, Any]:
        """Requests the engine still holds (running or waiting): what must drop to zero after a
        client disconnects; and what the replica reports to Serve's autoscaler."""
        client = self._engine_client()
        unfinished = client.get_num_unfinished_requests() if client is not None else -1
        autoscaling = await self.record_autoscaling_stats() if client is not None else {}
        load = self._engine_load(client) if client is not None else None
        prefix = {"queries": load.prefix_queries, "hits": load.prefix_hits} if load is not None else None
        # The KV cache's size in tokens (what vLLM's cache_config_info reports): how much of what
        # the gateway routes here the prefix cache can still hold (serve/policies/routing.py).
        cache = client.vllm_config.cache_config if client is not None else None
        kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size if cache is not None else 0
        return {"replica": self._replica_id, "model": self._model_name, "unfinished_requests": unfinished,
                "autoscaling": autoscaling, "prefix_cache_tokens": prefix, "kv_cache_tokens": kv_tokens,
                "pid": os.getpid()}

    def _runtime_adapters(self) -> list[dict[str, str]]:
        """Adapters promoted while the service ran (registered in Redis for this base model), if
        their path lies under the configured adapter roots: whoever can write to Redis must not be
        able to make a new replica load files from anywhere. No roots: none are loaded."""
        url = os.environ.get(REDIS_URL_ENV)  # the raylet's environment (never runtime_env: deployments.py)
        if not url or not os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            return []
        import redis

        try:
            entries = redis.Redis.from_url(url, socket_timeout=5).hgetall("llmserve:adapters")
        except redis.RedisError:
            logger.warning("could not read runtime adapters from redis", exc_info=True)
            return []
        allowed, refused = runtime_adapters_for(entries, self._model_name, adapter_roots())
        if refused:
            logger.warning("not loading runtime adapters %s: their paths are outside the adapter roots %s",
                           refused, adapter_roots())
        return allowed

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under `name` through vLLM's own runtime-LoRA endpoint."""
        import aiohttp

        async with aiohttp.ClientSession() as s, s.post(
            f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
            headers={"Authorization": f"Bearer {self._secret}"},
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"loading LoRA adapter {name} from {path} failed: {r.status} {await r.text()}")
        logger.info("LoRA adapter %s loaded from %s", name, path)

    async def __del__(self) -> None:
        # Serve calls this on graceful replica shutdown: leave the table first so the gateway stops
        # sending, then let uvicorn finish what it has in flight.
        with contextlib.suppress(Exception):
            self._heartbeat.cancel()
            await self._registry.unregister.remote(self._replica_id)
        with contextlib.suppress(Exception):
            self._server.should_exit = True
            await asyncio.wait_for(self._serve_task, timeout=30)
        await super().__del__()
