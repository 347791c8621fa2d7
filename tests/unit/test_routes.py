"""Routes through the gateway with a fake engine: cache, cascade, fallback and cost headers."""

import asyncio
import json

from starlette.testclient import TestClient

from serve.cache.store import LRU, CacheEntry, HeadCache
from serve.config import Config
from serve.gateway.app import create_app, create_metrics_app
from serve.gateway.backends import Backends
from tests.fakes import FakeUpstream

CONFIG = Config.model_validate({
    "auth": {"enabled": False},
    "models": [
        {"name": "student", "source": "x", "price": {"input_per_million": 1, "output_per_million": 2}},
        {"name": "teacher", "source": "y", "price": {"input_per_million": 10, "output_per_million": 20}},
        {"name": "backup", "source": "z"},
    ],
    "routes": [
        {"name": "assistant", "cascade": {"student": "student", "teacher": "teacher", "min_mean_logprob": -1.0},
         "fallback": ["backup"], "cache": {"ttl_s": 60}},
        {"name": "plain", "target": "teacher", "fallback": ["backup"], "max_attempts": 2},
    ],
})


def make(upstream):
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher", "backup")})
    return TestClient(create_app(CONFIG, backends, upstream, cache=HeadCache(None)))


def ask(client, model="assistant", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def test_models_lists_routes():
    ids = [m["id"] for m in make(FakeUpstream()).get("/v1/models").json()["data"]]
    assert ids[:2] == ["assistant", "plain"] and "student" in ids


def test_confident_student_answers_and_is_billed():
    up = FakeUpstream(text="a b", logprob=-0.1)
    r = ask(make(up))
    assert r.headers["x-llmserve-served-by"] == "student" and r.headers["x-llmserve-cache"] == "miss"
    assert [c[2]["model"] for c in up.calls] == ["student"]
    assert up.calls[0][2]["logprobs"] is True and r.json()["choices"][0]["logprobs"] is None
    cost = (3 * 1 + 2 * 2) / 1e6
    assert float(r.headers["x-llmserve-cost-usd"]) == r.json()["usage"]["cost_usd"] == round(cost, 10)


def test_unsure_student_escalates_to_teacher_and_both_are_billed():
    up = FakeUpstream(text="a b", logprob=-3.0)
    r = ask(make(up))
    assert r.headers["x-llmserve-served-by"] == "teacher"
    assert r.headers["x-llmserve-escalated"] == "low_confidence"
    assert [c[2]["model"] for c in up.calls] == ["student", "teacher"]
    cost = (3 * 1 + 2 * 2 + 3 * 10 + 2 * 20) / 1e6
    assert r.json()["usage"]["cost_usd"] == round(cost, 10)


def test_teacher_answer_is_cached_then_hit_streamed_and_plain():
    up = FakeUpstream(text="x y z", logprob=-3.0)
    client = make(up)
    assert ask(client).headers["x-llmserve-cache"] == "miss"
    n = len(up.calls)
    hit = ask(client)
    assert hit.headers["x-llmserve-cache"] == "hit" and len(up.calls) == n
    assert hit.json()["choices"][0]["message"]["content"] == "x y z"
    assert hit.json()["usage"]["cost_usd"] == 0 and hit.headers["x-llmserve-served-by"] == "cache:teacher"
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "assistant", "messages": [{"role": "user", "content": "  hi "}], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.headers["x-llmserve-cache"] == "hit"
        events = [json.loads(e[6:]) for e in b"".join(s.iter_bytes()).decode().split("\n\n")
                  if e.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "x y z"
    assert events[-1]["usage"]["completion_tokens"] == 0 and len(up.calls) == n


def test_sampled_requests_bypass_the_cache():
    up = FakeUpstream(logprob=-3.0)
    client = make(up)
    for _ in range(2):
        assert ask(client, temperature=0.8).headers["x-llmserve-cache"] == "bypass"


def test_streamed_miss_is_cached_for_the_next_request():
    up = FakeUpstream(text="p q", logprob=-3.0)
    client = make(up)
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "plain", "messages": [{"role": "user", "content": "s"}], "temperature": 0, "stream": True}) as s:
        b"".join(s.iter_bytes())
    # "plain" has no cache; "assistant" has: stream through it, then ask plainly.
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "assistant", "messages": [{"role": "user", "content": "s"}], "temperature": 0,
            "stream": True}) as s:
        b"".join(s.iter_bytes())
    r = client.post("/v1/chat/completions", json={
        "model": "assistant", "messages": [{"role": "user", "content": "s"}], "temperature": 0})
    assert r.headers["x-llmserve-cache"] == "hit"
    assert r.json()["choices"][0]["message"]["content"] == "p q "  # as it was streamed


