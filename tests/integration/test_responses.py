"""The Responses API through the official SDK's `client.responses`, on real engines."""

from __future__ import annotations

import io
import json
import time
import uuid

import openai
import pytest

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
          "required": ["city"], "additionalProperties": False}


@pytest.mark.parametrize("model", ["tiny-b", "cascade-cached"])
def test_plain_streamed_json_schema_and_a_continued_conversation(stack, model):
    client = stack.client()
    question = f"Where is Paris? {uuid.uuid4().hex[:6]}"
    first = client.responses.create(model=model, input=question, instructions="Answer briefly.",
                                    max_output_tokens=8, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.output_tokens > 0 and first.usage.model_extra["cost_usd"] > 0

    with client.responses.stream(model=model, input=question + " (streamed)", max_output_tokens=8,
                                 temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text

    shaped = client.responses.create(model=model, input="A city as JSON.", max_output_tokens=40, temperature=0,
                                     text={"format": {"type": "json_schema", "name": "city", "schema": SCHEMA,
                                                      "strict": True}})
    assert set(json.loads(shaped.output_text)) == {"city"}

    second = client.responses.create(model=model, input="And Berlin?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    # The gateway sent the whole conversation: the engine counted more input than the new turn alone.
    alone = client.responses.create(model=model, input="And Berlin?", max_output_tokens=8, temperature=0,
                                    store=False)
    assert second.usage.input_tokens > alone.usage.input_tokens
    assert client.responses.retrieve(second.id).id == second.id


def test_cascade_route_serves_from_the_cache_on_a_repeat(stack):
    client = stack.client()
    q = f"cache me {uuid.uuid4().hex[:6]}"
    raw = client.responses.with_raw_response.create(model="cascade-cached", input=q, max_output_tokens=6,
                                                    temperature=0)
    assert raw.headers["x-llmserve-served-by"] == "tiny-a" and raw.headers["x-llmserve-cache"] == "miss"
    first = raw.parse()
    time.sleep(0.2)  # the cache write is off the request path
    hit = client.responses.with_raw_response.create(model="cascade-cached", input=q, max_output_tokens=6,
                                                    temperature=0)
    assert hit.headers["x-llmserve-cache"] == "hit"
    assert hit.parse().output_text == first.output_text and hit.parse().usage.model_extra["cost_usd"] == 0.0


def test_responses_belong_to_their_key(stack):
    owner, other = stack.client(), stack.client(api_key="other")
    r = owner.responses.create(model="tiny-a", input="mine", max_output_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="tiny-a", input="continue", previous_response_id=r.id, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r.id)
    owner.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve(r.id)


def test_unsupported_is_a_clear_400(stack):
    with pytest.raises(openai.BadRequestError) as e:  # vLLM's rule: background needs store
        stack.client().responses.create(model="tiny-a", input="x", background=True, store=False)
    assert e.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().responses.create(model="tiny-a", input="x", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools"


def test_a_batch_of_responses_lines_completes(stack):
    client = stack.client()
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                         "body": {"model": "tiny-a", "input": f"batch question {i}", "max_output_tokens": 4,
                                  "temperature": 0}}) for i in range(3)]
    f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")
    deadline = time.monotonic() + 240
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, b
        time.sleep(0.5)
        b = client.batches.retrieve(b.id)
    assert b.status == "completed" and b.request_counts.completed == 3, b
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert {o["custom_id"] for o in out} == {"r0", "r1", "r2"}
    assert all(o["response"]["body"]["object"] == "response" for o in out)


def test_tokenize_and_detokenize_through_the_gateway(stack):
    import httpx

    base = f"http://127.0.0.1:{stack.config.gateway.port}"
    auth = {"Authorization": "Bearer test"}
    assert httpx.post(f"{base}/tokenize", json={"model": "tiny-a", "prompt": "hi"}).status_code == 401
    tokens = httpx.post(f"{base}/tokenize", json={"model": "tiny-a", "prompt": "hello world"}, headers=auth).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{base}/detokenize", json={"model": "tiny-a", "tokens": tokens["tokens"]}, headers=auth)
    assert text.json()["prompt"].strip() == "hello world"


def test_background_response_polled_cancelled_continued_and_owner_only(stack):
    """`background: true` through the SDK: queued at once, run by the batch worker (state in Redis),
    polled to completion, continued by a follow-up turn, cancelled, and invisible to another key."""
    client, other = stack.client(), stack.client(api_key="other")
    bg = client.responses.create(model="tiny-b", input="Say hi", max_output_tokens=8, temperature=0, background=True)
    assert bg.status == "queued" and bg.background is True
    deadline = time.time() + 60
    while (got := client.responses.retrieve(bg.id)).status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.1)
    # max_output_tokens=8 may cut the tiny model's answer: incomplete is a finished answer too.
    assert got.status in ("completed", "incomplete") and got.id == bg.id and got.output_text, got
    assert got.usage.output_tokens > 0 and got.usage.model_extra["cost_usd"] > 0
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(bg.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(bg.id)
    follow = client.responses.create(model="tiny-b", input="And again?", previous_response_id=bg.id,
                                     max_output_tokens=4, temperature=0)
    alone = client.responses.create(model="tiny-b", input="And again?", max_output_tokens=4, temperature=0,
                                    store=False)
    assert follow.usage.input_tokens > alone.usage.input_tokens  # the background turn was in its input

    long = client.responses.create(model="tiny-b", input="Count slowly", max_output_tokens=400, background=True)
    assert client.responses.cancel(long.id).status == "cancelled"
    time.sleep(2.0)  # the runner would have finished by now had it not stopped
    assert client.responses.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(follow.id)  # a synchronous response cannot be cancelled
