"""The benchmark's CPU accounting and per-round ratios (bench/run.py, bench/report.py): a real load
generator process against a small streaming server on a thread of this process."""

from __future__ import annotations

import json
import time
from typing import Any

import psutil
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench import report
from bench.run import loadgen
from serve.config import Config
from serve.gateway.server import serving_on_thread

CONFIG = Config.model_validate({"models": [{"name": "m", "source": "builtin://tiny", "accelerator": "cpu"}],
                                "gateway": {"port": 0, "metrics_port": 0, "drain_timeout_s": 1}})
SPIN_S = 0.02  # CPU this server burns per request, so its share is known


async def chat(request: Request) -> StreamingResponse:
    await request.body()
    end = time.thread_time() + SPIN_S
    while time.thread_time() < end:
        pass

    async def events() -> Any:
        yield b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        yield b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n'
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def test_a_load_reports_the_servers_cpu_per_request_by_role() -> None:
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with serving_on_thread(app, CONFIG) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        res = loadgen(f"http://127.0.0.1:{port}/v1", "m", 40, 4, 1, 0, server=psutil.Process(), role="stand-in")
    assert (res["ok"], res["errors"]) == (40, 0)
    cpu = res["cpu_ms_per_request"]
    # This process is the tree's root: its role gets the spin (20 ms) plus its HTTP work, which
    # on this machine is a few ms, never 30.
    assert SPIN_S * 1000 <= cpu["stand-in"] < SPIN_S * 1000 + 30, cpu
    # The tree is this process's: in the full run it also holds the integration session's Ray,
    # whose processes are charged under their own roles, never the stand-in's.
    assert cpu["total"] >= cpu["stand-in"]
    assert set(cpu) >= {"stand-in", "total", "load generator", "machine"}
    assert 0 < cpu["load generator"] < cpu["machine"], cpu
    assert cpu["machine"] >= cpu["total"]
    # Cores busy on average over the load: at most every core (jiffies and the two clocks being
    # read a moment apart can put it a little over).
    assert 0 < res["busy_cores"] < psutil.cpu_count() + 0.25


def test_summary_has_each_rounds_ratio_and_median_cpu() -> None:
    def run(rps: float, cpu: float) -> dict[str, Any]:
        return {"req_per_s": rps, "out_tok_per_s": rps * 32, "errors": 0,
                "ttft_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0}, "e2e_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                "cpu_ms_per_request": {"total": cpu, "gateway": cpu / 2, "machine": cpu + 1, "load generator": 1.0}}

    rounds = {"bare": {4: [run(10, 4), run(20, 6), run(10, 5)]},
              "llmserve": {4: [run(9, 8), run(10, 9), run(11, 7)]}}
    row = report.summarize(rounds)[4]
    assert row["ratio_per_round"] == [0.9, 0.5, 1.1]
    assert row["ratio"]["req_per_s"] == 10 / 10
    assert row["llmserve"]["cpu_ms_per_request"] == {"gateway": 4.0, "load generator": 1.0, "machine": 9.0,
                                                     "total": 8.0}
    table = report.cpu_table({4: row})
    assert "c=  4 llmserve: total 8.00 ms (machine 9.00, load generator 1.00): gateway 4.00" in table
    json.dumps(row)  # what report.write stores
