"""Replays one workload (bench/workloads.py, as JSON) against one OpenAI base URL, in its own
process (never sharing an event loop with a server it measures), and prints one JSON line per run:
each request's TTFT, end-to-end time, send time and the replica that served it where the server
says (`x-llmserve-replica`).

    python -m bench.routing_load --url http://127.0.0.1:8000/v1 --workload w.json --salt run3 [--deadline-s 300]

Open loop: a request is sent at its time whatever happened to the others (a conversation's next
turn: its think time after the previous turn finished). Requests not finished by the deadline
count as failed ("deadline"), so an overloaded router cannot stretch its own measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.workloads import Request
from serve.sse_events import aiter_events


def load_requests(path: str) -> list[Request]:
    with open(path) as f:
        rows = json.load(f)
    return [Request(**{**r, "messages": tuple(tuple(m) for m in r["messages"])}) for r in rows]


async def one(session: Any, url: str, headers: dict[str, str], body: dict, t0: float) -> dict[str, Any]:
    sent = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    async with session.post(url, json=body, headers=headers) as resp:
        replica = resp.headers.get("x-llmserve-replica")
        if resp.status != 200:
            await resp.read()
            return {"ok": False, "status": resp.status, "sent_s": sent - t0}
        async for event in aiter_events(resp.content.iter_any()):
            obj = event.json()
            if obj is None:  # [DONE]
                continue
            if obj.get("choices") and ttft is None:
                ttft = time.perf_counter() - sent
            if obj.get("usage"):
                usage = obj["usage"]
    end = time.perf_counter()
    return {"ok": True, "ttft_s": ttft if ttft is not None else end - sent, "e2e_s": end - sent,
            "sent_s": sent - t0, "end_s": end - t0, "replica": replica,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


async def replay(url: str, reqs: list[Request], salt: str, deadline_s: float, api_key: str = "none"
                 ) -> dict[str, Any]:
    import aiohttp

    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    done = {r.id: asyncio.Event() for r in reqs}
    results: dict[int, dict[str, Any]] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=deadline_s + 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        t0 = time.perf_counter()

        async def send(r: Request) -> None:
            try:
                if r.after is not None:
                    await done[r.after].wait()
                    if not results.get(r.after, {}).get("ok"):
                        results[r.id] = {"ok": False, "status": "previous turn failed"}
                        return
                    await asyncio.sleep(r.at)
                else:
                    await asyncio.sleep(max(0.0, t0 + r.at - time.perf_counter()))
                results[r.id] = await one(s, endpoint, headers, r.body(salt), t0)
            except Exception as e:  # a failed request is a data point, not a crash
                results[r.id] = {"ok": False, "status": type(e).__name__}
            finally:
                done[r.id].set()

        tasks = [asyncio.create_task(send(r)) for r in reqs]
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    rows = []
    for r in reqs:
        res = results.get(r.id) or {"ok": False, "status": "deadline"}
        rows.append({"id": r.id, "group": r.group, "model": r.model, **res})
    return {"wall_s": wall, "requests": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--workload", required=True, help="JSON list of bench.workloads.Request fields")
    p.add_argument("--salt", default="")
    p.add_argument("--deadline-s", type=float, default=600)
    p.add_argument("--api-key", default="none")
    a = p.parse_args(argv)
    out = asyncio.run(replay(a.url, load_requests(a.workload), a.salt, a.deadline_s, a.api_key))
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
