"""`llmserve report economics`: replay a query log through a running gateway's route and write what
each tier served, what it cost against the teacher or the student alone, and how often it agreed
with the teacher (economics.json, economics.txt, economics.png; the computation is
serve/students/economics.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from serve.config import Config
from serve.policies.cost import Price, usage_tokens
from serve.students.economics import Served, build, classify, mean_agreement, notes, sample_by_tier

CHAT = "/chat/completions"
# OpenAI's Batch API bills at half its online price (https://platform.openai.com/docs/guides/batch);
# the cache is filled by a batch, so that is what its offline build is billed at by default.
BATCH_PRICE_FACTOR = 0.5


def _body(request: dict[str, Any], model: str) -> dict[str, Any]:
    body = {k: v for k, v in request.items() if k not in ("model", "stream", "stream_options")}
    body["model"] = model
    return body


def _text(body: dict[str, Any]) -> str:
    from serve.policies.cascade import choice_text

    choices = body.get("choices") or []
    return choice_text(choices[0]) if choices else ""


class Caller:
    """The gateway's chat endpoint through one pooled HTTP client, at most `concurrency` in flight;
    answers of the models asked directly are remembered per exact request (temperature 0 repeats)."""

    def __init__(self, url: str, api_key: str, concurrency: int, timeout_s: float, transport: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/") + CHAT
        self.client = httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s,
                                        limits=httpx.Limits(max_connections=concurrency), transport=transport)
        self.concurrency = concurrency
        self._memo: dict[str, tuple[str, tuple[int, int]] | None] = {}

    async def close(self) -> None:
        await self.client.aclose()

    async def post(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any], float]:
        started = time.perf_counter()
        r = await self.client.post(self.url, json=body)
        elapsed = time.perf_counter() - started
        try:
            data = r.json()
        except ValueError:
            data = {}
        return r.status_code, dict(r.headers), data if isinstance(data, dict) else {}, elapsed

    async def each(self, items: list[Any], work: Any, desc: str | None = None) -> list[Any]:
        """work(item) for every item, `concurrency` at a time, results in order."""
        from tqdm import tqdm

        out: list[Any] = [None] * len(items)
        todo = iter(range(len(items)))
        with tqdm(total=len(items), desc=desc, unit="req", disable=desc is None, file=sys.stderr) as bar:
            async def worker() -> None:
                for i in todo:
                    out[i] = await work(items[i])
                    bar.update(1)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return out

    async def answer(self, model: str, request: dict[str, Any]) -> tuple[str, tuple[int, int]] | None:
        """(text, (prompt, completion) tokens) of `model` asked directly; None when it failed."""
        body = _body(request, model)
        key = json.dumps(body, sort_keys=True)
        if key not in self._memo:
            status, _, data, _ = await self.post(body)
            self._memo[key] = (_text(data), usage_tokens(data.get("usage"))) if status == 200 else None
        return self._memo[key]


async def replay(caller: Caller, requests: list[dict[str, Any]], route: str, student: str | None,
                 teacher: str) -> list[Served]:
    async def one(item: tuple[int, dict[str, Any]]) -> Served:
        i, request = item
        try:
            status, headers, data, elapsed = await caller.post(_body(request, route))
        except Exception:  # a dropped connection is a failed request, not the end of the replay
            return Served(i, "error", 0.0, 0.0)
        tier = classify(status, headers, student, teacher)
        provenance = None
        if tier == "cache":
            provenance = "batch" if (data.get("llmserve_provenance") or {}).get("batch_id") else "online"
        return Served(i, tier, elapsed, float(headers.get("x-llmserve-cost-usd") or 0.0),
                      _text(data) if status == 200 else None, provenance)

    result: list[Served] = await caller.each(list(enumerate(requests)), one, desc=f"replay through {route}")
    return result


async def _lifecycle(redis_url: str | None) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(runtime adapters, route overrides) from the lifecycle store; empty without Redis."""
    if not redis_url:
        return {}, {}
    from serve.students.registry import LifecycleStore

    store = LifecycleStore(redis_url)
    try:
        return await store.adapters(), await store.overrides()
    finally:
        await store.close()


def prices(config: Config, runtime_adapters: dict[str, dict[str, str]]) -> dict[str, Price]:
    """Every model's and adapter's price as the gateway bills it: an adapter's own, else its base's
    (runtime adapters, loaded by a promotion, have their base's)."""
    out: dict[str, Price] = {}
    for m in config.models:
        out[m.name] = Price(m.price.input_per_million, m.price.output_per_million)
        for a in m.adapters:
            p = a.price or m.price
            out[a.name] = Price(p.input_per_million, p.output_per_million)
    for name, info in runtime_adapters.items():
        if name not in out and info.get("base") in out:
            out[name] = out[info["base"]]
    return out


