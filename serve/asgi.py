"""Serve an ASGI app with uvicorn on the current event loop, from inside a Ray Serve replica.

Both kinds of replica (engines and the gateway) listen for HTTP themselves, so requests skip
Serve's proxy and handle hops; this is the one place that knows how.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any


def bind_socket(host: str, port: int = 0, reuse_port: bool = False) -> socket.socket:
    """A listening socket. reuse_port: SO_REUSEPORT, so several processes (gateway replicas on one
    host) bind the same port and the kernel spreads new connections over them, as nginx and
    gunicorn do; each must set it, and a socket bound without it keeps the port to itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Linux hands TCP_NODELAY down to every accepted connection. asyncio sets it on a connection
    # only when the socket's proto is IPPROTO_TCP (base_events._set_nodelay), and a socket made as
    # above has proto 0, so without this Nagle held each response's body behind its headers until
    # the client's delayed ACK: 40 ms added to every small answer (a head-cache hit took 44 ms
    # instead of 0.5; tests/unit/test_asgi_nodelay.py).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_config(app: Any, graceful_s: float, keep_alive_s: float) -> Any:
    """uvicorn's configuration for every server of the project (engine replicas, the gateway under
    Serve and under `llmserve run`). graceful_s: how long in-flight requests and streams get after
    a stop. keep_alive_s: how long an idle connection stays open."""
    import uvicorn

    # log_config=None: uvicorn's default applies logging.config.dictConfig, which closes every
    # handler of the process, Serve's replica log handler too; Serve's controller, recovering after
    # a lost head, reads that handler from each live replica and replaces every replica it cannot.
    # loop="none": the caller's loop (a replica's, or run_event_loop's uvloop).
    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=keep_alive_s,
                          timeout_graceful_shutdown=graceful_s, loop="none", log_config=None)


async def start_in_loop(config: Any, sock: socket.socket | list[socket.socket]) -> tuple[Any, asyncio.Task]:
    """Start uvicorn (`config`: uvicorn_config) on `sock` in the running loop; returns (server,
    task) once it accepts."""
    import uvicorn

    server = uvicorn.Server(config)
    # The replica already handles signals; uvicorn must not install its own.
    server.install_signal_handlers = lambda: None
    task = asyncio.get_running_loop().create_task(server.serve(sock if isinstance(sock, list) else [sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.05)
    return server, task
