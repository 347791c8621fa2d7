"""A key's budgets hold: tokens reserved for the worst case and settled on real usage (streams
and Responses conversations too), concurrency slots, a stream deadline, and billing for a stream
the client left."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from serve.config import Config
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.service import Gateway
from serve.gateway.upstream import UpstreamResponse
from tests.fakes import FakeTime, FakeUpstream

PRICE = {"input_per_million": 1_000_000, "output_per_million": 1_000_000}  # a dollar a token: cost = tokens


def gateway(up: Any, limiter: RateLimiter | None = None, **key: Any) -> Gateway:
    cfg = Config.model_validate({
        "models": [{"name": "m", "source": "x", "price": PRICE, "engine": {"max_model_len": 4096}}],
        "auth": {"keys": [{"name": "k", "sha256": hash_key("sk"), **key}]},
    })
    backends = Backends()
    backends.update({"m": [("m#1", "http://m")]})
    return Gateway(cfg, backends, up, limiter=limiter)


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


class Ticking:
    """An engine whose stream sends a token every `every_s`, `n` of them, then usage and [DONE];
    records whether the gateway closed it early."""

    def __init__(self, n: int = 50, every_s: float = 0.05) -> None:
        self.n, self.every_s = n, every_s
        self.closed_early = False

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> UpstreamResponse:
        async def chunks() -> AsyncIterator[bytes]:
            done = False
            try:
                for _ in range(self.n):
                    await asyncio.sleep(self.every_s)
                    yield b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}' \
                        b"\n\n"
                yield (b'data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":7,'
                       b'"completion_tokens":%d,"total_tokens":0}}\n\n' % self.n)
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                self.closed_early = not done

        return UpstreamResponse(200, {}, chunks=chunks())

    async def close(self) -> None:
        pass


def test_a_key_may_hold_only_its_concurrent_requests_across_every_entry() -> None:
    async def main() -> None:
        gw = gateway(FakeUpstream(latency_s=0.3), max_concurrent_requests=1)
        key = gw.keys.by_name("k")
        first = asyncio.ensure_future(gw.handle(key, "/v1/chat/completions", chat(max_tokens=5)))
        await asyncio.sleep(0.1)
        second = await gw.handle(key, "/v1/chat/completions", chat(max_tokens=5))
        assert second.status == 429 and second.body is not None
        assert second.body["error"]["code"] == "too_many_concurrent_requests"
        assert (await first).status == 200
        assert (await gw.handle(key, "/v1/chat/completions", chat(max_tokens=5))).status == 200  # the slot is free

    asyncio.run(main())


def test_a_stream_ends_at_the_keys_deadline_and_the_engine_request_is_closed() -> None:
    async def main() -> None:
        engine = Ticking(n=100, every_s=0.05)
        gw = gateway(engine, max_stream_s=0.3)
        answer = await gw.handle(gw.keys.by_name("k"), "/v1/chat/completions", chat(stream=True, max_tokens=100))
        assert answer.chunks is not None
        started = asyncio.get_running_loop().time()
        got = [c async for c in answer.chunks]
        assert asyncio.get_running_loop().time() - started < 1.5
        assert b"stream_time_limit" in got[-1] and len(got) < 20
        await asyncio.sleep(0.05)
        assert engine.closed_early

    asyncio.run(main())


def test_a_stream_the_client_leaves_is_billed_as_far_as_it_went() -> None:
    async def main() -> None:
        engine = Ticking(n=100, every_s=0.01)
        gw = gateway(engine)
        answer = await gw.handle(gw.keys.by_name("k"), "/v1/chat/completions", chat(stream=True, max_tokens=100))
        assert answer.chunks is not None
        it = answer.chunks.__aiter__()
        for _ in range(10):
            await it.__anext__()
        await it.aclose()  # the client hangs up: Starlette closes the stream
        await asyncio.sleep(0.05)
        billed = gw.metrics.cost.labels("m", "m", "k")._value.get()
        # The prompt as estimated (the bytes sent / 4: ~140 bytes) and a token an event relayed.
        assert 10 + 30 <= billed <= 10 + 45, billed

    asyncio.run(main())


def test_a_streams_reservation_is_settled_on_its_usage_when_it_ends() -> None:
    async def main() -> None:
        gw = gateway(Ticking(n=3, every_s=0.0), tokens_per_minute=300)
        key = gw.keys.by_name("k")
        for _ in range(3):  # each reserves ~210 of 300; each uses 10: settled, the next one fits
            answer = await gw.handle(key, "/v1/chat/completions", chat(stream=True, max_tokens=200))
            assert answer.status == 200 and answer.chunks is not None
            assert b"[DONE]" in b"".join([c async for c in answer.chunks])
            await asyncio.sleep(0.02)

    asyncio.run(main())


def test_a_responses_turn_reserves_the_whole_conversation_it_continues() -> None:
    async def main() -> None:
        clock = FakeTime(1000.0)
        gw = gateway(FakeUpstream(text="ok"), limiter=RateLimiter(None, clock=clock.time), tokens_per_minute=400)
        key = gw.keys.by_name("k")
        long = "word " * 200  # ~1000 bytes: ~250 tokens
        first = await gw.handle(key, "/v1/responses", {"model": "m", "input": long, "max_output_tokens": 10})
        assert first.status == 200 and first.body is not None
        clock.now += 600  # the bucket is full again (the fake engine reports a token a byte)
        again = await gw.handle(key, "/v1/responses", {"model": "m", "input": "and?", "max_output_tokens": 150,
                                                       "previous_response_id": first.body["id"]})
        # The new input is tiny; the conversation it continues is not: ~410 > 400 can never fit.
        assert again.status == 400 and again.body is not None
        assert again.body["error"]["code"] == "request_exceeds_token_limit"
        assert again.body["error"]["param"] == "max_output_tokens"
        follow = await gw.handle(key, "/v1/responses", {"model": "m", "input": "and?", "max_output_tokens": 10,
                                                        "previous_response_id": first.body["id"]})
        assert follow.status == 200  # ~270 of 400: fits

    asyncio.run(main())


def test_settle_gives_the_unused_reservation_back() -> None:
    """Without the settle, the second request would wait for the first one's 2,000 reserved tokens."""
    async def main() -> None:
        gw = gateway(FakeUpstream(), tokens_per_minute=2100)
        key = gw.keys.by_name("k")
        assert (await gw.handle(key, "/v1/chat/completions", chat(max_tokens=2000))).status == 200
        second = await gw.handle(key, "/v1/chat/completions", chat(max_tokens=2000))
        assert second.status == 200, json.dumps(second.body)

    asyncio.run(main())


