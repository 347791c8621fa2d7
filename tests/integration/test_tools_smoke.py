"""The load test and the benchmark run and write their files (tiny runs; figures come from
`make bench`, never from assertions here)."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import loadgen, report
from serve.contract.secret import engine_secret

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_pieces_produce_json_and_plot(stack, tmp_path):
    (_, replica_url), *_ = stack.replicas("tiny-a")
    bare_base = replica_url + "/v1"  # vLLM's own app inside the replica: the "bare" side

    def go(base, conc, api_key):
        return asyncio.run(loadgen.run(base, "tiny-a", 6, conc, 4, seed=conc, api_key=api_key))

    rounds = {"bare": {c: [go(bare_base, c, engine_secret())] for c in (1, 2)},
              "llmserve": {c: [go(stack.base_url, c, "test")] for c in (1, 2)}}
    assert all(r[0]["ok"] == 6 for side in rounds.values() for r in side.values())
    results = {"model": "tiny-a", "max_tokens": 4, "machine": "ci", "summary": report.summarize(rounds),
               "cache": {"hit_p50_ms": 1.0, "miss_p50_ms": 2.0}}
    jpath, ppath = report.write(results, tmp_path, "smoke")
    assert jpath.stat().st_size > 100 and ppath.read_bytes()[:4] == b"\x89PNG"


def test_locust_headless_run_has_no_failures(stack, tmp_path):
    env = {**os.environ, "LLMSERVE_API_KEY": "test", "LLMSERVE_MODEL": "tiny-a", "LLMSERVE_HEAD_MODEL": "head",
           "LLMSERVE_MAX_TOKENS": "4"}
    host = stack.base_url.removesuffix("/v1")
    # Its own process: locust's gevent patching must not meet Ray or vLLM (see CPU-NOTES).
    # 6 users at weights 3:2:1 give every user class at least one; --stop-timeout lets requests in
    # flight at the end finish instead of being cut (which locust would not count, but could log).
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "-u", "6",
         "-r", "6", "-t", "8s", "--stop-timeout", "30", "--host", host, "--csv", str(tmp_path / "run"),
         "--only-summary", "--loglevel", "INFO", "ChatUser", "HeadHeavyUser", "LongPromptUser"],
        env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    # Locust exits 1 when any request failed: 0 is the only passing exit code.
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    # One request name per user class (chat, head, long) and the long user's model lookup.
    for name in ("chat", "head", "long", "models.get", "Aggregated"):
        assert name in rows, sorted(rows)
        assert int(rows[name]["Request Count"]) > 0, rows[name]
        assert int(rows[name]["Failure Count"]) == 0, rows[name]
    assert {"chat TTFT", "head TTFT", "long TTFT"} <= set(rows)
    with open(tmp_path / "run_failures.csv") as f:
        assert list(csv.DictReader(f)) == []
    # The long prompts were sized from the context the gateway reports (512 in this stack).
    assert "tiny-a max_model_len 512 (from /v1/models)" in proc.stderr, proc.stderr[-3000:]
