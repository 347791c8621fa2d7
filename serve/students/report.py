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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from serve.config import Config, RouteSpec
from serve.policies.cost import Price, cost_usd, usage_tokens
from serve.policies.tier_prompt import apply_any, as_served, digest, prompt_for
from serve.students.attribution import OneOff, Traffic, attribute, by_model, goals, holding_back, terms, tokens_cost
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
        # The route whose per-tier prompts a model asked directly gets, as the route would send it
        # (None: the request as logged).
        self.route: RouteSpec | None = None

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
        """(text, (prompt, completion) tokens) of `model` asked directly, led by the prompt the route
        gives that model's tier (the teacher's instructions and examples); None when it failed."""
        body = _body(apply_any(request, prompt_for(self.route, model)), model)
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


async def cache_fills(redis_url: str | None, route: str) -> list[tuple[str, int, int, float | None]]:
    """(model that made it, prompt, completion tokens, the cost `cache build` recorded) of each of the
    route's batch-filled cache entries: the offline fills, billed at the batch price of the model
    that made each."""
    if not redis_url:
        return []
    from serve.cache.store import HeadCache

    cache = HeadCache(redis_url, op_timeout_s=5)
    try:
        out = []
        for key in await cache.list_keys(route, limit=1_000_000):
            entry = await cache.get(route, key)
            if entry is not None and entry.batch_id:
                p, c = usage_tokens(entry.response.get("usage"))
                out.append((entry.model, p, c, entry.cost_usd))
        return out
    finally:
        await cache.close()


def prompt_note(route: RouteSpec, teacher: str) -> dict[str, Any] | str:
    """What the teacher-only baseline sends: the route's teacher prompt (its digest and size), or the
    logged request alone when the route configures none."""
    p = prompt_for(route, teacher)
    if p is None:
        return "the request as logged (the route configures no teacher prompt)"
    return {"digest": digest(route), "system_chars": len(p.system or ""), "examples": len(p.examples),
            "note": "every teacher answer the report asks for (teacher-only, behind the cache, labels of each "
                    "tier) is led by the route's teacher prompt, as the route sends it"}


def label_key(request: dict[str, Any]) -> str:
    """A request's label id, as `students label` names it: the key its training labels carry."""
    from serve.policies.cache_key import cache_key

    return cache_key("labels", "/v1/chat/completions", request)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


async def _pairs(caller: Caller, model: str, items: Iterable[tuple[str, dict[str, Any]]],
                 desc: str) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    """(answer, teacher's answer) for (answer, request) items, the teacher asked directly, and the
    teacher's (prompt, completion) tokens for each."""
    items = list(items)
    labels = await caller.each([r for _, r in items], lambda r: caller.answer(model, r), desc=desc)
    return ([(a, lab[0]) for (a, _), lab in zip(items, labels, strict=True) if lab is not None],
            [lab[1] for lab in labels if lab is not None])


def one_off_costs(args: argparse.Namespace, price: dict[str, Price],
                  fills: list[tuple[str, int, int, float | None]], train_labels: list[dict[str, Any]],
                  student: str | None, teacher: str | None = None, teacher_req: float = 0.0) -> list[OneOff]:
    """Every cost paid once for the route: cache fills and labels at the batch price of the model
    that made them (a fill at the cost its build recorded, when it did), the student's evaluation
    and calibration at its price (the Batch API's for the evaluation), and training time at
    --train-hour-usd. A fill another model than `teacher` made is, for the teacher-behind-the-cache
    baseline, `teacher_req` (the teacher's cost per request, with its prompt) at the batch price per entry."""
    f = args.batch_price_factor
    fill_usd = by_model([(m, p, c) for m, p, c, usd in fills if usd is None], price, f)
    for m, _, _, usd in fills:
        if usd is not None:
            fill_usd[m] = fill_usd.get(m, 0.0) + usd
    entries = {model: sum(1 for x in fills if x[0] == model) for model in fill_usd}
    out = []
    for model, usd in sorted(fill_usd.items()):
        instead = None if teacher is None or model == teacher else entries[model] * teacher_req * f
        out.append(OneOff("cache fill", usd, model, f"{entries[model]} entries, batch price" + (
            f" (the teacher, for the teacher-behind-cache baseline: {instead:.6f})" if instead is not None else ""),
            cache_fill=True, teacher_usd=instead))
    labelled = [(lab.get("teacher_model") or "?", *usage_tokens(lab.get("usage"))) for lab in train_labels]
    if any(p or c for _, p, c in labelled):
        out += [OneOff("teacher labels", usd, model, f"{len(labelled)} labels, batch price")
                for model, usd in sorted(by_model(labelled, price, f).items())]
    elif train_labels:
        out.append(OneOff("teacher labels", 0.0, None, f"{len(train_labels)} labels carry no usage: not counted"))
    for name, path, factor in (("evaluation", args.eval_record, f), ("calibration", args.calibration_record, 1.0)):
        if path:
            rec = json.loads(Path(path).read_text())
            model = rec.get("usage_model") or rec.get("adapter") or student or "?"
            p_, c_ = usage_tokens(rec.get("usage"))
            out.append(OneOff(name, cost_usd(p_, c_, price.get(model, Price())) * factor, model,
                              f"{rec.get('n', '?')} labels{', batch price' if factor != 1.0 else ''}"))
    if args.manifest:
        m = json.loads(Path(args.manifest).read_text())
        hours = float(m.get("train_seconds") or 0.0) / 3600
        out.append(OneOff("training", hours * args.train_hour_usd, m.get("device"),
                          f"{hours * 3600:.0f} s at ${args.train_hour_usd:g}/h"))
    return out


