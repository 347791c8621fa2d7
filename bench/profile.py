"""Where the time goes in `llmserve run` under load (issue 17): py-spy on each Python process, CPU per request.

    python -m bench.profile [--config bench/config.yaml] [--concurrency 64] [--requests 600] [--seconds 20]

Starts `llmserve run` as bench/run.py does and drives a streaming load (its own process) while one
`py-spy record --nonblocking` samples each Python process of the stack; Ray's C++ daemons are not
sampled, but every process of the tree is charged its CPU over the load, by role, per completed
request. Writes <out>/profile.json and one collapsed-stack file per sampled process (<out>/<name>.txt,
for flamegraph.pl or speedscope), and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.procs import BINARIES, become_subreaper, classify, cmdline, cpu_ms_per_request, cpu_seconds, leftovers, tree
from bench.run import CPU_ENV, ROOT, free_port, loadgen, run_load, start_load, stop, wait_ready

# Roles that run Python, so py-spy can read them (the daemons in BINARIES cannot be).
SAMPLED = ("gateway", "engine replica", "engine core", "VLLM::Worker", "Serve controller", "dashboard agent")
# Stack groups by a frame's top-level package. py-spy names a file by its package path
# ("ray/serve/_private/replica.py", "serve/gateway/app.py"), so the first component tells ours
# ("serve") from Ray Serve's and from vLLM's own "vllm/entrypoints/serve/".
GROUPS: dict[str, tuple[str, ...]] = {
    "serve/ (ours)": ("serve",), "ray/": ("ray",), "vllm/": ("vllm",), "uvicorn/": ("uvicorn",),
    "starlette/": ("starlette",), "httpx/httpcore": ("httpx", "httpcore"), "h11/": ("h11",),
    "httptools/": ("httptools",), "asyncio/uvloop": ("asyncio", "uvloop"),
}
SUBSTRING_GROUPS = ("json", "pydantic")  # json, orjson, ujson; pydantic, pydantic_core
# A leaf that waits (a selector, Condition.wait): the thread is idle, not working. Not in asyncio/:
# a coroutine on top of a stack is running (sleep() arming its timer); a waiting one is on none.
IDLE = re.compile(r"(?:^|_)(?:select|e?poll|wait|sleep)")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse_frame(frame: str) -> tuple[str, str]:
    """("Replica.handle", "ray/serve/_private/replica.py") from "Replica.handle (ray/serve/_private/replica.py:10)"."""
    m = FRAME.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def package(file: str) -> str:
    """A file's top-level package; also with --full-filenames paths (after the last site-packages/)."""
    return file.rsplit("site-packages/", 1)[-1].split("/", 1)[0]


