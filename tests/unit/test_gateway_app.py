"""The gateway's request handling against a fake engine: routing, validation and error shapes."""

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from tests.fakes import FakeUpstream

CONFIG = Config.model_validate({
    "auth": {"enabled": False},
    "models": [
        {"name": "a", "source": "x", "adapters": [{"name": "a-lora", "path": "/tmp/l"}]},
        {"name": "b", "source": "y"},
        {"name": "emb", "source": "z", "task": "embed"},
    ],
    "gateway": {"max_body_bytes": 2000},
})


def make(upstream=None, replicas=None):
    backends = Backends()
    backends.update(replicas if replicas is not None else {
        "a": [("a#1", "http://a1"), ("a#2", "http://a2")], "b": [("b#1", "http://b1")],
        "emb": [("e#1", "http://e1")]})
    up = upstream or FakeUpstream()
    return TestClient(create_app(CONFIG, backends, up)), up, backends


def chat(model="a", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def assert_openai_error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


def test_models_lists_models_and_adapters():
    client, _, _ = make()
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["a", "a-lora", "b", "emb"]
    assert client.get("/v1/models/a-lora").json()["parent"] == "a"
    assert_openai_error(client.get("/v1/models/zzz"), 404, "model_not_found")


def test_routes_by_model_to_that_models_replicas():
    client, up, _ = make()
    for model, hosts in [("a", {"http://a1", "http://a2"}), ("b", {"http://b1"}), ("a-lora", {"http://a1", "http://a2"})]:
        r = client.post("/v1/chat/completions", json=chat(model))
        assert r.status_code == 200 and r.headers["x-llmserve-served-by"] == model
        assert up.calls[-1][0] in hosts
        assert r.headers["x-llmserve-replica"].split("#")[0] == model.split("-")[0]
        assert up.calls[-1][2]["model"] == model  # the body goes unchanged


def test_every_answer_names_the_gateway_that_gave_it():
    """Several gateways sit behind one Service: the pod (hostname) and process that answered."""
    import os
    import socket

    client, _, _ = make()
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert client.post("/v1/chat/completions", json=chat("a")).headers["x-llmserve-gateway"] == me
    streamed = client.post("/v1/chat/completions", json={**chat("a"), "stream": True})
    assert streamed.headers["x-llmserve-gateway"] == me
    assert client.post("/v1/chat/completions", json=chat("zzz")).headers["x-llmserve-gateway"] == me


def test_streaming_is_passed_through():
    client, _, _ = make(FakeUpstream(text="one two three"))
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = b"".join(r.iter_bytes()).decode()
    # words, the finish chunk and [DONE]; the usage chunk the gateway asked for (to bill the
    # stream) is not passed on, since the client did not ask for it.
    assert body.count("data: ") == 5 and body.rstrip().endswith("data: [DONE]")
    assert '"usage"' not in body


def test_stream_usage_chunk_carries_cost_when_asked():
    client, _, _ = make(FakeUpstream(text="one two three"))
    with client.stream("POST", "/v1/chat/completions",
                       json=chat(stream=True, stream_options={"include_usage": True})) as r:
        events = [e for e in b"".join(r.iter_bytes()).decode().split("\n\n") if e]
    usage = json.loads(events[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 3 and "cost_usd" in usage


@pytest.mark.parametrize("body,status,code,param", [
    (b"{not json", 400, None, None),
    (b"[1,2]", 400, None, None),
    (json.dumps({"messages": []}).encode(), 400, None, "model"),
    (json.dumps({"model": 3}).encode(), 400, None, "model"),
    (json.dumps(chat("nope")).encode(), 404, "model_not_found", "model"),
    (json.dumps(chat(stream="maybe")).encode(), 400, None, "stream"),
    (json.dumps(chat("emb")).encode(), 400, "model_not_supported", "model"),
    (json.dumps(chat(pad="x" * 3000)).encode(), 413, "request_too_large", None),
])
def test_bad_requests_get_openai_errors(body, status, code, param):
    client, up, _ = make()
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, status, code, param)
    assert up.calls == []  # nothing reached an engine


def test_refused_replica_is_skipped_and_marked_down():
    client, up, backends = make(FakeUpstream(fail_first_n=1))
    r = client.post("/v1/chat/completions", json=chat("a"))
    assert r.status_code == 200
    assert len(up.calls) == 2 and up.calls[0][0] != up.calls[1][0]
    assert backends.ready_count("a") == 1


def test_all_replicas_down_is_503_not_a_hang():
    client, _, _ = make(FakeUpstream(fail_first_n=5))
    r = client.post("/v1/chat/completions", json=chat("a"))
    assert_openai_error(r, 503, "engine_unavailable")
    assert "retry-after" in r.headers


def test_no_replica_yet_is_503_and_health_says_degraded():
    """A model that loses its replicas after the gateway was Ready: its requests get 503, but the
    gateway stays Ready (its probe is /health) so the other model keeps its traffic."""
    client, _, backends = make()
    assert client.get("/health").json()["status"] == "ok"
    backends.update({"a": [("a#1", "http://a1")]})
    assert_openai_error(client.post("/v1/chat/completions", json=chat("b")), 503, "model_not_ready")
    h = client.get("/health")
    assert h.status_code == 200 and h.json() == {"status": "degraded", "replicas": {"a": 1, "b": 0, "emb": 0}}
    assert client.get("/-/healthz").status_code == 200


def test_a_new_gateway_is_not_ready_until_every_model_has_a_replica():
    """A gateway of a new cluster (NewCluster upgrade, new pod) stays out of the Service while any
    model it must serve is still loading: Ready, it would fail that model's requests (issue 28).
    /-/healthz is the same answer (KubeRay's proxy health check on the head calls it)."""
    client, _, backends = make(replicas={"a": [("a#1", "http://a1")], "b": [("b#1", "http://b1")]})
    for path in ("/health", "/-/healthz"):
        h = client.get(path)
        assert h.status_code == 503 and h.json() == {"status": "starting", "replicas": {"a": 1, "b": 1, "emb": 0}}
    backends.update({"a": [("a#1", "http://a1")], "b": [("b#1", "http://b1")], "emb": [("e#1", "http://e1")]})
    assert client.get("/health").status_code == 200


def test_health_is_503_until_any_model_has_a_replica():
    client, _, _ = make(replicas={})
    h = client.get("/health")
    assert h.status_code == 503 and h.json() == {"status": "starting", "replicas": {"a": 0, "b": 0, "emb": 0}}


# What vLLM's OpenAI server answers when a prompt does not fit: flat, not under "error", with its
# own type name and a numeric code.
VLLM_CONTEXT_ERROR = json.dumps({
    "object": "error", "type": "BadRequestError", "param": "input_tokens", "code": 400,
    "message": "This model's maximum context length is 512 tokens. However, you requested 900 tokens "
               "(850 in the messages, 50 in the completion). Please reduce the length of the messages or "
               "completion."}).encode()


@pytest.mark.parametrize("stream", [False, True])
def test_engine_errors_are_normalized(stream):
    """A request the gateway lets through, refused by the engine: the client gets OpenAI's shape."""
    client, up, _ = make(FakeUpstream(status_by_model={"b": 400}, error_body=VLLM_CONTEXT_ERROR))
    r = client.post("/v1/chat/completions", json=chat("b", max_tokens=50, stream=stream))
    assert [c[2]["model"] for c in up.calls] == ["b"]  # it reached the engine, once (a 400 is not retried)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": {
        "message": json.loads(VLLM_CONTEXT_ERROR)["message"], "type": "invalid_request_error",
        "param": "messages", "code": "context_length_exceeded"}}


