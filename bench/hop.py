"""The gateway's own cost per request and per relayed chunk, with no engine and no Ray.

    python -m bench.hop [--requests 3000] [--concurrency 64] [--max-tokens 32] [--spy]

A stand-in engine (its own process: vLLM's SSE shapes, every token at once) answers the gateway
that `llmserve run` serves (build_gateway on uvloop, its own process, the embedded default
configuration with the stand-in as model `tiny`'s only replica). The load generator of `make
bench` drives it, held until both are up. Prints the gateway's CPU per request and per chunk, and
the stand-in's for scale; with --spy, py-spy's top functions of the gateway meanwhile.

On the real stack the engine shares the cores, so each millisecond here is one the engine loses
(bench/README.md, "Where the time goes"); this isolates the part of that we own, for changes to
the relay path to be measured in seconds, not in a `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.procs import cpu_ms_per_request, cpu_seconds
from bench.run import ROOT, free_port, run_load, start_load
from serve.sse_events import DONE, encode

SECRET = "bench-hop-engine-secret-0123456789"


def sse(obj: dict[str, Any]) -> bytes:
    return encode(json.dumps(obj, separators=(",", ":")))


def engine_main(port: int, step_s: float) -> None:
    """vLLM's chat stream, shape for shape: a role chunk, one chunk a token (one engine step of
    `step_s` apart, so each reaches the gateway on its own as vLLM's do), the finish, the usage
    chunk when asked for, [DONE]."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or 16)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-hop", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        await resp.write(sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]}))
        for i in range(n):
            await asyncio.sleep(step_s)
            await resp.write(sse({**base, "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "logprobs": None,
                                                       "finish_reason": None}]}))
        await resp.write(sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": "length"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(sse({**base, "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": n,
                                                                   "total_tokens": 30 + n}}))
        await resp.write(DONE)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def gateway_main(port: int, engine_url: str) -> None:
    from serve.config import load_config
    from serve.gateway.server import build_gateway, gateway_uvicorn_config, listen, run_event_loop

    config = load_config(None)
    config.gateway.port = port
    config.gateway.metrics_port = free_port()
    config.batch.enabled = False
    snapshot = {"tiny": [("tiny#hop", engine_url)]}

    async def fetch() -> dict[str, list[tuple[str, str]]]:
        return snapshot

    import uvicorn

    app = build_gateway(config, fetch)
    server = uvicorn.Server(gateway_uvicorn_config(app, config))
    run_event_loop(server.serve(sockets=listen(app, config)))


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def spy(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(exe), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
                             "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top(path: Path, n: int = 25) -> list[tuple[int, str]]:
    """Inclusive samples per function (each function counted once a stack), most first."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        for frame in set(stack.split(";")):
            counts[frame] = counts.get(frame, 0) + int(k)
    return sorted(((v, f) for f, v in counts.items()), reverse=True)[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=20.0, help="the stand-in engine's time per token")
    p.add_argument("--spy", action="store_true", help="py-spy the gateway during the load (200 Hz)")
    p.add_argument("--role", choices=["engine", "gateway"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--engine-url", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role == "engine":
        engine_main(a.port, a.step_ms / 1000)
        return 0
    if a.role == "gateway":
        gateway_main(a.port, a.engine_url)
        return 0
    env = {**os.environ, "LLMSERVE_ENGINE_SECRET": SECRET, "LLMSERVE_CACHE_DIR": str(ROOT / "bench/results/hop")}
    eport, gport = free_port(), free_port()
    me = [sys.executable, "-m", "bench.hop"]
    procs = [subprocess.Popen([*me, "--role", "engine", "--port", str(eport), "--step-ms", str(a.step_ms)],
                              cwd=ROOT, env=env)]
    try:
        wait_port(eport, procs[0])
        procs.append(subprocess.Popen([*me, "--role", "gateway", "--port", str(gport),
                                       "--engine-url", f"http://127.0.0.1:{eport}"], cwd=ROOT, env=env))
        wait_port(gport, procs[1])
        base = f"http://127.0.0.1:{gport}/v1"
        run_load(start_load(base, "tiny", 200, a.concurrency, a.max_tokens, 1))  # warm-up
        gw, eng = psutil.Process(procs[1].pid), psutil.Process(procs[0].pid)
        load = start_load(base, "tiny", a.requests, a.concurrency, a.max_tokens, 0)
        spied = spy(gw.pid, 600, ROOT / "bench/results/hop-gateway.txt") if a.spy else None
        before = {"gateway": cpu_seconds(gw), "engine": cpu_seconds(eng, "engine")}
        started = time.monotonic()
        res = run_load(load)
        wall = time.monotonic() - started
        after = {"gateway": cpu_seconds(gw), "engine": cpu_seconds(eng, "engine")}
        if spied is not None:
            spied.send_signal(2)
            spied.wait(60)
        chunks = a.max_tokens + 4  # role, tokens, finish, usage (the client asks for it), [DONE]
        out: dict[str, Any] = {"requests_ok": res["ok"], "errors": res.get("errors"),
                               "req_s": round(res["ok"] / wall, 1), "concurrency": a.concurrency,
                               "max_tokens": a.max_tokens, "step_ms": a.step_ms}
        for name in ("gateway", "engine"):
            ms = cpu_ms_per_request(before[name], after[name], res["ok"])["total"]
            out[f"{name}_cpu_ms_per_request"] = ms
            out[f"{name}_cpu_us_per_chunk"] = round(ms * 1000 / chunks, 1)
        print(json.dumps(out, indent=1))
        if spied is not None:
            for k, f in top(ROOT / "bench/results/hop-gateway.txt"):
                print(f"{k:7d}  {f}")
        return 0 if res["ok"] == a.requests else 1
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
