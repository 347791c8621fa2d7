"""`llmserve students ...`: label with the teacher, evaluate, calibrate, promote, roll back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from serve.cli.common import wait_for_batch
from serve.config import Config, GateSpec, load_config
from serve.policies.cost import usage_tokens


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=args.url, api_key=args.api_key or os.environ.get("LLMSERVE_API_KEY", "none"),
                  max_retries=2, timeout=300)


def _redis_url(args: argparse.Namespace) -> str:
    url = args.redis_url or load_config(args.config).cache.redis_url
    if not url:
        raise SystemExit("llmserve: the student lifecycle keeps its records in Redis: pass --redis-url")
    return str(url)


@contextlib.asynccontextmanager
async def _store(args: argparse.Namespace) -> AsyncIterator[Any]:
    from serve.students.registry import LifecycleStore

    store = LifecycleStore(_redis_url(args))
    try:
        yield store
    finally:
        await store.close()


def _run_batch(client: Any, lines: list[str], timeout_s: float) -> tuple[str, dict[str, dict[str, Any]]]:
    """Run lines through the gateway's Batch API; returns (batch id, custom_id -> response body)."""
    f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_for_batch(client, b.id, timeout_s)
    out: dict[str, dict[str, Any]] = {}
    if b.output_file_id:
        for raw in client.files.content(b.output_file_id).text.splitlines():
            rec = json.loads(raw)
            if (rec.get("response") or {}).get("status_code") == 200:
                out[rec["custom_id"]] = rec["response"]["body"]
    return b.id, out


def _text(body: dict[str, Any]) -> str:
    from serve.policies.cascade import choice_text

    return choice_text(body["choices"][0]) if body.get("choices") else ""


def _lines(labels: list[dict[str, Any]], model: str) -> list[str]:
    return [json.dumps({"custom_id": lab["id"], "method": "POST", "url": "/v1/chat/completions",
                        "body": {**lab["request"], "model": model}}) for lab in labels]


