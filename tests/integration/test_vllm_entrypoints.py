"""vLLM's chat completion entrypoint tests, ported to the gateway (issue 25).

The port's conventions are in tests/integration/vllm_port.py.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import jsonschema
import openai
import pytest
from openai import BadRequestError

from tests.integration.vllm_port import (
    CPU_PROMPT_LOGPROBS,
    ERROR_WORDING,
    LORA,
    MODEL,
    MSGS,
    SAGEMAKER,
)

pytestmark = pytest.mark.integration

BOTH = pytest.mark.parametrize("model_name", [MODEL, LORA])  # vLLM's base model, then its LoRA
CHOICES = ["Python", "Java", "JavaScript", "C++", "C#", "PHP", "TypeScript", "Ruby", "Swift", "Kotlin"]
IP_REGEX = r"((25[0-5]|(2[0-4]|1\d|[1-9]|)\d)\.){3}(25[0-5]|(2[0-4]|1\d|[1-9]|)\d)"
# Bounded, so a random model's output ends inside max_completion_tokens.
JSON_SCHEMA = {"type": "object", "properties": {"result": {"type": "integer", "minimum": 0, "maximum": 9}},
               "required": ["result"], "additionalProperties": False}


# ---- chat_completion/test_chat.py --------------------------------------------------------------

# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_no_logprobs_chat(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=5, temperature=0.0,
                                       logprobs=False)
    assert r.choices[0].logprobs is None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_zero_logprobs_chat(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=5, temperature=0.0,
                                       logprobs=True, top_logprobs=0)
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 0


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_some_logprobs_chat(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=5, temperature=0.0,
                                       logprobs=True, top_logprobs=5)
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 5


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_too_many_chat_logprobs(client, model_name):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        for _ in client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=10,
                                                logprobs=True, top_logprobs=21, stream=True):
            pass
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=10, logprobs=True,
                                       top_logprobs=30, stream=False)
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=10, stream=False)
    assert r.choices[0].message.content is not None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@pytest.mark.parametrize("prompt_logprobs", [
    pytest.param(1, marks=pytest.mark.xfail(strict=True, raises=BadRequestError, reason=CPU_PROMPT_LOGPROBS)),
    pytest.param(0, marks=pytest.mark.xfail(strict=True, raises=BadRequestError, reason=CPU_PROMPT_LOGPROBS)),
    -1, None])
def test_prompt_logprobs_chat(client, prompt_logprobs):
    params: dict = {"model": MODEL, "max_completion_tokens": 5, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who won the world series in 2020?"},
        {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
        {"role": "user", "content": "Where was it played?"}]}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.chat.completions.create(**params)
    else:
        r = client.chat.completions.create(**params)
        if prompt_logprobs is not None:
            assert r.prompt_logprobs is not None and len(r.prompt_logprobs) > 0
        else:
            assert getattr(r, "prompt_logprobs", None) is None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@pytest.mark.xfail(strict=True, raises=BadRequestError, reason=CPU_PROMPT_LOGPROBS)
def test_more_than_one_prompt_logprobs_chat(client):
    params: dict = {"model": MODEL, "max_completion_tokens": 5, "extra_body": {"prompt_logprobs": 1}, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who won the world series in 2020?"}]}
    r1 = client.chat.completions.create(**params)
    params["extra_body"] = {"prompt_logprobs": 2}
    r2 = client.chat.completions.create(**params)
    assert len(r1.prompt_logprobs[3]) == 1  # type: ignore[attr-defined]
    assert len(r2.prompt_logprobs[3]) == 2  # type: ignore[attr-defined]


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_single_chat_session(client, model_name, tokenizer):
    messages = list(MSGS)
    # ignore_eos: the tiny model samples (random weights) and may end early; vLLM's expects "length".
    r = client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=5, logprobs=True,
                                       top_logprobs=5, extra_body={"ignore_eos": True})
    assert r.id is not None and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    # vLLM's expected prompt_tokens=37 is zephyr's template; ours comes from the tiny model's.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # (newer transformers: a BatchEncoding)
    # The gateway adds the request's cost to usage (`cost_usd`, docs/api.md): compared field by field.
    assert (r.usage.completion_tokens, r.usage.prompt_tokens, r.usage.total_tokens) == (5, prompt, prompt + 5)
    assert choice.message.content is not None and choice.message.role == "assistant"
    messages += [{"role": "assistant", "content": choice.message.content},
                 {"role": "user", "content": "express your result in json"}]
    r = client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=5)
    assert r.choices[0].message.content is not None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_chat_streaming(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=10, temperature=0.0)
    output, stop_reason = r.choices[0].message.content, r.choices[0].finish_reason
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in client.chat.completions.create(model=model_name, messages=MSGS, max_completion_tokens=10,
                                                temperature=0.0, stream=True):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == stop_reason
    assert "".join(chunks) == output


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@BOTH
def test_chat_completion_stream_options(client, model_name):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    kw = {"model": model_name, "messages": messages, "max_completion_tokens": 10, "temperature": 0.0}
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": False}):
        assert chunk.usage is None
    stream = client.chat.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": False})
    for chunk in stream:
        if chunk.choices[0].finish_reason is None:
            assert chunk.usage is None
        else:
            assert chunk.usage is None
            final = next(stream)
            assert final.usage is not None and final.usage.prompt_tokens > 0 and final.usage.completion_tokens > 0
            assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens
            assert final.choices == []
    for so in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(BadRequestError):
            client.chat.completions.create(**kw, stream=False, stream_options=so)
    last = 0
    for chunk in client.chat.completions.create(**kw, extra_body={"min_tokens": 10}, stream=True,
                                                stream_options={"include_usage": True,
                                                                "continuous_usage_stats": True}):
        assert chunk.usage.prompt_tokens >= 0
        assert last == 0 or chunk.usage.completion_tokens > last or (
            not chunk.choices and chunk.usage.completion_tokens == last)
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        last = chunk.usage.completion_tokens
    assert last == 10


def _system_and(user: str) -> list[dict]:
    return [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": user}]


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_structured_outputs_choice_chat(client):
    messages = _system_and("The best language for type-safe systems programming is ")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0.7,
                                       extra_body={"structured_outputs": {"choice": CHOICES}})
    choice1 = r.choices[0].message.content
    assert choice1 in CHOICES
    messages += [{"role": "assistant", "content": choice1}, {"role": "user", "content": "I disagree, pick another one"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0.7,
                                       extra_body={"structured_outputs": {"choice": CHOICES}})
    # (vLLM's model also picks a different one when asked; random weights follow no request.)
    assert r.choices[0].message.content in CHOICES


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_structured_outputs_json_chat(client):
    messages = _system_and(f"Give an example JSON that fits this schema: {JSON_SCHEMA}")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=50,
                                       extra_body={"structured_outputs": {"json": JSON_SCHEMA}})
    jsonschema.validate(instance=json.loads(r.choices[0].message.content or ""), schema=JSON_SCHEMA)


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_structured_outputs_regex_chat(client):
    messages = _system_and(f"Give an example IP address with this regex: {IP_REGEX}")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                       extra_body={"structured_outputs": {"regex": IP_REGEX}})
    ip1 = r.choices[0].message.content
    assert ip1 is not None and re.fullmatch(IP_REGEX, ip1) is not None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_structured_outputs_type_error(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=_system_and("The best language is "),
                                       extra_body={"structured_outputs": {"regex": {1: "Python", 2: "C++"}}})


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_structured_outputs_choice_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=_system_and("The best language is "),
                                       max_completion_tokens=10, logprobs=True, top_logprobs=5,
                                       extra_body={"structured_outputs": {"choice": CHOICES}})
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
    for item in r.choices[0].logprobs.content[0].top_logprobs:
        assert item.logprob >= -9999.0


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_response_format_json_object(client):
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL, max_completion_tokens=100, response_format={"type": "json_object"},
            messages=[{"role": "user",
                       "content": 'what is 1+1? please respond with a JSON object, the format is {"result": 2}'}])
        # (vLLM's model answers {"result": 2}; the random-weight tiny model may run to the token
        # limit inside a string: then the answer is cut, not wrong. A finished one is an object.)
        content = r.choices[0].message.content or ""
        assert content.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_response_format_json_schema(client):
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL, max_completion_tokens=50,
            messages=[{"role": "user", "content": 'what is 1+1? The format is "result": 2'}],
            response_format={"type": "json_schema", "json_schema": {"name": "foo_test", "schema": JSON_SCHEMA}})
        jsonschema.validate(instance=json.loads(r.choices[0].message.content or ""), schema=JSON_SCHEMA)


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_response_format_text(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "what is 1+1?"}],
                                       max_completion_tokens=10, response_format={"type": "text"})
    assert r.choices[0].message.content is not None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_extra_fields_allowed(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "what is 1+1?", "extra_field": "0"}],  # type: ignore
        temperature=0, seed=0, max_completion_tokens=5)
    assert r.choices[0].message.content is not None


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_complex_message_content(client):
    text = "what is 1+1? please provide the result without any other text."
    r = client.chat.completions.create(model=MODEL, temperature=0, seed=0, max_completion_tokens=5,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": text}]}])
    plain = client.chat.completions.create(model=MODEL, temperature=0, seed=0, max_completion_tokens=5,
                                           messages=[{"role": "user", "content": text}])
    # (vLLM's model answers "2"; ours must answer as it does to the same text sent as a string.)
    assert r.choices[0].message.content == plain.choices[0].message.content


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_custom_role(client):
    r1 = client.chat.completions.create(model=MODEL, temperature=0, seed=0, max_completion_tokens=5,
                                        messages=[{"role": "my-custom-role", "content": "what is 1+1?"}])  # type: ignore
    r2 = client.chat.completions.create(
        model=MODEL, temperature=0, seed=0, max_completion_tokens=5,
        messages=[{"role": "my-custom-role", "content": [{"type": "text", "text": "what is 1+1?"}]}])  # type: ignore
    assert r1.choices[0].message.content == r2.choices[0].message.content


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@pytest.mark.xfail(strict=True, reason=ERROR_WORDING)
@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**63])
def test_long_seed(client, seed):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=MODEL, temperature=0, seed=seed,
                                       messages=[{"role": "system", "content": "You are a helpful assistant."}])
    assert "greater_than_equal" in e.value.message or "less_than_equal" in e.value.message


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
@pytest.mark.xfail(strict=True, reason=SAGEMAKER)
def test_invocations(client, http):
    args = {"model": MODEL, "messages": MSGS, "max_completion_tokens": 5, "temperature": 0.0, "logprobs": False}
    chat = client.chat.completions.create(**args)  # type: ignore[call-overload]
    inv = http.post("/invocations", json=args)
    inv.raise_for_status()
    assert chat.model_dump().keys() == inv.json().keys()
    assert chat.model_dump()["choices"] == inv.json()["choices"]


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_chat_completion_n_parameter_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, max_completion_tokens=20, temperature=0.7, n=3, stream=False,
                                       messages=[{"role": "user", "content": "What is the opposite of big?"}])
    assert len(r.choices) == 3
    for i, choice in enumerate(r.choices):
        assert choice.index == i and choice.message.content
    assert len({c.message.content for c in r.choices}) > 1


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_chat_completion_n_parameter_streaming(client):
    chunks_by_index = defaultdict(list)
    for chunk in client.chat.completions.create(model=MODEL, max_completion_tokens=15, temperature=0.7, n=2,
                                                stream=True, messages=MSGS):
        for choice in chunk.choices:
            if choice.delta.content:
                chunks_by_index[choice.index].append(choice.delta.content)
    assert chunks_by_index[0] and chunks_by_index[1]


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_chat_completion_n_with_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       max_completion_tokens=10, temperature=0.8, n=2, seed=42)
    assert len(r.choices) == 2
    for i, choice in enumerate(r.choices):
        assert choice.index == i and choice.message.content


# vLLM: tests/entrypoints/openai/chat_completion/test_chat.py
def test_chat_completion_n_equals_1(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                       max_completion_tokens=10, temperature=0.7, n=1)
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].message.content is not None


# ---- chat_completion/test_chat_echo.py ----------------------------------------------------------

# vLLM: tests/entrypoints/openai/chat_completion/test_chat_echo.py
@pytest.mark.parametrize("echo", [True, False])
def test_chat_session_with_echo_and_continue_final_message(client, echo):
    saying = "Here is a common saying about apple. An apple a day, keeps"
    r = client.chat.completions.create(
        model=MODEL, max_completion_tokens=5,
        messages=[{"role": "user", "content": "tell me a common saying"}, {"role": "assistant", "content": saying}],
        extra_body={"echo": echo, "continue_final_message": True, "add_generation_prompt": False,
                    "ignore_eos": True})
    assert r.id is not None and len(r.choices) == 1
    # (vLLM's model ends the saying: "stop". Ours has random weights and may sample its end-of-text
    # token within 5 tokens, so ignore_eos makes it run to max_completion_tokens every time.)
    assert r.choices[0].finish_reason == "length"
    content = r.choices[0].message.content
    assert content is not None and (saying in content) == echo
    assert r.choices[0].message.role == "assistant"


# vLLM: tests/entrypoints/openai/chat_completion/test_chat_echo.py
def test_top_logprobs(client):
    # vLLM asks for top_logprobs=-1 (the whole vocabulary) on a server started with --max-logprobs;
    # the stack's engines keep vLLM's default of 20, so 5 here. `"logprobs": "true"` as vLLM sends it.
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Beijing is the capital of which country?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                       extra_body={"top_logprobs": 5, "logprobs": "true"})
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 5


