"""A fake engine for unit tests of the gateway's pure logic: knobs for latency, failures, text."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serve.gateway.upstream import EngineUnavailable, UpstreamResponse


@dataclass
class FakeUpstream:
    text: str = "hello from the fake engine"
    latency_s: float = 0.0
    fail_first_n: int = 0  # refuse this many connections (EngineUnavailable) before answering
    status: int = 200
    error_body: bytes = b""
    calls: list[tuple[str, str, dict]] = field(default_factory=list)

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> UpstreamResponse:
        payload = json.loads(body)
        self.calls.append((base_url, path, payload))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_first_n > 0:
            self.fail_first_n -= 1
            raise EngineUnavailable(f"{base_url} refused")
        if self.status != 200:
            return UpstreamResponse(self.status, {}, self.error_body)
        model = payload["model"]
        if stream:
            return UpstreamResponse(200, {}, chunks=self._chunks(model))
        body_out = {
            "id": "cmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }
        return UpstreamResponse(200, {}, json.dumps(body_out).encode())

    async def _chunks(self, model: str) -> AsyncIterator[bytes]:
        for word in self.text.split():
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def close(self) -> None:
        pass
