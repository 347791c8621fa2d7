"""Curating the golden set (issue 29): the labels most likely wrong go out for review (disagreement,
low teacher confidence, a failed schema, a cut-off answer), corrections come back in, and the golden
set's version (a content digest) is what `students train` records in the adapter's manifest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve.students.curate import ReviewError, Thresholds, apply_reviews, suspects, version

SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "required": ["eta"]}}}


def lab(i: str, teacher: str, **kw: Any) -> dict[str, Any]:
    req = {"messages": [{"role": "user", "content": f"q{i}"}]}
    return {"id": i, "request": req, "input": req, "teacher": teacher, "teacher_mean_logprob": -0.2,
            "finish_reason": "stop", **kw}


LABELS = [
    lab("clean", "your parcel arrives tomorrow"),
    lab("disagree", "refunds take five days"),
    lab("unsure", "maybe tuesday", teacher_mean_logprob=-2.5),
    lab("both", "no idea at all", teacher_mean_logprob=-3.0),
    lab("schema", '{"when": 1}', input={"messages": [], "response_format": SCHEMA}),
    lab("cut", "the policy says that", finish_reason="length"),
]
OTHERS = {"clean": "your parcel arrives tomorrow", "disagree": "call the store", "unsure": "maybe tuesday",
          "both": "we ship worldwide", "schema": '{"when": 1}', "cut": "the policy says that"}


def test_each_sign_of_a_wrong_label_is_exported_most_suspect_first_and_clean_labels_are_not():
    rows = suspects(LABELS, OTHERS)
    assert [(r["id"], r["reasons"]) for r in rows] == [
        ("both", ["disagreement", "low_confidence"]),
        ("disagree", ["disagreement"]),  # one reason each from here: the lower agreement first
        ("unsure", ["low_confidence"]), ("schema", ["failed_schema"]), ("cut", ["cut_off"])]
    assert rows[0]["correction"] is None and rows[0]["other"] == "we ship worldwide" and rows[0]["agreement"] == 0.0
    assert [r["id"] for r in suspects(LABELS, OTHERS, limit=2)] == ["both", "disagree"]
    # Without a second opinion only the label's own signs count; thresholds are the caller's.
    assert [r["id"] for r in suspects(LABELS, {}, Thresholds(min_logprob=-2.8))] == ["both", "schema", "cut"]


def test_reviews_correct_drop_and_confirm_and_the_version_follows_the_content_only():
    reviews = [{"id": "disagree", "correction": "refunds take 5 working days"}, {"id": "both", "drop": True},
               {"id": "unsure", "correction": None}]
    out, counts = apply_reviews(LABELS, reviews)
    assert counts == {"corrected": 1, "dropped": 1, "confirmed": 1}
    by_id = {x["id"]: x for x in out}
    assert "both" not in by_id and len(out) == len(LABELS) - 1
    assert (by_id["disagree"]["teacher"], by_id["disagree"]["original_teacher"], by_id["disagree"]["reviewed"]) == \
        ("refunds take 5 working days", "refunds take five days", "corrected")
    assert by_id["unsure"]["reviewed"] == "confirmed" and LABELS[1]["teacher"] == "refunds take five days"
    assert version(out) != version(LABELS)
    # Line order and JSON spelling do not change the version; a confirmation alone does not either.
    assert version(list(reversed(LABELS))) == version(json.loads(json.dumps(LABELS)))
    assert version(apply_reviews(LABELS, [{"id": "clean"}])[0]) == version(LABELS)
    with pytest.raises(ReviewError, match="not in the golden set"):
        apply_reviews(LABELS, [{"id": "nope", "correction": "x"}])
    with pytest.raises(ReviewError, match="must be a string"):
        apply_reviews(LABELS, [{"id": "clean", "correction": 3}])


def test_the_cli_exports_with_the_students_opinion_imports_corrections_and_train_records_the_version(
        tmp_path, monkeypatch, capsys):
    import serve.cli.students_curate as curate_cli
    import serve.cli.train as train_cli
    from serve.cli import main

    golden = tmp_path / "labels.jsonl"
    golden.write_text("".join(json.dumps(x) + "\n" for x in LABELS))
    asked: list[dict[str, Any]] = []

    def run_batch(client: Any, lines: list[str], timeout_s: float) -> tuple[str, dict[str, Any]]:
        asked.extend(json.loads(x)["body"] for x in lines)
        return "b1", {json.loads(x)["custom_id"]: {"choices": [{"message": {"content": OTHERS[json.loads(x)[
            "custom_id"]]}}]} for x in lines}

    monkeypatch.setattr(curate_cli, "run_batch", run_batch)
    monkeypatch.setattr(curate_cli, "openai_client", lambda args, **_: None)
    review = tmp_path / "review.jsonl"
    assert main(["students", "curate", "export", "--labels", str(golden), "-o", str(review),
                 "--model", "student-v1"]) == 0
    assert {b["model"] for b in asked} == {"student-v1"} and len(asked) == len(LABELS)
    assert asked[0]["messages"] == LABELS[0]["request"]["messages"]  # the student is asked its own request
    rows = [json.loads(x) for x in review.read_text().splitlines()]
    assert rows[0]["id"] == "both" and json.loads(capsys.readouterr().out)["suspects"] == 5
    rows[0]["drop"] = True
    rows[1]["correction"] = "refunds take 5 working days"
    review.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corrected = tmp_path / "golden-v2.jsonl"
    assert main(["students", "curate", "import", "--labels", str(golden), "--reviews", str(review),
                 "-o", str(corrected)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["corrected"], printed["dropped"], printed["confirmed"]) == (1, 1, 3)
    new = [json.loads(x) for x in corrected.read_text().splitlines()]
    assert printed["golden_version"] == version(new) != printed["previous_version"] == version(LABELS)

    seen: dict[str, Any] = {}

    def fake_train(examples: Any, sources: list[dict[str, Any]], *a: Any, **kw: Any) -> Any:
        seen["sources"] = sources
        raise SystemExit(0)  # the training itself is tests/unit/test_train*.py's

    monkeypatch.setattr(train_cli, "train", fake_train)
    with pytest.raises(SystemExit):
        main(["students", "train", "--labels", str(corrected), "--base", "x", "-o", str(tmp_path / "a")])
    [source] = seen["sources"]
    assert source["golden_version"] == version(new) and source["reviewed"] == {"corrected": 1, "confirmed": 3}