def frame_groups(file: str) -> set[str]:
    top = package(file)
    return {g for g, tops in GROUPS.items() if top in tops} | {s for s in SUBSTRING_GROUPS if s in top}


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Totals of py-spy's raw (collapsed) output: "frame;...;leaf count" a line. Self samples are
    by function (the line numbers of one function merged); a group's share counts a sample once
    however many of its frames the group has; `idle` counts samples whose leaf waits."""
    total = 0
    leaves: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count, frames = int(n), [parse_frame(f) for f in stack.split(";")]
        total += count
        func, file = frames[-1]
        leaves[f"{func} ({file})"] += count
        hit: set[str] = set()
        for _, f in frames:
            hit |= frame_groups(f)
        for g in hit:
            groups[g] += count
        if IDLE.search(func.rsplit(".", 1)[-1].lower()) and package(file) != "asyncio":
            groups["idle"] += count

    def share(k: int) -> float:
        return round(k / total, 4) if total else 0.0

    return {"samples": total,
            "top_self": [{"function": f, "samples": k, "share": share(k)} for f, k in leaves.most_common(top)],
            "groups": {g: share(groups[g]) for g in [*GROUPS, *SUBSTRING_GROUPS, "idle"]}}


def discover(root: psutil.Process) -> dict[str, int]:
    """The processes to sample (and Ray's daemons, to report): a file-friendly name for each role
    -> pid; a second process of a role gets its pid appended."""
    found: dict[str, int] = {}
    for proc in tree(root):
        label = classify(cmdline(proc), proc.pid == root.pid)
        if label in SAMPLED or label in BINARIES:
            name = label.lower().replace("::", "-").replace(" ", "-")
            found[name if name not in found else f"{name}-{proc.pid}"] = proc.pid
    return found


def measure(a: argparse.Namespace, spy: str, base: str, root: psutil.Process, targets: dict[str, int],
            helpers: list[subprocess.Popen]) -> dict[str, Any]:
    """The load (its own process), one py-spy per target meanwhile, the tree's CPU around the load."""
    out = Path(a.out)
    load = start_load(base, "tiny", a.requests, a.concurrency, a.max_tokens, 0)
    helpers.append(load)
    spies = {}
    for name, pid in targets.items():
        with open(out / f"{name}.py-spy.log", "w") as spy_log:
            spies[name] = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(a.seconds),
                                            "--rate", str(a.rate), "--format", "raw", "--nonblocking",
                                            "--output", str(out / f"{name}.txt")],
                                           stdout=spy_log, stderr=subprocess.STDOUT)
            helpers.append(spies[name])
    # py-spy attaches first; the CPU window is the load's alone.
    before = cpu_seconds(root)
    started = sampling = time.monotonic()
    res = run_load(load)
    load_s = time.monotonic() - started
    after = cpu_seconds(root)
    for sp in spies.values():  # a load shorter than --seconds ends the sampling too (py-spy writes on SIGINT)
        if sp.poll() is None:
            sp.send_signal(signal.SIGINT)
    spy_rc = {name: sp.wait(60) for name, sp in spies.items()}
    window_s = min(float(a.seconds), time.monotonic() - sampling)
    result: dict[str, Any] = {
        "load": res, "cpu_window_s": load_s, "sample_window_s": window_s, "profiles": {},
        "cpu_ms_per_request": cpu_ms_per_request(before, after, res["ok"])}
    for name, rc in spy_rc.items():
        path = out / f"{name}.txt"
        summary = summarize_collapsed(path.read_text() if path.exists() else "")  # none: see py_spy_rc, its log
        # Samples with --idle off are busy-thread samples: over rate x window, the busy fraction
        # of one thread (above 1 when several threads work at once).
        summary.update(pid=targets[name], py_spy_rc=rc, busy=round(summary["samples"] / (a.rate * window_s), 3))
        log = (out / f"{name}.py-spy.log").read_text(errors="replace").splitlines()  # e.g. "2.3s behind in sampling"
        summary["py_spy_warnings"] = [ln for ln in log if "behind in sampling" in ln or ln.startswith("Error")]
        result["profiles"][name] = summary
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "bench" / "config.yaml"), help="llmserve config (model `tiny`)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seconds", type=int, default=20, help="py-spy's window at most (it ends with the load)")
    # py-spy's default is 100 a second; at that rate six samplers on two cores fell 15 s behind
    # and took a third of the load's throughput from the stack they measured.
    p.add_argument("--rate", type=int, default=20, help="py-spy samples a second per process")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile"))
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # the venv's, not on PATH
    if not Path(spy).exists():
        sys.exit("py-spy not found: `pip install py-spy` into this environment (.venv/bin/pip install py-spy)")
    from serve.config import load_config

    spec = load_config(a.config).model("tiny")
    assert spec is not None, "the benchmark config must define model `tiny`"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    t0 = time.time()
    env = {**os.environ, **(CPU_ENV if spec.accelerator == "cpu" else {})}
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    gw = None
    helpers: list[subprocess.Popen] = []  # the load and the py-spys: stopped in `finally` if still running
    result: dict[str, Any] = {"config": a.config, "concurrency": a.concurrency, "requests": a.requests,
                              "max_tokens": a.max_tokens, "seconds": a.seconds, "rate": a.rate}
    try:
        with open(out / "llmserve.log", "w") as log:
            gw = subprocess.Popen([sys.executable, "-m", "serve.cli", "run", "--config", a.config, "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        result["ready_s"] = wait_ready(base, "tiny", gw, 900, "llmserve")
        loadgen(base, "tiny", 32, 16, a.max_tokens, 999)  # warm-up, not measured
        root = psutil.Process(gw.pid)
        result["pids"] = found = discover(root)
        print("found: " + ", ".join(f"{k}={v}" for k, v in found.items()), flush=True)
        targets = {name: pid for name, pid in found.items() if not name.startswith(BINARIES)}  # C++: CPU only
        result.update(measure(a, spy, base, root, targets, helpers))
    finally:
        for h in helpers:
            if h.poll() is None:
                h.kill()
                h.wait(10)
        stopping = time.monotonic()
        stop(gw)
        # As subreaper, the run's orphans are our descendants. A Ray worker takes a moment to see
        # its raylet go: what is still there after 10 s is left behind.
        left = leftovers(t0, orphans=False)
        while left and time.monotonic() - stopping < 10:
            time.sleep(0.5)
            left = leftovers(t0, orphans=False)
        result["stopped_s"] = round(time.monotonic() - stopping, 1)
        result["leftovers"] = [f"{proc.pid} {cmdline(proc)[:100]}" for proc in left]
        for proc, what in zip(left, result["leftovers"], strict=True):
            print(f"LEFT RUNNING, killed: {what}", flush=True)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        (out / "profile.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {out / 'profile.json'} and the collapsed stacks next to it")
    return 0


def print_table(r: dict[str, Any]) -> None:
    load = r["load"]
    print(f"\nload: {load['ok']} ok, {load['errors']} errors, {load['req_per_s']:.1f} req/s, "
          f"TTFT p50 {load['ttft_ms']['p50']:.1f} ms, over {load['wall_s']:.1f}s (CPU window {r['cpu_window_s']:.1f}s, "
          f"sampled {r['sample_window_s']:.1f}s)")
    print("\nCPU ms per completed request:")
    for label, ms in r["cpu_ms_per_request"].items():
        print(f"  {label:<20} {ms:8.2f}")
    for name, prof in r["profiles"].items():
        print(f"\n{name} (pid {prof['pid']}): {prof['samples']} samples, busy {prof['busy']:.2f} of a thread"
              + ("" if prof["py_spy_rc"] == 0 else f", py-spy exit {prof['py_spy_rc']}"))
        for w in prof["py_spy_warnings"]:
            print(f"  {w}")
        if not prof["samples"]:
            continue
        print("  stacks with: " + ", ".join(f"{g} {v:.0%}" for g, v in prof["groups"].items() if v))
        for t in prof["top_self"][:10]:
            print(f"  {t['share']:6.1%}  {t['function'][:100]}")


if __name__ == "__main__":
    sys.exit(main())
