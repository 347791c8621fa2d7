"""`llmserve run` (engines, batch worker and gateway in one process tree) and `llmserve gateway` (the
gateway alone, joining engines in a Ray cluster)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from serve.config import Config, load_config

SNIPPET = """\
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="none")
reply = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=16
)
print(reply.choices[0].message.content)
"""


def _probe(base: str, model: str, keys_on: bool = False, timeout_s: float = 30) -> bool:
    """Readiness is a real completion, not a 200 on /v1/models (which answers before engines load).
    With API keys on the probe has none, and a completion is a 401 whatever the engines' state: it
    asks /health then (200 once every model has a replica the gateway sends to). Otherwise it
    would probe four times a second for the gateway's life, a fifth of its idle CPU (issue 27)."""
    if keys_on:
        req = urllib.request.Request(base.removesuffix("/v1") + "/health")
    else:
        body = json.dumps({"model": model, "prompt": "ready?", "max_tokens": 1}).encode()
        req = urllib.request.Request(f"{base}/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return False


class Phases:
    """`llmserve run`'s progress, one line a phase with the seconds since the command started:
    what a user watches during a start, and what `make bench-start` reads (bench/start.py)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, what: str) -> None:
        print(f"llmserve: {what} ({self.elapsed():.1f}s)", flush=True)


async def _watch_startup(config: Config, registry: object, base: str, server: object, phases: Phases) -> int:
    """Wait for every engine, then for a real completion; stop the gateway if an engine fails."""
    from serve.engine.cluster import EngineStartError, wait_for_engines

    def built(model: str) -> None:
        phases(f"{model}: application built, engine loading")

    try:
        await asyncio.to_thread(wait_for_engines, registry, [m.name for m in config.models], 3600, built)
    except EngineStartError as e:
        print(f"llmserve: an engine failed to start: {e}", file=sys.stderr, flush=True)
        server.should_exit = True  # type: ignore[attr-defined]
        return 1
    phases("engines ready")
    model = next((m.name for m in config.models if m.task == "generate"), None)
    # The gateway learns of a new replica within its discovery interval (1 s by default): probe
    # again soon, since each wasted second counts against the start (a failing probe is one 503).
    while model is not None and not await asyncio.to_thread(_probe, base, model, config.auth.enabled):
        await asyncio.sleep(0.25)
    print(f"llmserve: ready after {phases.elapsed():.0f}s: {base}", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn

    from serve.gateway.server import build_gateway, gateway_uvicorn_config, listen, ray_snapshot_source, run_event_loop
    from serve.launch.local import start_stack, stop_stack

    phases = Phases()
    config = load_config(args.config)
    if args.host:
        config.gateway.host = args.host
    if args.port is not None:
        config.gateway.port = args.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _warn_if_open(config)
    print("llmserve: starting Ray and the engines (the first start builds the tiny model)...", flush=True)
    try:
        # Inside the try: a start that fails half-way (Ray up, a deploy refused) still stops
        # whatever it started.
        registry = start_stack(config, phases)
        app = build_gateway(config, ray_snapshot_source(registry))
        server = uvicorn.Server(gateway_uvicorn_config(app, config))
        sockets = listen(app, config)
        base = f"http://{config.gateway.host}:{config.gateway.port}/v1"
        first = next((m.name for m in config.models if m.task == "generate"), config.models[0].name)
        phases(f"gateway on {base} (engines are loading; /health says when)")
        print("llmserve: paste this into Python once ready:\n\n" + SNIPPET.format(base=base, model=first),
              flush=True)

        async def main() -> int:
            watch = asyncio.get_running_loop().create_task(_watch_startup(config, registry, base, server, phases))
            try:
                await server.serve(sockets=sockets)
            finally:
                if not watch.done():
                    watch.cancel()
            return watch.result() if watch.done() and not watch.cancelled() else 0

        _exit_cleanly_on_sigterm()
        code = run_event_loop(main())
    finally:
        stopping = time.monotonic()
        print("llmserve: shutting down engines...", flush=True)
        stop_stack(config)
        print(f"llmserve: stopped in {time.monotonic() - stopping:.1f}s", flush=True)
    return code


def _warn_if_open(config: Config) -> None:
    if not config.auth.enabled:
        bar = "!" * 78
        print(f"{bar}\nllmserve: API KEYS ARE OFF - anyone who reaches {config.gateway.host}:{config.gateway.port} "
              f"can use every model.\nThis is only for a local run; set auth.enabled and keys for anything else.\n"
              f"{bar}", file=sys.stderr, flush=True)


def _exit_cleanly_on_sigterm() -> None:
    """uvicorn drains on SIGTERM, then re-raises it to the previous handler (Ray's driver handler
    exits with status 15). A drained gateway has done what SIGTERM asked: exit 0."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def cmd_gateway(args: argparse.Namespace) -> int:
    """Only the gateway, joining engines that already run in a Ray cluster (`ray.address`)."""
    import ray
    import uvicorn

    from serve.contract.registry import get_registry
    from serve.engine.cluster import connect_ray
    from serve.gateway.server import build_gateway, gateway_uvicorn_config, listen, ray_snapshot_source

    config = load_config(args.config)
    if args.port is not None:
        config.gateway.port = args.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _warn_if_open(config)
    from serve.contract.secret import ENV as SECRET_ENV
    from serve.contract.secret import engine_secret

    if engine_secret() is None:
        print(f"llmserve: set {SECRET_ENV} to the engines' secret (the chart keeps it in a Secret); engines "
              "answer nothing else", file=sys.stderr)
        return 2
    connect_ray(config)
    try:
        app = build_gateway(config, ray_snapshot_source(get_registry(config.ray.namespace)))
        server = uvicorn.Server(gateway_uvicorn_config(app, config))
        print(f"llmserve: gateway on http://{config.gateway.host}:{config.gateway.port}/v1", flush=True)
        _exit_cleanly_on_sigterm()
        server.run(sockets=listen(app, config))
    finally:
        ray.shutdown()
    return 0


def add_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="start engines and the OpenAI-compatible gateway")
    run.add_argument("--config", help="YAML configuration (default: the tiny model on CPU)")
    run.add_argument("--host", help="override gateway.host")
    run.add_argument("--port", type=int, help="override gateway.port")
    run.set_defaults(func=cmd_run)

    gw = sub.add_parser("gateway", help="run only the gateway against engines already in a Ray cluster")
    gw.add_argument("--config", help="YAML configuration (ray.address names the cluster)")
    gw.add_argument("--port", type=int, help="override gateway.port")
    gw.set_defaults(func=cmd_gateway)
