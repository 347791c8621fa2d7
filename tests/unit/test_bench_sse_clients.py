"""The benches' streaming clients read TTFT at the first event with choices, and the usage chunk's
token count, however the stream is cut into writes (they share serve/sse_events.py's reader)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from bench import cascade_ttft, loadgen

DELAY_S = 0.2  # each pause in the stream
ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
TOKEN = {"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None}
USAGE = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 7}}


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"  # CRLF, as a proxy may rewrite it


async def _stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b": comment, no choices\n\n" + b'data: {"id": "x", "choices": []}\n\n')
    await asyncio.sleep(DELAY_S)
    first = _data(ROLE)
    # The first event in two writes: TTFT is taken once it is whole, not at its first byte.
    await resp.write(first[:9])
    await asyncio.sleep(DELAY_S)
    await resp.write(first[9:])
    await asyncio.sleep(DELAY_S)  # TTFT is read before this, the end after
    await resp.write(_data(TOKEN)[:20])
    await resp.write(_data(TOKEN)[20:] + _data(USAGE) + b"data: [DONE]\n\n")
    return resp


async def _measure() -> tuple[dict[str, Any], dict[str, Any]]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as s:
            a = await loadgen.one(s, url, {}, {"stream": True}, True)
            b = await cascade_ttft.one(s, url, {}, {"stream": True})
    finally:
        await runner.cleanup()
    return a, b


def test_ttft_is_the_first_whole_event_with_choices_and_tokens_come_from_usage():
    a, b = asyncio.run(_measure())
    for r in (a, b):
        assert r["ok"] is True
        # The pause before the first event with choices and the one inside it count; the pause
        # after it does not (with its end lost, TTFT would come from the next one, a pause later).
        assert 2 * DELAY_S <= r["ttft"] < 3 * DELAY_S <= r["e2e"], r
    assert a["tokens"] == 7