async def economics(args: argparse.Namespace, config: Config, log: list[dict[str, Any]], transport: Any = None,
                    measures: Measures | None = None) -> tuple[dict[str, Any], list[Served]]:
    """The report and the replayed records. measures: the free-text measures (embedding similarity,
    the LLM judge) the CLI binds to the gateway, scored on each tier's out-of-sample answers."""
    route = config.route(args.route)
    if route is None:
        raise SystemExit(f"llmserve: route {args.route!r} is not in the configuration")
    redis_url = args.redis_url or config.cache.redis_url
    runtime, overrides = await _lifecycle(redis_url)
    route = as_served(route, overrides.get(route.name))  # a promoted student is the route's student
    teacher = route.cascade.teacher if route.cascade else str(route.target)
    student = route.cascade.student if route.cascade else None
    price = prices(config, runtime)
    fills = await cache_fills(redis_url, route.name)
    train_labels = _read_jsonl(args.train_labels) if args.train_labels else []
    trained_on = {str(lab["id"]) for lab in train_labels}
    if args.manifest:  # only what the student was trained on, not what it held out
        split = json.loads(Path(args.manifest).read_text()).get("split") or {}
        trained_on &= set(split.get("train") or trained_on)
    caller = Caller(args.url, args.api_key or os.environ.get("LLMSERVE_API_KEY", "none"), args.concurrency,
                    args.timeout, transport)
    caller.route = route
    try:
        started = time.monotonic()
        records = await replay(caller, log, route.name, student, teacher)
        records = [replace(r, seen=label_key(log[r.index]) in trained_on) for r in records]
        wall = time.monotonic() - started
        rng = random.Random(args.seed)
        uniform = [log[i] for i in sorted(rng.sample(range(len(log)), min(args.sample, len(log))))]
        by_tier = sample_by_tier(records, args.sample, args.seed)
        per_tier = {t: (await _pairs(caller, teacher, [(r.text or "", log[r.index]) for r in rs],
                                     f"teacher labels, {t} tier"))[0]
                    for t, rs in by_tier.items()}
        quality = await _free_text(caller, measures, by_tier, log, teacher, getattr(args, "quality_sample", 0))
        # What the teacher costs on the traffic the cache missed (whichever tier then answered it):
        # the teacher-behind-the-cache baseline.
        missed = [r for r in records if r.tier not in ("cache", "error")]
        missed = sorted(rng.sample(missed, min(args.sample, len(missed))), key=lambda r: r.index)
        m_ans = await caller.each([log[r.index] for r in missed], lambda r: caller.answer(teacher, r),
                                  desc="teacher on the cache's misses")
        missed_usage = [a[1] for a in m_ans if a is not None]
        t_ans = await caller.each(uniform, lambda r: caller.answer(teacher, r), desc="teacher on a log sample")
        s_ans = (await caller.each(uniform, lambda r: caller.answer(student, r), desc="student on a log sample")
                 if student else [])
        extra: dict[str, Any] = {"route": route.name, "log": args.log or "synthesised", "concurrency": args.concurrency,
                                 "replay_seconds": round(wall, 1), "sample": len(uniform),
                                 "teacher_prompt": prompt_note(route, teacher)}
        both = [(s[0], t[0]) for s, t in zip(s_ans, t_ans, strict=False) if s is not None and t is not None]
        extra["student_only_agreement"] = mean_agreement(both)
        if args.labels:
            extra["held_out"] = await _held_out(caller, args.labels, [m for m in (student, args.base) if m])
        if args.manifest:
            manifest = json.loads(Path(args.manifest).read_text())
            held = manifest["agreement"]["held_out"]
            golden: dict[str, Any] = next((s for s in manifest.get("labels") or [] if s.get("golden_version")), {})
            extra["training"] = {"before": held["before"].get("token_overlap"),
                                 "after": held["after"].get("token_overlap"), "manifest": args.manifest,
                                 "golden_version": golden.get("golden_version"), "reviewed": golden.get("reviewed")}
    finally:
        await caller.close()
    teacher_usage = [t[1] for t in t_ans if t is not None]
    student_usage = [s[1] for s in s_ans if s is not None]
    report = build(records, tier_agreement=per_tier, teacher_usage=teacher_usage, student_usage=student_usage,
                   prices=price, teacher=teacher, student=student, build_usage=None,
                   batch_factor=args.batch_price_factor, extra=extra)
    tp = price.get(teacher, Price())
    n_t, n_s, n_m = len(teacher_usage), len(student_usage), len(missed_usage)
    tiers = report["tiers"]
    cascade_saw = tiers["student"]["requests"] + tiers["teacher"]["requests"]
    traffic = Traffic(
        requests=len(records), route_online_usd=sum(r.cost_usd for r in records),
        tier_usd={t: tiers[t]["cost_usd"] for t in tiers}, cache_share=tiers["cache"]["share"],
        escalation_rate=tiers["teacher"]["requests"] / cascade_saw if cascade_saw and student else None,
        teacher_req=tokens_cost(teacher_usage, tp) / n_t if n_t else 0.0,
        teacher_missed_req=(tokens_cost(missed_usage, tp) / n_m if n_m else
                            tokens_cost(teacher_usage, tp) / n_t if n_t else 0.0),
        student_req=tokens_cost(student_usage, price.get(student or "", Price())) / n_s if n_s else None,
        student_at_teacher_price_req=tokens_cost(student_usage, tp) / n_s if n_s else None)
    costs = one_off_costs(args, price, fills, train_labels, student, teacher, traffic.teacher_req)
    horizon = args.horizon or len(records)
    att = attribute(traffic, costs, horizon)
    tm = terms(traffic, att["one_off_usd"], horizon, args.target_saving)
    report["attribution"], report["terms"], report["traffic"] = att, tm, asdict(traffic)
    if measures is not None:
        for t, (scores, _) in quality.items():
            report["tiers"][t]["agreement"].update(scores)
        report["quality_measures"] = {**measures.record, "sample_per_tier": getattr(args, "quality_sample", 0),
                                      "judge_spent": {t: spent for t, (_, spent) in quality.items() if spent}}
    report["goals"] = goals(att, traffic.cache_share, args.target_saving)
    report["out_of_sample"] = {"method": "time split: the replayed log is later than the traffic the cache and "
                                         "the labels came from; answers to prompts the student trained on are "
                                         "left out of every agreement figure",
                               "trained_on": len(trained_on),
                               "replayed_in_training": sum(1 for r in records if r.seen)}
    report["notes"] = (notes(report) + holding_back(tm, att["saving"]["route_vs_teacher_only"])
                       + list(args.note or []))
    return report, records


