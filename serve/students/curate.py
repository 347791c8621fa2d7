"""Curating the golden set (pure): find the teacher's labels most likely wrong, export them for a
person to review, and import the corrections back.

A student learns the teacher's mistakes as faithfully as its answers, and the gate scores it against
the same labels; so the labels a reviewer should read first are those with a sign of being wrong:
- disagreement: the trained student (or another model) answers the same input very differently
  (token overlap below a bound): one of the two is wrong, and a student trained on thousands of
  labels disagreeing with one of them points at that one;
- low confidence: the teacher's own mean token logprob on the label (`students label` asks for
  logprobs) is low;
- a failed schema: the request asked for a json_schema and the label does not satisfy it;
- cut off: the teacher stopped at max_tokens (finish_reason `length`).

The review file is JSONL, one suspect a line, most suspect first, each with its reasons and a
`correction` left null. A reviewer sets `correction` to the right answer, or `drop: true` to take
the label out; a line left as it is keeps the label. `apply_reviews` writes the corrected golden set,
and `version` is its content digest (independent of line order and JSON spelling), which `students
train` records in the manifest, so every adapter says which version of the golden set taught it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serve.policies.cascade import requested_schema, schema_verdict
from serve.students.metrics import token_overlap


@dataclass(frozen=True)
class Thresholds:
    max_agreement: float = 0.3  # a second answer overlapping the label less than this is a disagreement
    min_logprob: float = -1.5  # a teacher mean logprob below this is low confidence


def reasons(label: Mapping[str, Any], other: str | None, t: Thresholds) -> tuple[list[str], float | None]:
    """Why `label` may be wrong (empty: no sign), and the agreement of `other` with it (None: no other)."""
    out = []
    agreement = token_overlap(other, label["teacher"]) if other is not None else None
    if agreement is not None and agreement < t.max_agreement:
        out.append("disagreement")
    lp = label.get("teacher_mean_logprob")
    if isinstance(lp, (int, float)) and lp < t.min_logprob:
        out.append("low_confidence")
    schema = requested_schema(label.get("input") or label.get("request") or {})
    if schema is not None and schema_verdict(label["teacher"], schema) is False:
        out.append("failed_schema")
    if label.get("finish_reason") == "length":
        out.append("cut_off")
    return out, agreement


def suspects(labels: Iterable[Mapping[str, Any]], others: Mapping[str, str], t: Thresholds = Thresholds(),
             limit: int | None = None) -> list[dict[str, Any]]:
    """Review lines for the labels with any sign of being wrong, most suspect first: more reasons
    first, then the lower agreement, then the lower teacher confidence. `others`: label id -> a
    second model's answer to the same input (the trained student's, usually)."""
    rows = []
    for lab in labels:
        why, agreement = reasons(lab, others.get(lab["id"]), t)
        if not why:
            continue
        rows.append({"id": lab["id"], "reasons": why, "input": lab.get("input") or lab.get("request"),
                     "teacher": lab["teacher"], "other": others.get(lab["id"]), "agreement": agreement,
                     "teacher_mean_logprob": lab.get("teacher_mean_logprob"), "correction": None, "drop": False})

    def rank(r: dict[str, Any]) -> tuple[float, float, float]:
        lp = r["teacher_mean_logprob"]
        return (-len(r["reasons"]), r["agreement"] if r["agreement"] is not None else 1.0,
                lp if isinstance(lp, (int, float)) else 0.0)

    rows.sort(key=rank)
    return rows[:limit] if limit is not None else rows


class ReviewError(ValueError):
    pass


def apply_reviews(golden: list[dict[str, Any]], reviews: Iterable[Mapping[str, Any]]
                  ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The golden set with the reviewers' corrections applied (a new list; order kept): a
    `correction` replaces the teacher's answer (the original kept as `original_teacher`, the label
    marked `reviewed: corrected`), `drop: true` removes the label, a line with neither confirms it
    (`reviewed: confirmed`). A review of an id the golden set does not hold is refused."""
    by_id = {lab["id"]: i for i, lab in enumerate(golden)}
    out = [dict(lab) for lab in golden]
    dropped: set[str] = set()
    counts = {"corrected": 0, "dropped": 0, "confirmed": 0}
    for n, rev in enumerate(reviews, 1):
        rid = str(rev.get("id"))
        if rid not in by_id:
            raise ReviewError(f"review line {n}: label {rid!r} is not in the golden set")
        lab = out[by_id[rid]]
        if rev.get("drop"):
            dropped.add(rid)
            counts["dropped"] += 1
        elif isinstance(rev.get("correction"), str):
            lab.setdefault("original_teacher", lab["teacher"])
            lab["teacher"], lab["reviewed"] = rev["correction"], "corrected"
            lab["finish_reason"] = "stop"  # a reviewer's answer is whole, not cut off
            counts["corrected"] += 1
        elif rev.get("correction") is not None:
            raise ReviewError(f"review line {n}: correction must be a string or null")
        else:
            lab["reviewed"] = "confirmed"
            counts["confirmed"] += 1
    return [lab for lab in out if lab["id"] not in dropped], counts


def version(golden: Iterable[Mapping[str, Any]]) -> str:
    """The golden set's content digest: each label's id, what the student is asked and the answer it
    learns, in id order, so neither line order nor JSON spelling changes it and any correction does."""
    canon = sorted((str(lab["id"]), json.dumps(lab.get("request"), sort_keys=True, separators=(",", ":")),
                    str(lab["teacher"])) for lab in golden)
    return "sha256:" + hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()
