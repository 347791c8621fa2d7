"""The Responses API through the gateway with a fake engine: state, cascade, cache, cost, errors."""

import json

from starlette.testclient import TestClient

from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.dialects.responses_events import ResponsesAssembler
from tests.fakes import FakeUpstream

CONFIG = Config.model_validate({
    "auth": {"keys": [{"name": "alice", "sha256": hash_key("sk-a")}, {"name": "bob", "sha256": hash_key("sk-b")}]},
    "models": [
        {"name": "student", "source": "x", "price": {"input_per_million": 1, "output_per_million": 2},
         "engine": {"max_model_len": 256}},
        {"name": "teacher", "source": "y", "price": {"input_per_million": 10, "output_per_million": 20}},
    ],
    "routes": [{"name": "assistant", "cascade": {"student": "student", "teacher": "teacher",
                                                 "min_mean_logprob": -1.0}, "cache": {"ttl_s": 60}}],
})
ALICE = {"Authorization": "Bearer sk-a"}
BOB = {"Authorization": "Bearer sk-b"}


def make(up):
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher")})
    return TestClient(create_app(CONFIG, backends, up, cache=HeadCache(None)))


def create(client, headers=ALICE, **kw):
    return client.post("/v1/responses", json={"model": "teacher", "input": "hi", **kw}, headers=headers)


