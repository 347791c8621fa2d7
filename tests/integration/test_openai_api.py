"""The official `openai` SDK against the gateway, with real vLLM engines inside Ray Serve."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_are_listed(stack):
    models = {m.id: m for m in stack.client().models.list()}
    assert {"tiny-a", "tiny-b", "tiny-embed"} <= set(models)
    # Clients size prompts from the context length, as vLLM reports it.
    assert models["tiny-a"].model_extra["max_model_len"] == 512
    assert models["cascade-accept"].model_extra["max_model_len"] == 512


def test_models_need_a_key_and_show_only_the_keys_models(stack):
    with pytest.raises(openai.AuthenticationError):
        stack.client(api_key="wrong").models.list()
    # "limited" may use tiny-a only: it sees tiny-a and nothing else.
    assert [m.id for m in stack.client(api_key="limited").models.list()] == ["tiny-a"]


def test_public_port_serves_no_metrics(stack):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{stack.config.gateway.port}/metrics", timeout=10)
    assert e.value.code == 404
    assert "llmserve_requests_total" in stack.metrics()  # the metrics listener has them


def test_chat_plain_reaches_the_requested_model(stack):
    client = stack.client()
    outs = {}
    for model in ("tiny-a", "tiny-b"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=MSG, max_tokens=12, temperature=0)
        assert raw.headers["x-llmserve-served-by"] == model
        r = raw.parse()
        assert r.model == model and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
        outs[model] = r.choices[0].message.content
    # Different random weights: the same greedy prompt must give different text, which shows
    # each request really reached its own engine.
    assert outs["tiny-a"] != outs["tiny-b"]


def test_chat_streamed_with_usage(stack):
    client = stack.client()
    stream = client.chat.completions.create(
        model="tiny-a", messages=MSG, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    plain = client.chat.completions.create(model="tiny-a", messages=MSG, max_tokens=10, temperature=0)
    assert text == plain.choices[0].message.content


def test_completions_plain_and_streamed(stack):
    client = stack.client()
    r = client.completions.create(model="tiny-b", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8
    s = client.completions.create(model="tiny-b", prompt="Once upon a time", max_tokens=8, temperature=0,
                                  stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_n_two_choices(stack):
    r = stack.client().chat.completions.create(model="tiny-a", messages=MSG, max_tokens=6, n=2, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1]


def test_stop_cuts_the_output(stack):
    client = stack.client()
    full = client.completions.create(model="tiny-a", prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny-a", prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and full.startswith(cut.choices[0].text)


def test_same_seed_same_text(stack):
    client = stack.client()

    def sample(seed):
        return client.chat.completions.create(model="tiny-b", messages=MSG, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].message.content

    assert sample(1234) == sample(1234)


def test_logprobs(stack):
    r = stack.client().chat.completions.create(model="tiny-a", messages=MSG, max_tokens=4, logprobs=True,
                                               top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_json_schema_output_parses_and_validates(stack):
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "ok"],
              "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                             "ok": {"type": "boolean"}}}
    r = stack.client().chat.completions.create(
        model="tiny-a", messages=MSG, max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_embeddings(stack):
    r = stack.client().embeddings.create(model="tiny-embed", input=["hello world", "goodbye"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 128
    assert r.data[0].embedding != r.data[1].embedding


def test_unknown_model_is_404(stack):
    with pytest.raises(openai.NotFoundError) as e:
        stack.client().chat.completions.create(model="gpt-17", messages=MSG)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"


def test_bad_parameter_is_400_with_param(stack):
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().chat.completions.create(model="tiny-a", messages=MSG, temperature=-3)
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "temperature"


def test_prompt_over_context_is_400(stack):
    long = [{"role": "user", "content": "hello " * 2000}]
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().chat.completions.create(model="tiny-a", messages=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_generate_model_rejects_embeddings(stack):
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().embeddings.create(model="tiny-a", input="x")
    assert e.value.code == "model_not_supported"