def test_settle_and_slots_are_shared_through_redis(redis_url: str) -> None:
    """The Lua side of the same arithmetic: two gateways (two limiters) see one bucket and one
    set of slots; a refund never fills past capacity; a dead gateway's slot expires."""
    async def main() -> None:
        clock = FakeTime(1000.0)
        a, b = RateLimiter(redis_url, clock=clock.time), RateLimiter(redis_url, clock=clock.time)
        try:
            assert (await a.check("k", None, 100, 90)).allowed
            assert not (await b.check("k", None, 100, 20)).allowed  # one bucket: 10 left
            await a.settle("k", 100, 85)  # 90 reserved, 5 used
            assert (await b.check("k", None, 100, 20)).allowed
            await a.settle("k", 100, 1000)  # capped at capacity
            assert not (await b.check("k", None, 100, 101)).allowed
            assert await a.acquire("k", 2, "s1", 30) and await b.acquire("k", 2, "s2", 30)
            assert not await a.acquire("k", 2, "s3", 30)
            await b.release("k", "s2")
            assert await a.acquire("k", 2, "s3", 30)
            clock.now += 31  # s1 and s3 were held by gateways that never released them
            assert await b.acquire("k", 2, "s4", 30) and await b.acquire("k", 2, "s5", 30)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_non_streamed_request_the_client_cancels_is_billed_its_prompt_and_keeps_its_reservation() -> None:
    async def main() -> None:
        clock = FakeTime(1000.0)
        gw = gateway(FakeUpstream(latency_s=5.0), limiter=RateLimiter(None, clock=clock.time), tokens_per_minute=300)
        key = gw.keys.by_name("k")
        work = asyncio.ensure_future(gw.handle(key, "/v1/chat/completions", chat(max_tokens=200)))
        await asyncio.sleep(0.1)
        work.cancel()  # the edge does this when the client hangs up (until_disconnect)
        await asyncio.sleep(0.05)
        billed = gw.metrics.cost.labels("m", "m", "k")._value.get()
        assert 5 <= billed <= 40, billed  # the prompt as estimated: its bytes / 4
        # The ~210 reserved stay spent (what the engine made before the abort is unknown).
        assert (await gw.handle(key, "/v1/chat/completions", chat(max_tokens=200))).status == 429

    asyncio.run(main())
