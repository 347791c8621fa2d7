"""EventStream (serve/gateway/app.py): a streamed answer on the wire, without Starlette's task group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from serve.gateway.app import EventStream, StreamTiming
from serve.gateway.metrics import Metrics


def test_a_client_that_leaves_stops_the_stream_and_closes_the_engine_side():
    """The client hangs up after three chunks: no more are relayed, the chunks' generator is closed
    (that is what closes the engine connection, so vLLM aborts), and the stream ends normally."""
    closed: list[bool] = []
    sent: list[dict] = []

    async def scenario() -> None:
        leave = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                for i in range(100):
                    yield b"data: %d\n\n" % i
                    await asyncio.sleep(0.005)
            finally:
                closed.append(True)

        async def receive() -> dict:
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if len(sent) == 4:  # the start and three chunks
                leave.set()

        await EventStream(chunks(), 200, {"x-llmserve-route": "a"})({"type": "http"}, receive, send)

    asyncio.run(scenario())
    assert closed == [True]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert 3 <= len(bodies) <= 4, len(bodies)
    assert all(m["more_body"] for m in bodies)


def test_a_whole_stream_goes_out_timed_with_its_headers():
    """A server answers every receive with a disconnect once the last byte is out (uvicorn does):
    that must not cancel anything. Every chunk goes out, then the end, and the timing is taken."""
    metrics = Metrics()
    sent: list[dict] = []

    async def scenario() -> None:
        done = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                await asyncio.sleep(0.01)
                yield b"data: %d\n\n" % i

        async def receive() -> dict:
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message["more_body"]:
                done.set()

        timing = StreamTiming(metrics, "r", "m", time.perf_counter())
        await EventStream(chunks(), 200, {"x-llmserve-route": "r"}, timing)({"type": "http"}, receive, send)
        await asyncio.sleep(0.02)  # a late watcher would cancel nothing now: the call has returned

    asyncio.run(scenario())
    start, *bodies = sent
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-llmserve-route", b"r") in start["headers"]
    assert [m["body"] for m in bodies] == [b"data: %d\n\n" % i for i in range(5)] + [b""]
    labels = {"route": "r", "model": "m"}
    assert metrics.registry.get_sample_value("llmserve_time_to_first_token_seconds_count", labels) == 1
    assert metrics.registry.get_sample_value("llmserve_request_latency_seconds_count", labels) == 1
    assert metrics.registry.get_sample_value("llmserve_time_per_output_token_seconds_count", labels) == 1

