"""`make bench-peers`: llmserve beside the peers a platform team would otherwise run (issue 27 §1).

    make bench-peers      # or: python -m bench.peers [--replicas 1 2] [--concurrency 1 16 64] [--rounds 2]

The same tiny engine as `make bench` (bench/config.yaml), one replica and then two: bare vLLM
servers for the peers (the ceiling: the load generator talks to the engine itself; with two
replicas there is no single URL for it, so the ceiling is skipped there), llmserve with an API key
that has per-key request and token limits and model prices (cost) on, LiteLLM's proxy
(`litellm[proxy]`, from `.venv-peers`) and `vllm-router` (round robin and cache aware). Every
system is driven by the same seeded streaming load, in alternating rounds as `make bench`. Per
system and concurrency: req/s, TTFT p50/p99, the TTFT added to bare vLLM's, the CPU per request of
the routing process(es) (llmserve: its gateway process; a peer: its whole process tree) and their
RSS. Writes bench/results/peers-<date>.json (with issue 27's `goals`) and .png, prints the table.

LiteLLM's virtual keys (per-key rpm/tpm) live in its database, reached through a Prisma client
generated at run time, and `prisma generate` downloads its query engine from binaries.prisma.sh.
The bench tries it; where it fails (offline) LiteLLM runs with its master key and its router's
per-deployment rpm/tpm limits instead, and the JSON's `litellm_mode` says which, and why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench import peers_report, procs, run
from bench.run import ROOT, free_port, loadgen, stop

PEERS_BIN = ROOT / ".venv-peers" / "bin"
KEY = "sk-bench-peers-0123456789"  # llmserve's API key and LiteLLM's master key, on loopback only
# High enough never to refuse the bench's load, low enough to be real limits the gateway enforces.
KEY_RPM, KEY_TPM = 1_000_000, 1_000_000_000
PRICE = {"input_per_million": 0.15, "output_per_million": 0.6}
# What a leftover of this bench looks like (besides bench/procs.py's Ray and vLLM markers).
MARKERS = ("litellm", "vllm-router", "vllm.entrypoints.openai.api_server")


def bare_vllm_cmd(model_path: str, port: int, engine: dict[str, Any], python: str = sys.executable) -> list[str]:
    """vLLM's OpenAI server on the engine arguments llmserve gives its engine (flags from kwargs)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    for k, v in engine.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd += [flag] if v else []
        else:
            cmd += [flag, str(v)]
    return cmd


def llmserve_config(base: dict[str, Any], replicas: int, key_sha256: str) -> dict[str, Any]:
    """bench/config.yaml with `replicas` engine replicas, prices on every model and auth on: one key
    with per-key request and token limits."""
    cfg = json.loads(json.dumps(base))
    for m in cfg["models"]:
        m.setdefault("deployment", {})["replicas"] = replicas
        m["price"] = dict(PRICE)
    cfg["auth"] = {"enabled": True, "keys": [{"name": "bench", "sha256": key_sha256,
                                              "requests_per_minute": KEY_RPM, "tokens_per_minute": KEY_TPM}]}
    return cfg


def litellm_config(worker_urls: list[str], database_url: str | None) -> dict[str, Any]:
    """One deployment of model `tiny` per engine (LiteLLM's router spreads over them), each with the
    router's own rpm/tpm limits; the master key; the database when virtual keys can be used."""
    general: dict[str, Any] = {"master_key": KEY}
    if database_url:
        general["database_url"] = database_url
    return {"model_list": [{"model_name": "tiny", "litellm_params": {
                "model": "hosted_vllm/tiny", "api_base": f"{u}/v1", "api_key": "none", "rpm": KEY_RPM, "tpm": KEY_TPM}}
                           for u in worker_urls],
            "general_settings": general}


