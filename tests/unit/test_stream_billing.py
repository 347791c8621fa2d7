"""Streams are billed from their usage event however the engine's bytes are cut into reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from serve.config import Config
from serve.gateway.backends import Backends
from serve.gateway.service import Gateway
from serve.gateway.upstream import UpstreamResponse

CONFIG = Config.model_validate({
    "auth": {"enabled": False},
    "models": [{"name": "m", "source": "x", "price": {"input_per_million": 1000, "output_per_million": 2000}}],
})
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def events() -> bytes:
    out = b""
    for obj in ({**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                       "finish_reason": None}]},
                {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {**CHUNK, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}):
        out += b"data: " + json.dumps(obj).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


class CutEngine:
    """Sends the stream in reads of `size` bytes: every event boundary falls somewhere in a read."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> UpstreamResponse:
        data = events()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), self.size):
                yield data[i:i + self.size]

        return UpstreamResponse(200, {}, chunks=chunks())

    async def close(self) -> None:
        pass


def test_usage_event_cut_across_reads_is_billed_and_relayed_whole() -> None:
    for size in (7, 50, 10_000):
        backends = Backends()
        backends.update({"m": [("m#1", "http://m")]})
        gw = Gateway(CONFIG, backends, CutEngine(size))

        async def run(gw: Gateway) -> bytes:
            answer = await gw.handle(None, "/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "stream_options": {"include_usage": True}})
            assert answer.chunks is not None
            return b"".join([c async for c in answer.chunks])

        relayed = asyncio.run(run(gw))
        cost = (3 * 1000 + 1 * 2000) / 1e6
        assert gw.metrics.cost.labels("m", "m", "anonymous")._value.get() == cost, size
        usage = [json.loads(e[6:]) for e in relayed.split(b"\n\n") if b'"usage": {' in e or b'"usage":{' in e]
        assert len(usage) == 1 and usage[0]["usage"]["cost_usd"] == round(cost, 10), (size, relayed)
        assert relayed.endswith(b"data: [DONE]\n\n")
