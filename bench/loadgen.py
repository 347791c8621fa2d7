"""A bounded, seeded OpenAI streaming load generator (its own process, so it never shares an event
loop or a core's GIL with the server it measures).

    python -m bench.loadgen --url http://127.0.0.1:8000/v1 --model tiny --requests 200 --concurrency 16

Prints one JSON object: throughput and TTFT / end-to-end latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

from serve.sse_events import aiter_events

WORDS = [
    "order", "status", "refund", "account", "password", "delivery", "invoice", "price", "shipping",
    "return", "warranty", "address", "payment", "card", "login", "email", "phone", "store",
    "hours", "product", "size", "colour", "stock",
]


def prompts(n: int, seed: int, words: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + f" #{i}" for i in range(n)]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one(session: Any, url: str, headers: dict, body: dict, stream: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return {"ok": False, "status": resp.status}
        if not stream:
            data = await resp.json()
            e2e = time.perf_counter() - t0
            return {"ok": True, "ttft": e2e, "e2e": e2e,
                    "tokens": (data.get("usage") or {}).get("completion_tokens", 0)}
        async for event in aiter_events(resp.content.iter_any()):
            obj = event.json()
            if obj is None:  # [DONE]
                continue
            if obj.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"].get("completion_tokens", 0)
    e2e = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft if ttft is not None else e2e, "e2e": e2e, "tokens": tokens}


async def run(url: str, model: str, requests: int, concurrency: int, max_tokens: int, seed: int,
              api_key: str = "none", stream: bool = True, repeat_prompt: bool = False,
              temperature: float = 0.0, timeout_s: float = 600) -> dict[str, Any]:
    import aiohttp

    texts = prompts(1 if repeat_prompt else requests, seed)
    headers = {"Authorization": f"Bearer {api_key}"}
    endpoint = url.rstrip("/") + "/chat/completions"
    results: list[dict[str, Any]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {"model": model, "messages": [{"role": "user", "content": texts[i % len(texts)]}],
                        "max_tokens": max_tokens, "temperature": temperature, "stream": stream,
                        "ignore_eos": True}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                try:
                    results.append(await one(s, endpoint, headers, body, stream))
                except Exception as e:  # a failed request is a data point, not a crash
                    results.append({"ok": False, "status": type(e).__name__})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] * 1000 for r in ok]
    e2e = [r["e2e"] * 1000 for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": requests, "concurrency": concurrency, "ok": len(ok), "errors": len(results) - len(ok),
        "wall_s": wall, "req_per_s": len(ok) / wall, "out_tok_per_s": tokens / wall,
        "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "p99": pct(ttft, 99),
                    "mean": statistics.fmean(ttft) if ttft else float("nan")},
        "e2e_ms": {"p50": pct(e2e, 50), "p95": pct(e2e, 95), "p99": pct(e2e, 99)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="none")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--repeat-prompt", action="store_true", help="same prompt every time (cache hits)")
    a = p.parse_args(argv)
    out = asyncio.run(run(a.url, a.model, a.requests, a.concurrency, a.max_tokens, a.seed, a.api_key,
                          stream=not a.no_stream, repeat_prompt=a.repeat_prompt))
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
