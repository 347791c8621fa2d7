"""Student lifecycle on the tiny models: teacher labels, adapters evaluated by the digest of their
weights, a name reloaded with new weights really answers with them, the gate refuses the worse
adapter and weights nobody evaluated, promotes the better twice while traffic flows, rollback walks
back twice and then refuses; calibration finds no threshold for a student that never agrees and
the expected one for a student that always does; shadow traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import make_lora_adapter
from tests.support import counter, msgs

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "serve.cli"]


def run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def last_json(r):
    return json.loads(r.stdout.splitlines()[-1])


def load(client, name, path, **extra):
    return client.post("/llmserve/adapters", cast_to=httpx.Response,
                       body={"name": name, "path": path, "base": "tiny-a", **extra}).json()


def answers(client, model, labels):
    return [client.chat.completions.create(**{**lab["request"], "model": model}).choices[0].message.content
            for lab in labels]


def wait_served(results, model):
    deadline = time.monotonic() + 30
    while not results or results[-1][1] != model:
        assert time.monotonic() < deadline, results[-5:]
        time.sleep(0.2)


def test_student_lifecycle(stack, tmp_path):
    from serve.config import ModelSpec
    from serve.engine.models import resolve_source
    from serve.policies.cascade import mean_logprob
    from serve.students.calibrate import split
    from serve.students.registry import adapter_digest

    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump(stack.config.model_dump(mode="json")))
    remote = ["--url", stack.base_url, "--api-key", "test", "--redis-url", stack.redis.url, "--config", str(cfg)]
    local = ["--redis-url", stack.redis.url, "--config", str(cfg)]
    log = tmp_path / "log.jsonl"
    assert run("cache", "synth-log", "-o", str(log), "--requests", "200", "--distinct", "20", "--seed", "2",
               "--max-tokens", "8", "--model", "student-route").returncode == 0

    # 1. Labels: the base model tiny-a plays the teacher, so a near-zero adapter agrees with it.
    labels_file = tmp_path / "labels.jsonl"
    r = run("students", "label", "--log", str(log), "--teacher", "tiny-a", "--sample", "6", "-o", str(labels_file),
            *remote)
    assert r.returncode == 0, r.stderr[-2000:]
    assert last_json(r)["labels"] == 6
    labels = [json.loads(x) for x in labels_file.read_text().splitlines()]

    # 2. Adapters under the gateway's adapter root; loading from anywhere else is refused.
    root = Path(stack.config.gateway.adapter_roots[0])
    base = resolve_source(ModelSpec(name="x", source="builtin://tiny?seed=1"))
    near = make_lora_adapter(base, str(root / "tiny-a-near"), seed=11, std=1e-4)
    near2 = make_lora_adapter(base, str(root / "tiny-a-near2"), seed=13, std=1e-4)
    far = make_lora_adapter(base, str(root / "tiny-a-far"), seed=12, std=0.3)
    outside = make_lora_adapter(base, str(tmp_path / "outside"), seed=14, std=1e-4)
    lora = stack.config.models[0].adapters[0].path
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as e:
        load(client, "tiny-a-out", outside)
    assert e.value.body["param"] == "path"
    with pytest.raises(openai.PermissionDeniedError):
        load(stack.client("limited"), "tiny-a-out", near)

    # 3. A name reloaded with other weights answers with the new ones (vLLM refuses to load a name
    # it holds; the gateway unloads and loads, which also gives fresh prefix-cache blocks).
    first = load(client, "tiny-a-cand", far)
    assert (first["replicas"], first["reloaded"], first["digest"]) == (2, 0, adapter_digest(far))
    teacher = [lab["teacher"] for lab in labels[:3]]
    assert answers(client, "tiny-a-cand", labels[:3]) != teacher  # the far weights change the output
    second = load(client, "tiny-a-cand", near2)
    assert (second["replicas"], second["reloaded"], second["digest"]) == (2, 2, adapter_digest(near2))
    assert answers(client, "tiny-a-cand", labels[:3]) == teacher
    assert load(client, "tiny-a-near", near, digest=adapter_digest(near))["replicas"] == 2

    # 4. Evaluations record the digest of the weights the name serves, and nothing else.
    wrong = run("students", "eval", "--adapter", "tiny-a-cand", "--labels", str(labels_file), "--path", far, *remote)
    assert wrong.returncode == 1 and "not evaluated" in wrong.stderr, wrong.stderr[-2000:]
    scores = {}
    for adapter, path in (("tiny-a-lora", lora), ("tiny-a-near", near), ("tiny-a-cand", near2)):
        r = run("students", "eval", "--adapter", adapter, "--labels", str(labels_file), "--path", path, *remote)
        assert r.returncode == 0, r.stderr[-2000:]
        record = last_json(r)
        assert (record["digest"], record["path"], record["n"]) == (adapter_digest(path), path, 6)
        scores[adapter] = record["scores"]
    assert scores["tiny-a-near"]["token_overlap"] > 0.5 > scores["tiny-a-lora"]["token_overlap"], scores
    assert scores["tiny-a-cand"]["token_overlap"] > 0.5, scores

    # 5. Live traffic on the route while the gate decides; two promotions, two rollbacks.
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic():
        c = stack.client()
        while not stop.is_set():
            raw = c.chat.completions.with_raw_response.create(model="student-route", messages=msgs("live"),
                                                              max_tokens=2, temperature=0)
            results.append((raw.http_response.status_code, raw.headers["x-llmserve-served-by"]))

    promote = ["--route", "student-route", "--base", "tiny-a", *remote]
    rollback = ["students", "rollback", "--route", "student-route", *local]
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        low = run("students", "promote", "tiny-a-lora", "--path", lora, *promote)
        assert low.returncode == 1 and "scored" in low.stderr, low.stderr[-2000:]
        other = run("students", "promote", "tiny-a-near", "--path", near2, *promote)  # not the evaluated weights
        assert other.returncode == 1 and "evaluated on the weights" in other.stderr, other.stderr[-2000:]
        ok = run("students", "promote", "tiny-a-near", "--path", near, *promote)
        assert ok.returncode == 0, ok.stderr[-2000:]
        wait_served(results, "tiny-a-near")
        # With the threshold calibrated for it: at 0 every answer is unsure (a mean logprob is below
        # 0), so the running gateway escalates them all to the teacher, until the rollback.
        ok = run("students", "promote", "tiny-a-cand", "--path", near2, "--threshold", "0", "--uncalibrated",
                 *promote)
        assert ok.returncode == 0, ok.stderr[-2000:]
        wait_served(results, "tiny-b")
        back = run(*rollback)
        assert back.returncode == 0 and "back to tiny-a-near" in back.stdout, back.stderr
        wait_served(results, "tiny-a-near")
        back = run(*rollback)
        assert back.returncode == 0 and "back to tiny-a-lora" in back.stdout, back.stderr
        wait_served(results, "tiny-a-lora")
        done = run(*rollback)
        assert done.returncode == 1 and "nothing to roll back" in done.stderr
    finally:
        stop.set()
        t.join(30)
    assert all(code == 200 for code, _ in results) and len(results) > 5
    served = [s for _, s in results]
    assert {"tiny-a-near", "tiny-b"} <= set(served) and served[0] == "tiny-a-lora"
    assert served.index("tiny-b") > served.index("tiny-a-near")  # the teacher only under the threshold
    history = json.loads(run("students", "history", "--route", "student-route", *local).stdout)
    assert [(h["action"], h["to"]) for h in history] == [("rollback", "tiny-a-lora"), ("rollback", "tiny-a-near"),
                                                         ("promote", "tiny-a-cand"), ("promote", "tiny-a-near")]

    # 6. Calibration: escalations are teacher answers, not agreement. A student that never gives
    # the teacher's answer gets no threshold at all; one that always does keeps every query.
    assert scores["tiny-a-lora"]["exact_match"] == 0.0 and scores["tiny-a-near"]["exact_match"] == 1.0, scores
    sweep, held = split([lab["id"] for lab in labels], 0.5)
    assert sweep and held, "the labels' ids put them all on one side of the split"
    never = run("students", "calibrate", "--student", "tiny-a-lora", "--labels", str(labels_file), "--metric",
                "exact_match", "--target", "0.5", "--out", str(tmp_path / "never"), "--route", "student-route", *remote)
    assert never.returncode == 1 and "no threshold reaches agreement 0.5" in never.stderr, never.stderr[-2000:]
    assert (last_json(never)["threshold"], last_json(never)["met"]) == (None, False)
    cal = run("students", "calibrate", "--student", "tiny-a-near", "--labels", str(labels_file), "--metric",
              "exact_match", "--target", "0.9", "--out", str(tmp_path / "cal"), "--route", "student-route", *remote)
    assert cal.returncode == 0, cal.stderr[-2000:]
    got = last_json(cal)
    assert (tmp_path / "cal" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    confidences = [mean_logprob(client.chat.completions.create(
        **{**labels[i]["request"], "model": "tiny-a-near", "logprobs": True}).model_dump()["choices"][0])
        for i in sweep]
    assert got["threshold"] == pytest.approx(min(confidences), abs=1e-3)  # the least confident sweep label
    assert got["sweep"] == {"n": len(sweep), "teacher_share": 0.0, "agreement": 1.0}
    assert got["held_out"] == {"n": len(held), "teacher_share": 0.0, "agreement": 1.0} and got["met"] is True


def test_shadow_traffic_is_compared_and_counted(stack):
    client = stack.client()
    for i in range(3):
        r = client.chat.completions.with_raw_response.create(model="shadowed", messages=msgs(f"shadow {i}"),
                                                             max_tokens=4, temperature=0)
        assert r.headers["x-llmserve-served-by"] == "tiny-a"  # the client's answer is the live model's
    deadline = time.monotonic() + 30
    while counter(stack.metrics(), "llmserve_shadow_requests_total", route="shadowed", result="ok") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert counter(stack.metrics(), "llmserve_shadow_agreement_count", route="shadowed") >= 3