def test_engine_error_that_is_not_json_is_still_an_openai_error():
    client, up, _ = make(FakeUpstream(status_by_model={"a": 502}, error_body=b"<html>Bad Gateway</html>"))
    r = client.post("/v1/chat/completions", json=chat("a"))
    assert up.calls and {c[2]["model"] for c in up.calls} == {"a"}
    assert r.json() == {"error": {"message": "<html>Bad Gateway</html>", "type": "server_error",
                                  "param": None, "code": None}}
    assert r.status_code == 502


def test_unknown_route_and_method():
    client, _, _ = make()
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_an_engine_refusing_the_gateway_is_a_502_not_the_clients_401():
    """An engine's 401 means the gateway's engine secret is wrong; the client's key is fine."""
    client, up, _ = make(FakeUpstream(status_by_model={"b": 401}))
    r = client.post("/v1/chat/completions", json=chat("b"))
    assert_openai_error(r, 502, "engine_auth_failed")
    assert up.calls and up.calls[-1][2]["model"] == "b"


def test_a_stream_is_timed_where_the_client_sees_it():
    """TTFT once the first chunk goes out, the latency at the end, TPOT over the chunks after the
    first less [DONE] (vLLM sends one chunk a decode step); with a pause before each chunk, the
    figures are those pauses, not the time the route took to answer."""
    from serve.gateway.metrics import Metrics

    class Paced(FakeUpstream):
        async def _chunks(self, model, text, usage):
            async for chunk in super()._chunks(model, text, usage):
                await asyncio.sleep(0.05)
                yield chunk

    metrics = Metrics()
    app = create_app(CONFIG, make()[2], Paced(text="one two three"), metrics=metrics)
    with TestClient(app).stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        assert b"".join(r.iter_bytes()).count(b"data: ") == 5
    labels = {"route": "a", "model": "a"}

    def sample(name, suffix):
        return metrics.registry.get_sample_value(f"llmserve_{name}_seconds_{suffix}", labels)

    assert sample("time_to_first_token", "count") == 1 and 0.05 <= sample("time_to_first_token", "sum") < 0.5
    assert sample("request_latency", "count") == 1
    # 6 chunks from the engine (3 words, finish, the usage chunk the gateway asked for, [DONE]):
    # the usage chunk is not passed on, so 5 go out, 4 after the first, 0.05 s or more apart.
    assert 0.25 <= sample("request_latency", "sum") - sample("time_to_first_token", "sum") < 1.0
    assert sample("time_per_output_token", "count") == 1
    after_first = sample("request_latency", "sum") - sample("time_to_first_token", "sum")
    assert sample("time_per_output_token", "sum") == pytest.approx(after_first / 3, abs=0.005)
