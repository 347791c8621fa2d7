"""vLLM's /v1/score and /v1/rerank through the gateway with a fake engine: forwarded to an
embedding model's replica, refused for a generate model, validated, cached without a temperature."""

from __future__ import annotations

from starlette.testclient import TestClient

from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from tests.fakes import FakeUpstream

CONFIG = Config.model_validate({
    "auth": {"enabled": False},
    "models": [{"name": "emb", "source": "x", "task": "embed"}, {"name": "gen", "source": "y"}],
    "routes": [{"name": "emb-cached", "target": "emb", "cache": {"ttl_s": 60}}],
})


def make(up: FakeUpstream) -> TestClient:
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("emb", "gen")})
    return TestClient(create_app(CONFIG, backends, up, cache=HeadCache(None)))


def test_score_and_rerank_reach_the_embedding_models_engine_at_every_vllm_path() -> None:
    up = FakeUpstream()
    client = make(up)
    for path in ("/v1/score", "/score"):
        r = client.post(path, json={"model": "emb", "text_1": "a", "text_2": ["b", "c"]})
        assert r.status_code == 200, r.text
        assert up.calls[-1][:2] == ("http://emb", path) and up.calls[-1][2]["text_2"] == ["b", "c"]
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        r = client.post(path, json={"model": "emb", "query": "q", "documents": ["x", "y"], "top_n": 1})
        assert r.status_code == 200, r.text
        assert up.calls[-1][:2] == ("http://emb", path)


def test_score_on_a_generate_model_and_malformed_bodies_are_400_naming_the_param() -> None:
    up = FakeUpstream()
    client = make(up)
    cases = [("/v1/score", {"model": "gen", "text_1": "a", "text_2": "b"}, "model"),
             ("/v1/score", {"model": "emb", "text_1": "a"}, "text_1"),
             ("/v1/score", {"model": "emb", "queries": "a", "documents": []}, "documents"),
             ("/v1/rerank", {"model": "emb", "documents": ["x"]}, "query"),
             ("/v1/rerank", {"model": "emb", "query": "q", "documents": ["x"], "top_n": -1}, "top_n")]
    for path, body, param in cases:
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    assert up.calls == []


def test_a_repeated_score_is_a_cache_hit_without_a_temperature() -> None:
    up = FakeUpstream()
    client = make(up)
    body = {"model": "emb-cached", "text_1": "a", "text_2": "b"}
    assert client.post("/v1/score", json=body).headers["x-llmserve-cache"] == "miss"
    hit = client.post("/v1/score", json=body)
    assert hit.headers["x-llmserve-cache"] == "hit" and hit.json()["usage"]["cost_usd"] == 0.0
    assert len(up.calls) == 1
