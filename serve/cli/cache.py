"""`llmserve cache ...`: the head-cache pipeline (build from a query log, stats, invalidate, a
synthetic log)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve.cache.pipeline import route_normalization
from serve.cli.batch import offline_batch
from serve.cli.common import add_remote_arguments, openai_client, wait_for_batch
from serve.config import Config, load_config


def _cache(config: Config, redis_url: str | None) -> Any:
    from serve.cache.store import HeadCache

    url = redis_url or config.cache.redis_url
    if not url:
        raise SystemExit("llmserve: the head cache needs Redis: set cache.redis_url or pass --redis-url")
    return HeadCache(url, op_timeout_s=5)


async def _served_digest(redis_url: str | None, model: str) -> str | None:
    """The digest of the weights the gateways serve `model` from, as they know it: a runtime
    adapter's registration in the lifecycle store (None for configured, unhashed weights)."""
    from serve.students.registry import LifecycleStore

    if not redis_url:
        return None
    store = LifecycleStore(redis_url)
    try:
        registered = await store.adapter(model)
    finally:
        await store.close()
    return (registered or {}).get("digest") or None


def cmd_cache_build(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import batch_entries, batch_lines, read_log, select_head

    config = load_config(args.config)
    with open(args.log, "rb") as f:
        requests = read_log(f)
    head, total = select_head(requests, args.route, args.top, route_normalization(config, args.route))
    covered = sum(q.count for q in head)
    print(f"{len(head)} head queries cover {covered}/{total} logged requests ({covered / max(total, 1):.1%})")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "in.jsonl"), Path(tmp, "out.jsonl")
        inp.write_text("\n".join(batch_lines(head, args.model)) + "\n")
        if args.url:
            client = openai_client(args)
            with open(inp, "rb") as f:
                up = client.files.create(file=f, purpose="batch")
            b = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions", completion_window="24h")
            b = wait_for_batch(client, b.id, args.timeout)
            batch_id = b.id
            out.write_bytes(client.files.content(b.output_file_id).content if b.output_file_id else b"")
        else:
            batch_id = f"offline-{int(time.time())}"
            if offline_batch(config, args.model, str(inp), str(out)) != 0:
                return 1
        output = out.read_text().splitlines()
        route = config.route(args.route)
        ttl = route.cache.ttl_s if route is not None and route.cache is not None else None

    async def load() -> int:
        cache = _cache(config, args.redis_url)
        try:
            digest = await _served_digest(args.redis_url or config.cache.redis_url, args.model)
            items = batch_entries(output, args.route, args.model, digest, batch_id, time.time())
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
                norm = route_normalization(config, args.route)
                out["log_coverage"] = coverage(read_log(f), args.route, set(keys), norm)
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
    add_remote_arguments(p)
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
