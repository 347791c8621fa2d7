"""A head cache that never lies, on the real stack: `llmserve cache invalidate` reaches every
running gateway's in-process LRU, a streamed answer is stored whole (logprobs too), and requests
that differ in a parameter vLLM honours never share an entry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.support import free_port, serving

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def msgs(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def second_gateway(stack):
    """Another gateway process's worth of state (its own LRU), in this process, on the same Redis
    and engines: what a second gateway replica is."""
    from openai import OpenAI

    from serve.gateway.server import build_gateway, ray_snapshot_source

    gateway = stack.config.gateway.model_copy(update={"port": free_port(), "metrics_port": free_port()})
    # No batch worker: one per batch database is the stack's.
    batch = stack.config.batch.model_copy(update={"enabled": False})
    config = stack.config.model_copy(update={"gateway": gateway, "batch": batch})
    app = build_gateway(config, ray_snapshot_source(stack.registry))
    with serving(app, config):
        yield OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="test", max_retries=0, timeout=120)


def cache_state(client, question, **kw) -> str:
    raw = client.chat.completions.with_raw_response.create(model="head", messages=question, max_tokens=8,
                                                           temperature=0, **kw)
    return raw.headers["x-llmserve-cache"]


def test_cache_invalidate_reaches_every_gateway_within_a_second(stack, second_gateway):
    first = stack.client()
    tag = uuid.uuid4().hex[:6]
    q1, q2 = msgs(f"Track parcel {tag}"), msgs(f"Cancel parcel {tag}")
    for q in (q1, q2):
        assert cache_state(first, q) == "miss"
        assert cache_state(first, q) == "hit"  # from the first gateway's LRU
        assert cache_state(second_gateway, q) == "hit"  # through Redis, now in the second one's LRU too
        assert cache_state(second_gateway, q) == "hit"
    done = subprocess.run([sys.executable, "-m", "serve.cli", "cache", "invalidate", "--route", "head",
                           "--redis-url", stack.redis.url], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    time.sleep(1.0)
    # One question per gateway: a miss stores its answer again, which the other one could find.
    assert cache_state(first, q1) == "miss"
    assert cache_state(second_gateway, q2) == "miss"


def test_streamed_answer_is_stored_with_its_logprobs(stack):
    client = stack.client()
    ask = {"model": "head", "messages": msgs(f"Describe parcel {uuid.uuid4().hex[:6]}"), "max_tokens": 8,
           "temperature": 0, "logprobs": True, "top_logprobs": 2}
    raw = client.chat.completions.with_raw_response.create(**ask, stream=True)
    chunks = list(raw.parse())
    assert (raw.headers["x-llmserve-cache"], raw.headers["x-llmserve-served-by"]) == ("miss", "tiny-b")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    hit = client.chat.completions.with_raw_response.create(**ask)
    assert hit.headers["x-llmserve-cache"] == "hit"
    cached = hit.parse().choices[0]
    fresh = client.chat.completions.create(**{**ask, "model": "tiny-b"}).choices[0]  # the route's model, uncached
    assert cached.message.content == fresh.message.content == streamed
    assert cached.finish_reason == fresh.finish_reason
    assert [t.token for t in cached.logprobs.content] == [t.token for t in fresh.logprobs.content]
    assert [t.logprob for t in cached.logprobs.content] == pytest.approx(
        [t.logprob for t in fresh.logprobs.content], abs=1e-3)
    assert [len(t.top_logprobs) for t in cached.logprobs.content] == [2] * len(fresh.logprobs.content)

    # A streamed hit replays them as an engine streams them.
    again = client.chat.completions.with_raw_response.create(**ask, stream=True)
    replayed = [t.token for c in again.parse() if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    assert again.headers["x-llmserve-cache"] == "hit"
    assert replayed == [t.token for t in fresh.logprobs.content]


@pytest.mark.parametrize("extra", [{"min_tokens": 6}, {"ignore_eos": True}])
def test_engine_parameters_do_not_share_an_entry(stack, extra):
    client = stack.client()
    question = msgs(f"Refund order {uuid.uuid4().hex[:6]}")
    assert cache_state(client, question) == "miss"
    assert cache_state(client, question) == "hit"
    assert cache_state(client, question, extra_body=extra) == "miss"
    assert cache_state(client, question, extra_body=extra) == "hit"  # it has an entry of its own
