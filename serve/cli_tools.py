"""`llmserve batch ...` and `llmserve cache ...`: offline batches, the Batch API from the shell, and
the head-cache pipeline."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve.config import Config, load_config


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=args.url, api_key=args.api_key or os.environ.get("LLMSERVE_API_KEY", "none"),
                  max_retries=2, timeout=120)


def _wait(client: Any, batch_id: str, timeout_s: float, quiet: bool = False) -> Any:
    """Poll a batch to a final state, with a progress bar of its request counts."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    with tqdm(desc=batch_id, unit="req", disable=quiet) as bar:
        while True:
            b = client.batches.retrieve(batch_id)
            rc = b.request_counts
            if rc is not None:
                bar.total = rc.total or None
                bar.n = rc.completed + rc.failed
                bar.set_postfix(status=b.status, failed=rc.failed)
                bar.refresh()
            if b.status in ("completed", "failed", "expired", "cancelled"):
                return b
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {b.status} after {timeout_s:.0f}s")
            time.sleep(1)


# ---- batch -----------------------------------------------------------------------------------------
def offline_batch(config: Config, model: str, input_path: str, output_path: str) -> int:
    """vLLM's own offline batch runner (OpenAI batch format in and out), on the configured engine
    arguments; no server, no Ray."""
    # CPU_ENV: what every CPU engine of the project gets (one definition), so an offline batch
    # runs the engine as `llmserve run` and `make bench` do.
    from serve.engine import private
    from serve.engine.deployments import CPU_ENV
    from serve.engine.models import resolve_source

    spec = config.model(model)
    if spec is None:
        raise SystemExit(f"llmserve: model {model!r} is not in the configuration")
    cmd = [sys.executable, "-m", private.VLLM_RUN_BATCH.module, "-i", input_path, "-o", output_path,
           "--model", resolve_source(spec), "--served-model-name", spec.name]
    for k, v in spec.engine.to_kwargs().items():
        if k == "structured_outputs_config":
            cmd += ["--structured-outputs-config", json.dumps(v)]
        elif isinstance(v, bool):
            cmd += [f"--{k.replace('_', '-')}"] if v else []
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, **(CPU_ENV if spec.accelerator == "cpu" else {}), **spec.env}
    return subprocess.call(cmd, env=env)


def cmd_batch_run(args: argparse.Namespace) -> int:
    return offline_batch(load_config(args.config), args.model, args.input, args.output)


def cmd_batch_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    with open(args.input, "rb") as f:
        up = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=up.id, endpoint=args.endpoint, completion_window="24h")
    print(b.id)
    if args.wait:
        b = _wait(client, b.id, args.timeout)
        print(json.dumps(b.model_dump(), indent=1))
    return 0


def cmd_batch_status(args: argparse.Namespace) -> int:
    client = _client(args)
    b = _wait(client, args.batch_id, args.timeout) if args.wait else client.batches.retrieve(args.batch_id)
    print(json.dumps(b.model_dump(), indent=1))
    return 0


def cmd_batch_download(args: argparse.Namespace) -> int:
    client = _client(args)
    b = client.batches.retrieve(args.batch_id)
    if b.output_file_id:
        Path(args.output).write_bytes(client.files.content(b.output_file_id).content)
    if args.errors and b.error_file_id:
        Path(args.errors).write_bytes(client.files.content(b.error_file_id).content)
    print(f"{b.status}: {b.request_counts.completed if b.request_counts else 0} ok, "
          f"{b.request_counts.failed if b.request_counts else 0} failed")
    return 0


# ---- cache -----------------------------------------------------------------------------------------
def _norm(config: Config, route: str) -> Any:
    from serve.policies.cache_key import Normalization

    r = config.route(route)
    if r is None or r.cache is None:
        return Normalization()
    return Normalization(whitespace=r.cache.normalize_whitespace, case=r.cache.normalize_case)


def _cache(config: Config, redis_url: str | None) -> Any:
    from serve.cache.store import HeadCache

    url = redis_url or config.cache.redis_url
    if not url:
        raise SystemExit("llmserve: the head cache needs Redis: set cache.redis_url or pass --redis-url")
    return HeadCache(url, op_timeout_s=5)


def cmd_cache_build(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import batch_lines, read_log, select_head
    from serve.cache.store import CacheEntry

    config = load_config(args.config)
    with open(args.log, "rb") as f:
        requests = read_log(f)
    head, total = select_head(requests, args.route, args.top, _norm(config, args.route))
    covered = sum(q.count for q in head)
    print(f"{len(head)} head queries cover {covered}/{total} logged requests ({covered / max(total, 1):.1%})")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "in.jsonl"), Path(tmp, "out.jsonl")
        inp.write_text("\n".join(batch_lines(head, args.model)) + "\n")
        if args.url:
            client = _client(args)
            with open(inp, "rb") as f:
                up = client.files.create(file=f, purpose="batch")
            b = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions", completion_window="24h")
            b = _wait(client, b.id, args.timeout)
            batch_id = b.id
            out.write_bytes(client.files.content(b.output_file_id).content if b.output_file_id else b"")
        else:
            batch_id = f"offline-{int(time.time())}"
            if offline_batch(config, args.model, str(inp), str(out)) != 0:
                return 1
        now = time.time()
        route = config.route(args.route)
        ttl = route.cache.ttl_s if route is not None and route.cache is not None else None
        items = []
        for raw in out.read_text().splitlines():
            rec = json.loads(raw)
            resp = rec.get("response") or {}
            if resp.get("status_code") == 200:
                items.append((rec["custom_id"], CacheEntry(response=resp["body"], model=args.model, created_at=now,
                                                           batch_id=batch_id, route=args.route)))

    async def load() -> int:
        cache = _cache(config, args.redis_url)
        try:
            return await cache.put_many(args.route, items, ttl)
        finally:
            await cache.close()

    n = asyncio.run(load())
    print(f"loaded {n} answers from {args.model} into route {args.route!r} (batch {batch_id})")
    return 0 if n == len(head) else 1


