"""Every endpoint fuzzed: whatever a client sends, the gateway answers below 500, and every error is
OpenAI's shape `{"error": {message, type, param, code}}` (issue 26).

Each POST endpoint of the endpoint table (serve/gateway/dialects/table.py), the Files and Batches
API, the adapter loader and the stored Responses' GET/DELETE/cancel get a valid request with one
field (top level or nested one down) replaced by a value of any JSON type: nested containers,
unicode digits, huge integers, NaN-like strings. The fake engine answers 200 to everything it is
sent, so any 5xx is the gateway's own failure."""

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from serve.batch.sql import SqliteStore
from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.dialects.table import endpoint_table
from serve.gateway.ratelimit import RateLimiter
from tests.fakes import FakeUpstream

KEY = {"Authorization": "Bearer sk-admin"}
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**20, max_value=10**40)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["²", "٣", "NaN", "Infinity", "-Infinity", "1e400", "", "0x10", "٣h", "24h",
                              "true", "null", "{}", "[]", "-1", "1" * 40, "\x00", "\ud7ff"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
# A valid request per endpoint, with every field it reads, so each can be replaced.
BASES = {
    "/v1/chat/completions": {"model": "casc", "messages": MSG, "max_tokens": 8, "n": 1, "stream": False,
                             "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 1,
                             "logprobs": False, "top_logprobs": 0, "stop": ["x"], "seed": 1, "user": "u",
                             "response_format": SCHEMA, "max_completion_tokens": 8, "tools": [],
                             "presence_penalty": 0, "frequency_penalty": 0, "echo": False, "request_id": "r"},
    "/v1/completions": {"model": "casc", "prompt": "hi", "max_tokens": 8, "n": 1, "stream": False,
                        "stream_options": {"include_usage": True}, "logprobs": 1, "echo": False, "stop": "x",
                        "temperature": 0, "seed": 2, "user": "u", "prompt_logprobs": 0},
    "/v1/responses": {"model": "casc", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 8,
                      "stream": False, "store": True, "include": ["message.output_text.logprobs"],
                      "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
                      "instructions": "be", "temperature": 1, "top_p": 1, "tools": [], "metadata": {},
                      "previous_response_id": None, "background": False, "stream_options": {}},
    "/v1/embeddings": {"model": "emb", "input": ["a", "b"], "encoding_format": "float", "dimensions": 4,
                       "user": "u", "stream_options": None},
    "/tokenize": {"model": "plain", "prompt": "hi", "messages": MSG, "add_special_tokens": True},
    "/detokenize": {"model": "plain", "tokens": [1, 2]},
    "/v1/score": {"model": "emb", "text_1": "a", "text_2": ["b", "c"], "truncate_prompt_tokens": 3},
    "/score": {"model": "emb", "queries": "a", "documents": ["b"]},
    "/v1/rerank": {"model": "emb", "query": "a", "documents": ["b", "c"], "top_n": 1},
    "/rerank": {"model": "emb", "query": "a", "documents": ["b"]},
    "/v2/rerank": {"model": "emb", "query": "a", "documents": ["b"], "top_n": 2},
    "/v1/llmserve/adapters": {"name": "x", "path": "/nonexistent/adapter", "base": "plain-model", "digest": "ab"},
    "/v1/batches": {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                    "metadata": {"a": "b"}},
}


def test_every_post_endpoint_of_the_table_is_fuzzed():
    assert set(endpoint_table(None, None)) <= set(BASES)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    cfg = Config.model_validate({
        "models": [{"name": "plain-model", "source": "x"}, {"name": "student", "source": "y"},
                   {"name": "teacher", "source": "z"}, {"name": "emb", "source": "e", "task": "embed"}],
        "routes": [{"name": "casc", "cascade": {"student": "student", "teacher": "teacher",
                                                "min_mean_logprob": -1.0}, "cache": {"ttl_s": 60}},
                   {"name": "plain", "target": "plain-model", "cache": {"ttl_s": 60}}],
        "auth": {"keys": [{"name": "admin", "sha256": hash_key("sk-admin"), "admin": True}]},
        "gateway": {"adapter_roots": [str(d)]},
    })
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("plain-model", "student", "teacher", "emb")})
    app = create_app(cfg, backends, FakeUpstream(logprob=-0.1), cache=HeadCache(None), limiter=RateLimiter(None),
                     batch_store=SqliteStore(d / "b.db", d / "f"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check(r):
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), r.text


@st.composite
def mutated(draw, base):
    body = json.loads(json.dumps(base))
    name = draw(st.sampled_from(sorted(body)))
    value = draw(json_values)
    inner = body[name]
    if isinstance(inner, dict) and inner and draw(st.booleans()):
        inner[draw(st.sampled_from(sorted(inner)))] = value  # one level down: stream_options.include_usage, ...
    elif isinstance(inner, list) and inner and isinstance(inner[0], dict) and draw(st.booleans()):
        first = inner[0]
        first[draw(st.sampled_from(sorted(first)))] = value  # messages[0].content, input[0].role, ...
    else:
        body[name] = value
    return body


@pytest.mark.parametrize("path", sorted(BASES))
def test_a_mutated_request_is_never_a_500(client, path):
    @SETTINGS
    @given(body=mutated(BASES[path]), stream=st.booleans())
    def run(body, stream):
        if stream and "stream" in body:
            body["stream"] = True
        check(client.post(path, json=body, headers=KEY))

    run()


@SETTINGS
@given(value=json_values)
def test_any_json_body_is_never_a_500(client, value):
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/llmserve/adapters", "/v1/batches"):
        check(client.post(path, json=value, headers=KEY))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/llmserve/adapters",
                                  "/v1/batches", "/v1/score"])
