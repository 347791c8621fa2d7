"""Faults, marked destructive (run after every other test) because they take parts of the stack away."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.support import counter, gauge, msgs

pytestmark = [pytest.mark.integration, pytest.mark.destructive]


def test_redis_down_serves_from_models_and_says_so(stack):
    client = stack.client()

    def head_request(tag: str) -> None:  # a miss each time: it reads and writes the shared cache
        raw = client.chat.completions.with_raw_response.create(
            model="head", messages=msgs(f"{tag} {uuid.uuid4().hex[:6]}"), max_tokens=4, temperature=0)
        assert raw.http_response.status_code == 200

    stack.redis.stop()
    try:
        for _ in range(2):
            head_request("no redis")
        # The first refused operation marks Redis down for the cache's retry window (5 s); two
        # 4-token answers and a scrape fit well inside it.
        assert gauge(stack.metrics(), "llmserve_cache_redis_up") == 0
    finally:
        stack.redis.start()
    # Back: once the retry window has passed, a request reaches Redis again and the gauge says so.
    deadline = time.monotonic() + 60
    while True:
        head_request("redis back")
        up = gauge(stack.metrics(), "llmserve_cache_redis_up")
        if up == 1:
            break
        assert up == 0 and time.monotonic() < deadline, f"redis gauge still {up}"
        time.sleep(1)


def _replica_pid(url: str) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/llmserve/stats", timeout=10) as r:
        return int(json.loads(r.read())["pid"])


def test_engine_crash_fails_fast_then_recovers(stack):
    """Kill a replica mid-stream: the stream ends with an error at once, new requests go to the
    healthy replica, and Serve brings a new one up without touching the gateway."""
    client = stack.client()
    before = stack.replicas("tiny-a")
    assert len(before) == 2
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-a", messages=msgs("long story"), max_tokens=450, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    victim = raw.headers["x-llmserve-replica"]
    url = dict(before)[victim]
    stream = raw.parse()
    next(iter(stream))
    os.kill(_replica_pid(url), signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - an error event or a broken connection, either is fine
        for chunk in stream:
            assert chunk.choices is not None
    assert time.monotonic() - started < 15
    for i in range(4):  # new requests are answered by the surviving replica
        r = client.chat.completions.with_raw_response.create(model="tiny-a", messages=msgs(f"after {i}"),
                                                             max_tokens=2)
        assert r.http_response.status_code == 200 and r.headers["x-llmserve-replica"] != victim
    deadline = time.monotonic() + 400
    while True:
        now = stack.replicas("tiny-a")
        if len(now) == 2 and victim not in dict(now):
            break
        assert time.monotonic() < deadline, f"replica not replaced: {now}"
        time.sleep(2)
    r = client.chat.completions.with_raw_response.create(model="tiny-a", messages=msgs("recovered"), max_tokens=2)
    assert r.http_response.status_code == 200


def test_sigterm_drains_in_flight_streams(stack, tmp_path):
    """A second gateway process joins the cluster; SIGTERM lets its open stream finish."""
    import ray
    import yaml

    from tests.support import free_port

    port = free_port()
    cfg = stack.config.model_dump(mode="json")
    cfg["gateway"].update(port=port, metrics_port=free_port(), drain_timeout_s=30)
    cfg["ray"]["address"] = ray.get_runtime_context().gcs_address
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "gateway", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from openai import OpenAI

        gw = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                gw.models.list()
                if json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())[
                        "status"] == "ok":
                    break
            except Exception:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "second gateway did not come up"
                time.sleep(0.5)
        stream = gw.chat.completions.create(model="tiny-b", messages=msgs("drain"), max_tokens=120,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        rest = list(it)  # finishes normally: the stream is drained, not cut
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=40) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stopped_model_falls_back_to_the_next(stack):
    from ray import serve

    client = stack.client()
    serve.delete("tiny-b")  # the route's target goes away; its replica leaves the registry
    deadline = time.monotonic() + 60
    while True:
        raw = client.chat.completions.with_raw_response.create(
            model="head", messages=msgs(f"fallback {uuid.uuid4().hex[:6]}"), max_tokens=4, temperature=0)
        if raw.headers["x-llmserve-served-by"] == "tiny-a":
            break
        assert time.monotonic() < deadline, "never fell back"
        time.sleep(1)
    assert raw.parse().choices[0].message.content
    assert counter(stack.metrics(), "llmserve_fallbacks_total", route="head", from_model="tiny-b") >= 1
