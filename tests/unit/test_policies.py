"""Each policy's decisions, including malformed and boundary input."""

import pytest

from serve.policies.affinity import prefix_key, rendezvous
from serve.policies.cascade import CascadePolicy, decide, mean_logprob
from serve.policies.cost import Price, cost_usd, usage_tokens
from serve.policies.fallback import Failure, FallbackPolicy, classify_status

CHAT = {"model": "r", "messages": [{"role": "user", "content": "What  is\tthe capital of France? "}],
        "temperature": 0, "max_tokens": 16}


# (cache keys: tests/unit/test_cache.py)


# ---- cascade ----------------------------------------------------------------------------------
def student(text="Paris.", lp=-0.5, finish="stop", n=1, chat=True):
    if chat:
        choice = {"message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": {"content": [{"token": "t", "logprob": lp}] * 3}}
    else:
        choice = {"text": text, "finish_reason": finish, "logprobs": {"token_logprobs": [lp, lp]}}
    return {"choices": [{**choice, "index": i} for i in range(n)]}


POLICY = CascadePolicy(min_mean_logprob=-1.0)


def test_accepts_confident_answer():
    d = decide(POLICY, CHAT, student(lp=-0.2))
    assert not d.escalate and d.reason == "accepted" and d.mean_logprob == pytest.approx(-0.2)
    assert not decide(POLICY, {"prompt": "x"}, student(lp=-0.2, chat=False)).escalate


def test_threshold_boundary_is_accept():
    assert not decide(POLICY, CHAT, student(lp=-1.0)).escalate
    assert decide(POLICY, CHAT, student(lp=-1.0001)).reason == "low_confidence"


def test_escalates_on_length_schema_refusal_and_malformed():
    assert decide(POLICY, CHAT, student(finish="length")).reason == "length"
    assert not decide(CascadePolicy(min_mean_logprob=-1, escalate_on_length=False), CHAT,
                      student(finish="length")).escalate
    schema_req = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}}}}
    assert decide(POLICY, schema_req, student(text='{"a": "no"}')).reason == "schema"
    assert decide(POLICY, schema_req, student(text="not json")).reason == "schema"
    assert not decide(POLICY, schema_req, student(text='{"a": 3}')).escalate
    assert decide(POLICY, CHAT, student(text="I'm sorry, I can't help with that.")).reason == "refusal"
    for bad in [None, {}, {"choices": []}, {"choices": ["x"]}, {"choices": [{"message": {"content": "x"}}]}]:
        assert decide(POLICY, CHAT, bad).reason == "malformed"


def test_every_choice_must_pass():
    resp = student(n=2)
    resp["choices"][1]["logprobs"]["content"] = [{"logprob": -5.0}]
    assert decide(POLICY, CHAT, resp).reason == "low_confidence"


def test_mean_logprob_ignores_junk():
    assert mean_logprob({"logprobs": {"content": [{"logprob": -1}, {"logprob": "x"}, "y", {"logprob": -3}]}}) == -2
    assert mean_logprob({"logprobs": None}) is None


# ---- fallback ---------------------------------------------------------------------------------
def test_fallback_walks_the_chain_within_attempts():
    p = FallbackPolicy(("a", "b", "c"), max_attempts=2)
    assert p.next_target(1, Failure.UNAVAILABLE, bytes_sent=False) == "b"
    assert p.next_target(2, Failure.UNAVAILABLE, bytes_sent=False) is None  # max_attempts reached
    assert FallbackPolicy(("a", "b"), 5).next_target(2, Failure.TIMEOUT, False) is None  # chain exhausted


def test_no_retry_after_bytes_or_on_client_errors():
    p = FallbackPolicy(("a", "b"))
    assert p.next_target(1, Failure.ENGINE_ERROR, bytes_sent=True) is None
    assert p.next_target(1, Failure.CLIENT_ERROR, bytes_sent=False) is None
    assert p.next_target(1, Failure.OVERLOADED, bytes_sent=False) == "b"


@pytest.mark.parametrize("status,failure", [(200, None), (400, Failure.CLIENT_ERROR), (404, Failure.CLIENT_ERROR),
                                            (429, Failure.OVERLOADED), (503, Failure.OVERLOADED),
                                            (500, Failure.ENGINE_ERROR), (504, Failure.TIMEOUT)])
def test_classify_status(status, failure):
    assert classify_status(status) == failure


# ---- cost -------------------------------------------------------------------------------------
def test_cost():
    assert cost_usd(1_000_000, 2_000_000, Price(0.5, 1.5)) == pytest.approx(3.5)
    assert cost_usd(0, 0, Price(1, 1)) == 0
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4}) == (3, 4)
    for bad in [None, "x", {"prompt_tokens": -1, "completion_tokens": "2"}, {"prompt_tokens": True}]:
        assert usage_tokens(bad) == (0, 0)


# ---- affinity ---------------------------------------------------------------------------------
def test_rendezvous_is_stable_and_moves_few_keys():
    reps = ["r1", "r2", "r3"]
    keys = [f"k{i}" for i in range(300)]
    before = {k: rendezvous(k, reps) for k in keys}
    assert before == {k: rendezvous(k, list(reversed(reps))) for k in keys}
    assert len(set(before.values())) == 3
    after = {k: rendezvous(k, [*reps, "r4"]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "r4" for k in moved) and len(moved) < 150


def test_prefix_key():
    long_sys = [{"role": "system", "content": "S" * 500}, {"role": "user", "content": "q1"}]
    other = [{"role": "system", "content": "S" * 500}, {"role": "user", "content": "q2"}]
    assert prefix_key({"messages": long_sys}) == prefix_key({"messages": other})
    assert prefix_key({"prompt": "abc"}) == "abc"
    assert prefix_key({"prompt": ""}) is None and prefix_key({}) is None
