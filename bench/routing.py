"""`make bench-routing`: routers compared on realistic traffic over two replicas, in one run.

    python -m bench.routing                      # every workload and router (long on 2 cores)
    python -m bench.routing --workloads tenants conversations uniform --requests 48 \\
        --routers round_robin "vllm-router cache_aware" "llmserve prefix_affinity" "llmserve cache_aware"

Two replicas of a `builtin://tiny` shape where prefill dominates (8 layers, hidden 256, 4,096-token
context), prefix caching on, each replica's KV cache sized (--kv-tokens) so that a workload's
distinct prefixes exceed one replica's cache and fit in both (bench/README.md says how each
workload sits). First two bare `vllm serve` replicas behind vllm-router (round_robin, cache_aware,
kv_aware fed by the engines' KV events), then llmserve with the model at two replicas (its
`gateway.routing.policy`s; a second policy is a second gateway joining the same engines). Every
(router, workload) cell replays the same seeded requests (bench/workloads.py), salted so that no
cell finds an earlier cell's blocks cached. Per cell: TTFT p50/p90/p99, goodput within an SLO of
twice one uncontended cold prefill (measured first), each replica's prefix-cache hit rate from
vLLM's own counters and the load spread. Writes bench/results/routing-<date>.json (with issue 27
§3's `goals`) and a TTFT CDF PNG per workload.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench import routing_fleet as fleet
from bench import routing_stats as stats
from bench import workloads as wl
from bench.run import ROOT, free_port, stop, wait_ready
from serve.engine.deployments import CPU_ENV

SHAPE = "num_hidden_layers=8&hidden_size=256&intermediate_size=512&num_attention_heads=4&num_key_value_heads=4" \
        "&max_position_embeddings=4096"
BLOCK = 128  # vLLM's CPU default block size: what its prefix cache keys
BARE_ROUTERS = {"round_robin": "round_robin", stats.VR_CACHE: "cache_aware", stats.VR_KV: "kv_aware"}
LLMSERVE_ROUTERS = ("llmserve prefix_affinity", "llmserve cache_aware", "llmserve round_robin",
                    "llmserve least_loaded")
ROUTERS = [*BARE_ROUTERS, *LLMSERVE_ROUTERS]
ALL_ROUTERS = ROUTERS[:5]
ALL_WORKLOADS = ["tenants", "conversations", "zipf", "uniform", "tenants+lora"]
ADAPTERS = ["tenant-lora-a", "tenant-lora-b"]
RAY_FLUSH_S = 11  # Ray exports a worker's metrics every 10 s (metrics_report_interval_ms)


def build(name: str, a: argparse.Namespace) -> tuple[list[wl.Request], float]:
    """A workload's requests and the deadline of its replay (its sending span plus --drain-s)."""
    if name in ("tenants", "tenants+lora"):
        reqs = wl.tenants(a.requests, a.seed, rate=a.rate)
        if name == "tenants+lora":
            reqs = wl.with_adapters(reqs, ADAPTERS)
        return reqs, reqs[-1].at + a.drain_s
    if name == "conversations":
        reqs = wl.conversations(a.conversations, a.turns, a.seed, start_rate=a.rate)
        last_start = max(r.at for r in reqs if r.after is None)
        return reqs, last_start + a.turns * 8 + a.drain_s
    if name == "zipf":
        reqs = wl.zipf(a.requests, a.seed, rate=2 * a.rate)
        return reqs, reqs[-1].at + a.drain_s
    if name == "uniform":
        reqs = wl.uniform(a.uniform_requests, a.seed, rate=a.uniform_rate)
        return reqs, reqs[-1].at + a.drain_s
    raise ValueError(f"unknown workload {name}")