async def build_usage(redis_url: str | None, route: str) -> tuple[int, int] | None:
    """Tokens the teacher spent on the route's batch-filled cache entries (the offline build)."""
    if not redis_url:
        return None
    from serve.cache.store import HeadCache

    cache = HeadCache(redis_url, op_timeout_s=5)
    try:
        prompt = completion = 0
        for key in await cache.list_keys(route, limit=1_000_000):
            entry = await cache.get(route, key)
            if entry is not None and entry.batch_id:
                p, c = usage_tokens(entry.response.get("usage"))
                prompt, completion = prompt + p, completion + c
        return prompt, completion
    finally:
        await cache.close()


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


async def _pairs(caller: Caller, model: str, items: Iterable[tuple[str, dict[str, Any]]],
                 desc: str) -> list[tuple[str, str]]:
    """(answer, teacher's answer) for (answer, request) items, the teacher asked directly."""
    items = list(items)
    labels = await caller.each([r for _, r in items], lambda r: caller.answer(model, r), desc=desc)
    return [(a, lab[0]) for (a, _), lab in zip(items, labels, strict=True) if lab is not None]


async def economics(args: argparse.Namespace, config: Config, log: list[dict[str, Any]]
                    ) -> tuple[dict[str, Any], list[Served]]:
    route = config.route(args.route)
    if route is None:
        raise SystemExit(f"llmserve: route {args.route!r} is not in the configuration")
    redis_url = args.redis_url or config.cache.redis_url
    runtime, overrides = await _lifecycle(redis_url)
    teacher = route.cascade.teacher if route.cascade else str(route.target)
    student = overrides.get(route.name, {}).get("student", route.cascade.student) if route.cascade else None
    price = prices(config, runtime)
    built = await build_usage(redis_url, route.name)
    caller = Caller(args.url, args.api_key or os.environ.get("LLMSERVE_API_KEY", "none"), args.concurrency,
                    args.timeout)
    try:
        started = time.monotonic()
        records = await replay(caller, log, route.name, student, teacher)
        wall = time.monotonic() - started
        rng = random.Random(args.seed)
        uniform = [log[i] for i in sorted(rng.sample(range(len(log)), min(args.sample, len(log))))]
        per_tier = {t: await _pairs(caller, teacher, [(r.text or "", log[r.index]) for r in rs],
                                    f"teacher labels, {t} tier")
                    for t, rs in sample_by_tier(records, args.sample, args.seed).items()}
        t_ans = await caller.each(uniform, lambda r: caller.answer(teacher, r), desc="teacher on a log sample")
        s_ans = (await caller.each(uniform, lambda r: caller.answer(student, r), desc="student on a log sample")
                 if student else [])
        extra: dict[str, Any] = {"route": route.name, "log": args.log or "synthesised", "concurrency": args.concurrency,
                                 "replay_seconds": round(wall, 1), "sample": len(uniform)}
        both = [(s[0], t[0]) for s, t in zip(s_ans, t_ans, strict=False) if s is not None and t is not None]
        extra["student_only_agreement"] = mean_agreement(both)
        if args.labels:
            extra["held_out"] = await _held_out(caller, args.labels, [m for m in (student, args.base) if m])
        if args.manifest:
            held = json.loads(Path(args.manifest).read_text())["agreement"]["held_out"]
            extra["training"] = {"before": held["before"].get("token_overlap"),
                                 "after": held["after"].get("token_overlap"), "manifest": args.manifest}
    finally:
        await caller.close()
    report = build(records, tier_agreement=per_tier, teacher_usage=[t[1] for t in t_ans if t is not None],
                   student_usage=[s[1] for s in s_ans if s is not None], prices=price, teacher=teacher,
                   student=student, build_usage=built, batch_factor=args.batch_price_factor, extra=extra)
    report["notes"] = notes(report) + list(args.note or [])
    return report, records


async def _held_out(caller: Caller, labels_path: str, models: list[str]) -> dict[str, Any]:
    """Agreement of each model, asked directly, with the teacher's labels (held out from training)."""
    labels = _read_jsonl(labels_path)
    scores: dict[str, float | None] = {}
    for m in models:
        got = await caller.each([lab["request"] for lab in labels], lambda r, m=m: caller.answer(m, r),
                                desc=f"{m} on the held-out labels")
        scores[m] = mean_agreement([(g[0] if g else "", lab["teacher"]) for g, lab in zip(got, labels, strict=True)])
    return {"labels": labels_path, "n": len(labels), "token_overlap": scores}
