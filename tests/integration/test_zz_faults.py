"""Faults, last in the session because they take parts of the stack away."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.integration.test_policies import counter, msgs

pytestmark = pytest.mark.integration


def test_redis_down_serves_from_models_and_says_so(stack):
    client = stack.client()
    stack.redis.stop()
    try:
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="head", messages=msgs(f"no redis {uuid.uuid4().hex[:6]}"), max_tokens=4, temperature=0)
            assert raw.http_response.status_code == 200
        text = stack.metrics()
        assert counter(text, "llmserve_cache_redis_up") == 0
    finally:
        stack.redis.start()


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
