"""`llmserve batch run`: vLLM's offline runner gets the same CPU environment as every other CPU
engine of the project (one CPU_ENV, serve/engine/deployments.py)."""

from __future__ import annotations

import subprocess

from serve.cli import batch
from serve.config import Config
from serve.engine import deployments, models, private


def test_offline_batch_runs_vllm_with_the_projects_cpu_environment(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setattr(models, "resolve_source", lambda spec: "/models/tiny")
    config = Config.model_validate({"models": [{"name": "tiny", "source": "builtin://tiny", "accelerator": "cpu",
                                                "env": {"EXTRA": "1"}}]})
    assert batch.offline_batch(config, "tiny", "in.jsonl", "out.jsonl") == 0
    cmd, env = calls[0]
    assert cmd[1:3] == ["-m", private.VLLM_RUN_BATCH.module]
    assert cmd[cmd.index("--model") + 1] == "/models/tiny"
    assert {k: env[k] for k in deployments.CPU_ENV} == deployments.CPU_ENV
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["EXTRA"] == "1"
