"""Routes on real engines: head cache with real Redis, cascade both ways, LoRA, cost, affinity."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.integration.conftest import PRICE_A, PRICE_B
from tests.support import counter, msgs

pytestmark = pytest.mark.integration


def test_routes_and_adapters_are_listed(stack):
    ids = {m.id for m in stack.client().models.list()}
    assert {"cascade-accept", "cascade-escalate", "head", "tiny-a-lora"} <= ids


def test_lora_adapter_answers_differently_from_its_base(stack):
    client = stack.client()

    def greedy(model):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs("Tell me a joke."),
                                                               max_tokens=12, temperature=0)
        return raw.headers["x-llmserve-served-by"], raw.parse().choices[0].message.content

    assert greedy("tiny-a-lora")[0] == "tiny-a-lora"
    assert greedy("tiny-a-lora")[1] != greedy("tiny-a")[1]


def test_repeated_deterministic_request_is_a_cache_hit_plain_and_streamed(stack):
    client = stack.client()
    question = msgs(f"Where is my order {uuid.uuid4().hex[:6]}?")
    first = client.chat.completions.with_raw_response.create(model="head", messages=question, max_tokens=8,
                                                             temperature=0)
    assert first.headers["x-llmserve-cache"] == "miss" and first.headers["x-llmserve-served-by"] == "tiny-b"
    answer = first.parse().choices[0].message.content
    second = client.chat.completions.with_raw_response.create(model="head", messages=question, max_tokens=8,
                                                              temperature=0)
    assert second.headers["x-llmserve-cache"] == "hit"
    assert second.parse().choices[0].message.content == answer
    assert float(second.headers["x-llmserve-cost-usd"]) == 0
    stream = client.chat.completions.create(model="head", messages=question, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == 0
    # The entry lives in Redis, with provenance, where other gateway replicas find it.
    import redis

    r = redis.Redis.from_url(stack.redis.url)
    keys = r.keys("llmserve:cache:head:*")
    assert keys and any(b'"model":"tiny-b"' in r.get(k) for k in keys)


def test_streamed_miss_then_streamed_hit(stack):
    client = stack.client()
    question = msgs(f"Summarise order {uuid.uuid4().hex[:6]}")

    def streamed():
        raw = client.chat.completions.with_raw_response.create(model="head", messages=question, max_tokens=8,
                                                               temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return raw.headers["x-llmserve-cache"], text

    miss, hit = streamed(), streamed()
    assert (miss[0], hit[0]) == ("miss", "hit") and miss[1] == hit[1]


def test_cascade_accepts_when_policy_says_so(stack):
    raw = stack.client().chat.completions.with_raw_response.create(
        model="cascade-accept", messages=msgs("What is two plus two?"), max_tokens=8, temperature=0)
    assert raw.headers["x-llmserve-served-by"] == "tiny-a-lora" and "x-llmserve-escalated" not in raw.headers
    assert raw.headers["x-llmserve-route"] == "cascade-accept"


def test_cascade_escalates_when_policy_says_so_streamed_too(stack):
    client = stack.client()
    raw = client.chat.completions.with_raw_response.create(
        model="cascade-escalate", messages=msgs("What is two plus two?"), max_tokens=8, temperature=0)
    assert raw.headers["x-llmserve-served-by"] == "tiny-b"
    assert raw.headers["x-llmserve-escalated"] == "low_confidence"
    teacher = client.chat.completions.create(model="tiny-b", messages=msgs("What is two plus two?"),
                                             max_tokens=8, temperature=0).choices[0].message.content
    assert raw.parse().choices[0].message.content == teacher
    s = client.chat.completions.with_raw_response.create(
        model="cascade-escalate", messages=msgs("What is two plus two?"), max_tokens=8, temperature=0,
        stream=True)
    assert s.headers["x-llmserve-served-by"] == "tiny-b"
    assert "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices) == teacher
    accepted = client.chat.completions.create(model="cascade-accept", messages=msgs("hi"), max_tokens=6,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in accepted if c.choices)


def _usd(usage, price) -> float:
    """What the gateway must bill for `usage` at `price` (USD per million tokens)."""
    return (usage.prompt_tokens * price["input_per_million"]
            + usage.completion_tokens * price["output_per_million"]) / 1e6


def test_costs_add_up_across_a_run(stack):
    client = stack.client()
    # ignore_eos: every answer is exactly max_tokens long, so the escalated request's student run
    # can be replayed below with the same token counts whatever the greedy text is.
    ask = {"max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    before = stack.metrics()
    total = 0.0
    for i, model in enumerate(["tiny-a", "tiny-b", "cascade-escalate", "tiny-b"]):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs(f"cost {i}"), **ask)
        r = raw.parse()
        header = float(raw.headers["x-llmserve-cost-usd"])
        assert r.usage.model_extra["cost_usd"] == pytest.approx(header, abs=1e-9)
        if model in ("tiny-a", "tiny-b"):
            assert header == pytest.approx(_usd(r.usage, PRICE_A if model == "tiny-a" else PRICE_B), abs=1e-9)
        else:
            # Student and teacher both ran and both are billed, each at its own price. The answer's
            # usage is the teacher's; the student's is what tiny-a says for the request the cascade
            # sent it (same messages, logprobs on, the same max_tokens).
            assert raw.headers["x-llmserve-served-by"] == "tiny-b" and r.usage.completion_tokens == 5
            student = client.chat.completions.create(model="tiny-a", messages=msgs(f"cost {i}"), logprobs=True,
                                                     **ask).usage
            assert student.completion_tokens == 5
            assert header == pytest.approx(_usd(student, PRICE_A) + _usd(r.usage, PRICE_B), abs=1e-9)
            escalated = (_usd(student, PRICE_A), _usd(r.usage, PRICE_B))
        total += header
    after = stack.metrics()

    def spent(**labels):
        return counter(after, "llmserve_cost_usd_total", **labels) - counter(before, "llmserve_cost_usd_total",
                                                                            **labels)

    # One more tiny-a request (the replayed student) was billed after the loop's four.
    assert spent() == pytest.approx(total + escalated[0], abs=1e-9)
    # The escalated request's cost is attributed to the model that spent it.
    assert spent(route="cascade-escalate", model="tiny-a") == pytest.approx(escalated[0], abs=1e-9)
    assert spent(route="cascade-escalate", model="tiny-b") == pytest.approx(escalated[1], abs=1e-9)


def test_prefix_sharing_requests_land_on_one_replica(stack):
    client = stack.client()
    system = {"role": "system", "content": "You are the order-status assistant of a large shop. " * 6}

    def replica(question, sys=system):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-a", messages=[sys, {"role": "user", "content": question}], max_tokens=2, temperature=0)
        return raw.headers["x-llmserve-replica"]

    shared = {replica(f"question {i}") for i in range(8)}
    assert len(shared) == 1
    spread = {replica("q", {"role": "system", "content": f"prefix {i} " * 40}) for i in range(16)}
    assert len(spread) == 2  # other prefixes use the other replica too


def test_metrics_expose_policy_counters(stack):
    text = stack.metrics()
    assert counter(text, "llmserve_cache_requests_total", route="head", result="hit") >= 1
    assert counter(text, "llmserve_escalations_total", route="cascade-escalate") >= 1
    assert re.search(r"llmserve_time_to_first_token_seconds_count\{[^}]*\} [1-9]", text)
