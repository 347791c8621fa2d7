"""What the engines report to the autoscaling policy, from real vLLM replicas: the requests the
gateway sent them, and no ongoing or waiting request once those are answered."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.support import msgs

pytestmark = pytest.mark.integration


def stats(stack, model: str) -> list[dict[str, float]]:
    out = []
    for _, url in stack.replicas(model):
        with urllib.request.urlopen(f"{url}/llmserve/stats", timeout=10) as r:
            out.append(json.loads(r.read())["autoscaling"])
    return out


def test_engines_report_the_load_the_gateway_sent(stack):
    client = stack.client()
    before = sum(s["llmserve_requests_total"] for s in stats(stack, "tiny-b"))
    for i in range(6):
        client.chat.completions.create(model="tiny-b", messages=msgs(f"load {i}"), max_tokens=2)
    # Only this test talks to tiny-b now; the counter counts on arrival, so it is exact.
    after = stats(stack, "tiny-b")
    assert sum(s["llmserve_requests_total"] for s in after) - before == 6
    deadline = time.monotonic() + 10
    while any(s["llmserve_ongoing_requests"] or s.get("llmserve_waiting_requests", 0) for s in after):
        assert time.monotonic() < deadline, after
        time.sleep(0.5)
        after = stats(stack, "tiny-b")
    assert all(set(s) >= {"llmserve_requests_total", "llmserve_ongoing_requests"} for s in after)