def distinct_prefix_tokens(reqs: list[wl.Request], tokenizer: Any) -> dict[str, int]:
    """What a workload can put in prefix caches: distinct full blocks of its prompts (as vLLM
    hashes them, per model) times the block size (`tokens`); of those, the ones two requests or
    more share, which a cache can turn into hits (`shared_tokens`); and its largest prompt."""
    seen: dict[tuple[str, int], int] = {}
    longest = 0
    for r in reqs:
        ids = tokenizer.apply_chat_template([{"role": ro, "content": c} for ro, c in r.messages],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        longest = max(longest, len(ids))
        for k in range(1, len(ids) // BLOCK + 1):
            key = (r.model, hash(tuple(ids[: k * BLOCK])))
            seen[key] = seen.get(key, 0) + 1
    return {"tokens": len(seen) * BLOCK, "shared_tokens": sum(1 for n in seen.values() if n > 1) * BLOCK,
            "longest_prompt": longest, "groups": len({r.group for r in reqs})}


def replay(base: str, reqs_file: Path, salt: str, deadline_s: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.routing_load", "--url", base, "--workload", str(reqs_file),
                          "--salt", salt, "--deadline-s", str(deadline_s)], cwd=ROOT, capture_output=True,
                         text=True, timeout=deadline_s + 180)
    if out.returncode != 0:
        raise RuntimeError(f"bench.routing_load exited with {out.returncode}: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def probe_slo(base: str, tokenizer_words: int, seed: int) -> dict[str, float]:
    """One uncontended cold prefill of a tenant-sized prompt on one bare replica (twice, fresh text
    each time; the faster counts), then the same prompt again (a prefix-cache hit)."""
    import random

    rng = random.Random(seed + 991)
    times = []
    for i in range(2):
        system = f"probe {i}: " + wl.text(rng, tokenizer_words)
        req = wl.Request(i, (("system", system), ("user", "hello?")), 0.0, "probe")
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"routing-probe-{os.getpid()}.json"
        path.write_text(json.dumps([req.__dict__]))
        res = replay(base, path, "", 120)
        res2 = replay(base, path, "", 120)
        path.unlink()
        times.append((res["requests"][0]["ttft_s"], res2["requests"][0]["ttft_s"]))
    cold, hit = min(t[0] for t in times), min(t[1] for t in times)
    return {"cold_prefill_s": round(cold, 3), "hit_s": round(hit, 3), "slo_s": round(2 * cold, 3)}


def run_cells(router: str, base: str, names: list[str], files: dict[str, Path], deadlines: dict[str, float],
              counters: Any, results: dict[str, dict[str, Any]], slo_s: float, salt_seed: int, flush_s: float) -> None:
    time.sleep(flush_s)  # what came before (a readiness request) reaches the counters first
    before = counters()
    for name in names:
        # Fixed length, different for every (router, workload): same token counts, no shared blocks.
        salt = f"[{salt_seed % 100:02d}{ROUTERS.index(router)}{ALL_WORKLOADS.index(name)}]"
        t = time.monotonic()
        res = replay(base, files[name], salt, deadlines[name])
        time.sleep(flush_s)
        after = counters()
        cell = stats.summarize(res["requests"], res["wall_s"], slo_s)
        reps = stats.counter_delta(before, after)
        cell["replicas"] = reps
        cell["spread"] = stats.spread(r[stats.SUCCESS] for r in reps.values()) if reps else None
        results.setdefault(name, {})[router] = cell
        before = after
        hit = ", ".join(f"{r['hit_rate']:.2f}" for r in reps.values())
        print(f"{name:>14} {router:>26}: TTFT p50/p90/p99 {cell['ttft_ms']['p50']:7.0f} {cell['ttft_ms']['p90']:7.0f} "
              f"{cell['ttft_ms']['p99']:7.0f} ms  {cell['req_per_s']:.2f} req/s"
              f"  goodput {cell['goodput_req_per_s']:.2f}"
              f"  ok {cell['ok']}/{cell['requests']}  hit rate per replica [{hit}]  spread {cell['spread']}"
              f"  ({time.monotonic() - t:.0f} s)", flush=True)


def git_state() -> dict[str, Any]:
    """The commit measured, and the paths of serve/ that differed from it (a router being edited)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "serve_changed": [line[3:] for line in git("status", "--porcelain", "serve").splitlines()]}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| workload | router | TTFT p50 ms | p90 ms | p99 ms | req/s | goodput req/s | within SLO | "
             "hit rate per replica | busiest replica's share |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for w, routers in results.items():
        for r, c in routers.items():
            hits = " / ".join(f"{x['hit_rate']:.2f}" for x in c.get("replicas", {}).values()) or "-"
            sp = f"{c['spread']:.2f}" if isinstance(c.get("spread"), float) else "-"
            lines.append(f"| {w} | {r} | {c['ttft_ms']['p50']:.0f} | {c['ttft_ms']['p90']:.0f} | "
                         f"{c['ttft_ms']['p99']:.0f} | {c['req_per_s']:.2f} | {c['goodput_req_per_s']:.2f} | "
                         f"{c['within_slo']:.0%} | {hits} | {sp} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=ALL_WORKLOADS, choices=ALL_WORKLOADS)
    p.add_argument("--routers", nargs="+", default=ALL_ROUTERS, choices=ROUTERS)
    p.add_argument("--requests", type=int, default=320, help="requests of the tenants and zipf workloads")
    p.add_argument("--uniform-requests", type=int, default=160)
    p.add_argument("--uniform-rate", type=float, default=8.0,
                   help="arrivals per second of the uniform workload (enough to saturate: it measures throughput)")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--rate", type=float, default=4.0,
                   help="Poisson arrivals per second (chat starts for conversations)")
    p.add_argument("--kv-tokens", type=int, default=24_576, help="KV cache of each replica, in tokens")
    p.add_argument("--drain-s", type=float, default=90, help="how long after its last send a replay may run on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    from transformers import AutoTokenizer

    from serve.engine.models import resolve_tiny
    from serve.model.tiny import parse_tiny_source

    procs.become_subreaper()
    started = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    source = f"builtin://tiny?seed=1&{SHAPE}"
    model_path = resolve_tiny(parse_tiny_source(source))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    files, deadlines, sizes = {}, {}, {}
    for name in a.workloads:
        reqs, deadlines[name] = build(name, a)
        files[name] = out / f"routing-{stamp}-{name}.requests.json"
        files[name].write_text(json.dumps([r.__dict__ for r in reqs]))
        sizes[name] = {"requests": len(reqs), **distinct_prefix_tokens(reqs, tokenizer),
                       "kv_tokens_per_replica": a.kv_tokens - a.kv_tokens % BLOCK}
        sizes[name]["shared_over_one_replica"] = round(sizes[name]["shared_tokens"] / a.kv_tokens, 2)
        print(f"workload {name}: {sizes[name]}", flush=True)
    lora = "tenants+lora" in a.workloads
    adapters = fleet.make_adapters(model_path, Path(os.path.expanduser("~/.cache/llmserve/adapters")), ADAPTERS) \
        if lora else {}
    # VLLM_CPU_KVCACHE_SPACE (llmserve's CPU engines get 1) takes whole GiB only, 65,536 tokens of this
    # shape, and replaces --kv-cache-memory-bytes when set (vllm/platforms/cpu.py); an empty value
    # fails vLLM's env parsing. So every engine keeps that 1 GiB and vLLM's own block-count override
    # caps the cache at --kv-tokens (vllm/v1/core/kv_cache_utils.py), bare and llmserve alike.
    engine: dict[str, Any] = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
                              "enable_prefix_caching": True, "max_num_seqs": 64,
                              "num_gpu_blocks_override": a.kv_tokens // BLOCK}
    if lora:
        engine.update(enable_lora=True, max_lora_rank=8)
    engine_env: dict[str, str] = {}
    env = {**os.environ, **CPU_ENV, **engine_env, "LLMSERVE_ENGINE_SECRET": secrets.token_urlsafe(32)}
    results: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": source,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "engine_args": engine, "block_size": BLOCK,
        "kv_tokens_per_replica": a.kv_tokens, "workloads": sizes, "args": vars(a), "errors": {},
        "git": git_state(),
    }
    running: list[subprocess.Popen] = []
    try:
        bare_routers = [r for r in a.routers if r in BARE_ROUTERS]
        kv_events = stats.VR_KV in bare_routers
        reps, urls, zmq = fleet.start_bare(model_path, engine, env, out, 2, adapters, kv_events)
        running += reps
        for u, rp in zip(urls, reps, strict=True):
            wait_ready(u + "/v1", "tiny", rp, 600, "bare vLLM")
        meta["probe"] = probe_slo(urls[0] + "/v1", 1480, a.seed)
        slo_s = meta["probe"]["slo_s"]
        print(f"probe: {meta['probe']}", flush=True)
        for router in bare_routers:
            rproc, base = fleet.start_vllm_router(BARE_ROUTERS[router], urls, zmq, out, BLOCK)
            try:
                wait_ready(base, "tiny", rproc, 120, router)
                run_cells(router, base, a.workloads, files, deadlines, lambda: fleet.bare_counters(urls),
                          results, slo_s, a.seed, 1.0)
            except Exception as e:  # one router failing must not cost the others' figures
                meta["errors"][router] = f"{type(e).__name__}: {e}"
                print(f"{router}: {meta['errors'][router]}", flush=True)
            finally:
                stop(rproc, 20)
        for rp in reps:
            stop(rp, 60)
        # The router the goals are about first, on `llmserve run`'s own gateway; others join it.
        ours = sorted((r for r in a.routers if r in LLMSERVE_ROUTERS), key=lambda r: r != stats.GOAL_ROUTER)
        if ours:
            run_llmserve(ours, source, engine, engine_env, adapters, env, out, a, files, deadlines, results,
                         slo_s, meta, running)
    finally:
        for proc in reversed(running):
            stop(proc, 90)
        left = procs.leftovers(started, orphans=False)
        meta["left_running"] = [procs.cmdline(x)[:120] for x in left]
        for x in left:
            x.kill()
    meta["results"] = results
    meta["goals"] = stats.goals(results)
    jpath = out / f"routing-{stamp}.json"
    jpath.write_text(json.dumps(meta, indent=1, default=float))
    pngs = stats.plot_cdfs(results, meta.get("probe", {}).get("slo_s", 0), out, stamp) if results else []
    for f in files.values():
        f.unlink(missing_ok=True)
    print(table(results))
    for g in meta["goals"]:
        print(f"  [{'x' if g['met'] else ' '}] {g['name']}: target {g['target']}, measured {g['measured']}")
    print(f"wrote {jpath} and {', '.join(map(str, pngs))}; left running: {meta['left_running'] or 'nothing'}")
    return 0


def run_llmserve(ours: list[str], source: str, engine: dict[str, Any], engine_env: dict[str, str],
                 adapters: dict[str, str], env: dict[str, str], out: Path, a: argparse.Namespace,
                 files: dict[str, Path], deadlines: dict[str, float], results: dict[str, dict[str, Any]],
                 slo_s: float, meta: dict[str, Any], running: list[subprocess.Popen]) -> None:
    """llmserve at two replicas with the first policy of `ours`; each further policy a gateway of
    its own joining the same engines (its cells run on caches the first left: each cell is salted)."""
    since = time.time()
    policy = ours[0].split()[1]
    cfg = fleet.llmserve_config(source, engine, engine_env, policy, adapters, free_port())
    gw, base = fleet.start_llmserve(cfg, out, "llmserve", env)
    running.append(gw)
    meta["llmserve_ready_s"] = fleet.wait_replicas(base, gw, 2, 900)
    wait_ready(base, "tiny", gw, 60, "llmserve")
    metrics = fleet.ray_metrics_url(since)
    meta["llmserve_metrics"] = metrics
    for router in ours:
        extra = None
        try:
            if router != ours[0]:
                gcs = fleet.ray_port(since, "gcs_server")
                cfg2 = fleet.llmserve_config(source, engine, engine_env, router.split()[1], adapters, free_port(),
                                             address=f"127.0.0.1:{gcs}" if gcs else "auto")
                # The head `llmserve run` started has Ray's token auth on (serve/engine/head.py); a
                # process joining it says so, and reads the token from ~/.ray/auth_token.
                extra, base2 = fleet.start_llmserve(cfg2, out, router.replace(" ", "-"),
                                                    {**env, "RAY_AUTH_MODE": "token"}, command="gateway")
                running.append(extra)
                fleet.wait_replicas(base2, extra, 2, 180)
            else:
                base2 = base
            run_cells(router, base2, a.workloads, files, deadlines, lambda: fleet.ray_counters(metrics), results,
                      slo_s, a.seed, RAY_FLUSH_S if metrics else 1.0)
        except Exception as e:
            meta["errors"][router] = f"{type(e).__name__}: {e}"
            print(f"{router}: {meta['errors'][router]}", flush=True)
        finally:
            if extra is not None:
                stop(extra, 30)


if __name__ == "__main__":
    sys.exit(main())
