"""Bounded soak: a few thousand requests at twice the configured concurrency against `llmserve run`.

    python -m bench.soak [--requests 3000] [--max-ongoing 16]

Starts llmserve (bench/config.yaml, with the model's max_ongoing_requests lowered so the overload
path is exercised), sends streaming and plain requests at 2 x that concurrency, and reports the
status codes seen (only 200, and the documented 429/503 with Retry-After, are acceptable), requests
still open at the end (must be 0), and the gateway process's memory at the start and the end.
Writes bench/results/soak-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.run import ROOT, free_port, stop, wait_ready


def rss_mb(pid: int) -> float:
    """Resident memory of the gateway process (the `llmserve run` process that serves HTTP)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def drive(base: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    import aiohttp

    codes: Counter[str] = Counter()
    missing_retry_after = 0
    open_requests = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal missing_retry_after, open_requests
        while not queue.empty():
            i = queue.get_nowait()
            stream = i % 2 == 0
            body = {"model": "tiny", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"soak {i}"}]}
            open_requests += 1
            try:
                async with session.post(f"{base}/chat/completions", json=body) as r:
                    await r.read()
                    codes[str(r.status)] += 1
                    if r.status in (429, 503):
                        if "Retry-After" not in r.headers:
                            missing_retry_after += 1
                        # A well-behaved client backs off (bounded here, so the soak stays short).
                        await asyncio.sleep(min(float(r.headers.get("Retry-After", 1)), 0.1))
            except Exception as e:
                codes[type(e).__name__] += 1
            finally:
                open_requests -= 1

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return {"codes": dict(codes), "missing_retry_after": missing_retry_after, "open_at_end": open_requests,
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--max-ongoing", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    port = free_port()
    env = {**os.environ, "LLMSERVE__MODELS__0__DEPLOYMENT__MAX_ONGOING_REQUESTS": str(a.max_ongoing)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "soak-llmserve.log", "w") as log:
        cmd = [sys.executable, "-m", "serve.cli", "run", "--config", str(ROOT / "bench" / "config.yaml"),
               "--port", str(port)]
        gw = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        wait_ready(base, "tiny", gw, 900, "llmserve")
        asyncio.run(drive(base, 200, 2 * a.max_ongoing, a.max_tokens))  # warm-up
        before = rss_mb(gw.pid)
        result = asyncio.run(drive(base, a.requests, 2 * a.max_ongoing, a.max_tokens))
        after = rss_mb(gw.pid)
    finally:
        stop(gw)
    ok = set(result["codes"]) <= {"200", "429", "503"} and result["missing_retry_after"] == 0
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "requests": a.requests,
              "concurrency": 2 * a.max_ongoing, "max_ongoing_requests": a.max_ongoing, **result,
              "gateway_rss_mb": {"start": before, "end": after, "growth": (after - before) / before},
              "only_documented_errors": ok}
    path = out / f"soak-{dt.datetime.now().strftime('%Y-%m-%d-%H%M')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if ok and result["open_at_end"] == 0 and report["gateway_rss_mb"]["growth"] < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
