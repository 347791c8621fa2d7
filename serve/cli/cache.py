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

from serve.cache.pipeline import route_normalization, route_prompts
from serve.cli.batch import offline_batch
from serve.cli.common import add_remote_arguments, openai_client, wait_for_batch
from serve.config import Config, load_config
from serve.policies.cost import Price
from serve.policies.tier_prompt import as_served, prompt_for


def _cache(config: Config, redis_url: str | None) -> Any:
    from serve.cache.store import HeadCache

    url = redis_url or config.cache.redis_url
    if not url:
        raise SystemExit("llmserve: the head cache needs Redis: set cache.redis_url or pass --redis-url")
    return HeadCache(url, op_timeout_s=5)


async def _served(redis_url: str | None, model: str, route: str) -> tuple[dict[str, str], dict[str, str]]:
    """How the gateways know `model` and `route` at run time, from the lifecycle store: a runtime
    adapter's registration (its weights' `digest`, its `base`; {} for a configured model) and the
    route's promotion override ({} when none)."""
    from serve.students.registry import LifecycleStore

    if not redis_url:
        return {}, {}
    store = LifecycleStore(redis_url)
    try:
        registered = await store.adapter(model)
        override = (await store.overrides()).get(route)
    finally:
        await store.close()
    return dict(registered or {}), dict(override or {})


def fill_price(config: Config, model: str, registered: dict[str, str]) -> Price:
    """The price `model` is billed at, as the gateway bills it: its own (a configured model or
    adapter), else its base's (a runtime adapter loaded by a promotion)."""
    from serve.students.report import prices

    known = prices(config, {model: registered} if registered.get("base") else {})
    if model not in known:
        raise SystemExit(f"llmserve: no price for {model!r}: not a configured model or a registered adapter")
    return known[model]


def cmd_cache_build(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import batch_entries, batch_lines, read_log, select_head

    config = load_config(args.config)
    route = config.route(args.route)
    if route is None:
        raise SystemExit(f"llmserve: route {args.route!r} is not in the configuration")
    with open(args.log, "rb") as f:
        requests = read_log(f)
    head, total = select_head(requests, args.route, args.top, route_normalization(config, args.route),
                              route_prompts(config, args.route), skip=args.skip)
    covered = sum(q.count for q in head)
    print(f"{len(head)} head queries cover {covered}/{total} logged requests ({covered / max(total, 1):.1%})")
    redis_url = args.redis_url or config.cache.redis_url
    registered, override = asyncio.run(_served(redis_url, args.model, args.route))
    route = as_served(route, override)  # a promoted student is the route's student
    price = fill_price(config, args.model, registered)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "in.jsonl"), Path(tmp, "out.jsonl")
        # Each model is asked as the route asks it: a student with its own (short) prompt.
        inp.write_text("\n".join(batch_lines(head, args.model, prompt_for(route, args.model))) + "\n")
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
        ttl = route.cache.ttl_s if route.cache is not None else None
    items = batch_entries(output, args.route, args.model, registered.get("digest") or None, batch_id, time.time(),
                          price, args.batch_price_factor)

    async def load() -> int:
        cache = _cache(config, args.redis_url)
        try:
            return await cache.put_many(args.route, items, ttl)
        finally:
            await cache.close()

    n = asyncio.run(load())
    billed = sum(e.cost_usd or 0.0 for _, e in items)
    print(f"loaded {n} answers from {args.model} into route {args.route!r} (batch {batch_id}), "
          f"billed {billed:.6f} USD at {args.model}'s price x {args.batch_price_factor:g}")
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
                out["log_coverage"] = coverage(read_log(f), args.route, set(keys), norm,
                                               route_prompts(config, args.route))
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
    p.add_argument("--model", required=True,
                   help="who answers: the teacher, or a trained student (asked with the route's student prompt, "
                        "billed at its own price)")
    p.add_argument("--route", required=True)
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the N most frequent queries first (e.g. those a teacher build already filled)")
    p.add_argument("--batch-price-factor", type=float, default=0.5,
                   help="the batch price as a share of the model's online price (OpenAI's Batch API: 0.5)")
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