def _read_labels(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _without_head(log: list[dict[str, Any]], route: str, top: int, config: Config) -> list[dict[str, Any]]:
    """The log less its `top` most frequent queries, counted as `cache build --route --top` counts
    them (the route's normalisation): the head cache answers those, so labelling them teaches the
    student traffic it will not see."""
    from serve.cache.pipeline import route_normalization, select_head
    from serve.policies.cache_key import cache_key, endpoint_for

    norm = route_normalization(config, route)
    head = {q.key for q in select_head(log, route, top, norm)[0]}
    return [r for r in log if cache_key(route, endpoint_for(r), r, norm) not in head]


def cmd_label(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import read_log
    from serve.policies.cache_key import cache_key

    with open(args.log, "rb") as f:
        log = read_log(f)
    if args.exclude_head:
        log = _without_head(log, args.route, args.exclude_head, load_config(args.config))
    distinct: dict[str, dict[str, Any]] = {}
    for r in log:
        distinct.setdefault(cache_key("labels", "/v1/chat/completions", r), r)  # labels are chat requests
    keys = sorted(distinct)
    random.Random(args.seed).shuffle(keys)
    sample = {k: {x: v for x, v in distinct[k].items() if x not in ("model", "stream", "stream_options")}
              for k in keys[: args.sample]}
    client = _client(args)
    batch_id, answers = _run_batch(client, _lines([{"id": k, "request": r} for k, r in sample.items()],
                                                  args.teacher), args.timeout)
    # finish_reason: a student must not learn to stop where the teacher was only cut off.
    labels = [{"id": k, "request": r, "teacher": _text(answers[k]), "teacher_model": args.teacher,
               "finish_reason": answers[k]["choices"][0].get("finish_reason"), "batch_id": batch_id,
               "usage": answers[k].get("usage")}  # what the label cost: a one-off cost of the student
              for k, r in sample.items() if k in answers]
    data = "".join(json.dumps(x) + "\n" for x in labels)
    Path(args.output).write_text(data)
    stored = client.files.create(file=("labels.jsonl", io.BytesIO(data.encode())), purpose="evals")
    print(json.dumps({"labels": len(labels), "file": args.output, "file_id": stored.id, "batch_id": batch_id}))
    return 0 if labels else 1


async def _served(store: Any, config: Config, name: str) -> dict[str, Any] | None:
    """Where the gateway serves adapter `name` from: its runtime registration (a load through the
    gateway, possibly replacing configured weights), else its configuration; None if neither."""
    from serve.students.registry import AdapterError, adapter_digest

    registered = await store.adapter(name)
    if registered is not None:
        return {**registered, "digest": registered.get("digest") or None, "source": "runtime"}
    for m in config.models:
        for a in m.adapters:
            if a.name == name:
                try:
                    digest: str | None = adapter_digest(a.path)
                except (AdapterError, OSError):
                    digest = None  # unreadable here: nothing can be tied to it
                return {"base": m.name, "path": a.path, "digest": digest, "source": "config"}
    return None


def _digest_or_exit(path: str, prefix: str) -> str:
    from serve.students.registry import AdapterError, adapter_digest

    try:
        return adapter_digest(path)
    except (AdapterError, OSError) as e:
        raise SystemExit(f"{prefix}: {e}") from e


def cmd_eval(args: argparse.Namespace) -> int:
    from serve.students.gate import eval_refusal
    from serve.students.metrics import score

    digest = _digest_or_exit(args.path, "llmserve")
    config = load_config(args.config)

    async def check() -> str | None:
        async with _store(args) as store:
            return eval_refusal(args.adapter, args.path, digest, await _served(store, config, args.adapter))

    refusal = asyncio.run(check())
    if refusal:
        print(f"llmserve: not evaluated: {refusal}", file=sys.stderr)
        return 1
    labels = _read_labels(args.labels)
    batch_id, answers = _run_batch(_client(args), _lines(labels, args.adapter), args.timeout)
    pairs: list[tuple[str, str, dict[str, Any] | None]] = [
        (_text(answers[lab["id"]]), lab["teacher"], None) for lab in labels if lab["id"] in answers]
    pairs += [("", lab["teacher"], None) for lab in labels if lab["id"] not in answers]  # failures score 0
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    usage = [usage_tokens(a.get("usage")) for a in answers.values()]
    record = {"digest": digest, "path": args.path, "labels": args.labels, "n": len(pairs), "batch_id": batch_id,
              "scores": score(pairs, metrics), "usage_model": args.adapter,
              "usage": {"prompt_tokens": sum(p for p, _ in usage), "completion_tokens": sum(c for _, c in usage)}}

    async def save() -> str | None:
        async with _store(args) as store:
            # Checked again: weights reloaded under this name during the batch void the score.
            late = eval_refusal(args.adapter, args.path, digest, await _served(store, config, args.adapter))
            if late is None:
                await store.record_eval(args.adapter, record)
            return late

    refusal = asyncio.run(save())
    if refusal:
        print(f"llmserve: not recorded, the adapter changed during the evaluation: {refusal}", file=sys.stderr)
        return 1
    print(json.dumps({"adapter": args.adapter, **record}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from serve.policies.cascade import mean_logprob
    from serve.students.calibrate import calibrate, plot, table
    from serve.students.metrics import METRICS

    client = _client(args)
    samples = []
    spent = [0, 0]  # what calibrating cost: a one-off cost in the economics report
    for lab in _read_labels(args.labels):
        r = client.chat.completions.create(**{**lab["request"], "model": args.student, "logprobs": True})
        body = r.model_dump()
        p_, c_ = usage_tokens(body.get("usage"))
        spent[0], spent[1] = spent[0] + p_, spent[1] + c_
        lp = mean_logprob(body["choices"][0])
        samples.append((str(lab["id"]), lp if lp is not None else float("-inf"),
                        METRICS[args.metric](_text(body), lab["teacher"], None)))
    result = calibrate(samples, args.target, args.holdout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result.points, result.chosen, args.target, str(out / "calibration.png"))
    md = table(result.points)
    (out / "calibration.md").write_text(md + "\n")
    print(md)
    chosen, held = result.chosen, result.held
    summary = {
        "target": args.target, "metric": args.metric, "met": result.problem is None,
        "threshold": chosen.threshold if chosen else None,
        "sweep": {"n": result.n_sweep, "teacher_share": chosen.teacher_share if chosen else None,
                  "agreement": chosen.agreement if chosen else None},
        "held_out": {"n": result.n_held, "teacher_share": held.teacher_share if held else None,
                     "agreement": held.agreement if held else None},
        "n": len(samples), "usage_model": args.student,
        "usage": {"prompt_tokens": spent[0], "completion_tokens": spent[1]}}
    (out / "calibration.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if result.problem:
        print(f"llmserve: no cascade threshold for {args.student}: {result.problem}", file=sys.stderr)
        return 1
    return 0


def _route_field(args: argparse.Namespace) -> tuple[Config, str, str, GateSpec]:
    config = load_config(args.config)
    route = config.route(args.route)
    if route is None:
        raise SystemExit(f"llmserve: route {args.route!r} is not in the configuration")
    field, current = ("student", route.cascade.student) if route.cascade else ("target", str(route.target))
    return config, field, current, route.gate or GateSpec()


def cmd_promote(args: argparse.Namespace) -> int:
    from openai import APIError as OpenAIError

    from serve.students.gate import promote_refusal, short

    config, field, configured, gate = _route_field(args)
    if args.threshold is not None and field != "student":
        raise SystemExit(f"llmserve: route {args.route!r} has no cascade: --threshold is a cascade's threshold")
    digest = _digest_or_exit(args.path, "refused")

    async def go() -> int:
        async with _store(args) as store:
            latest = await store.latest_eval(args.adapter)
            served = await _served(store, config, args.adapter)
            refusal = promote_refusal(args.adapter, args.path, digest, latest, gate, served)
            if refusal:
                print(f"refused: {refusal}", file=sys.stderr)
                return 1
            if served is None or served["source"] == "runtime":
                # The gateway checks the path against its adapter roots and the digest against the
                # files, loads every replica, and registers {base, path, digest} for the others.
                try:
                    _client(args).post("/llmserve/adapters", cast_to=httpx.Response, body={
                        "name": args.adapter, "path": args.path, "base": args.base, "digest": digest})
                except OpenAIError as e:
                    print(f"refused: the gateway did not load {args.adapter}: {e}", file=sys.stderr)
                    return 1
            elif served["base"] != args.base:
                print(f"refused: {args.adapter} is configured on {served['base']}, not {args.base}", file=sys.stderr)
                return 1
            # else: a configured adapter whose files still hash to the evaluated digest, which every
            # replica loaded at start.
            previous = (await store.overrides()).get(args.route, {}).get(field, configured)
            score = (latest or {}).get("scores", {}).get(gate.metric)
            from serve.students.registry import THRESHOLD

            # The threshold calibrated for this student goes with it: a rollback takes both back.
            settings = {} if args.threshold is None else {THRESHOLD: args.threshold}
            await store.promote(args.route, field, args.adapter, previous,
                                f"{gate.metric}={score:.3f} >= {gate.min_score} (weights {short(digest)})", digest,
                                settings)
            with_threshold = "" if args.threshold is None else f", cascade threshold {args.threshold:.4f}"
            print(f"promoted {args.adapter} (weights {short(digest)}) on route {args.route} ({field}; was "
                  f"{previous}{with_threshold})")
            return 0

    return asyncio.run(go())


def cmd_rollback(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with _store(args) as store:
            undone = await store.rollback(args.route)
            if undone is None:
                print(f"nothing to roll back on route {args.route}", file=sys.stderr)
                return 1
            print(f"route {args.route}: {undone['field']} back to {undone['from']} "
                  f"(undid the promotion of {undone['to']})")
            return 0

    return asyncio.run(go())


def cmd_history(args: argparse.Namespace) -> int:
    async def go() -> list[dict[str, Any]]:
        async with _store(args) as store:
            return list(await store.history(args.route))

    print(json.dumps(asyncio.run(go()), indent=1))
    return 0


def add_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, remote: bool = True) -> None:
        p.add_argument("--config")
        p.add_argument("--redis-url")
        if remote:
            p.add_argument("--url", default=os.environ.get("LLMSERVE_URL", "http://127.0.0.1:8000/v1"))
            p.add_argument("--api-key", help="default: $LLMSERVE_API_KEY")
            p.add_argument("--timeout", type=float, default=3600)

    st = sub.add_parser("students", help="student lifecycle: label, eval, calibrate, promote, rollback")
    ss = st.add_subparsers(dest="students_command", required=True)
    from serve.cli.train import add_train_command

    add_train_command(ss)
    p = ss.add_parser("label", help="teacher answers for a sample of logged queries (Batch API)")
    p.add_argument("--log", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--sample", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--exclude-head", type=int, default=0, metavar="N",
                   help="leave out the log's N most frequent queries, the ones `cache build --top N` caches "
                        "(needs --route: its normalisation counts them), so the sample is the tail")
    p.add_argument("--route", help="the route whose head cache --exclude-head stands for")
    common(p)

    def label(args: argparse.Namespace) -> int:
        if args.exclude_head < 0 or (args.exclude_head and not args.route):
            p.error("--exclude-head takes N >= 0 and needs --route")
        return cmd_label(args)

    p.set_defaults(func=label)
    p = ss.add_parser("eval", help="score an adapter against teacher labels and record it with the digest of "
                                   "its weights (refused unless the gateway serves the name from those weights)")
    p.add_argument("--adapter", required=True, help="the name the gateway serves the adapter under")
    p.add_argument("--labels", required=True)
    p.add_argument("--metrics", default="token_overlap,exact_match")
    p.add_argument("--path", required=True, help="the adapter directory whose weights the score belongs to")
    common(p)
    p.set_defaults(func=cmd_eval)
    p = ss.add_parser("calibrate", help="pick the cascade threshold at which the student's own answers meet an "
                                        "agreement target; exits 1 when none does")
    p.add_argument("--student", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--target", type=float, default=0.8,
                   help="agreement the answers the student keeps must reach (escalated ones are the teacher's)")
    p.add_argument("--metric", default="token_overlap", choices=["token_overlap", "exact_match", "json_valid"])
    p.add_argument("--holdout", type=float, default=0.5,
                   help="share of labels (by a hash of their id) kept out of the sweep to check the chosen "
                        "threshold on; 0: no check")
    p.add_argument("--out", default="calibration")
    common(p)
    p.set_defaults(func=cmd_calibrate)
    p = ss.add_parser("promote", help="load exactly the evaluated weights and move a route to them, if the "
                                      "adapter's latest evaluation (of these weights) passes the route's gate")
    p.add_argument("adapter")
    p.add_argument("--route", required=True)
    p.add_argument("--base", required=True, help="the model the adapter belongs to")
    p.add_argument("--path", required=True, help="adapter directory under the gateway's adapter_roots, readable by "
                                                 "the engine replicas; its digest must be the evaluated one")
    p.add_argument("--threshold", type=float, help="the cascade threshold `students calibrate` chose for this "
                                                   "adapter: gateways use it on the route (no restart) until "
                                                   "the promotion is rolled back")
    common(p)
    p.set_defaults(func=cmd_promote)
    p = ss.add_parser("rollback", help="undo a route's newest promotion still in force (again: the one before)")
    p.add_argument("--route", required=True)
    common(p, remote=False)
    p.set_defaults(func=cmd_rollback)
    p = ss.add_parser("history", help="every change of a route")
    p.add_argument("--route", required=True)
    common(p, remote=False)
    p.set_defaults(func=cmd_history)
