"""`llmserve students curate export|import`: the labels most likely wrong out for review, the
reviewers' corrections back into the golden set (serve/students/curate.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serve.cli.common import openai_client, run_batch
from serve.cli.students_common import answer_text, batch_lines, read_labels
from serve.students.curate import ReviewError, Thresholds, apply_reviews, suspects, version


def cmd_curate_export(args: argparse.Namespace) -> int:
    labels = read_labels(args.labels)
    others: dict[str, str] = {}
    if args.model:
        # The second opinion: the model (the trained student) asked each label's request as its
        # tier is asked it, through the Batch API.
        _, answers = run_batch(openai_client(args, timeout_s=300), batch_lines(labels, args.model), args.timeout)
        others = {k: answer_text(body) for k, body in answers.items()}
    rows = suspects(labels, others, Thresholds(args.max_agreement, args.min_logprob), args.limit)
    Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    why: dict[str, int] = {}
    for r in rows:
        for w in r["reasons"]:
            why[w] = why.get(w, 0) + 1
    print(json.dumps({"labels": len(labels), "suspects": len(rows), "reasons": why, "file": args.output,
                      "second_opinion": args.model, "golden_version": version(labels)}))
    return 0


def cmd_curate_import(args: argparse.Namespace) -> int:
    golden = read_labels(args.labels)
    reviews = read_labels(args.reviews)
    try:
        out, counts = apply_reviews(golden, reviews)
    except ReviewError as e:
        raise SystemExit(f"llmserve: {e}") from e
    target = args.output or args.labels
    Path(target).write_text("".join(json.dumps(r) + "\n" for r in out))
    print(json.dumps({"file": target, "labels": len(out), **counts, "previous_version": version(golden),
                      "golden_version": version(out)}))
    return 0


def add_curate_commands(ss: Any, common: Any) -> None:
    cu = ss.add_parser("curate", help="export the labels most likely wrong for review; import the corrections")
    cs = cu.add_subparsers(dest="curate_command", required=True)
    p = cs.add_parser("export", help="suspect labels (disagreement, low teacher confidence, failed schema, cut off) "
                                     "as review JSONL, most suspect first")
    p.add_argument("--labels", required=True, help="the golden set (`students label` output)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--model", help="a second opinion asked every label through the Batch API (the trained student)")
    p.add_argument("--max-agreement", type=float, default=Thresholds.max_agreement,
                   help="a second answer overlapping a label less than this marks a disagreement")
    p.add_argument("--min-logprob", type=float, default=Thresholds.min_logprob,
                   help="a teacher mean token logprob below this marks low confidence")
    p.add_argument("--limit", type=int, help="at most this many suspects")
    common(p)
    p.set_defaults(func=cmd_curate_export)
    p = cs.add_parser("import", help="apply reviewed lines (correction, drop, or confirmed) to the golden set and "
                                     "print its new version, which `students train` records in the manifest")
    p.add_argument("--labels", required=True, help="the golden set to correct")
    p.add_argument("--reviews", required=True, help="the review file, edited")
    p.add_argument("-o", "--output", help="where to write the corrected set (default: over --labels)")
    p.set_defaults(func=cmd_curate_import)
