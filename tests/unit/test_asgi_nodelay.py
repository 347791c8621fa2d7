"""The gateway's listener: a small answer is not held back by Nagle's algorithm.

A response goes out as two writes (headers, then body). Without TCP_NODELAY on the connection the
body waits for the ACK of the headers, which a client delays by up to 40 ms. This measured a
head-cache hit at 44 ms instead of 0.5 ms."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from serve.asgi import bind_socket


def test_accepted_connections_have_tcp_nodelay() -> None:
    listener = bind_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    seen: list[int] = []

    async def serve() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            for _ in range(100):
                if seen:
                    return
                await asyncio.sleep(0.05)

    t = threading.Thread(target=lambda: asyncio.run(serve()))
    t.start()
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port)):
        t.join(timeout=10)
    assert seen and seen[0] != 0
