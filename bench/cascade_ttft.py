"""Time to first token of streamed requests on a cascade route, decided on the whole student
answer versus on its first k tokens (`cascade.decide_after_tokens`). Starts nothing: it measures a
running gateway whose config has two cascade routes over the same student and teacher, one with
`decide_after_tokens` and one without (run this after `llmserve run` or `make bench`'s gateway):

    python -m bench.cascade_ttft --url http://127.0.0.1:8000/v1 --whole assistant --prefix assistant-k8

Per route and concurrency (1 and 4 by default): TTFT p50/p95, end-to-end p50, and the share
escalated to the teacher (x-llmserve-escalated), since an escalated request's TTFT includes the student's
k tokens (or whole answer) and then the teacher's first token. One JSON object on stdout, a table
on stderr. Requests end at the model's own EOS (no ignore_eos): an answer forced to max_tokens
would be escalated by escalate_on_length on the whole-answer route and not on the prefix route.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.loadgen import pct, prompts
from serve.sse_events import aiter_events


async def one(session: Any, url: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return {"ok": False, "status": resp.status}
        served_by = resp.headers.get("x-llmserve-served-by", "")
        escalated = "x-llmserve-escalated" in resp.headers
        async for event in aiter_events(resp.content.iter_any()):
            if ttft is None and (event.json() or {}).get("choices"):  # json() is None for [DONE]
                ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    return {"ok": True, "ttft": ttft if ttft is not None else e2e, "e2e": e2e, "served_by": served_by,
            "escalated": escalated}


async def measure(url: str, route: str, requests: int, concurrency: int, max_tokens: int, seed: int,
                  api_key: str) -> dict[str, Any]:
    import aiohttp

    texts = prompts(requests, seed)
    headers = {"Authorization": f"Bearer {api_key}"}
    endpoint = url.rstrip("/") + "/chat/completions"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                # temperature > 0 keeps the head cache out of it (a hit has no student to wait for).
                body = {"model": route, "messages": [{"role": "user", "content": texts[i]}],
                        "max_tokens": max_tokens, "temperature": 0.7, "seed": seed + i, "stream": True}
                try:
                    results.append(await one(s, endpoint, headers, body))
                except Exception as e:  # a failed request is a data point, not a crash
                    results.append({"ok": False, "status": type(e).__name__})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] * 1000 for r in ok]
    served = [r["served_by"] for r in ok]
    return {"route": route, "concurrency": concurrency, "ok": len(ok), "errors": len(results) - len(ok),
            "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
            "e2e_ms": {"p50": pct([r["e2e"] * 1000 for r in ok], 50)},
            "escalated_share": sum(r["escalated"] for r in ok) / len(ok) if ok else 0.0,
            "served_by": sorted(set(served))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the gateway's /v1 base URL")
    p.add_argument("--whole", required=True, help="cascade route decided on the whole student answer")
    p.add_argument("--prefix", required=True, help="the same cascade with decide_after_tokens")
    p.add_argument("--requests", type=int, default=40, help="per route and concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="none")
    a = p.parse_args(argv)
    rows = [asyncio.run(measure(a.url, route, a.requests, conc, a.max_tokens, a.seed, a.api_key))
            for conc in a.concurrency for route in (a.whole, a.prefix)]
    print(f"{'route':<24}{'conc':>5}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}{'e2e p50 ms':>12}{'teacher %':>11}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['route']:<24}{r['concurrency']:>5}{r['ttft_ms']['p50']:>13.1f}{r['ttft_ms']['p95']:>13.1f}"
              f"{r['e2e_ms']['p50']:>12.1f}{100 * r['escalated_share']:>10.0f}%", file=sys.stderr)
    json.dump({"cascade_ttft": rows}, sys.stdout)
    print()
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
