"""What an admitted request holds until its answer is done: tokens reserved against its key's
budget (settled on the usage the engine reports), one of its key's concurrency slots, and a
deadline for its stream. Admission takes the lease (serve/gateway/admission.py `reserve`); the
service ends it when the answer is whole, or when its stream ends however it ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from serve.gateway.ratelimit import RateLimiter

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


def _error_event(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@dataclass
class Lease:
    limiter: RateLimiter | None = None  # None: nothing to settle or release (auth off, prepaid)
    key_name: str = ""
    tpm: int | None = None
    reserved: int = 0  # tokens taken from the key's bucket at admission
    slot: str | None = None  # the key's concurrency slot, when it has a limit
    max_stream_s: float | None = None
    _ended: bool = field(default=False, repr=False)

    async def end(self, used: int | None) -> None:
        """Give back what the request did not use (`used` None: unknown, nothing is given back)
        and free its slot. Idempotent."""
        if self._ended or self.limiter is None:
            return
        self._ended = True
        if self.tpm and self.reserved and used is not None:
            await self.limiter.settle(self.key_name, self.tpm, self.reserved - used)
        if self.slot is not None:
            await self.limiter.release(self.key_name, self.slot)

    async def guard(self, chunks: AsyncIterator[bytes], used: Callable[[], int], spawn: Spawn,
                    clock: Callable[[], float] = time.monotonic) -> AsyncIterator[bytes]:
        """Relay a stream; end it with an error event at the key's stream deadline; end the lease
        when the stream ends, the client left or not (`used`: the tokens billed by then)."""
        deadline = clock() + self.max_stream_s if self.max_stream_s else None
        try:
            while True:
                try:
                    if deadline is None:
                        chunk = await chunks.__anext__()
                    else:
                        chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, deadline - clock()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    yield _error_event(f"The stream ran longer than this key's limit of {self.max_stream_s:g}s.",
                                       "stream_time_limit")
                    break
                yield chunk
        finally:
            if hasattr(chunks, "aclose"):
                spawn(chunks.aclose())  # closes the engine connection: vLLM aborts the request
            # Spawned, not awaited: a client that left cancels this generator, and an await here
            # would be cancelled again before it settled anything.
            spawn(self.end(used()))
