"""Quality a promotion can trust: the gate's minimum sample and confidence bound, labels disjoint
from the weights' training split, and a calibration that simulates the route's whole cascade with
its threshold tied to the weights' digest (serve/students/gate.py, calibrate.py, the eval CLI)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from serve.cli import main
from serve.config import GateSpec
from serve.policies.cascade import CascadePolicy
from serve.students.calibrate import at, calibrate, cascade_sample, curve
from serve.students.gate import lower_bound, promote_refusal, split_check, threshold_refusal
from serve.students.registry import adapter_digest

Z95 = 1.6448536269514722


def wilson(p, n, z=Z95):
    return ((p + z * z / (2 * n)) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def test_the_lower_bound_is_wilsons_one_sided_95():
    assert lower_bound(1.0, 6, 0.95) == pytest.approx(0.68921, abs=1e-4)  # by hand; Wald would say 1.0
    assert lower_bound(0.5, 100, 0.95) == pytest.approx(0.41884, abs=1e-4)
    assert lower_bound(0.8, 50, 0.95) == pytest.approx(wilson(0.8, 50))
    assert lower_bound(0.8, 50, 0.99) < lower_bound(0.8, 50, 0.95) < lower_bound(0.8, 500, 0.95) < 0.8
    assert lower_bound(0.0, 10, 0.95) == 0.0


GATE = GateSpec(metric="token_overlap", min_score=0.5, min_samples=30)


def evaluation(mean, n, split=None):
    return {"digest": "d1", "path": "/p", "n": n, "scores": {"token_overlap": mean},
            "training_split": split if split is not None else {"checked": True, "overlap": 0}}


def test_the_gate_needs_a_sample_and_passes_on_the_lower_bound_not_the_mean():
    assert "evaluated on 29 labels; the route's gate needs at least 30" in \
        promote_refusal("v", "/p", "d1", evaluation(0.95, 29), GATE, None)
    # 0.6 over 40 labels: the mean clears 0.5, the lower bound (0.47) does not; over 400 it does (0.56)
    refused = promote_refusal("v", "/p", "d1", evaluation(0.6, 40), GATE, None)
    assert refused is not None and "0.600 on token_overlap over 40 labels, 0.47" in refused
    assert "95% one-sided Wilson score interval; the route needs 0.5" in refused
    assert promote_refusal("v", "/p", "d1", evaluation(0.6, 400), GATE, None) is None


def test_the_gate_refuses_labels_not_checked_against_or_overlapping_the_training_split():
    unchecked = evaluation(0.9, 100, {"checked": False, "manifest": None})
    assert "not checked against its training split" in promote_refusal("v", "/p", "d1", unchecked, GATE, None)
    relaxed = GATE.model_copy(update={"require_training_split": False})
    assert promote_refusal("v", "/p", "d1", unchecked, relaxed, None) is None
    overlapping = evaluation(0.9, 100, {"checked": True, "overlap": 3})
    assert "evaluated on 3 labels it was trained on" in promote_refusal("v", "/p", "d1", overlapping, relaxed, None)


def test_split_check_reads_the_manifest_of_these_weights():
    manifest = {"digest": "d1", "split": {"train": ["a", "b"], "held_out": ["c"]}}
    assert split_check(["c", "d"], manifest, "d1", "/m") == (
        {"checked": True, "manifest": "/m", "train": 2, "overlap": 0}, None)
    record, why = split_check(["b", "c"], manifest, "d1", "/m")
    assert record["overlap"] == 1 and why is not None and "1 of these labels are in the training split" in why
    assert "describes weights d2" in split_check(["c"], {**manifest, "digest": "d2"}, "d1", "/m")[1]
    assert split_check(["c"], None, "d1", None) == ({"checked": False, "manifest": None}, None)


def test_a_threshold_is_promoted_only_as_calibrated_for_these_weights():
    cal = {"digest": "d1", "threshold": -0.8, "met": True}
    assert threshold_refusal("v", -0.8, "d1", cal) is None
    assert "no calibration" in threshold_refusal("v", -0.8, "d1", None)
    assert "calibration was of weights d1" in threshold_refusal("v", -0.8, "d2", cal)
    assert "-0.5 is not the threshold calibrated" in threshold_refusal("v", -0.5, "d1", cal)
    assert "found no threshold" in threshold_refusal("v", -0.8, "d1", {**cal, "met": False})


# ---- calibration of the whole cascade ---------------------------------------------------------------
def answer(tokens, logprobs, finish="stop"):
    content = [{"token": t, "logprob": lp} for t, lp in zip(tokens, logprobs, strict=True)]
    return {"choices": [{"message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": finish,
                         "logprobs": {"content": content}}]}


REQ = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 8}


def test_cascade_sample_applies_every_rule_decide_applies():
    policy = CascadePolicy()
    assert cascade_sample(policy, REQ, answer(["Open", " it"], [-0.1, -0.3])) == (pytest.approx(-0.2), "threshold")
    assert cascade_sample(policy, REQ, answer(["Open", " it"], [-0.1, -0.3], "length")) == (None, "length")
    assert cascade_sample(policy, REQ, answer(["I'm", " sorry"], [-0.1, -0.1])) == (None, "refusal")
    schema = {**REQ, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "required": ["x"]}}}}
    assert cascade_sample(policy, schema, answer(["{}"], [-0.1])) == (None, "schema")
    assert cascade_sample(policy, schema, answer(['{"x":', "1}"], [-0.1, -0.2]))[1] == "threshold"
    no_lp = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
    assert cascade_sample(policy, REQ, no_lp) == (None, "malformed")
    assert cascade_sample(CascadePolicy(escalate_on_length=False), REQ,
                          answer(["a"], [-0.5], "length")) == (pytest.approx(-0.5), "threshold")


def test_cascade_sample_on_a_streamed_route_judges_the_first_k_tokens():
    policy = CascadePolicy()
    sure_then_not = answer(["Open", " the", " page", " and", " then"], [-0.1, -0.1, -3.0, -3.0, -3.0], "length")
    # The stream is decided on 2 tokens: their mean, and the length cut later is never seen.
    assert cascade_sample(policy, REQ, sure_then_not, first_k=2) == (pytest.approx(-0.1), "threshold")
    assert cascade_sample(policy, REQ, sure_then_not) == (None, "length")  # buffered: the whole answer
    # A refusal inside the first k tokens escalates; one after them is streamed to the client.
    late = answer(["Sure", ".", " I'm", " sorry"], [-0.1, -0.1, -0.1, -0.1])
    assert cascade_sample(policy, REQ, late, first_k=2)[1] == "threshold"
    assert cascade_sample(policy, REQ, late, first_k=4) == (None, "refusal")
    short = answer(["Ok"], [-0.2], "length")  # finished within k: its finish counts
    assert cascade_sample(policy, REQ, short, first_k=4) == (None, "length")


def test_answers_another_rule_escalates_are_teacher_answers_at_every_threshold():
    samples = [(-0.1, 1.0), (-0.5, 0.0), (None, 1.0), (None, 1.0)]
    points = curve(samples)
    assert [p.threshold for p in points] == [-0.5, -0.1]  # no threshold from a sample without one
    lowest = at(samples, -0.5)
    assert (lowest.teacher_share, lowest.kept, lowest.agreement) == (0.5, 2, 0.5)
    result = calibrate([(f"id{i}", lp, a) for i, (lp, a) in enumerate(samples)], 0.9, 0.0)
    assert result.chosen is not None and result.chosen.threshold == -0.1 and result.chosen.teacher_share == 0.75


# ---- eval refuses labels the weights were trained on ---------------------------------------------------
def test_eval_refuses_labels_in_the_weights_training_split(redis_url, tmp_path, capsys):
    path = tmp_path / "v1"
    path.mkdir()
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "v1.manifest.json").write_text(json.dumps(
        {"digest": adapter_digest(path), "split": {"train": ["a"], "held_out": ["b"]}}))
    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "base", "source": "x",
                                               "adapters": [{"name": "v1", "path": str(path)}]}]}))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "request": {"messages": []}, "teacher": "t"}) + "\n"
                              for i in ("a", "b")))
    remote = ["--redis-url", redis_url, "--config", str(cfg), "--url", "http://127.0.0.1:9/v1"]  # never reached
    assert main(["students", "eval", "--adapter", "v1", "--labels", str(labels), "--path", str(path), *remote]) == 1
    assert "1 of these labels are in the training split of these weights (e.g. a)" in capsys.readouterr().err


def test_json_field_match_gives_credit_per_field():
    from serve.students.metrics import json_field_match, score

    teacher = '{"intent": "refund", "order": {"id": 7, "items": ["a", "b"]}}'
    assert json_field_match(teacher, teacher) == 1.0
    assert json_field_match('{"order": {"items": ["a", "b"], "id": 7}, "intent": " Refund"}', teacher) == 1.0
    assert json_field_match('{"intent": "refund", "order": {"id": 8, "items": ["a", "c"]}}', teacher) == 0.5
    assert json_field_match("refund, order 7", teacher) == 0.0
    assert json_field_match("Open  it", "open it") == 1.0  # a teacher answer that is not JSON: exact match
    assert score([('{"a": 1}', '{"a": 1, "b": 2}', None)], ["json_field_match"]) == {"json_field_match": 0.5}