def test_deep_or_broken_json_is_a_400(client, path):
    for raw in ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "{", "NaN", '{"a": NaN}',
                b"\xff\xfe"]:
        r = client.post(path, content=raw, headers={**KEY, "content-type": "application/json"})
        check(r)
        assert r.status_code == 400


@SETTINGS
@given(rid=st.text(min_size=1, max_size=30).map(lambda s: quote(s, safe="")),
       query=st.dictionaries(st.sampled_from(["stream", "starting_after", "include", "include_obfuscation",
                                              "limit", "after", "all_owners"]), st.text(max_size=8), max_size=3))
def test_stored_responses_and_lists_are_never_a_500(client, rid, query):
    for method, path in [("GET", f"/v1/responses/{rid}"), ("DELETE", f"/v1/responses/{rid}"),
                         ("POST", f"/v1/responses/{rid}/cancel"), ("GET", "/v1/batches"), ("GET", "/v1/files"),
                         ("GET", f"/v1/batches/{rid}"), ("POST", f"/v1/batches/{rid}/cancel"),
                         ("GET", f"/v1/files/{rid}"), ("GET", f"/v1/files/{rid}/content"),
                         ("DELETE", f"/v1/files/{rid}")]:
        check(client.request(method, path, params=query, headers=KEY))


@SETTINGS
@given(purpose=json_values.map(lambda v: v if isinstance(v, str) else json.dumps(v)),
       content=st.binary(max_size=200) | st.lists(json_values, max_size=3).map(
           lambda xs: "\n".join(json.dumps(x) for x in xs).encode()))
def test_file_uploads_are_never_a_500(client, purpose, content):
    r = client.post("/v1/files", data={"purpose": purpose}, files={"file": ("in.jsonl", content)}, headers=KEY)
    check(r)


@pytest.mark.parametrize("path,field,value", [
    ("/v1/embeddings", "stream_options", 5), ("/v1/embeddings", "stream_options", "x"),
    ("/v1/responses", "stream_options", 5), ("/v1/responses", "stream_options", [True]),
    ("/v1/responses", "include", 5), ("/v1/responses", "include", True), ("/v1/responses", "include", [1]),
    ("/v1/responses", "text", 5), ("/v1/responses", "text", {"format": "json"}),
    ("/v1/chat/completions", "response_format", {"type": []}),
])
def test_the_500s_found_are_400s_naming_the_field(client, path, field, value):
    """Each found once as a 500 (issue 26 and this file's fuzzing); the cascade route `casc` reads
    `include` to ask the student for logprobs."""
    body = {**BASES[path], field: value}
    r = client.post(path, json=body, headers=KEY)
    check(r)
    assert r.status_code == 400 and r.json()["error"]["param"] in (field, f"{field}.type")


def test_adapter_json_nested_too_deeply_is_a_400(client):
    r = client.post("/v1/llmserve/adapters", content="[" * 100_000 + "]" * 100_000,
                    headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
