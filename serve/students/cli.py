"""`llmserve students ...`: label with the teacher, evaluate, calibrate, promote, roll back."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from serve.config import GateSpec, load_config


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
    from serve.cli_tools import _wait

    f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = _wait(client, b.id, timeout_s)
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


def cmd_label(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import read_log
    from serve.policies.cache_key import cache_key

    with open(args.log, "rb") as f:
        log = read_log(f)
    distinct: dict[str, dict[str, Any]] = {}
    for r in log:
        distinct.setdefault(cache_key("labels", r), r)
    keys = sorted(distinct)
    random.Random(args.seed).shuffle(keys)
    sample = {k: {x: v for x, v in distinct[k].items() if x not in ("model", "stream", "stream_options")}
              for k in keys[: args.sample]}
    client = _client(args)
    batch_id, answers = _run_batch(client, _lines([{"id": k, "request": r} for k, r in sample.items()],
                                                  args.teacher), args.timeout)
    labels = [{"id": k, "request": r, "teacher": _text(answers[k]), "teacher_model": args.teacher,
               "batch_id": batch_id} for k, r in sample.items() if k in answers]
    data = "".join(json.dumps(x) + "\n" for x in labels)
    Path(args.output).write_text(data)
    stored = client.files.create(file=("labels.jsonl", io.BytesIO(data.encode())), purpose="evals")
    print(json.dumps({"labels": len(labels), "file": args.output, "file_id": stored.id, "batch_id": batch_id}))
    return 0 if labels else 1


def _adapter_version(path: str | None) -> str:
    if not path or not Path(path).is_dir():
        return "unknown"
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cmd_eval(args: argparse.Namespace) -> int:
    from serve.students.metrics import score

    labels = _read_labels(args.labels)
    batch_id, answers = _run_batch(_client(args), _lines(labels, args.adapter), args.timeout)
    pairs: list[tuple[str, str, dict[str, Any] | None]] = [
        (_text(answers[lab["id"]]), lab["teacher"], None) for lab in labels if lab["id"] in answers]
    pairs += [("", lab["teacher"], None) for lab in labels if lab["id"] not in answers]  # failures score 0
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    record = {"version": args.version or _adapter_version(args.path), "labels": args.labels, "n": len(pairs),
              "batch_id": batch_id, "scores": score(pairs, metrics)}

    async def save() -> None:
        async with _store(args) as store:
            await store.record_eval(args.adapter, record)

    asyncio.run(save())
    print(json.dumps({"adapter": args.adapter, **record}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from serve.policies.cascade import mean_logprob
    from serve.students.calibrate import choose, curve, plot, table
    from serve.students.metrics import METRICS

    client = _client(args)
    samples = []
    for lab in _read_labels(args.labels):
        r = client.chat.completions.create(**{**lab["request"], "model": args.student, "logprobs": True})
        body = r.model_dump()
        lp = mean_logprob(body["choices"][0])
        samples.append((lp if lp is not None else float("-inf"),
                        METRICS[args.metric](_text(body), lab["teacher"], None)))
    points = curve(samples)
    chosen = choose(points, args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(points, chosen, args.target, str(out / "calibration.png"))
    md = table(points)
    (out / "calibration.md").write_text(md + "\n")
    print(md)
    print(json.dumps({"target": args.target, "metric": args.metric,
                      "threshold": chosen.threshold if chosen else None,
                      "teacher_share": chosen.teacher_share if chosen else None,
                      "agreement": chosen.agreement if chosen else None}))
    return 0 if chosen else 1


def _route_field(args: argparse.Namespace) -> tuple[str, str, GateSpec]:
    route = load_config(args.config).route(args.route)
    if route is None:
        raise SystemExit(f"llmserve: route {args.route!r} is not in the configuration")
    field, current = ("student", route.cascade.student) if route.cascade else ("target", str(route.target))
    return field, current, route.gate or GateSpec()


def cmd_promote(args: argparse.Namespace) -> int:
    field, configured, gate = _route_field(args)

    async def go() -> int:
        async with _store(args) as store:
            latest = await store.latest_eval(args.adapter)
            got = (latest or {}).get("scores", {}).get(gate.metric)
            if got is None or got < gate.min_score:
                print(f"refused: {args.adapter} scored {got} on {gate.metric}; route {args.route} needs "
                      f"{gate.min_score}", file=sys.stderr)
                return 1
            client = _client(args)
            client.post("/llmserve/adapters", cast_to=httpx.Response,
                        body={"name": args.adapter, "path": args.path, "base": args.base})
            await store.register_adapter(args.adapter, args.base, args.path)
            previous = (await store.overrides()).get(args.route, {}).get(field, configured)
            await store.move(args.route, field, args.adapter, previous, "promote",
                             f"{gate.metric}={got:.3f} >= {gate.min_score} (eval {(latest or {}).get('version')})")
            print(f"promoted {args.adapter} on route {args.route} ({field}; was {previous})")
            return 0

    return asyncio.run(go())


def cmd_rollback(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with _store(args) as store:
            history = await store.history(args.route)
            if not history:
                print(f"nothing to roll back on route {args.route}", file=sys.stderr)
                return 1
            last = history[0]
            await store.move(args.route, last["field"], last["from"], last["to"], "rollback",
                             f"rollback of {last['action']} to {last['to']}")
            print(f"route {args.route}: {last['field']} back to {last['from']}")
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
    p = ss.add_parser("label", help="teacher answers for a sample of logged queries (Batch API)")
    p.add_argument("--log", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--sample", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    common(p)
    p.set_defaults(func=cmd_label)
    p = ss.add_parser("eval", help="score an adapter against teacher labels and record it")
    p.add_argument("--adapter", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--metrics", default="token_overlap,exact_match")
    p.add_argument("--version", help="default: a hash of the adapter's weights (--path)")
    p.add_argument("--path", help="the adapter directory (for its version)")
    common(p)
    p.set_defaults(func=cmd_eval)
    p = ss.add_parser("calibrate", help="pick the cascade threshold for an agreement target")
    p.add_argument("--student", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--metric", default="token_overlap")
    p.add_argument("--out", default="calibration")
    common(p)
    p.set_defaults(func=cmd_calibrate)
    p = ss.add_parser("promote", help="load an adapter and move a route to it, if its eval passes the gate")
    p.add_argument("adapter")
    p.add_argument("--route", required=True)
    p.add_argument("--base", required=True, help="the model the adapter belongs to")
    p.add_argument("--path", required=True, help="adapter directory, readable by the engine replicas")
    common(p)
    p.set_defaults(func=cmd_promote)
    p = ss.add_parser("rollback", help="undo a route's last change")
    p.add_argument("--route", required=True)
    common(p, remote=False)
    p.set_defaults(func=cmd_rollback)
    p = ss.add_parser("history", help="every change of a route")
    p.add_argument("--route", required=True)
    common(p, remote=False)
    p.set_defaults(func=cmd_history)