def test_fallback_when_target_is_down_or_overloaded_not_on_client_error():
    up = FakeUpstream(down_models={"teacher"})
    r = ask(make(up), "plain")
    assert r.status_code == 200 and r.headers["x-llmserve-served-by"] == "backup"
    up = FakeUpstream(status_by_model={"teacher": 503})
    assert ask(make(up), "plain").headers["x-llmserve-served-by"] == "backup"
    up = FakeUpstream(status_by_model={"teacher": 400})
    r = ask(make(up), "plain")
    assert r.status_code == 400 and [c[2]["model"] for c in up.calls] == ["teacher"]


def test_everything_down_is_one_clear_error():
    up = FakeUpstream(down_models={"teacher", "backup", "student"})
    r = ask(make(up), "plain")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


def test_student_down_escalates_to_teacher():
    up = FakeUpstream(down_models={"student"})
    r = ask(make(up))
    assert r.headers["x-llmserve-served-by"] == "teacher"
    assert r.headers["x-llmserve-escalated"] == "student_unavailable"


def test_metrics_count_cache_escalations_and_cost():
    up = FakeUpstream(logprob=-3.0)
    client = make(up)
    ask(client)
    ask(client)
    text = TestClient(create_metrics_app(client.app.state.gateway)).get("/metrics").text
    assert 'llmserve_cache_requests_total{result="hit",route="assistant"} 1.0' in text
    assert 'llmserve_escalations_total{reason="low_confidence",route="assistant"} 1.0' in text
    assert "llmserve_cost_usd_total" in text


def test_lru_ttl_and_eviction():
    now = [0.0]
    lru = LRU(2, clock=lambda: now[0])
    e = CacheEntry(response={}, model="m", created_at=0)
    lru.put("a", e, 10)
    lru.put("b", e, 10)
    lru.get("a")
    lru.put("c", e, 10)  # evicts b, the least recently used
    assert lru.get("b") is None and lru.get("a") is e
    now[0] = 11
    assert lru.get("a") is None


def test_head_cache_without_redis_is_local_only():
    cache = HeadCache(None)
    e = CacheEntry(response={"x": 1}, model="m", created_at=0)

    async def go():
        await cache.put_many("r", [("k1", e), ("k2", e)])
        assert (await cache.get("r", "k1")).response == {"x": 1}
        assert await cache.invalidate("r") == 2
        assert await cache.get("r", "k1") is None

    asyncio.run(go())
    assert not cache.redis_up


CACHED = Config.model_validate({**CONFIG.model_dump(mode="json"), "routes": [
    {"name": "cached", "target": "teacher", "fallback": ["backup"], "cache": {"ttl_s": 60}},
    {"name": "assistant", "cascade": {"student": "student", "teacher": "teacher", "min_mean_logprob": -1.0},
     "cache": {"ttl_s": 60}},
]})


def make_cached(upstream):
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher", "backup")})
    return TestClient(create_app(CACHED, backends, upstream, cache=HeadCache(None)))


def test_a_fallback_answer_is_served_but_never_cached():
    """The primary is down: the fallback answers, and once the primary is back the route's own
    answer is served, not the fallback's for the rest of the TTL."""
    up = FakeUpstream(status_by_model={"teacher": 503},
                      text_by_model={"backup": "from backup", "teacher": "from teacher"})
    client = make_cached(up)
    r = ask(client, "cached")
    assert r.headers["x-llmserve-served-by"] == "backup"
    up.status_by_model.clear()
    r = ask(client, "cached")
    assert r.headers["x-llmserve-cache"] == "miss" and r.headers["x-llmserve-served-by"] == "teacher"
    assert r.json()["choices"][0]["message"]["content"] == "from teacher"
    r = ask(client, "cached")  # the primary's answer is the one cached
    assert r.headers["x-llmserve-cache"] == "hit" and r.headers["x-llmserve-served-by"] == "cache:teacher"


def test_accepted_student_answer_is_the_routes_own_and_cached():
    up = FakeUpstream(text="a b", logprob=-0.1)
    client = make_cached(up)
    assert ask(client).headers["x-llmserve-served-by"] == "student"
    r = ask(client)
    assert r.headers["x-llmserve-cache"] == "hit" and r.headers["x-llmserve-served-by"] == "cache:student"
    assert len(up.calls) == 1


def test_an_aborted_answer_is_not_cached():
    up = FakeUpstream(finish_reason="abort")
    client = make_cached(up)
    ask(client, "cached")
    assert ask(client, "cached").headers["x-llmserve-cache"] == "miss"
    assert len(up.calls) == 2
