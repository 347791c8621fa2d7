"""`llmserve students eval` and `students calibrate`: the measurements a promotion rests on.

eval scores an adapter on labels it was not trained on (the manifest beside the adapter says which
it was) and records the score with the digest of the weights; calibrate simulates the route's whole
cascade on the student's answers and records the threshold it chose with the same digest, so
`promote --threshold` only accepts a threshold calibrated for the weights it promotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from serve.cli.common import openai_client, run_batch
from serve.cli.students_common import (
    answer_text,
    batch_lines,
    digest_or_exit,
    lifecycle_store,
    read_labels,
    served_adapter,
)
from serve.config import load_config
from serve.policies.cost import usage_tokens


def _manifest(flag: str | None, path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The training manifest of the adapter at `path`: --manifest, else `<path>.manifest.json`
    where `students train` writes it; (None, None) when there is none."""
    where = Path(flag) if flag else Path(path.rstrip("/") + ".manifest.json")
    if not where.is_file():
        if flag:
            raise SystemExit(f"llmserve: no manifest at {flag}")
        return None, None
    return json.loads(where.read_text()), str(where)


def _free_text_measures(args: argparse.Namespace, client: Any, labels: list[dict[str, Any]],
                        answers: dict[str, dict[str, Any]], scores: dict[str, float]) -> dict[str, Any]:
    """Embedding similarity (--embedding-model, through the gateway's /v1/embeddings) and the LLM
    judge's verdicts (--judge, through the Batch API), added to `scores`; what each used, returned."""
    from serve.students.judges import embedding_similarity, judge_lines, judge_score

    student = {str(lab["id"]): answer_text(answers[lab["id"]]) if lab["id"] in answers else "" for lab in labels}
    out: dict[str, Any] = {}
    if args.embedding_model:
        sims = embedding_similarity(client, args.embedding_model,
                                    [(student[str(lab["id"])], lab["teacher"]) for lab in labels])
        scores["embedding_similarity"] = sum(sims) / len(sims) if sims else 0.0
        out["embedding"] = {"model": args.embedding_model, "method": "cosine of /v1/embeddings, clamped to [0, 1]"}
    if args.judge:
        items = [(str(lab["id"]), lab["request"], student[str(lab["id"])], lab["teacher"]) for lab in labels]
        judge_batch, verdicts = run_batch(client, judge_lines(items, args.judge), args.timeout)
        scores["judge"], unreadable = judge_score([i for i, *_ in items], verdicts)
        usage = [usage_tokens(a.get("usage")) for a in verdicts.values()]
        out["judge"] = {"model": args.judge, "batch_id": judge_batch, "unreadable": unreadable,
                        "usage": {"prompt_tokens": sum(p for p, _ in usage),
                                  "completion_tokens": sum(c for _, c in usage)}}
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from serve.students.gate import eval_refusal, split_check
    from serve.students.metrics import score

    digest = digest_or_exit(args.path, "llmserve")
    config = load_config(args.config)

    async def check() -> str | None:
        async with lifecycle_store(args) as store:
            return eval_refusal(args.adapter, args.path, digest, await served_adapter(store, config, args.adapter))

    refusal = asyncio.run(check())
    if refusal:
        print(f"llmserve: not evaluated: {refusal}", file=sys.stderr)
        return 1
    labels = read_labels(args.labels)
    manifest, manifest_path = _manifest(args.manifest, args.path)
    split_record, overlap = split_check([str(lab["id"]) for lab in labels], manifest, digest, manifest_path)
    if overlap:
        print(f"llmserve: not evaluated: {overlap}", file=sys.stderr)
        return 1
    client = openai_client(args, timeout_s=300)
    batch_id, answers = run_batch(client, batch_lines(labels, args.adapter), args.timeout)
    pairs: list[tuple[str, str, dict[str, Any] | None]] = [
        (answer_text(answers[lab["id"]]), lab["teacher"], None) for lab in labels if lab["id"] in answers]
    pairs += [("", lab["teacher"], None) for lab in labels if lab["id"] not in answers]  # failures score 0
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    usage = [usage_tokens(a.get("usage")) for a in answers.values()]
    scores = score(pairs, metrics)
    measures = _free_text_measures(args, client, labels, answers, scores)
    record = {"digest": digest, "path": args.path, "labels": args.labels, "n": len(pairs), "batch_id": batch_id,
              "scores": scores, "usage_model": args.adapter, "training_split": split_record, **measures,
              "usage": {"prompt_tokens": sum(p for p, _ in usage), "completion_tokens": sum(c for _, c in usage)}}

    async def save() -> str | None:
        async with lifecycle_store(args) as store:
            # Checked again: weights reloaded under this name during the batch void the score.
            late = eval_refusal(args.adapter, args.path, digest, await served_adapter(store, config, args.adapter))
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
    from serve.config import CascadeSpec
    from serve.gateway.stages.student import policy_of
    from serve.students.calibrate import calibrate, cascade_sample, plot, table
    from serve.students.metrics import METRICS

    config = load_config(args.config)
    route = config.route(args.route) if args.route else None
    if args.route and (route is None or route.cascade is None):
        raise SystemExit(f"llmserve: route {args.route!r} is not a cascade in the configuration")
    spec = route.cascade if route is not None and route.cascade is not None else \
        CascadeSpec(student=args.student, teacher="?")
    policy, first_k = policy_of(spec), spec.decide_after_tokens
    client = openai_client(args, timeout_s=300)
    samples: list[tuple[str, float | None, float]] = []
    reasons: dict[str, int] = {}
    spent = [0, 0]  # what calibrating cost: a one-off cost in the economics report
    for lab in read_labels(args.labels):
        request = {**lab["request"], "model": args.student, "logprobs": True}
        if request.get("max_tokens") is not None:  # the cascade caps the student's answer as the route does
            request["max_tokens"] = min(int(request["max_tokens"]), spec.max_student_tokens)
        r = client.chat.completions.create(**request)
        body = r.model_dump()
        p_, c_ = usage_tokens(body.get("usage"))
        spent[0], spent[1] = spent[0] + p_, spent[1] + c_
        lp, rule = cascade_sample(policy, lab["request"], body, first_k)
        reasons[rule] = reasons.get(rule, 0) + 1
        samples.append((str(lab["id"]), lp, METRICS[args.metric](answer_text(body), lab["teacher"], None)))
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
        "usage": {"prompt_tokens": spent[0], "completion_tokens": spent[1]},
        "cascade": {"route": args.route, "first_k": first_k, "rules": reasons,
                    "method": "decide() with every rule of the route; a sample another rule escalates is a "
                              "teacher answer at every threshold"}}

    async def record() -> str | None:
        async with lifecycle_store(args) as store:
            served = await served_adapter(store, config, args.student)
            digest = (served or {}).get("digest")
            await store.record_calibration(args.student, {**summary, "digest": digest})
            return digest

    summary["digest"] = asyncio.run(record())
    (out / "calibration.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    if result.problem:
        print(f"llmserve: no cascade threshold for {args.student}: {result.problem}", file=sys.stderr)
        return 1
    return 0
