"""bench/profile.py's pure parts: the collapsed-stack summary, the role of a process from its
command line, and CPU seconds by role between two snapshots."""

from __future__ import annotations

import pytest

from bench.procs import classify, cpu_by_label, cpu_ms_per_request
from bench.profile import summarize_collapsed

# py-spy's raw format: "frame;...;leaf count", files named by package path. 25 samples in all.
COLLAPSED = "\n".join([
    "main (serve/cli.py:9);run (asyncio/runners.py:190);Server.serve (uvicorn/server.py:68);"
    "handle (serve/gateway/app.py:20);dumps (json/__init__.py:231) 6",
    "main (serve/cli.py:9);run (asyncio/runners.py:190);handle (serve/gateway/app.py:22) 3",
    "main (serve/cli.py:9);run (asyncio/runners.py:190);handle (serve/gateway/app.py:25) 1",
    "main (serve/cli.py:9);run (asyncio/runners.py:190);BaseEventLoop._run_once (asyncio/base_events.py:1898);"
    "EpollSelector.select (selectors.py:468) 3",
    "Replica.handle (ray/serve/_private/replica.py:10);BaseModel.model_validate (pydantic/main.py:5) 5",
    "OpenAIServing.chat (vllm/entrypoints/serve/chat.py:3) 1",
    "Thread.run (threading.py:975);Condition.wait (threading.py:320) 1",
    "main (serve/cli.py:9);run (asyncio/runners.py:190);poll (serve/gateway/app.py:40);sleep (asyncio/tasks.py:639) 5",
    "",
    "not a stack line",
])


def test_summary_counts_self_samples_by_function():
    s = summarize_collapsed(COLLAPSED)
    assert s["samples"] == 25
    assert s["top_self"] == [
        {"function": "dumps (json/__init__.py)", "samples": 6, "share": 0.24},
        {"function": "BaseModel.model_validate (pydantic/main.py)", "samples": 5, "share": 0.2},
        {"function": "sleep (asyncio/tasks.py)", "samples": 5, "share": 0.2},
        {"function": "handle (serve/gateway/app.py)", "samples": 4, "share": 0.16},  # lines 22 and 25 merged
        {"function": "EpollSelector.select (selectors.py)", "samples": 3, "share": 0.12},
        {"function": "OpenAIServing.chat (vllm/entrypoints/serve/chat.py)", "samples": 1, "share": 0.04},
        {"function": "Condition.wait (threading.py)", "samples": 1, "share": 0.04},
    ]
    assert [t["function"] for t in summarize_collapsed(COLLAPSED, top=2)["top_self"]] == [
        "dumps (json/__init__.py)", "BaseModel.model_validate (pydantic/main.py)"]


def test_summary_group_shares():
    groups = summarize_collapsed(COLLAPSED)["groups"]
    assert groups == {
        "serve/ (ours)": 0.72,  # not Ray Serve's ray/serve/ nor vLLM's vllm/entrypoints/serve/
        "ray/": 0.2, "vllm/": 0.04, "uvicorn/": 0.24, "starlette/": 0.0, "httpx/httpcore": 0.0, "h11/": 0.0,
        "httptools/": 0.0,
        "asyncio/uvloop": 0.72,  # a sample counts once, however many asyncio frames its stack has
        "json": 0.24, "pydantic": 0.2,
        # leaves EpollSelector.select and Condition.wait; not asyncio's sleep (a running coroutine)
        # nor our `poll` under it (only the leaf counts)
        "idle": 0.16,
    }


def test_summary_of_nothing():
    s = summarize_collapsed("")
    assert s["samples"] == 0 and s["top_self"] == []
    assert set(s["groups"].values()) == {0.0}


@pytest.mark.parametrize(("cmd", "is_root", "label"), [
    ("/venv/bin/python -m serve.cli run --config bench/config.yaml --port 8123", True, "gateway"),
    ("/venv/bin/python -m serve.cli run --config bench/config.yaml --port 8123", False, "other"),
    ("ray::ServeReplica:tiny:LLMServer", False, "engine replica"),
    ("VLLM::EngineCore", False, "engine core"),
    ("VLLM::Worker_TP0", False, "VLLM::Worker"),
    ("ray::ServeController", False, "Serve controller"),
    ("ray::IDLE", False, "idle Ray workers"),
    ("ray::ProxyActor", False, "ray::ProxyActor"),
    ("ray::EngineRegistry.snapshot", False, "ray::EngineRegistry"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s/raylet "
     "--python_worker_command=/venv/bin/python default_worker.py --raylet-name=/tmp/ray/s/raylet", False, "raylet"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/s/logs", False,
     "gcs_server"),
    # Python daemons whose arguments name the raylet: their script decides, not the substring.
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/dashboard/agent.py "
     "--raylet-name=/tmp/ray/s/raylet --gcs-address=127.0.0.1:6379", False, "dashboard agent"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/runtime_env/agent/main.py "
     "--raylet-name=/tmp/ray/s/raylet", False, "runtime env agent"),
    ("/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --gcs-address=x", False,
     "log monitor"),
    ("/usr/bin/bash", False, "other"),
])
def test_classify(cmd, is_root, label):
    assert classify(cmd, is_root) == label


def test_cpu_by_label():
    before = {1: ("gateway", 1.0), 2: ("raylet", 2.0), 3: ("other", 5.0), 5: ("idle Ray workers", 1.0)}
    after = {1: ("gateway", 1.5), 2: ("raylet", 2.25), 4: ("idle Ray workers", 0.5), 5: ("idle Ray workers", 1.25)}
    # pid 4 was born in the window (all its CPU counts), pid 3 ended in it (lost).
    assert cpu_by_label(before, after) == pytest.approx({"gateway": 0.5, "raylet": 0.25, "idle Ray workers": 0.75})


def test_cpu_ms_per_request_adds_the_total_and_outside_seconds_per_completed_request():
    before = {1: ("gateway", 1.0), 2: ("raylet", 2.0)}
    after = {1: ("gateway", 1.5), 2: ("raylet", 2.25), 4: ("engine core", 1.25)}
    got = cpu_ms_per_request(before, after, 250, {"load generator": 0.5, "machine": 3.0})
    # 2.0 s of the tree over 250 requests is 8 ms each; outside seconds are not in the total.
    assert got == pytest.approx({"gateway": 2.0, "raylet": 1.0, "engine core": 5.0, "total": 8.0,
                                 "load generator": 2.0, "machine": 12.0})
    assert list(got)[:2] == ["machine", "total"]  # most first
    assert cpu_ms_per_request(before, before, 0) == {"gateway": 0.0, "raylet": 0.0, "total": 0.0}


def test_hop_counts_each_function_once_a_stack(tmp_path):
    from bench.hop import top

    raw = tmp_path / "gateway.txt"
    # A recursive frame counts once for its stack; a leaf shared by two stacks counts for both.
    raw.write_text("main (a.py:1);relay (b.py:2);relay (b.py:2);send (c.py:3) 5\nmain (a.py:1);read (d.py:4) 2\n")
    assert top(raw) == [(7, "main (a.py:1)"), (5, "send (c.py:3)"), (5, "relay (b.py:2)"), (2, "read (d.py:4)")]
