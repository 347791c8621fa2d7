"""The cascade at its real boundary, on the real engines: a threshold calibrated from the student's
own measured confidence (mean token logprob, read through the SDK), so that some requests fall
below it and some above; each one below is escalated to the teacher and each one above is the
student's, and the headers, the answer and the cost say which."""

from __future__ import annotations

import pytest

from tests.integration.conftest import PRICE_A, PRICE_B
from tests.support import free_port, serving

pytestmark = pytest.mark.integration

PROMPTS = [f"{verb} my {thing}, please." for verb in ("Track", "Cancel", "Explain", "Summarise", "Change", "Price")
           for thing in ("order", "invoice", "password", "parcel")]
ASK = {"max_tokens": 8, "temperature": 0}
# Two measurements of one greedy request can differ in the last float bits (another batch, another
# replica): no prompt may sit closer than this to the threshold.
MARGIN = 0.01


def msgs(text):
    return [{"role": "user", "content": text}]


def cost(usage, price) -> float:
    return (usage.prompt_tokens * price["input_per_million"]
            + usage.completion_tokens * price["output_per_million"]) / 1e6


def calibrate(lps: list[float]) -> float:
    """Midway across the widest gap between neighbouring measured confidences in their middle half:
    a threshold with a quarter or more of the prompts on each side and none near it."""
    xs = sorted(lps)
    n = len(xs)
    k = max(range(n // 4, 3 * n // 4 + 1), key=lambda i: xs[i] - xs[i - 1])
    assert xs[k] - xs[k - 1] > 2 * MARGIN, f"no gap in the middle of the measured confidences: {xs}"
    return (xs[k] + xs[k - 1]) / 2


def test_cascade_escalates_exactly_the_requests_below_a_calibrated_threshold(stack):
    from openai import OpenAI

    from serve.config import Config
    from serve.gateway.server import build_gateway, ray_snapshot_source
    from serve.policies.cascade import mean_logprob

    client = stack.client()
    # 1. What the student (tiny-a) and the teacher (tiny-b) answer to each prompt, with the
    # student's confidence, measured as the route will ask: greedy, 8 tokens, logprobs on.
    student, teacher = {}, {}
    for p in PROMPTS:
        r = client.chat.completions.create(model="tiny-a", messages=msgs(p), logprobs=True, **ASK)
        lp = mean_logprob(r.choices[0].model_dump())
        assert lp is not None
        student[p] = (lp, r.choices[0].message.content, r.usage)
        t = client.chat.completions.create(model="tiny-b", messages=msgs(p), **ASK)
        teacher[p] = (t.choices[0].message.content, t.usage)
    threshold = calibrate([v[0] for v in student.values()])
    below = [p for p in PROMPTS if student[p][0] < threshold]
    above = [p for p in PROMPTS if student[p][0] >= threshold]
    assert len(below) >= len(PROMPTS) // 4 and len(above) >= len(PROMPTS) // 4

    # 2. A gateway whose route cascades at that threshold (no cache: every request meets the cascade).
    data = stack.config.model_dump(mode="json")
    data["routes"].append({"name": "cascade-boundary", "cascade": {
        "student": "tiny-a", "teacher": "tiny-b", "min_mean_logprob": threshold, "escalate_on_length": False}})
    data["gateway"].update(port=free_port(), metrics_port=free_port())
    data["batch"]["enabled"] = False  # one batch worker per batch database: the stack's
    config = Config.model_validate(data)

    with serving(build_gateway(config, ray_snapshot_source(stack.registry)), config):
        gw = OpenAI(base_url=f"http://127.0.0.1:{config.gateway.port}/v1", api_key="test", max_retries=0, timeout=120)
        for p in PROMPTS:
            raw = gw.chat.completions.with_raw_response.create(model="cascade-boundary", messages=msgs(p), **ASK)
            h, body = raw.headers, raw.parse()
            lp, s_text, s_usage = student[p]
            where = f"{p!r}: mean logprob {lp:.4f}, threshold {threshold:.4f}"
            assert abs(lp - threshold) > MARGIN, where
            if p in below:
                assert (h["x-llmserve-served-by"], h.get("x-llmserve-escalated")) == ("tiny-b", "low_confidence"), where
                assert body.choices[0].message.content == teacher[p][0], where
                expected = cost(s_usage, PRICE_A) + cost(teacher[p][1], PRICE_B)  # both models are billed
            else:
                assert (h["x-llmserve-served-by"], h.get("x-llmserve-escalated")) == ("tiny-a", None), where
                assert body.choices[0].message.content == s_text, where
                expected = cost(s_usage, PRICE_A)
            assert float(h["x-llmserve-cost-usd"]) == pytest.approx(expected, abs=2e-10), where


K = 4  # decide_after_tokens of the streamed route


def test_streamed_cascade_decides_on_the_first_k_tokens_at_a_calibrated_threshold(stack):
    """The same boundary for a streamed request on a route with decide_after_tokens: the decision
    reads the student's first K token logprobs (measured here through the SDK), so each prompt
    whose prefix falls below the threshold streams the teacher's answer, each above it the
    student's, and the usage chunk and headers say which (serve/gateway/stages/prefix.py, on real engines)."""
    from openai import OpenAI

    from serve.config import Config
    from serve.gateway.server import build_gateway, ray_snapshot_source

    client = stack.client()
    student, teacher = {}, {}
    for p in PROMPTS:
        r = client.chat.completions.create(model="tiny-a", messages=msgs(p), logprobs=True, **ASK)
        toks = r.choices[0].logprobs.content
        assert len(toks) == ASK["max_tokens"], "the prefix must be shorter than the answer"
        student[p] = (sum(t.logprob for t in toks[:K]) / K, r.choices[0].message.content, r.usage)
        t = client.chat.completions.create(model="tiny-b", messages=msgs(p), **ASK)
        teacher[p] = (t.choices[0].message.content, t.usage)
    threshold = calibrate([v[0] for v in student.values()])
    below = {p for p in PROMPTS if student[p][0] < threshold}
    assert len(below) >= len(PROMPTS) // 4 and len(PROMPTS) - len(below) >= len(PROMPTS) // 4

    data = stack.config.model_dump(mode="json")
    data["routes"].append({"name": "cascade-prefix", "cascade": {
        "student": "tiny-a", "teacher": "tiny-b", "min_mean_logprob": threshold, "escalate_on_length": False,
        "decide_after_tokens": K}})
    data["gateway"].update(port=free_port(), metrics_port=free_port())
    data["batch"]["enabled"] = False
    config = Config.model_validate(data)

    with serving(build_gateway(config, ray_snapshot_source(stack.registry)), config):
        gw = OpenAI(base_url=f"http://127.0.0.1:{config.gateway.port}/v1", api_key="test", max_retries=0, timeout=120)
        for p in PROMPTS:
            raw = gw.chat.completions.with_raw_response.create(
                model="cascade-prefix", messages=msgs(p), stream=True, stream_options={"include_usage": True}, **ASK)
            h = raw.headers
            chunks = list(raw.parse())
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            assert usage is not None and not chunks[-1].choices
            assert all(c.choices[0].logprobs is None for c in chunks if c.choices), "logprobs were not asked for"
            lp, s_text, s_usage = student[p]
            where = f"{p!r}: first-{K} mean logprob {lp:.4f}, threshold {threshold:.4f}"
            assert abs(lp - threshold) > MARGIN, where
            if p in below:
                assert (h["x-llmserve-served-by"], h.get("x-llmserve-escalated")) == ("tiny-b", "low_confidence"), where
                assert text == teacher[p][0], where
                assert usage.completion_tokens == teacher[p][1].completion_tokens, where
            else:
                assert (h["x-llmserve-served-by"], h.get("x-llmserve-escalated")) == ("tiny-a", None), where
                assert text == s_text, where
                assert (usage.prompt_tokens, usage.completion_tokens) == (s_usage.prompt_tokens,
                                                                          s_usage.completion_tokens), where