def prisma_client(workdir: Path) -> tuple[bool, str]:
    """Generate LiteLLM's Prisma client (its database layer); (done, why not)."""
    schema = next(iter((PEERS_BIN.parent / "lib").glob("python3*/site-packages/litellm/proxy/schema.prisma")), None)
    if schema is None or not (PEERS_BIN / "prisma").exists():
        return False, "no prisma or no litellm schema in .venv-peers (make peers)"
    env = {**os.environ, "PATH": f"{PEERS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        p = subprocess.run([str(PEERS_BIN / "prisma"), "generate", "--schema", str(schema)], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return False, "prisma generate took over 180 s"
    if p.returncode != 0:
        last = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
        return False, f"prisma generate failed: {last[-1][:300] if last else p.returncode}"
    return True, ""


def litellm_virtual_key(base: str) -> str:
    """A LiteLLM virtual key with per-key rpm/tpm limits, made with the master key (`/key/generate`,
    LiteLLM's documented call; it needs the database). Not exercised here: offline, the database
    client cannot be generated (module docstring)."""
    import urllib.request

    body = json.dumps({"models": ["tiny"], "rpm_limit": KEY_RPM, "tpm_limit": KEY_TPM}).encode()
    req = urllib.request.Request(f"{base.removesuffix('/v1')}/key/generate", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(json.loads(r.read())["key"])


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float, name: str, interval_s: float = 1.0) -> float:
    """Ready: a real chat completion through it with the bench's key (an open port is not enough;
    LiteLLM's proxy answers none without its master key, the others ignore it); the seconds from
    this call."""
    return run.wait_ready(base, "tiny", proc, timeout_s, name, path="/chat/completions",
                          headers={"Authorization": f"Bearer {KEY}"}, interval_s=interval_s,
                          body={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})


class Fleet:
    """The processes one phase starts, each in its own session, its log in the results folder."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.bases: dict[str, str] = {}
        self.launched: dict[str, float] = {}

    def start(self, name: str, cmd: list[str], base: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.logs / f"peers-{name.replace(' ', '-')}.log", "w") as log:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs[name], self.bases[name], self.launched[name] = p, base, time.monotonic()
        return p

    def ready(self, name: str, timeout_s: float) -> float:
        """Wait until `name` answers a completion; seconds from its launch."""
        wait_ready(self.bases[name], self.procs[name], timeout_s, name)
        return round(time.monotonic() - self.launched[name], 1)

    def stop(self, *names: str) -> None:
        for name in names or list(self.procs):
            stop(self.procs.pop(name, None))
            self.bases.pop(name, None)


def routing_figures(system: str, res: dict[str, Any], proc: psutil.Process) -> tuple[float | None, float]:
    """The CPU ms per request of the routing process(es) and their RSS: llmserve's gateway process
    (its engine replicas are the engine side, as bare vLLM's API server is); a peer's whole tree;
    bare vLLM routes nothing (its API server's CPU stays in the run's `cpu_ms_per_request`)."""
    cpu = res.get("cpu_ms_per_request", {})
    if system == "bare":
        return None, float("nan")
    if system == "llmserve":
        return cpu.get("gateway"), procs.rss_mb(proc)
    return cpu.get("total"), sum(procs.rss_mb(p) for p in procs.tree(proc))


def phase(replicas: int, a: argparse.Namespace, fleet: Fleet, bare_urls: list[str], base_cfg: dict[str, Any],
          runs: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """Start llmserve with `replicas` engines and the peers in front of the bare engines, warm each,
    run the alternating rounds, stop all but the bare engines."""
    from serve.gateway.auth import hash_key

    def wanted(system: str) -> bool:
        return not a.systems or system in a.systems

    cfg_path = Path(a.workdir) / f"llmserve-{replicas}.yaml"
    cfg_path.write_text(yaml.safe_dump(llmserve_config(base_cfg, replicas, hash_key(KEY))))
    gw_port = free_port()
    env = {**fleet.env, "LLMSERVE__GATEWAY__METRICS_PORT": str(free_port()),
           **({"CUDA_VISIBLE_DEVICES": a.llmserve_gpus} if a.llmserve_gpus else {})}
    if wanted("llmserve"):
        fleet.start("llmserve", [sys.executable, "-m", "serve.cli", "run", "--config", str(cfg_path), "--port",
                                 str(gw_port)], f"http://127.0.0.1:{gw_port}/v1", env)
    lite_cfg = Path(a.workdir) / f"litellm-{replicas}.yaml"
    lite_cfg.write_text(yaml.safe_dump(litellm_config(bare_urls, info.get("litellm_database_url"))))
    port = free_port()
    # LiteLLM as its production docs run it: errors only in the log; the model price map it ships
    # (it would fetch one from GitHub at start, unreachable here, and retry for seconds).
    lite_env = {**os.environ, "PATH": f"{PEERS_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if wanted("litellm"):
        fleet.start("litellm", [str(PEERS_BIN / "litellm"), "--config", str(lite_cfg), "--host", "127.0.0.1",
                                "--port", str(port), "--num_workers", "1"], f"http://127.0.0.1:{port}/v1", lite_env)
    for policy in [p for p in ("round_robin", "cache_aware") if wanted(f"vllm-router {p}")]:
        port = free_port()
        fleet.start(f"vllm-router {policy}", [str(PEERS_BIN / "vllm-router"), "--host", "127.0.0.1", "--port",
                                              str(port), "--worker-urls", *bare_urls, "--policy", policy,
                                              "--prometheus-port", str(free_port()), "--log-level", "warning",
                                              "--worker-startup-timeout-secs", "900"],
                    f"http://127.0.0.1:{port}/v1", lite_env)
    systems = [s for s in peers_report.SYSTEMS if s in fleet.procs or (s == "bare" and replicas == 1)]
    systems = [s for s in systems if wanted(s)]
    ready = info.setdefault("ready_s", {})
    for name in [n for n in fleet.procs if n.startswith("bare-") and n not in ready]:
        ready[name] = fleet.ready(name, 600)
    for s in systems:
        if s != "bare":
            ready[f"{s} ({replicas})"] = fleet.ready(s, 900)  # from its launch, beside the others
    print(f"[{replicas} replica(s)] ready: {ready}", flush=True)
    keys = {s: KEY for s in systems}
    if "litellm" in systems and info.get("litellm_database_url"):
        keys["litellm"] = litellm_virtual_key(fleet.bases["litellm"])
    bases = {**fleet.bases, "bare": f"{bare_urls[0]}/v1"}
    handles = {s: psutil.Process(fleet.procs["bare-1" if s == "bare" else s].pid) for s in systems}
    for s in systems:  # warm-up, not measured
        loadgen(bases[s], "tiny", 32, 16, a.max_tokens, 999, "--api-key", keys[s])
    for r in range(a.rounds):
        for conc in a.concurrency:
            n = max(a.min_requests, min(a.max_requests, a.requests_per_stream * conc))
            order = systems if r % 2 == 0 else systems[::-1]
            for s in order:
                role = "vLLM API server" if s == "bare" else "gateway" if s == "llmserve" else s
                res = loadgen(bases[s], "tiny", n, conc, a.max_tokens, r * 100 + conc, "--api-key", keys[s],
                              server=handles[s], role=role)
                cpu, rss = routing_figures(s, res, handles[s])
                res.update(system=s, replicas=replicas, round=r, routing_cpu_ms=cpu, routing_rss_mb=rss)
                runs.append(res)
                print(f"[{replicas}] round {r} c={conc:>3} {s:>24}: {res['req_per_s']:6.1f} req/s  TTFT p50 "
                      f"{res['ttft_ms']['p50']:7.1f} p99 {res['ttft_ms']['p99']:7.1f} ms  routing CPU "
                      f"{'-' if cpu is None else f'{cpu:.2f}'} ms/req  errors {res['errors']}", flush=True)
    fleet.stop("llmserve", "litellm", "vllm-router round_robin", "vllm-router cache_aware")


def leftovers(since: float) -> list[str]:
    """Anything of this bench still running: Ray and vLLM by bench/procs.py's markers, and the peers."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    found = {p.pid: procs.cmdline(p) for p in procs.leftovers(since)}
    for p in psutil.process_iter(["pid"]):
        if p.pid in mine and p.pid not in found:
            cmd = procs.cmdline(p)
            if any(m in cmd for m in MARKERS):
                found[p.pid] = cmd
    return [f"{pid} {cmd[:120]}" for pid, cmd in found.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "bench" / "config.yaml"), help="llmserve config (model `tiny`)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=6, help="requests = this x concurrency")
    p.add_argument("--min-requests", type=int, default=40)
    p.add_argument("--max-requests", type=int, default=192)
    p.add_argument("--systems", nargs="*", help="only these systems (debugging)")
    p.add_argument("--bare-gpus", nargs="*", default=[], help="GPU: CUDA_VISIBLE_DEVICES of each bare vLLM, in order")
    p.add_argument("--llmserve-gpus", help="GPU: CUDA_VISIBLE_DEVICES of `llmserve run` (its Ray's GPUs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    if not (PEERS_BIN / "litellm").exists() or not (PEERS_BIN / "vllm-router").exists():
        print("bench.peers: .venv-peers lacks litellm or vllm-router: run `make peers`", file=sys.stderr)
        return 2

    from serve.config import load_config
    from serve.engine.deployments import CPU_ENV
    from serve.engine.models import resolve_source

    spec = load_config(a.config).model("tiny")
    assert spec is not None, "the benchmark config must define model `tiny`"
    model_path, engine = resolve_source(spec), spec.engine.to_kwargs()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    procs.become_subreaper()
    since = time.time()
    env = {**os.environ, **(CPU_ENV if spec.accelerator == "cpu" else {})}
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": model_path,
        "engine_args": engine, "max_tokens": a.max_tokens, "rounds": a.rounds, "concurrency": a.concurrency,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "llmserve_key": {"requests_per_minute": KEY_RPM, "tokens_per_minute": KEY_TPM, "price": PRICE},
        "ceiling": "bare vLLM at 1 replica only: with 2 the load generator has no single URL for both engines",
        "routing_cpu": "llmserve: its gateway process; LiteLLM and vllm-router: their whole process tree",
        "runs": [],
    }
    fleet = Fleet(out, env)
    with tempfile.TemporaryDirectory(prefix="llmserve-bench-peers-") as work:
        a.workdir = work
        pg = None
        try:
            done, why = prisma_client(Path(work))
            if done:
                from tests.support import PostgresServer

                pg = PostgresServer(workdir=work)
                pg.start()
                results["litellm_database_url"] = pg.url
            results["litellm_mode"] = ("virtual keys on PostgreSQL" if done else
                                       f"master key and its router's per-deployment rpm/tpm, no database ({why})")
            print(f"LiteLLM: {results['litellm_mode']}", flush=True)
            base_cfg = yaml.safe_load(Path(a.config).read_text())
            bare_urls: list[str] = []
            for replicas in sorted(a.replicas):
                while len(bare_urls) < replicas:  # started here, waited on beside llmserve's start
                    port = free_port()
                    gpu = a.bare_gpus[len(bare_urls)] if len(a.bare_gpus) > len(bare_urls) else None
                    fleet.start(f"bare-{len(bare_urls) + 1}", bare_vllm_cmd(model_path, port, engine),
                                f"http://127.0.0.1:{port}/v1", {**env, "CUDA_VISIBLE_DEVICES": gpu} if gpu else None)
                    bare_urls.append(f"http://127.0.0.1:{port}")
                phase(replicas, a, fleet, bare_urls, base_cfg, results["runs"], results)
        finally:
            fleet.stop()
            if pg is not None:
                pg.stop()
            results.pop("litellm_database_url", None)
    deadline = time.monotonic() + 60
    while (left := leftovers(since)) and time.monotonic() < deadline:
        time.sleep(1)
    results["leftovers"] = left
    results["summary"] = peers_report.summarize(results["runs"])
    results["goals"] = peers_report.goals(results["summary"])
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    jpath, ppath = out / f"peers-{stamp}.json", out / f"peers-{stamp}.png"
    jpath.write_text(json.dumps(results, indent=1, default=float))
    peers_report.plot(results, ppath)
    print("\n" + peers_report.table(results["summary"]) + "\n\n" + peers_report.goals_table(results["goals"]))
    print(f"\nLiteLLM: {results['litellm_mode']}\nleft running: {left or 'nothing'}\nwrote {jpath} and {ppath}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
