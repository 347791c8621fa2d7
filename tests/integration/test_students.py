"""Student lifecycle on the tiny models: teacher labels, two adapters evaluated, the gate refuses
the worse and promotes the better while traffic flows, rollback restores; shadow traffic."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from tests.integration.conftest import make_lora_adapter
from tests.integration.test_policies import counter, msgs

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "serve.cli"]


def run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_student_lifecycle(stack, tmp_path):
    from serve.config import ModelSpec
    from serve.engine.models import resolve_source

    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump(stack.config.model_dump(mode="json")))
    remote = ["--url", stack.base_url, "--api-key", "test", "--redis-url", stack.redis.url, "--config", str(cfg)]
    log = tmp_path / "log.jsonl"
    assert run("cache", "synth-log", "-o", str(log), "--requests", "200", "--distinct", "20", "--seed", "2",
               "--max-tokens", "8", "--model", "student-route").returncode == 0

    # 1. Labels: the base model tiny-a plays the teacher, so a near-zero adapter agrees with it.
    labels = tmp_path / "labels.jsonl"
    r = run("students", "label", "--log", str(log), "--teacher", "tiny-a", "--sample", "6", "-o", str(labels),
            *remote)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["labels"] == 6

    # 2. A second adapter, loaded at runtime on the running engines (no restart).
    base = resolve_source(ModelSpec(name="x", source="builtin://tiny?seed=1"))
    near = make_lora_adapter(base, str(tmp_path / "tiny-a-near"), seed=11, std=1e-4)
    client = stack.client()
    loaded = client.post("/llmserve/adapters", cast_to=httpx.Response,
                         body={"name": "tiny-a-near", "path": near, "base": "tiny-a"})
    assert loaded.status_code == 200 and loaded.json()["replicas"] == 2

    scores = {}
    for adapter in ("tiny-a-lora", "tiny-a-near"):
        r = run("students", "eval", "--adapter", adapter, "--labels", str(labels), *remote)
        assert r.returncode == 0, r.stderr[-2000:]
        scores[adapter] = json.loads(r.stdout.splitlines()[-1])["scores"]["token_overlap"]
    assert scores["tiny-a-near"] > 0.5 > scores["tiny-a-lora"], scores

    # 3. Live traffic on the route while the gate decides.
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic():
        c = stack.client()
        while not stop.is_set():
            raw = c.chat.completions.with_raw_response.create(model="student-route", messages=msgs("live"),
                                                              max_tokens=2, temperature=0)
            results.append((raw.http_response.status_code, raw.headers["x-llmserve-served-by"]))

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        refused = run("students", "promote", "tiny-a-lora", "--route", "student-route", "--base", "tiny-a",
                      "--path", stack.config.models[0].adapters[0].path, *remote)
        assert refused.returncode == 1 and "refused" in refused.stderr
        ok = run("students", "promote", "tiny-a-near", "--route", "student-route", "--base", "tiny-a",
                 "--path", near, *remote)
        assert ok.returncode == 0, ok.stderr[-2000:]
        deadline = time.monotonic() + 30
        while not results or results[-1][1] != "tiny-a-near":
            assert time.monotonic() < deadline, results[-5:]
            time.sleep(0.2)
        back = run("students", "rollback", "--route", "student-route", "--redis-url", stack.redis.url,
                   "--config", str(cfg))
        assert back.returncode == 0, back.stderr
        deadline = time.monotonic() + 30
        while results[-1][1] != "tiny-a-lora":
            assert time.monotonic() < deadline, results[-5:]
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(30)
    assert all(code == 200 for code, _ in results) and len(results) > 5
    served = [s for _, s in results]
    assert "tiny-a-near" in served and served[0] == "tiny-a-lora"
    history = json.loads(run("students", "history", "--route", "student-route", "--redis-url",
                             stack.redis.url, "--config", str(cfg)).stdout)
    assert [h["action"] for h in history] == ["rollback", "promote"]

    # 4. Calibration from the same labels writes its curve and table.
    cal = run("students", "calibrate", "--student", "tiny-a-lora", "--labels", str(labels), "--target", "0.9",
              "--out", str(tmp_path / "cal"), *remote)
    assert cal.returncode == 0, cal.stderr[-2000:]
    assert (tmp_path / "cal" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(cal.stdout.splitlines()[-1])["threshold"] is not None


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
