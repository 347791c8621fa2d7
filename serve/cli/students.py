"""`llmserve students ...`: label with the teacher, evaluate, calibrate, promote, roll back."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import httpx

from serve.cli.common import openai_client, run_batch
from serve.cli.students_common import (
    answer_text,
    batch_lines,
    digest_or_exit,
    lifecycle_store,
    served_adapter,
)
from serve.cli.students_eval import cmd_calibrate, cmd_eval
from serve.config import Config, GateSpec, load_config
from serve.policies.cascade import mean_logprob
from serve.policies.tier_prompt import apply_any, digest, prompt_for
from serve.students.metrics import METRICS


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
    config = load_config(args.config) if args.route else None
    route = config.route(args.route) if config is not None else None
    if args.exclude_head:
        assert config is not None
        log = _without_head(log, args.route, args.exclude_head, config)
    distinct: dict[str, dict[str, Any]] = {}
    for r in log:
        distinct.setdefault(cache_key("labels", "/v1/chat/completions", r), r)  # labels are chat requests
    keys = sorted(distinct)
    random.Random(args.seed).shuffle(keys)
    sample = {k: {x: v for x, v in distinct[k].items() if x not in ("model", "stream", "stream_options")}
              for k in keys[: args.sample]}
    client = openai_client(args, timeout_s=300)
    # The teacher is asked as the route asks it (its instructions and examples), with logprobs for
    # curation's confidence signal; the label's `request` is what the route's student is asked (its
    # own short prompt and the client's input: what it trains and is evaluated on), `input` the
    # client's own request.
    teacher_prompt = prompt_for(route, args.teacher)
    student_prompt = route.prompts.student if route is not None and route.prompts is not None else None
    asked = [{"id": k, "request": {**apply_any(r, teacher_prompt), "logprobs": True}} for k, r in sample.items()]
    batch_id, answers = run_batch(client, batch_lines(asked, args.teacher), args.timeout)
    # finish_reason: a student must not learn to stop where the teacher was only cut off.
    labels = [{"id": k, "request": apply_any(r, student_prompt), "input": r, "teacher": answer_text(answers[k]),
               "teacher_model": args.teacher, "teacher_prompt": digest(route),
               "teacher_mean_logprob": mean_logprob(answers[k]["choices"][0]),
               "finish_reason": answers[k]["choices"][0].get("finish_reason"), "batch_id": batch_id,
               "usage": answers[k].get("usage")}  # what the label cost: a one-off cost of the student
              for k, r in sample.items() if k in answers]
    data = "".join(json.dumps(x) + "\n" for x in labels)
    Path(args.output).write_text(data)
    stored = client.files.create(file=("labels.jsonl", io.BytesIO(data.encode())), purpose="evals")
    print(json.dumps({"labels": len(labels), "file": args.output, "file_id": stored.id, "batch_id": batch_id}))
    return 0 if labels else 1


def _route_field(args: argparse.Namespace) -> tuple[Config, str, str, GateSpec]:
    config = load_config(args.config)
    route = config.route(args.route)
    if route is None:
        raise SystemExit(f"llmserve: route {args.route!r} is not in the configuration")
    field, current = ("student", route.cascade.student) if route.cascade else ("target", str(route.target))
    return config, field, current, route.gate or GateSpec()


def cmd_promote(args: argparse.Namespace) -> int:
    from openai import APIError as OpenAIError

    from serve.students.gate import gate_verdict, promote_refusal, short, threshold_refusal

    config, field, configured, gate = _route_field(args)
    if args.threshold is not None and field != "student":
        raise SystemExit(f"llmserve: route {args.route!r} has no cascade: --threshold is a cascade's threshold")
    digest = digest_or_exit(args.path, "refused")

    async def go() -> int:
        async with lifecycle_store(args) as store:
            latest = await store.latest_eval(args.adapter)
            served = await served_adapter(store, config, args.adapter)
            refusal = promote_refusal(args.adapter, args.path, digest, latest, gate, served)
            calibration = await store.latest_calibration(args.adapter)
            if refusal is None and args.threshold is not None and not args.uncalibrated:
                refusal = threshold_refusal(args.adapter, args.threshold, digest, calibration)
            if refusal:
                print(f"refused: {refusal}", file=sys.stderr)
                return 1
            if served is None or served["source"] == "runtime":
                # The gateway checks the path against its adapter roots and the digest against the
                # files, loads every replica, and registers {base, path, digest} for the others.
                try:
                    openai_client(args, timeout_s=300).post("/llmserve/adapters", cast_to=httpx.Response, body={
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
            verdict = gate_verdict(latest or {}, gate)
            evidence = {"gate": verdict, "calibration": calibration if args.threshold is not None else None,
                        "threshold_uncalibrated": bool(args.uncalibrated and args.threshold is not None)}
            await store.promote(args.route, field, args.adapter, previous,
                                f"{gate.metric}={score:.3f}, lower bound {verdict['lower_bound']:.3f} over "
                                f"{verdict['n']} labels >= {gate.min_score} (weights {short(digest)})", digest,
                                settings, evidence)
            with_threshold = "" if args.threshold is None else f", cascade threshold {args.threshold:.4f}"
            print(f"promoted {args.adapter} (weights {short(digest)}) on route {args.route} ({field}; was "
                  f"{previous}{with_threshold})")
            return 0

    return asyncio.run(go())


def cmd_rollback(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with lifecycle_store(args) as store:
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
        async with lifecycle_store(args) as store:
            return list(await store.history(args.route))

    print(json.dumps(asyncio.run(go()), indent=1))
    return 0


def _common(p: argparse.ArgumentParser, remote: bool = True) -> None:
    """Every subcommand's last options: where the lifecycle's state is and, for one that asks the
    gateway (`remote`), its address, key and timeout."""
    p.add_argument("--config")
    p.add_argument("--redis-url")
    if remote:
        p.add_argument("--url", default=os.environ.get("LLMSERVE_URL", "http://127.0.0.1:8000/v1"))
        p.add_argument("--api-key", help="default: $LLMSERVE_API_KEY")
        p.add_argument("--timeout", type=float, default=3600)


def _finish(p: argparse.ArgumentParser, func: Any, remote: bool = True) -> None:
    _common(p, remote)
    p.set_defaults(func=func)


def _add_label(ss: Any) -> None:
    p = ss.add_parser("label", help="teacher answers for a sample of logged queries (Batch API)")
    p.add_argument("--log", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--sample", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--exclude-head", type=int, default=0, metavar="N",
                   help="leave out the log's N most frequent queries, the ones `cache build --top N` caches "
                        "(needs --route: its normalisation counts them), so the sample is the tail")
    p.add_argument("--route", help="the route whose head cache --exclude-head stands for, and whose per-tier "
                                   "prompts lead the teacher's request and the student's label")

    def label(args: argparse.Namespace) -> int:
        if args.exclude_head < 0 or (args.exclude_head and not args.route):
            p.error("--exclude-head takes N >= 0 and needs --route")  # this parser's: `students label`'s usage
        return cmd_label(args)

    _finish(p, label)


def _add_eval(ss: Any) -> None:
    p = ss.add_parser("eval", help="score an adapter against teacher labels and record it with the digest of "
                                   "its weights (refused unless the gateway serves the name from those weights)")
    p.add_argument("--adapter", required=True, help="the name the gateway serves the adapter under")
    p.add_argument("--labels", required=True)
    p.add_argument("--metrics", default="token_overlap,exact_match,json_field_match")
    p.add_argument("--path", required=True, help="the adapter directory whose weights the score belongs to")
    p.add_argument("--manifest", help="the weights' training manifest (default: <path>.manifest.json): labels in "
                                      "its training split are refused")
    p.add_argument("--embedding-model", help="an embedding model the gateway serves: adds embedding_similarity "
                                             "(cosine through /v1/embeddings)")
    p.add_argument("--judge", help="a model (the teacher) that judges each answer against the label through the "
                                   "Batch API with a json_schema verdict: adds judge (share judged the same)")
    _finish(p, cmd_eval)


def _add_calibrate(ss: Any) -> None:
    p = ss.add_parser("calibrate", help="pick the cascade threshold at which the student's own answers meet an "
                                        "agreement target; exits 1 when none does")
    p.add_argument("--student", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--target", type=float, default=0.8,
                   help="agreement the answers the student keeps must reach (escalated ones are the teacher's)")
    p.add_argument("--metric", default="token_overlap", choices=sorted(METRICS))
    p.add_argument("--holdout", type=float, default=0.5,
                   help="share of labels (by a hash of their id) kept out of the sweep to check the chosen "
                        "threshold on; 0: no check")
    p.add_argument("--out", default="calibration")
    p.add_argument("--route", help="the cascade route whose rules are simulated (length, schema, refusal, the first-k "
                                   "decision of streams); default: a cascade's default rules")
    _finish(p, cmd_calibrate)


def _add_promote(ss: Any) -> None:
    p = ss.add_parser("promote", help="load exactly the evaluated weights and move a route to them, if the "
                                      "adapter's latest evaluation (of these weights) passes the route's gate")
    p.add_argument("adapter")
    p.add_argument("--route", required=True)
    p.add_argument("--base", required=True, help="the model the adapter belongs to")
    p.add_argument("--path", required=True, help="adapter directory under the gateway's adapter_roots, readable by "
                                                 "the engine replicas; its digest must be the evaluated one")
    p.add_argument("--threshold", type=float, help="the cascade threshold `students calibrate` chose for this "
                                                   "adapter: gateways use it on the route (no restart) until "
                                                   "the promotion is rolled back; refused unless it is the one "
                                                   "calibrated, and recorded, for these weights")
    p.add_argument("--uncalibrated", action="store_true",
                   help="accept a --threshold no calibration chose (recorded as such in the promotion)")
    _finish(p, cmd_promote)


def _add_route_record(ss: Any, name: str, summary: str, func: Any) -> None:
    """A command on one route's lifecycle record alone (rollback, history): no gateway asked."""
    p = ss.add_parser(name, help=summary)
    p.add_argument("--route", required=True)
    _finish(p, func, remote=False)


def add_commands(sub: Any) -> None:
    st = sub.add_parser("students", help="student lifecycle: label, eval, calibrate, promote, rollback")
    ss = st.add_subparsers(dest="students_command", required=True)
    from serve.cli.train import add_train_command

    add_train_command(ss)
    from serve.cli.students_curate import add_curate_commands

    add_curate_commands(ss, _common)
    _add_label(ss)
    _add_eval(ss)
    _add_calibrate(ss)
    _add_promote(ss)
    _add_route_record(ss, "rollback", "undo a route's newest promotion still in force (again: the one before)",
                      cmd_rollback)
    _add_route_record(ss, "history", "every change of a route", cmd_history)
