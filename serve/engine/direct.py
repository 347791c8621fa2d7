"""The engine replica: Ray Serve LLM's LLMServer, plus vLLM's own OpenAI app on a port of its own.

This is the one module that relies on Ray Serve LLM's less public surface
(``LLMServer.__serve_build_asgi_app__``, which Ray 2.60's direct streaming uses to get vLLM's
FastAPI app with LoRA resolution attached). Everything else in the project uses public APIs.

The port is closed to everyone without the engine secret (serve/engine/secret.py): the app is
served wrapped in RequireEngineSecret rather than with vLLM's --api-key, whose middleware guards
only /v1, /v2, /inference and /cohere and so leaves /invocations (inference) and SageMaker's
/adapters (LoRA loading) open in vLLM 0.32.

Why: a request that goes proxy -> ingress replica -> LLMServer handle pays two Ray hops and
per-chunk object transfers; on 2 cores that served ~0.3x bare vLLM. Serving vLLM's app straight
from the replica lets the gateway forward bytes over one keep-alive HTTP connection, while Ray
Serve still owns placement, replica restarts, health checks and autoscaling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import Any

from ray.serve.llm import LLMServer

from serve.asgi import bind_socket, start_in_loop
from serve.engine.lifeline import tie_engine_cores_to_replica
from serve.engine.registry import get_registry
from serve.engine.secret import ENV as SECRET_ENV
from serve.engine.secret import RequireEngineSecret, adapter_roots, engine_secret, runtime_adapters_for

logger = logging.getLogger("llmserve.engine")

HEARTBEAT_S = 2.0
TTL_S = 8.0


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
        await super().__init__(llm_config, **kwargs)
        self._model_name: str = llm_config.model_id
        self._namespace = os.environ.get("LLMSERVE_NAMESPACE", "llmserve")
        bind_host = os.environ.get("LLMSERVE_BIND_HOST", "127.0.0.1")
        advertise = os.environ.get("LLMSERVE_ADVERTISE_HOST") or self._node_ip(bind_host)
        self._replica_id = f"{self._model_name}#{uuid.uuid4().hex[:8]}"
        self._sock = bind_socket(bind_host)
        self.url = f"http://{advertise}:{self._sock.getsockname()[1]}"
        app = await self.__serve_build_asgi_app__()
        app.add_api_route("/llmserve/stats", self._stats, methods=["GET"])
        self._server, self._serve_task = await start_in_loop(RequireEngineSecret(app, secret), self._sock)
        # A name reloaded at run time (other weights under a configured name) wins over the config:
        # loading both would fail on the second ("already been loaded") and the replica never start.
        wanted = {a["name"]: a for a in [*(adapters or []), *self._runtime_adapters()]}
        for adapter in wanted.values():
            await self.load_adapter(adapter["name"], adapter["path"])
        self._registry = get_registry(self._namespace)
        await self._registry.register.remote(self._model_name, self._replica_id, self.url, TTL_S)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        logger.info("engine %s serving at %s", self._replica_id, self.url)

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

    async def _stats(self) -> dict[str, Any]:
        """Requests the engine still holds (running or waiting): what must drop to zero after a
        client disconnects. Read from vLLM's AsyncLLM through Ray's engine wrapper."""
        client = getattr(self.engine, "_engine_client", None)
        unfinished = client.get_num_unfinished_requests() if client is not None else -1
        return {"replica": self._replica_id, "model": self._model_name, "unfinished_requests": unfinished,
                "pid": os.getpid()}

    def _runtime_adapters(self) -> list[dict[str, str]]:
        """Adapters promoted while the service ran (registered in Redis for this base model), if
        their path lies under the configured adapter roots: whoever can write to Redis must not be
        able to make a new replica load files from anywhere. No roots: none are loaded."""
        url = os.environ.get("LLMSERVE_REDIS_URL")
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
