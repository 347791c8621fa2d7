"""Side-by-side benchmark: bare `vllm serve` and llmserve on the same model and engine settings.

    make bench            # or: python -m bench.run [--concurrency 1 4 16 64] [--rounds 2]

Starts both servers on this machine, drives the same seeded load at each in alternation (the
load generator is a separate process), and writes bench/results/<date>.json and a PNG plot.
On a GPU machine pass `--model-path` (a real checkpoint) and `--config` with the same engine
arguments; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench import procs, report

# Bare vLLM runs with the environment llmserve gives its CPU engines: the same engine, both ways.
from serve.engine.deployments import CPU_ENV

ROOT = Path(__file__).resolve().parents[1]
# The role of each system's root process in the CPU breakdown (bench/procs.py classify).
ROLES = {"bare": "vLLM API server", "llmserve": "gateway"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, model: str, proc: subprocess.Popen, timeout_s: float, name: str, *,
               path: str = "/completions", headers: dict[str, str] | None = None,
               body: dict[str, Any] | None = None, interval_s: float = 1.0) -> float:
    """Ready means a real request went through (not just an open port); the seconds from this call.
    The probe: POST `body` (default: a one-token completion of `model`) to `base` + `path`, JSON,
    with `headers` besides (a key, for a server that wants one), every `interval_s`."""
    started = time.monotonic()
    data = json.dumps(body if body is not None else {"model": model, "prompt": "hi", "max_tokens": 1}).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see its log")
        try:
            req = urllib.request.Request(f"{base}{path}", data=data, headers=sent)
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{name} not ready after {timeout_s:.0f}s")
        time.sleep(interval_s)


# bench.loadgen, its imports done first, then held until told to go: the load (and any window
# measured around it) starts with the requests, not with an interpreter, which takes seconds of
# CPU on a busy 2-core box that would otherwise be charged to the server's idle daemons. It
# prints its own CPU seconds for the load after the result.
LOADGEN = ("import json, sys, time, aiohttp, bench.loadgen as g; print('ready', flush=True); sys.stdin.readline(); "
           "t = time.process_time(); rc = g.main(sys.argv[1:]); "
           "print(json.dumps({'cpu_s': time.process_time() - t}), flush=True); sys.exit(rc)")


def start_load(base: str, model: str, requests: int, conc: int, max_tokens: int, seed: int, *extra: str
               ) -> subprocess.Popen:
    """A load generator, imported and waiting: run_load starts it."""
    load = subprocess.Popen([sys.executable, "-c", LOADGEN, "--url", base, "--model", model,
                             "--requests", str(requests), "--concurrency", str(conc), "--max-tokens", str(max_tokens),
                             "--seed", str(seed), *extra],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert load.stdout is not None
    if load.stdout.readline().strip() != "ready":
        load.kill()
        raise RuntimeError("bench.loadgen did not start")
    return load


def run_load(load: subprocess.Popen) -> dict[str, Any]:
    """Let a started load generator go; its result, with `loadgen_cpu_s` (its own CPU)."""
    try:
        out, _ = load.communicate("go\n", timeout=900)
    finally:
        if load.poll() is None:
            load.kill()
    if load.returncode != 0:
        raise RuntimeError(f"bench.loadgen exited with {load.returncode}")
    *_, result, cpu = out.strip().splitlines()
    return {**json.loads(result), "loadgen_cpu_s": json.loads(cpu)["cpu_s"]}


def loadgen(base: str, model: str, requests: int, conc: int, max_tokens: int, seed: int, *extra: str,
            server: psutil.Process | None = None, role: str = "gateway") -> dict[str, Any]:
    """One load; with `server`, also the CPU its process tree spent on it, by role, in ms per
    completed request (`cpu_ms_per_request`: `total` is the tree's, `load generator` the client's,
    `machine` every process's on every core; `busy_cores`: the cores in use on average)."""
    load = start_load(base, model, requests, conc, max_tokens, seed, *extra)
    before = procs.cpu_seconds(server, role) if server else {}
    busy0, t0 = procs.machine_busy_s(), time.monotonic()
    res = run_load(load)
    if server is not None:
        after, machine_s = procs.cpu_seconds(server, role), procs.machine_busy_s() - busy0
        res["cpu_ms_per_request"] = procs.cpu_ms_per_request(
            before, after, res["ok"], {"load generator": res["loadgen_cpu_s"], "machine": machine_s})
        res["busy_cores"] = round(machine_s / max(time.monotonic() - t0, 1e-9), 2)
    return res


def stop(proc: subprocess.Popen | None, timeout_s: float = 60) -> float:
    """Stop a server the way a service manager does (SIGTERM to its whole process group, as
    systemd's control-group kill or `kill -TERM -<pgid>`) and return the seconds it took; SIGKILL
    to the group if it does not stop in time. (`llmserve run` keeps Ray's daemons in a session of
    their own, serve/engine/head.py, so the signal reaches only its driver; issue 25.)"""
    if proc is None or proc.poll() is not None:
        return 0.0
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "bench" / "config.yaml"), help="llmserve config (model `tiny`)")
    p.add_argument("--model-path", help="checkpoint for bare vLLM (default: the tiny model llmserve builds)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=12, help="requests = this x concurrency")
    p.add_argument("--min-requests", type=int, default=40)
    p.add_argument("--max-requests", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    from serve.config import load_config
    from serve.engine.models import resolve_source

    cfg = load_config(a.config)
    spec = cfg.model("tiny")
    assert spec is not None, "the benchmark config must define model `tiny`"
    model_path = a.model_path or resolve_source(spec)
    logs = Path(a.out)
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(CPU_ENV if spec.accelerator == "cpu" else {})}
    bare_port, gw_port = free_port(), free_port()
    engine = spec.engine.to_kwargs()
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(bare_port),
                "--disable-uvicorn-access-log"]
    for k, v in engine.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            vllm_cmd += [flag] if v else []
        else:
            vllm_cmd += [flag, str(v)]
    bare = gw = None
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": model_path,
        "engine_args": engine, "max_tokens": a.max_tokens, "rounds": a.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": [],
    }
    try:
        with open(logs / "bare-vllm.log", "w") as blog, open(logs / "llmserve.log", "w") as glog:
            bare = subprocess.Popen(vllm_cmd, env=env, stdout=blog, stderr=subprocess.STDOUT, start_new_session=True)
            gw = subprocess.Popen([sys.executable, "-m", "serve.cli", "run", "--config", a.config, "--port",
                                   str(gw_port)], cwd=ROOT, env=env, stdout=glog, stderr=subprocess.STDOUT,
                                  start_new_session=True)
            bases = {"bare": f"http://127.0.0.1:{bare_port}/v1", "llmserve": f"http://127.0.0.1:{gw_port}/v1"}
            results["ready_s"] = {"bare": wait_ready(bases["bare"], "tiny", bare, 600, "bare vLLM"),
                                  "llmserve": wait_ready(bases["llmserve"], "tiny", gw, 900, "llmserve")}
            print(f"ready: {results['ready_s']}", flush=True)
            servers = {"bare": psutil.Process(bare.pid), "llmserve": psutil.Process(gw.pid)}
            for system in ("bare", "llmserve"):  # warm-up, not measured
                loadgen(bases[system], "tiny", 32, 16, a.max_tokens, 999)
            rounds: dict[str, dict[int, list[dict[str, Any]]]] = {"bare": {}, "llmserve": {}}
            for r in range(a.rounds):
                for conc in a.concurrency:
                    n = max(a.min_requests, min(a.max_requests, a.requests_per_stream * conc))
                    order = ("bare", "llmserve") if r % 2 == 0 else ("llmserve", "bare")
                    for system in order:
                        res = loadgen(bases[system], "tiny", n, conc, a.max_tokens, r * 100 + conc,
                                      server=servers[system], role=ROLES[system])
                        res.update(system=system, round=r)
                        results["runs"].append(res)
                        rounds[system].setdefault(conc, []).append(res)
                        cpu = res["cpu_ms_per_request"]
                        print(f"round {r} c={conc:>3} {system:>8}: {res['req_per_s']:7.1f} req/s  "
                              f"TTFT p50 {res['ttft_ms']['p50']:7.1f} ms  errors {res['errors']}  "
                              f"CPU/request {cpu['total']:.1f} ms (machine {cpu['machine']:.1f}, "
                              f"{res['busy_cores']:.2f} cores busy)", flush=True)
            results["summary"] = report.summarize(rounds)
            # Cache: the same deterministic request (hits after the first) against unique ones (misses).
            hit = loadgen(bases["llmserve"], "tiny-cached", 200, 1, a.max_tokens, 7, "--no-stream",
                          "--repeat-prompt")
            miss = loadgen(bases["llmserve"], "tiny-cached", 40, 1, a.max_tokens, 8, "--no-stream")
            results["cache"] = {"hit_p50_ms": hit["e2e_ms"]["p50"], "hit_p95_ms": hit["e2e_ms"]["p95"],
                                "miss_p50_ms": miss["e2e_ms"]["p50"], "miss_p95_ms": miss["e2e_ms"]["p95"]}
    finally:
        stop(gw)
        stop(bare)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    jpath, ppath = report.write(results, Path(a.out), stamp)
    print(json.dumps({str(k): {"ratio_req_per_s": v["ratio"]["req_per_s"],
                               "ratio_per_round": [round(x, 2) for x in v["ratio_per_round"]],
                               "ratio_ttft_p50": v["ratio"]["ttft_p50_ms"],
                               "added_ttft_p50_ms": v["added_ttft_p50_ms"]}
                      for k, v in results["summary"].items()}, indent=1))
    print("CPU ms per completed request (medians):\n" + report.cpu_table(results["summary"]))
    print(f"cache: {results['cache']}")
    print(f"wrote {jpath} and {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
