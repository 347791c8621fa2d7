"""The economics report's free-text quality measures (issue 29): each tier's out-of-sample answers
scored by embedding similarity and by the judge's verdicts (serve/students/judges.py tier_quality,
serve/students/report.py), shown in the quality table with the golden set the student was trained
on; and the demo's curation step (serve/cli/demo_parts.py): what stands in for the reviewer, and
export -> review -> import through the real `llmserve students curate` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json

import httpx
import pytest

from serve.cli.demo_parts import FAQ, curate, faq_review, topic_of, wrong_share
from serve.students.economics import table
from serve.students.judges import tier_quality
from serve.students.report import Measures, economics
from tests.unit.economics_support import CONFIG, SureOfSome, cascade_app


def said(same: bool | None) -> dict:
    content = "cut off {" if same is None else json.dumps({"same_meaning": same, "reason": "r"})
    return {"choices": [{"message": {"content": content}}], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}


def test_tier_quality_means_the_similarities_and_verdicts_and_counts_an_unreadable_one_against():
    items = [("a", {"messages": []}, "x", "x"), ("b", {"messages": []}, "y", "z"), ("c", {"messages": []}, "y", "w")]
    asked: list = []

    def embed(pairs):
        asked.append(pairs)
        return [1.0, 0.5, 0.0]

    def judge(its):
        asked.append([i for i, *_ in its])
        return "batch-1", {"a": said(True), "b": said(None), "c": said(False)}

    scores, spent = tier_quality(items, embed, judge)
    assert asked == [[("x", "x"), ("y", "z"), ("y", "w")], ["a", "b", "c"]]
    assert scores == {"embedding_similarity": pytest.approx(0.5), "judge": pytest.approx(1 / 3)}
    assert spent == {"batch_id": "batch-1", "unreadable": 1, "prompt_tokens": 30, "completion_tokens": 9}
    assert tier_quality([], embed, judge) == ({}, {})
    assert tier_quality(items, embed, None)[0] == {"embedding_similarity": pytest.approx(0.5)}


def test_the_report_scores_each_tiers_out_of_sample_answers_and_shows_the_golden_set(tmp_path):
    app = cascade_app(SureOfSome(text_by_model={"student": "s1 s2", "teacher": "t1 t2"}))
    log = [{"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8}
           for q in ("easy one", "easy two", "easy one", "hard one")]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"train_seconds": 1, "device": "cpu", "split": {"train": [], "held_out": []},
                                    "labels": [{"path": "golden.jsonl", "golden_version": "sha256:abc",
                                                 "reviewed": {"corrected": 3, "confirmed": 2}}],
                                    "agreement": {"held_out": {"before": {}, "after": {}}}}))
    judged: list = []

    def judge(items):
        judged.extend(items)
        return "batch-j", {i: said(answer == "s1 s2") for i, _, answer, _ in items}

    measures = Measures(lambda pairs: [0.25 if a == "s1 s2" else 1.0 for a, _ in pairs], judge,
                        {"embedding": {"model": "embedder"}, "judge": {"model": "teacher"}})
    args = argparse.Namespace(route="assistant", redis_url=None, url="http://gw/v1", api_key="none", concurrency=1,
                              timeout=30, seed=0, sample=10, log="log", labels=None, base=None,
                              manifest=str(manifest), train_labels=None, eval_record=None, calibration_record=None,
                              batch_price_factor=0.5, train_hour_usd=1.0, horizon=None, target_saving=100.0,
                              note=None, quality_sample=1)
    report, _ = asyncio.run(economics(args, CONFIG, log, transport=httpx.ASGITransport(app=app), measures=measures))
    student, cache = report["tiers"]["student"]["agreement"], report["tiers"]["cache"]["agreement"]
    # quality_sample=1: the first of each tier's sample; the student said "s1 s2" to "easy one".
    assert judged == [("cache-2", log[2], "s1 s2", "t1 t2"), ("student-0", log[0], "s1 s2", "t1 t2")]
    assert (student["embedding_similarity"], student["judge"]) == (0.25, 1.0)
    assert (cache["embedding_similarity"], cache["judge"]) == (0.25, 1.0)
    assert report["quality_measures"]["judge_spent"]["student"]["batch_id"] == "batch-j"
    text = table(report)
    header = text.splitlines()[0].split()
    assert header[:7] == ["tier", "requests", "share", "agreement", "exact", "embed", "judge"]
    row = text.splitlines()[2].split()  # the student's row
    assert row[0] == "student" and row[5:7] == ["0.250", "1.000"]
    assert "from embedder through the gateway's /v1/embeddings" in text and "verdicts of teacher" in text
    assert "trained on golden set sha256:abc (3 labels corrected, 2 confirmed by review" in text


def label(i: int, question: str, teacher: str, lp: float) -> dict:
    request = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24}
    return {"id": f"l{i}", "request": request, "input": request, "teacher": teacher, "teacher_mean_logprob": lp,
            "finish_reason": "stop", "teacher_model": "teacher"}


def test_the_demos_reviewer_stand_in_confirms_corrects_and_drops_by_the_faq():
    assert topic_of("  How  do  I  change  my  store  hours  (case  389)? ") == "store hours"
    assert topic_of("What is the weather?") is None
    rows = [label(0, "How do I change my refund (case 1)?", FAQ["refund"].upper(), -0.1),
            label(1, "How do I change my login (case 2)?", "Open the refund page.", -2.0),
            label(2, "What is the weather?", "Sunny.", -3.0)]
    done, counts = faq_review(rows)
    assert counts == {"confirmed": 1, "corrected": 1, "dropped": 1}
    assert [(r["correction"] if not r.get("drop") else "drop") for r in done] == [None, FAQ["login"], "drop"]
    assert wrong_share(rows) == 0.5  # of the two with a topic, the login label is wrong


def test_the_demos_curation_exports_the_least_confident_and_trains_on_the_corrected_golden_set(tmp_path):
    from serve.cli import main
    from serve.students.curate import version

    rows = [label(i, f"How do I change my {t} (case {i})?", FAQ[t] if i % 2 else "garbled", -0.1 * (i + 1))
            for i, t in enumerate(["order", "refund", "password", "delivery", "invoice", "warranty", "address",
                                   "payment"])]
    labels, golden = tmp_path / "labels.jsonl", tmp_path / "golden.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ran = []

    def llmserve(*argv: str) -> tuple[int, str]:
        ran.append(argv[:3])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(list(argv))
        return code, out.getvalue()

    note = curate(llmserve, labels, golden, tmp_path, 0.25)
    assert ran == [("students", "curate", "export"), ("students", "curate", "import")]
    # The least confident quarter of eight (logprob below the third lowest): labels 7 and 6 (6 garbled).
    exported = [json.loads(x)["id"] for x in (tmp_path / "review.jsonl").read_text().splitlines()]
    assert exported == ["l7", "l6"]
    got = {r["id"]: r for r in map(json.loads, golden.read_text().splitlines())}
    assert got["l6"]["teacher"] == FAQ["address"] and got["l6"]["reviewed"] == "corrected"
    assert got["l7"]["reviewed"] == "confirmed" and got["l0"]["teacher"] == "garbled"  # not exported: as it was
    assert note.startswith(f"golden set {version(list(got.values()))}: 1 of 8 teacher labels corrected")
    assert "50% of the exported labels were wrong against 50% of the rest" in note