def events(resp):
    out = []
    for block in resp.text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_plain_response_is_forwarded_billed_and_stored_for_its_owner_only():
    up = FakeUpstream(text="a b c")
    client = make(up)
    r = create(client, instructions="be brief", max_output_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output"][0]["content"][0]["text"] == "a b c" and body["store"] is True
    assert up.calls[-1][1] == "/v1/responses" and up.calls[-1][2]["store"] is False  # the gateway keeps state
    usage = body["usage"]
    assert usage["cost_usd"] == round((usage["input_tokens"] * 10 + usage["output_tokens"] * 20) / 1e6, 10)
    assert client.get(f"/v1/responses/{body['id']}", headers=ALICE).json()["id"] == body["id"]
    # Another key: 404, exactly as for an id that does not exist.
    for rid in (body["id"], "resp_nope"):
        got = client.get(f"/v1/responses/{rid}", headers=BOB)
        assert got.status_code == 404 and got.json()["error"]["code"] == "not_found"
        assert client.delete(f"/v1/responses/{rid}", headers=BOB).status_code == 404
    assert client.delete(f"/v1/responses/{body['id']}", headers=ALICE).json()["deleted"] is True
    assert client.get(f"/v1/responses/{body['id']}", headers=ALICE).status_code == 404


def test_previous_response_id_sends_the_whole_conversation_and_only_for_its_owner():
    up = FakeUpstream(text_by_model={"teacher": "first answer"})
    client = make(up)
    first = create(client, input="question one").json()
    up.text_by_model["teacher"] = "second answer"
    second = create(client, input="question two", previous_response_id=first["id"])
    assert second.status_code == 200 and second.json()["previous_response_id"] == first["id"]
    sent = up.calls[-1][2]
    assert "previous_response_id" not in sent
    assert sent["input"] == [{"role": "user", "content": "question one"},
                             {"role": "assistant", "content": "first answer"},
                             {"role": "user", "content": "question two"}]
    # A third turn carries both earlier turns.
    create(client, input=[{"role": "user", "content": "three"}], previous_response_id=second.json()["id"])
    assert len(up.calls[-1][2]["input"]) == 5
    # Bob cannot continue Alice's conversation (and learns nothing about it).
    r = create(client, headers=BOB, input="steal", previous_response_id=first["id"])
    assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"
    # store: false keeps nothing to continue from.
    unstored = create(client, store=False).json()
    assert client.get(f"/v1/responses/{unstored['id']}", headers=ALICE).status_code == 404


def test_streamed_response_passes_events_through_and_is_stored():
    up = FakeUpstream(text="x y")
    client = make(up)
    r = create(client, stream=True)
    evs = events(r)
    assert evs[0]["type"] == "response.created" and evs[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == "x y"
    final = evs[-1]["response"]
    assert final["usage"]["cost_usd"] > 0
    assert client.get(f"/v1/responses/{final['id']}", headers=ALICE).status_code == 200


def test_cascade_accepts_a_confident_student_and_the_cache_replays_it():
    up = FakeUpstream(text="a b", logprob=-0.1)
    client = make(up)
    r = create(client, model="assistant", temperature=0)
    assert r.headers["x-llmserve-served-by"] == "student" and r.headers["x-llmserve-cache"] == "miss"
    sent = up.calls[-1][2]
    assert "message.output_text.logprobs" in sent["include"] and "stream" not in sent
    # The client did not ask for logprobs: none come back.
    assert r.json()["output"][0]["content"][0]["logprobs"] == []
    hit = create(client, model="assistant", temperature=0, stream=True)
    assert hit.headers["x-llmserve-cache"] == "hit" and hit.headers["x-llmserve-served-by"] == "cache:student"
    evs = events(hit)
    assert evs[-1]["type"] == "response.completed" and evs[-1]["response"]["usage"]["cost_usd"] == 0.0
    assert evs[-1]["response"]["id"] != r.json()["id"]  # a hit is a new response of its own
    assert len(up.calls) == 1


def test_cascade_escalates_an_unsure_student_and_bills_both():
    up = FakeUpstream(text="a b", logprob=-3.0)
    client = make(up)
    r = create(client, model="assistant")
    assert r.headers["x-llmserve-served-by"] == "teacher" and r.headers["x-llmserve-escalated"] == "low_confidence"
    assert [c[2]["model"] for c in up.calls] == ["student", "teacher"]
    student_in = up.calls[0][2]
    n_in = len(json.dumps(student_in["input"]))
    expected = (n_in * 1 + 2 * 2) / 1e6 + (n_in * 10 + 2 * 20) / 1e6
    assert r.json()["usage"]["cost_usd"] == round(expected, 10)


def test_unsupported_parameters_and_non_json_bodies_are_refused_clearly():
    client = make(FakeUpstream())
    for extra, param in [({"background": True, "store": False}, "background"), ({"conversation": "c1"}, "conversation"),
                         ({"tools": [{"type": "web_search"}]}, "tools"), ({"input": 3}, "input")]:
        r = create(client, **extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = client.post("/v1/chat/completions", content=b'{"model": "teacher", "messages": []}',
                    headers={**ALICE, "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_tokenize_reaches_the_models_engine_with_the_key_checked():
    up = FakeUpstream()
    client = make(up)
    assert client.post("/tokenize", json={"model": "student", "prompt": "hi"}).status_code == 401
    r = client.post("/tokenize", json={"model": "assistant", "prompt": "hi"}, headers=ALICE)
    assert r.status_code == 200 and r.headers["x-llmserve-served-by"] == "student"
    assert up.calls[-1][1] == "/tokenize" and up.calls[-1][2]["model"] == "student"


def test_models_report_max_model_len():
    r = make(FakeUpstream()).get("/v1/models", headers=ALICE).json()["data"]
    by_id = {m["id"]: m for m in r}
    assert by_id["student"]["max_model_len"] == 256 and by_id["assistant"]["max_model_len"] == 256
    assert "max_model_len" not in by_id["teacher"]  # not configured: vLLM's default applies


def test_assembler_keeps_only_a_completed_response():
    a = ResponsesAssembler()
    a.feed(b'event: response.created\ndata: {"type":"response.created","response":{"id":"r"}}\n\n')
    assert a.response() is None
    a.feed(b'event: response.incomplete\ndata: {"type":"response.incomplete","response":{"id":"r"}}\n\n')
    assert a.done and a.response() is None


def test_an_answer_cut_at_max_output_tokens_streams_to_completion_and_is_cached():
    """vLLM marks it `incomplete` and still ends its stream with response.completed, which the
    SDK's stream helper waits for; like chat's finish_reason "length", it is the answer the same
    request gets again, so the cache keeps it."""
    up = FakeUpstream(text="a b", logprob=-0.1, finish_reason="length")
    client = make(up)
    r = create(client, model="assistant", temperature=0, max_output_tokens=2)
    assert r.json()["status"] == "incomplete" and r.headers["x-llmserve-cache"] == "miss"
    hit = create(client, model="assistant", temperature=0, max_output_tokens=2, stream=True)
    assert hit.headers["x-llmserve-cache"] == "hit"
    evs = events(hit)
    assert evs[-1]["type"] == "response.completed" and evs[-1]["response"]["status"] == "incomplete"
    # The student hit the limit and escalated (escalate_on_length); the teacher's answer is cached.
    assert [c[2]["model"] for c in up.calls] == ["student", "teacher"]
    assert hit.headers["x-llmserve-served-by"] == "cache:teacher"
