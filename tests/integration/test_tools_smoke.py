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

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_pieces_produce_json_and_plot(stack, tmp_path):
    (_, replica_url), *_ = stack.replicas("tiny-a")
    bare_base = replica_url + "/v1"  # vLLM's own app inside the replica: the "bare" side

    def go(base, conc, api_key):
        return asyncio.run(loadgen.run(base, "tiny-a", 6, conc, 4, seed=conc, api_key=api_key))

    rounds = {"bare": {c: [go(bare_base, c, "none")] for c in (1, 2)},
              "llmserve": {c: [go(stack.base_url, c, "test")] for c in (1, 2)}}
    assert all(r[0]["ok"] == 6 for side in rounds.values() for r in side.values())
    results = {"model": "tiny-a", "max_tokens": 4, "machine": "ci", "summary": report.summarize(rounds),
               "cache": {"hit_p50_ms": 1.0, "miss_p50_ms": 2.0}}
    jpath, ppath = report.write(results, tmp_path, "smoke")
    assert jpath.stat().st_size > 100 and ppath.read_bytes()[:4] == b"\x89PNG"


def test_locust_headless_run_writes_csv(stack, tmp_path):
    env = {**os.environ, "LLMSERVE_API_KEY": "test", "LLMSERVE_MODEL": "tiny-a", "LLMSERVE_HEAD_MODEL": "head",
           "LLMSERVE_MAX_TOKENS": "4"}
    host = stack.base_url.removesuffix("/v1")
    # Its own process: locust's gevent patching must not meet Ray or vLLM (see CPU-NOTES).
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "-u", "3",
         "-r", "3", "-t", "6s", "--host", host, "--csv", str(tmp_path / "run"), "--only-summary",
         "ChatUser", "HeadHeavyUser", "LongPromptUser"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = list(csv.DictReader(f))
    names = {r["Name"] for r in rows}
    assert {"chat", "chat TTFT"} <= names, names
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(agg["Request Count"]) > 0
    assert int(next(r for r in rows if r["Name"] == "chat")["Failure Count"]) == 0
