"""serving_on_thread: the gateway on a thread of a process that has its own work (the demo, tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serve.config import Config
from serve.gateway.server import GatewayStartError, run_event_loop, serving_on_thread

CONFIG = Config.model_validate({"models": [{"name": "m", "source": "builtin://tiny", "accelerator": "cpu"}],
                                "gateway": {"port": 0, "metrics_port": 0, "drain_timeout_s": 1}})


def test_serves_until_the_block_ends() -> None:
    app = Starlette(routes=[Route("/ping", lambda r: PlainTextResponse("pong"))])
    with serving_on_thread(app, CONFIG) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).text == "pong"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)


def test_the_gateway_serves_on_uvloop() -> None:
    """`llmserve run` and serving_on_thread run the gateway through run_event_loop: uvloop, as
    uvicorn's run() and Ray's actors give every other gateway."""

    async def loop_kind(request: Any) -> PlainTextResponse:
        return PlainTextResponse(type(asyncio.get_running_loop()).__module__)

    app = Starlette(routes=[Route("/loop", loop_kind)])
    with serving_on_thread(app, CONFIG) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        assert httpx.get(f"http://127.0.0.1:{port}/loop", timeout=5).text == "uvloop"

    async def answer() -> int:
        return 42

    assert run_event_loop(answer()) == 42


def test_a_gateway_that_cannot_start_is_an_error_not_a_hang() -> None:
    @contextlib.asynccontextmanager
    async def broken(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("the store is unreachable")
        yield

    started = time.monotonic()
    with (pytest.raises(GatewayStartError, match="did not start"),
          serving_on_thread(Starlette(lifespan=broken), CONFIG, start_timeout_s=60)):
        pytest.fail("the block ran without a gateway")
    # Seen as soon as the server's thread ends, not after the start timeout.
    assert time.monotonic() - started < 30
