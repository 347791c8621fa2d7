"""`llmserve report economics`: replay a query log through a route and report share, cost and
agreement per tier (serve/students/report.py, serve/students/economics.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve.config import load_config
from serve.students.economics import plot, table
from serve.students.report import BATCH_PRICE_FACTOR, Measures, economics


def cmd_economics(args: argparse.Namespace) -> int:
    from serve.cache.pipeline import read_log, synth_log

    config = load_config(args.config)
    if args.log:
        with open(args.log, "rb") as f:
            log = read_log(f)
    else:
        log = synth_log(args.requests, args.distinct, args.s, args.seed, args.max_tokens, args.route)
    if not log:
        raise SystemExit("llmserve: the log holds no chat requests")
    report, records = asyncio.run(economics(args, config, log, measures=_measures(args)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    (out / "economics.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(report)
    (out / "economics.txt").write_text(text + "\n")
    plot(report, str(out / "economics.png"))
    print(text)
    print(f"\nwrote {out / 'economics.json'}, {out / 'economics.txt'}, {out / 'economics.png'}")
    return 0 if report["tiers"]["error"]["requests"] < len(log) else 1


def _measures(args: argparse.Namespace) -> Measures | None:
    """The embedding similarity (--embedding-model, the gateway's /v1/embeddings) and the judge
    (--judge, the Batch API with a json_schema verdict), bound to the gateway; None when neither."""
    if not (args.embedding_model or args.judge):
        return None
    from serve.cli.common import openai_client, run_batch
    from serve.students.judges import JUDGE_INSTRUCTIONS, VERDICT_SCHEMA, embedding_similarity, judge_lines

    client = openai_client(args, timeout_s=300)
    record: dict[str, Any] = {}
    embed = judge = None
    if args.embedding_model:
        def embed(pairs: list[tuple[str, str]]) -> list[float]:
            return embedding_similarity(client, args.embedding_model, pairs)

        record["embedding"] = {"model": args.embedding_model, "endpoint": "/v1/embeddings",
                               "method": "cosine of the answer's and the teacher's embeddings, clamped to [0, 1]"}
    if args.judge:
        def judge(items: list[tuple[str, dict[str, Any], str, str]]) -> tuple[str, dict[str, Any]]:
            return run_batch(client, judge_lines(items, args.judge), args.timeout)

        record["judge"] = {"model": args.judge, "endpoint": "Batch API, /v1/chat/completions",
                           "instructions": JUDGE_INSTRUCTIONS, "schema": VERDICT_SCHEMA,
                           "method": "share of same_meaning verdicts; an unreadable verdict counts as not the same"}
    return Measures(embed, judge, record)


def add_commands(sub: Any) -> None:
    rep = sub.add_parser("report", help="reports on a running gateway: economics")
    rs = rep.add_subparsers(dest="report_command", required=True)
    p = rs.add_parser("economics", help="replay a query log through a route: share, cost per 1,000 requests and "
                                        "agreement with the teacher per tier (cache, student, teacher)")
    p.add_argument("--route", required=True)
    p.add_argument("--config")
    p.add_argument("--redis-url", help="the route's cache and lifecycle store (default: the config's)")
    p.add_argument("--url", default=os.environ.get("LLMSERVE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", help="default: $LLMSERVE_API_KEY")
    p.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--log", help="query log (JSONL request bodies); default: a synthesised Zipf log")
    p.add_argument("--requests", type=int, default=10_000, help="synthesised log: requests")
    p.add_argument("--distinct", type=int, default=1000, help="synthesised log: distinct queries")
    p.add_argument("--s", type=float, default=1.1, help="synthesised log: Zipf exponent")
    p.add_argument("--max-tokens", type=int, default=16, help="synthesised log: max_tokens of each request")
    p.add_argument("--seed", type=int, default=0, help="seeds the synthesised log and the samples")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--sample", type=int, default=200,
                   help="log requests the teacher and the student answer directly (cost and agreement of each "
                        "alone), and answers per tier scored against the teacher")
    p.add_argument("--batch-price-factor", type=float, default=BATCH_PRICE_FACTOR,
                   help="the cache build's batch price as a share of the teacher's online price")
    p.add_argument("--labels", help="held-out teacher labels (`students label` format): the route's student "
                                    "and --base are scored on them")
    p.add_argument("--base", help="the untrained student base model, scored on --labels beside the student")
    p.add_argument("--manifest", help="`students train` manifest: its before/after agreement goes in the report")
    p.add_argument("--train-labels", help="the labels the student was trained on (`students label` output): "
                                          "their cost is a one-off cost, and replayed prompts among them are left "
                                          "out of the agreement figures")
    p.add_argument("--eval-record", help="`students eval`'s JSON line, saved: its usage is a one-off cost")
    p.add_argument("--calibration-record", help="`students calibrate`'s calibration.json: its usage is a one-off cost")
    p.add_argument("--train-hour-usd", type=float, default=2.0,
                   help="price of one hour of the training machine (the manifest's train_seconds)")
    p.add_argument("--horizon", type=int,
                   help="requests the one-off costs are amortised over (default: the replayed requests)")
    p.add_argument("--target-saving", type=float, default=100.0, help="the goal against teacher-only")
    p.add_argument("--embedding-model", help="score each tier's answers by embedding similarity with the teacher's, "
                                             "through this model on the gateway's /v1/embeddings")
    p.add_argument("--judge", help="score each tier's answers by this model's verdict (same meaning as the teacher's "
                                   "or not), asked through the Batch API with a json_schema")
    p.add_argument("--quality-sample", type=int, default=50,
                   help="answers per tier the embedding similarity and the judge score (the first of the tier's "
                        "out-of-sample sample)")
    p.add_argument("--note", action="append", help="a line for the closing note (repeatable)")
    p.add_argument("--out", default="economics", help="directory for economics.json, .txt and .png")
    p.set_defaults(func=cmd_economics)