@dataclass(frozen=True)
class Measures:
    """The free-text measures bound to a gateway: embed(pairs) -> similarities, judge(items) ->
    (batch id, answers) (serve/students/judges.py, tier_quality), and what they are (the record)."""

    embed: Callable[[list[tuple[str, str]]], list[float]] | None
    judge: Callable[[list[tuple[str, dict[str, Any], str, str]]], tuple[str, dict[str, Any]]] | None
    record: dict[str, Any]


async def _free_text(caller: Caller, measures: Measures | None, by_tier: dict[str, list[Served]],
                     log: list[dict[str, Any]], teacher: str, k: int
                     ) -> dict[str, tuple[dict[str, float | None], dict[str, Any]]]:
    """Each tier's embedding similarity and judge verdicts on the first k of its out-of-sample
    sample, against the teacher asked directly (answers the tier's token overlap already asked for:
    remembered, not asked again)."""
    from serve.students.judges import tier_quality

    out: dict[str, tuple[dict[str, float | None], dict[str, Any]]] = {}
    if measures is None:
        return out
    for t, rs in by_tier.items():
        items = []
        for r in rs[:k]:
            label = await caller.answer(teacher, log[r.index])
            if label is not None:
                items.append((f"{t}-{r.index}", log[r.index], r.text or "", label[0]))
        out[t] = await asyncio.to_thread(tier_quality, items, measures.embed, measures.judge)
    return out


async def _held_out(caller: Caller, labels_path: str, models: list[str]) -> dict[str, Any]:
    """Agreement of each model, asked directly, with the teacher's labels (held out from training)."""
    labels = _read_jsonl(labels_path)
    scores: dict[str, float | None] = {}
    for m in models:
        # The client's own input (`students label --route` keeps it apart from the student-led
        # request): the caller leads it with each model's tier prompt.
        got = await caller.each([lab.get("input") or lab["request"] for lab in labels],
                                lambda r, m=m: caller.answer(m, r),
                                desc=f"{m} on the held-out labels")
        scores[m] = mean_agreement([(g[0] if g else "", lab["teacher"]) for g, lab in zip(got, labels, strict=True)])
    return {"labels": labels_path, "n": len(labels), "token_overlap": scores}