def cmd_cache_stats(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import coverage, read_log

    config = load_config(args.config)

    async def go() -> dict[str, Any]:
        cache = _cache(config, args.redis_url)
        try:
            keys = await cache.list_keys(args.route, limit=1_000_000)
            stats = await cache.stats(args.route)
        finally:
            await cache.close()
        hits, misses = stats.get("hits", 0), stats.get("misses", 0)
        out: dict[str, Any] = {"route": args.route, "entries": len(keys), "hits": hits, "misses": misses,
                               "hit_rate": hits / (hits + misses) if hits + misses else None}
        if args.log:
            with open(args.log, "rb") as f:
                out["log_coverage"] = coverage(read_log(f), args.route, set(keys), _norm(config, args.route))
        return out

    print(json.dumps(asyncio.run(go()), indent=1))
    return 0


def cmd_cache_synth_log(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import synth_log

    rows = synth_log(args.requests, args.distinct, args.s, args.seed, args.max_tokens, args.model)
    Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} requests over {args.distinct} distinct queries to {args.output}")
    return 0


def cmd_cache_invalidate(args: argparse.Namespace) -> int:
    """Move the route to a new cache generation in Redis: every running gateway drops its
    in-process copies within its poll interval (`HeadCache.follow_invalidations`)."""
    config = load_config(args.config)

    async def go() -> tuple[int, int | None, int]:
        cache = _cache(config, args.redis_url)
        try:
            n = await cache.invalidate(args.route)
            return n, cache.generation(args.route), cache.redis_errors
        finally:
            await cache.close()

    n, gen, errors = asyncio.run(go())
    if errors:  # the gateways may not have been told: say so, and fail
        print(f"llmserve: invalidating route {args.route!r} failed in Redis; running gateways may still "
              "serve its entries", file=sys.stderr)
        return 1
    print(f"dropped {n} entries of route {args.route!r}; running gateways follow generation {gen}")
    return 0


def add_commands(sub: Any) -> None:
    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("LLMSERVE_URL", "http://127.0.0.1:8000/v1"))
        p.add_argument("--api-key", help="default: $LLMSERVE_API_KEY")
        p.add_argument("--timeout", type=float, default=3600)

    batch = sub.add_parser("batch", help="Batch API: offline runs and a running gateway's batches")
    bsub = batch.add_subparsers(dest="batch_command", required=True)
    p = bsub.add_parser("run", help="run IN.jsonl on a model with vLLM's offline runner (no server)")
    p.add_argument("input")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--config")
    p.set_defaults(func=cmd_batch_run)
    p = bsub.add_parser("submit", help="upload IN.jsonl and create a batch on a running gateway")
    p.add_argument("input")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--wait", action="store_true")
    remote(p)
    p.set_defaults(func=cmd_batch_submit)
    p = bsub.add_parser("status", help="show a batch (--wait: follow it with a progress bar)")
    p.add_argument("batch_id")
    p.add_argument("--wait", action="store_true")
    remote(p)
    p.set_defaults(func=cmd_batch_status)
    p = bsub.add_parser("download", help="write a batch's output (and error) file")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--errors")
    remote(p)
    p.set_defaults(func=cmd_batch_download)

    cache = sub.add_parser("cache", help="the head cache: build from a query log, stats, invalidate")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    p = csub.add_parser("build", help="answer the top-N logged queries with the teacher and cache them")
    p.add_argument("--log", required=True)
    p.add_argument("--top", type=int, required=True)
    p.add_argument("--model", required=True, help="the teacher")
    p.add_argument("--route", required=True)
    p.add_argument("--config")
    p.add_argument("--redis-url")
    p.add_argument("--offline", dest="url", action="store_const", const=None,
                   help="use vLLM's offline runner instead of a running gateway's Batch API")
    remote(p)
    p.set_defaults(func=cmd_cache_build)
    p = csub.add_parser("stats", help="entries, hit rate, and the share of a log the cache covers")
    p.add_argument("--route", required=True)
    p.add_argument("--log")
    p.add_argument("--config")
    p.add_argument("--redis-url")
    p.set_defaults(func=cmd_cache_stats)
    p = csub.add_parser("invalidate", help="drop every entry of a route")
    p.add_argument("--route", required=True)
    p.add_argument("--config")
    p.add_argument("--redis-url")
    p.set_defaults(func=cmd_cache_invalidate)
    p = csub.add_parser("synth-log", help="write a Zipf-distributed synthetic query log")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--distinct", type=int, default=200)
    p.add_argument("--s", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model", default="assistant", help="the route named in the logged requests")
    p.set_defaults(func=cmd_cache_synth_log)
