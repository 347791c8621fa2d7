"""How the gateway talks to an engine replica: one POST, answered whole or as a byte stream.

``Upstream`` is the injection point: production uses ``HttpUpstream`` (aiohttp, keep-alive pool to
vLLM's app inside each replica); unit tests pass a fake with knobs instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


class EngineUnavailable(Exception):
    """The engine could not be reached; nothing was sent or received, so another may be tried."""


class EngineTimeout(Exception):
    """The engine did not answer in time."""


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # whole body when not streaming (or when the engine answered an error)
    chunks: AsyncIterator[bytes] | None = None  # streamed body, when streaming and status is 200

    async def aclose(self) -> None:
        if self.chunks is not None and hasattr(self.chunks, "aclose"):
            await self.chunks.aclose()


class Upstream(Protocol):
    async def post(
        self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class HttpUpstream:
    """aiohttp client with a keep-alive pool: the cheapest hop we measured from Python.

    Every request carries the engine secret (serve/contract/secret.py) as its only credential; the
    client's own Authorization never reaches an engine, since only these headers are sent."""

    def __init__(self, connect_timeout_s: float = 5.0, max_connections: int = 1024,
                 secret: str | None = None) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._session = None  # created lazily, inside the running loop
        self._headers = {"Content-Type": "application/json"}
        if secret:
            self._headers["Authorization"] = f"Bearer {secret}"

    def _get_session(self):  # -> aiohttp.ClientSession
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def post(
        self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float
    ) -> UpstreamResponse:
        import aiohttp

        session = self._get_session()
        timeout = aiohttp.ClientTimeout(
            total=None if stream else timeout_s, connect=self._connect_timeout_s,
            sock_read=timeout_s,
        )
        try:
            resp = await session.post(
                base_url + path, data=body, headers=self._headers, timeout=timeout
            )
        except (aiohttp.ClientConnectionError, ConnectionError, OSError) as e:
            if isinstance(e, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
                raise EngineTimeout(str(e)) from e
            raise EngineUnavailable(f"{base_url}: {e}") from e
        except asyncio.TimeoutError as e:
            raise EngineTimeout(str(e)) from e
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if not stream or resp.status != 200:
            try:
                data = await resp.read()
            except asyncio.TimeoutError as e:
                raise EngineTimeout(str(e)) from e
            except aiohttp.ClientError as e:
                raise EngineUnavailable(f"{base_url}: {e}") from e
            finally:
                resp.release()
            return UpstreamResponse(resp.status, headers, data)
        return UpstreamResponse(resp.status, headers, chunks=_iter_chunks(resp))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _iter_chunks(resp) -> AsyncIterator[bytes]:  # resp: aiohttp.ClientResponse
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    finally:
        # Closing (not releasing) drops the connection, which is how vLLM learns the client went
        # away and aborts the request in the engine.
        if not resp.content.at_eof():
            resp.close()
        else:
            resp.release()
