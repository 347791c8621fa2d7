"""uvicorn must not reconfigure logging inside a Serve replica: its default log config
(logging.config.dictConfig) closes every handler of the process, Serve's replica log handler too,
and after a lost head Serve's recovering controller reads that handler from every live replica
(is_allocated) and replaces each one it cannot read: every model reloaded (issue 28)."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator

import pytest

from serve.config import Config


@pytest.fixture()
def serve_handler(tmp_path) -> Iterator[logging.handlers.MemoryHandler]:
    target = logging.FileHandler(tmp_path / "replica.log")
    handler = logging.handlers.MemoryHandler(10, target=target)
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    target.close()


def test_the_gateways_uvicorn_leaves_serves_log_handler_open(serve_handler) -> None:
    from starlette.applications import Starlette

    from serve.gateway.server import gateway_uvicorn_config

    gateway_uvicorn_config(Starlette(), Config.model_validate({"models": [{"name": "m", "source": "x"}]}))
    assert serve_handler.target is not None


async def test_the_engines_uvicorn_leaves_serves_log_handler_open(serve_handler) -> None:
    from starlette.applications import Starlette

    from serve.asgi import bind_socket, start_in_loop, uvicorn_config

    config = uvicorn_config(Starlette(), graceful_s=1, keep_alive_s=5)
    server, task = await start_in_loop(config, bind_socket("127.0.0.1"))
    server.should_exit = True
    await task
    assert serve_handler.target is not None
