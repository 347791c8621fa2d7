"""API keys, rate limits and input validation (fake engine; pure bucket arithmetic)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from serve.config import Config, ConfigError
from serve.gateway.app import create_app, create_metrics_app
from serve.gateway.auth import KeyStore, hash_key
from serve.gateway.backends import Backends
from serve.gateway.ratelimit import RateLimiter
from serve.policies.ratelimit import Bucket, take
from tests.fakes import FakeUpstream
from tests.support import validate


def config(**auth):
    return Config.model_validate({
        "models": [{"name": "a", "source": "x"}, {"name": "b", "source": "y"}],
        "auth": {"keys": [
            {"name": "alice", "sha256": hash_key("sk-alice"), "requests_per_minute": 3},
            {"name": "bob", "sha256": hash_key("sk-bob"), "models": ["b"], "tokens_per_minute": 300},
        ], **auth},
        "gateway": {"max_messages": 4},
    })


def make(cfg=None):
    cfg = cfg or config()
    backends = Backends()
    backends.update({"a": [("a#1", "http://a")], "b": [("b#1", "http://b")]})
    up = FakeUpstream()
    return TestClient(create_app(cfg, backends, up, limiter=RateLimiter(None))), up


def chat(model="a", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def post(client, body, key="sk-alice"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_missing_or_wrong_key_is_401_invalid_api_key():
    client, up = make()
    for key in [None, "sk-wrong"]:
        r = post(client, chat(), key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Basic x"})
    assert r.status_code == 401
    assert up.calls == []
    assert client.get("/health").status_code == 200


def metrics_text(client) -> str:
    return TestClient(create_metrics_app(client.app.state.gateway)).get("/metrics").text


def test_key_limited_to_models():
    client, _ = make()
    assert post(client, chat("b", max_tokens=16), "sk-bob").status_code == 200
    r = post(client, chat("a"), "sk-bob")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_requests_per_minute_gives_429_with_headers():
    client, _ = make()
    codes = [post(client, chat()).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = post(client, chat())
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert 'llmserve_rate_limited_total{key="alice",limit="requests"}' in metrics_text(client)


def test_tokens_per_minute_reserve_the_worst_case_and_settle_on_real_usage():
    """bob may use 300 tokens a minute. A request reserves its prompt plus every choice's
    max_tokens (the rest of the context without one) and is settled on the usage the engine
    reports (the fake engine: 3 prompt + 2 completion tokens)."""
    client, _ = make()
    # 200 reserved, 5 used: the rest goes back, so the next one fits at once.
    assert post(client, chat("b", max_tokens=200), "sk-bob").status_code == 200
    assert post(client, chat("b", max_tokens=200), "sk-bob").status_code == 200
    # More than a minute's budget can never be admitted: a clear 400, not a 429 retried forever.
    for body in (chat("b", max_tokens=1000),
                 chat("b", max_tokens=100, n=3),  # every choice counts
                 chat("b")):  # no max_tokens: the rest of the context (auth.assumed_context_tokens)
        r = post(client, body, "sk-bob")
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_exceeds_token_limit", body
        assert r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"model": "b", "prompt": ["x", "y", "z"], "max_tokens": 100},
                    headers={"Authorization": "Bearer sk-bob"})
    assert r.status_code == 400, "a list of prompts is one completion each"


def test_auth_on_without_keys_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="no API keys"):
        KeyStore(Config.model_validate({"models": [{"name": "a", "source": "x"}]}).auth)


def test_keys_file(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"- name: carol\n  sha256: {hash_key('sk-carol')}\n")
    client, _ = make(config(keys=[], keys_file=str(f)))
    assert post(client, chat(), "sk-carol").status_code == 200
    f.write_text("- name: x\n  sha256: nothex\n")
    with pytest.raises(ConfigError, match="keys_file"):
        KeyStore(config(keys=[], keys_file=str(f)).auth)


def test_bucket_arithmetic():
    v, b = take(None, capacity=10, per_minute=60, cost=4, now=0)
    assert v.allowed and v.remaining == 6
    v, b = take(b, 10, 60, 7, now=0)
    assert not v.allowed and v.retry_after_s == pytest.approx(1.0)
    v, b = take(b, 10, 60, 7, now=1)
    assert v.allowed and v.remaining == pytest.approx(0)
    v, _ = take(Bucket(0, 0), 10, 60, 50, now=0)  # bigger than the bucket: finite retry
    assert not v.allowed and v.retry_after_s == pytest.approx(10)


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 5}, "messages"),
    ({"messages": [{"role": 7, "content": "x"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user"}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
    ({"messages": [1]}, "messages.[0]"),
    (chat(max_tokens=0), "max_tokens"), (chat(max_tokens="five"), "max_tokens"), (chat(n=0), "n"),
    (chat(temperature=3), "temperature"), (chat(temperature="hot"), "temperature"), (chat(top_p=-1), "top_p"),
    (chat(stop=[1]), "stop"), (chat(stop=["a"] * 20), "stop"), (chat(logprobs="maybe"), "logprobs"),
    (chat(top_logprobs=50), "top_logprobs"), (chat(response_format={"type": "xml"}), "response_format"),
    (chat(stream_options={"include_usage": [1]}), "stream_options.include_usage"), (chat(user=3), "user"),
])
def test_invalid_chat_parameters(body, param):
    client, up = make()
    r = post(client, {"model": "a", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert up.calls == []


def test_invalid_utf8_and_deep_nesting():
    client, _ = make()
    h = {"Authorization": "Bearer sk-bob", "Content-Type": "application/json"}
    assert client.post("/v1/chat/completions", content=b'{"model": "b", "x": "\xff\xfe"}', headers=h).status_code == 400
    nan = client.post("/v1/chat/completions", content=b'{"model": "b", "temperature": NaN}', headers=h)
    assert nan.status_code == 400
    deep = b'{"model": "b", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/v1/chat/completions", content=deep, headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_validate_completions_and_embeddings():
    validate("/v1/completions", {"prompt": [1, 2, 3]}, 10)
    validate("/v1/embeddings", {"input": ["a", "b"]}, 10)
    for path, body in [("/v1/completions", {"prompt": None}), ("/v1/completions", {"prompt": []}),
                       ("/v1/completions", {"prompt": "x", "echo": 1}), ("/v1/embeddings", {"input": 3}),
                       ("/v1/embeddings", {"input": "x", "encoding_format": "hex"})]:
        with pytest.raises(Exception) as e:
            validate(path, body, 10)
        assert getattr(e.value, "status", None) == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
FIELDS = ["messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "logprobs", "top_logprobs",
          "response_format", "stream_options", "seed", "user", "model"]


@st.composite
def malformed(draw):
    """A chat request with one field replaced by an arbitrary JSON value of a wrong kind."""
    body = chat("b")
    field = draw(st.sampled_from(FIELDS))
    value = draw(json_values)
    body[field] = value
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=malformed())
def test_malformed_requests_never_reach_the_engine_as_errors(body):
    """Whatever the gateway lets through must be well-formed; whatever it refuses is a 4xx."""
    client, up = make(config(default_requests_per_minute=None))
    r = post(client, body, "sk-bob")
    if r.status_code >= 400:
        assert 400 <= r.status_code < 500
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    else:
        sent = up.calls[-1][2]
        assert isinstance(sent["messages"], list) and sent["messages"]
    json.dumps(r.json() if r.headers.get("content-type", "").startswith("application/json") else {})


def test_adapter_loading_needs_an_admin_key():
    client, _ = make()
    body = {"name": "x", "path": "/p", "base": "a"}
    r = client.post("/v1/llmserve/adapters", json=body, headers={"Authorization": "Bearer sk-alice"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert client.post("/v1/llmserve/adapters", json=body).status_code == 401


def test_public_port_has_no_metrics_and_models_need_a_key():
    client, _ = make()
    # Metrics name keys and per-key spend: only the metrics listener serves them.
    assert client.get("/metrics").status_code == 404
    assert "llmserve_requests_total" in metrics_text(client)
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models/a").status_code == 401
    # A key sees the models it may use, and nothing else (404 as for an unknown model).
    bob = {"Authorization": "Bearer sk-bob"}
    assert [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]] == ["b"]
    assert client.get("/v1/models/a", headers=bob).status_code == 404
    assert client.get("/v1/models/b", headers=bob).json()["id"] == "b"


async def test_batch_line_is_admitted_with_its_owners_key():
    """A batch line takes the same admission as the HTTP request: model access, rate limits, and
    the cost billed to the owner's key."""
    from serve.launch.batch_worker import owner_call

    client, up = make()
    gw = client.app.state.gateway
    call = owner_call(gw)
    # bob may use only model b: a line for model a is refused as an unknown model, never sent.
    status, body = await call("bob", "/v1/chat/completions", chat("a"))
    assert status == 404 and body["error"]["code"] == "model_not_found" and up.calls == []
    status, body = await call("bob", "/v1/chat/completions", chat("b", max_tokens=16))
    assert status == 200 and body["choices"][0]["message"]["content"]
    # alice's limit is 3 requests a minute, shared with her online requests.
    assert post(client, chat()).status_code == 200
    codes = [(await call("alice", "/v1/chat/completions", chat()))[0] for _ in range(3)]
    assert codes == [200, 200, 429]
    # A key that no longer exists owns nothing it can run.
    status, body = await call("mallory", "/v1/chat/completions", chat())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    text = metrics_text(client)
    assert 'llmserve_cost_usd_total{key="bob",model="b",route="b"}' in text
    assert 'llmserve_cost_usd_total{key="alice",model="a",route="a"}' in text
    assert 'key="batch"' not in text


def test_health_names_models_to_admins_and_the_metrics_port_only():
    """A probe or any caller without an admin key learns the status, not which models exist."""
    cfg = Config.model_validate({
        "models": [{"name": "secret-model", "source": "x"}],
        "auth": {"keys": [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True},
                          {"name": "user", "sha256": hash_key("sk-user")}]},
    })
    backends = Backends()
    backends.update({"secret-model": [("s#1", "http://s")]})
    app = create_app(cfg, backends, FakeUpstream())
    client = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer sk-user"}, {"Authorization": "Bearer sk-wrong"}):
        r = client.get("/health", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"} and "secret-model" not in r.text, headers
    r = client.get("/health", headers={"Authorization": "Bearer sk-ops"})
    assert r.json() == {"status": "ok", "replicas": {"secret-model": 1}}
    detail = TestClient(create_metrics_app(app.state.gateway)).get("/health")
    assert detail.json() == {"status": "ok", "replicas": {"secret-model": 1}}


def test_two_keys_of_one_name_are_refused_at_start(tmp_path):
    """Ownership goes by key name: two keys of one name would share files, batches, responses
    and rate buckets. Refused whether both are inline or one comes from the keys file."""
    dup = tmp_path / "keys.yaml"
    dup.write_text(f"- {{name: alice, sha256: {hash_key('sk-other')}}}\n")
    alice = {"name": "alice", "sha256": hash_key("sk-1")}
    for auth in ({"keys": [alice, {"name": "alice", "sha256": hash_key("sk-2")}]},
                 {"keys": [alice], "keys_file": str(dup)}):
        cfg = Config.model_validate({"models": [{"name": "a", "source": "x"}], "auth": auth})
        with pytest.raises(ConfigError, match="unique"):
            KeyStore(cfg.auth)


def test_prompt_logprobs_on_a_cpu_engine_is_a_400_not_a_dead_engine():
    """vLLM's CPU engine core dies on batched prompt_logprobs: refused before it reaches one."""
    cfg = Config.model_validate({"auth": {"enabled": False}, "models": [
        {"name": "c", "source": "x", "accelerator": "cpu"}, {"name": "g", "source": "y"}]})
    backends = Backends()
    backends.update({"c": [("c#1", "http://c")], "g": [("g#1", "http://g")]})
    up = FakeUpstream()
    client = TestClient(create_app(cfg, backends, up))
    r = client.post("/v1/completions", json={"model": "c", "prompt": ["a", "b"], "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs" and up.calls == []
    assert client.post("/v1/completions", json={"model": "g", "prompt": ["a", "b"], "prompt_logprobs": 1}
                       ).status_code == 200
    assert client.post("/v1/completions", json={"model": "c", "prompt": "a"}).status_code == 200
