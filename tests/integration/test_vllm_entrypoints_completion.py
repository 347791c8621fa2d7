"""vLLM's completion, tokenization and token-id entrypoint tests, ported to the gateway (issue 25).

The port's conventions are in tests/integration/vllm_port.py.
"""

from __future__ import annotations

import openai
import pytest
from openai import BadRequestError

from tests.integration.vllm_port import (
    CPU_PROMPT_LOGPROBS,
    ERROR_WORDING,
    MAX_MODEL_LEN,
    MODEL,
)

pytestmark = pytest.mark.integration


# ---- completion/test_completion.py -------------------------------------------------------------

# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_single_completion(client, tokenizer):
    prompt = "Hello, my name is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0)
    assert r.id is not None and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tokenizer.encode(prompt))
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n_prompt, n_prompt + 5)
    r = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
    assert len(r.choices[0].text) >= 1
    assert getattr(r.choices[0], "prompt_logprobs", None) is None


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_completion_truncation_side_controls_prompt_truncation(client):
    ids = list(range(8))
    for side, expected in (("right", ids[:4]), ("left", ids[-4:])):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0.0, extra_body={
            "return_token_ids": True, "truncate_prompt_tokens": 4, "truncation_side": side})
        assert r.choices[0].prompt_token_ids == expected  # type: ignore[attr-defined]


# vLLM: tests/entrypoints/openai/completion/test_completion.py (test_no_logprobs, test_zero_logprobs,
# test_some_logprobs)
@pytest.mark.parametrize("logprobs", [None, 0, 5], ids=["test_no_logprobs", "test_zero_logprobs",
                                                         "test_some_logprobs"])
def test_completion_logprobs(client, logprobs):
    r = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                  logprobs=logprobs)
    lp = r.choices[0].logprobs
    if logprobs is None:
        assert lp is None
        return
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    if logprobs == 0:
        assert len(lp.top_logprobs[0]) == 1
    else:
        assert 5 <= len(lp.top_logprobs[0]) <= 6


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_too_many_completion_logprobs(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        for _ in client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=30, stream=True):
            pass
    r = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
    assert r.choices[0].text is not None


# vLLM: tests/entrypoints/openai/completion/test_completion.py
@pytest.mark.parametrize("prompt_logprobs", [
    -1,
    pytest.param(0, marks=pytest.mark.xfail(strict=True, raises=BadRequestError, reason=CPU_PROMPT_LOGPROBS)),
    pytest.param(1, marks=pytest.mark.xfail(strict=True, raises=BadRequestError, reason=CPU_PROMPT_LOGPROBS)),
    None])
def test_prompt_logprobs_completion(client, prompt_logprobs):
    params: dict = {"model": MODEL, "prompt": ["A robot may not injure another robot", "My name is"], "max_tokens": 5}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.completions.create(**params)
        return
    r = client.completions.create(**params)
    if prompt_logprobs is not None:
        assert r.choices[0].prompt_logprobs and r.choices[1].prompt_logprobs  # type: ignore[attr-defined]
    else:
        assert getattr(r.choices[0], "prompt_logprobs", None) is None


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_completion_streaming(client):
    prompt = "What is an LLM?"
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0).choices[0].text
    chunks: list[str] = []
    finish_reason_count = 0
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0, stream=True):
        chunks.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == "length"
    assert "".join(chunks) == single


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_parallel_no_streaming(client):
    n = 3
    r = client.completions.create(model=MODEL, prompt="What is an LLM?", max_tokens=50, n=n, temperature=1.0,
                                  stream=False, logprobs=0, seed=42)
    assert len(r.choices) == n
    for idx, choice in enumerate(r.choices):
        assert choice.index == idx and choice.finish_reason is not None
    # (vLLM also asserts the samples end at different lengths; random weights rarely pick EOS.)
    assert len({c.text for c in r.choices}) == n


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_parallel_streaming(client):
    n, max_tokens = 3, 50
    chunks: list[list[str]] = [[] for _ in range(n)]
    finish_reason_count = 0
    for chunk in client.completions.create(model=MODEL, prompt="What is an LLM?", max_tokens=max_tokens, n=n,
                                           temperature=1.0, stream=True, seed=42):
        chunks[chunk.choices[0].index].append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == n
    assert all(len(c) <= max_tokens for c in chunks)
    assert len({"".join(c) for c in chunks}) == n


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_completion_stream_options(client):
    kw = {"model": MODEL, "prompt": "What is the capital of France?", "max_tokens": 5, "temperature": 0.0}
    for so in ({"include_usage": False, "continuous_usage_stats": False},
               {"include_usage": False, "continuous_usage_stats": True}, {}):
        for chunk in client.completions.create(**kw, stream=True, stream_options=so):
            assert chunk.usage is None
    for continuous in (False, True):
        stream = client.completions.create(**kw, stream=True,
                                           stream_options={"include_usage": True, "continuous_usage_stats": continuous})
        for chunk in stream:
            if continuous:
                assert chunk.usage is not None and chunk.usage.completion_tokens > 0
            elif chunk.choices[0].finish_reason is None:
                assert chunk.usage is None
            if chunk.choices[0].finish_reason is not None:
                final = next(stream)
                assert final.usage is not None and final.usage.prompt_tokens > 0
                assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens
                assert final.choices == []
    for so in ({"include_usage": None}, {"include_usage": True}, {"continuous_usage_stats": None},
               {"continuous_usage_stats": True}):
        with pytest.raises(BadRequestError):
            client.completions.create(**kw, stream=False, stream_options=so)


# vLLM: tests/entrypoints/openai/completion/test_completion.py
def test_batch_completions(client):
    for prompts in (["Hello, my name is"] * 2, [[0, 0, 0, 0, 0]] * 2):
        batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0)
        assert len(batch.choices) == 2 and batch.choices[0].text == batch.choices[1].text
        batch = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0.0,
                                          extra_body={"use_beam_search": True})
        assert len(batch.choices) == 4
        assert batch.choices[0].text != batch.choices[1].text
        assert batch.choices[0].text == batch.choices[2].text and batch.choices[1].text == batch.choices[3].text
        texts = ["", ""]
        for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0,
                                               stream=True):
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts[0] == texts[1]


# vLLM: tests/entrypoints/openai/completion/test_completion.py
@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(client, tokenizer, logprobs_arg):
    for prompt in ("Hello, my name is", [0, 0, 0, 0, 0]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
                                      logprobs=logprobs_arg)
        prompt_text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        assert r.choices[0].text.startswith(prompt_text)
        lp = r.choices[0].logprobs
        assert lp is not None and len(lp.text_offset) > 5
        assert len(lp.token_logprobs) > 5 and lp.token_logprobs[0] is None
        assert len(lp.top_logprobs) > 5 and lp.top_logprobs[0] is None
        for top in lp.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top) <= logprobs_arg + 1
        assert len(lp.tokens) > 5


# vLLM: tests/entrypoints/openai/completion/test_completion.py (test_invalid_json_schema,
# test_invalid_regex, test_invalid_grammar)
@pytest.mark.parametrize("structured", [
    {"json": {"type": "object", "properties": {"foo": "bar"}}},
    {"regex": r"[.*"},
    {"grammar": 'root ::= select_statementinvalidsyntax\nselect_statement ::= "SELECT " column'},
], ids=["test_invalid_json_schema", "test_invalid_regex", "test_invalid_grammar"])
def test_invalid_structured_outputs(client, structured):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model=MODEL, prompt="Generate something", max_tokens=5,
                                  extra_body={"structured_outputs": structured})


# ---- completion/test_prompt_validation.py ------------------------------------------------------

# vLLM: tests/entrypoints/openai/completion/test_prompt_validation.py
@pytest.mark.xfail(strict=True, reason=ERROR_WORDING)
def test_empty_prompt(client):
    with pytest.raises(openai.BadRequestError,
                       match=r"Either prompt or prompt_embeds must be provided and non-empty\."):
        client.completions.create(model=MODEL, prompt=None, max_tokens=5, temperature=0.0,  # type: ignore
                                  extra_body={"prompt_embeds": []})


# vLLM: tests/entrypoints/openai/completion/test_prompt_validation.py
def test_out_of_vocab_token_ids(client):
    with pytest.raises(openai.BadRequestError, match=r".*out of vocabulary.*"):
        client.completions.create(model=MODEL, prompt=[999999], max_tokens=5, temperature=0.0)


# ---- test_tokenization.py ----------------------------------------------------------------------

# vLLM: tests/entrypoints/openai/test_tokenization.py
@pytest.mark.parametrize("add_special", [False, True])
def test_tokenize_completions(http, tokenizer, add_special):
    prompt = "vllm1 This is a test prompt."
    tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
    r = http.post("/tokenize", json={"add_special_tokens": add_special, "model": MODEL, "prompt": prompt})
    r.raise_for_status()
    assert r.json() == {**r.json(), "tokens": tokens, "count": len(tokens), "max_model_len": MAX_MODEL_LEN,
                        "token_strs": None}


# vLLM: tests/entrypoints/openai/test_tokenization.py (test_tokenize_chat, test_tokenize_chat_with_tools)
@pytest.mark.parametrize("with_tools", [False, True], ids=["test_tokenize_chat", "test_tokenize_chat_with_tools"])
@pytest.mark.parametrize("add_generation,continue_final", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("add_special", [False, True])
def test_tokenize_chat(http, tokenizer, with_tools, add_generation, continue_final, add_special):
    conversation = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Nice to meet you!"},
                    {"role": "user", "content": "Can I ask a question? vllm1"}]
    if continue_final:
        conversation.append({"role": "assistant", "content": "Sure,"})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}}}}}] if with_tools else None
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation,
                                           continue_final_message=continue_final, tools=tools, tokenize=False)
    tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
    body = {"add_generation_prompt": add_generation, "continue_final_message": continue_final,
            "add_special_tokens": add_special, "messages": conversation, "model": MODEL}
    r = http.post("/tokenize", json={**body, **({"tools": tools} if tools else {})})
    r.raise_for_status()
    assert (r.json()["tokens"], r.json()["count"], r.json()["max_model_len"]) == (tokens, len(tokens), MAX_MODEL_LEN)


# vLLM: tests/entrypoints/openai/test_tokenization.py
def test_tokenize_with_return_token_strs(http, tokenizer):
    prompt = "This is a token_strs test prompt! vllm1"
    r = http.post("/tokenize", json={"prompt": prompt, "model": MODEL, "return_token_strs": True})
    r.raise_for_status()
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    assert r.json()["tokens"] == tokens and r.json()["count"] == len(tokens)
    assert r.json()["token_strs"] == tokenizer.convert_ids_to_tokens(tokens)


# vLLM: tests/entrypoints/openai/test_tokenization.py
def test_detokenize(http, tokenizer):
    prompt = "This is a test prompt. vllm1"
    r = http.post("/detokenize", json={"model": MODEL, "tokens": tokenizer.encode(prompt, add_special_tokens=False)})
    r.raise_for_status()
    assert r.json() == {"prompt": prompt}


# ---- basic/test_return_token_ids.py ------------------------------------------------------------

# vLLM: tests/entrypoints/openai/basic/test_return_token_ids.py
def test_basic_completion_with_emoji(client, tokenizer):
    prompt = "Complete this sentence with emojis: I love coding 🚀"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0]
    encoded = tokenizer.encode(prompt)
    pids = choice.prompt_token_ids  # type: ignore[attr-defined]
    assert any(pids[i:i + len(encoded)] == encoded for i in range(len(pids) - len(encoded) + 1))
    assert choice.token_ids  # type: ignore[attr-defined]
    assert tokenizer.decode(choice.token_ids).startswith(choice.text)  # type: ignore[attr-defined]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                  extra_body={"return_token_ids": False})
    assert r.model_dump()["choices"][0].get("token_ids") is None and r.model_dump().get("prompt_token_ids") is None


# vLLM: tests/entrypoints/openai/basic/test_return_token_ids.py
@pytest.mark.xfail(strict=True, raises=BadRequestError, reason=CPU_PROMPT_LOGPROBS)
def test_comparison_with_prompt_logprobs_and_logprobs(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt="Hello, world! How are you today?", max_tokens=20, temperature=0,
                                  echo=True, logprobs=1, extra_body={"return_token_ids": True,
                                                                      "return_tokens_as_token_ids": True,
                                                                      "prompt_logprobs": 1})
    c = r.choices[0]
    assert c.token_ids and c.prompt_token_ids and c.prompt_logprobs and c.logprobs  # type: ignore[attr-defined]
    lp_ids = [int(t.removeprefix("token_id:")) for t in c.logprobs.tokens if t.startswith("token_id:")]
    assert len(c.token_ids) < len(lp_ids) and lp_ids[-len(c.token_ids):] == c.token_ids  # type: ignore[attr-defined]
    assert "Hello, world" in tokenizer.decode(c.prompt_token_ids)  # type: ignore[attr-defined]
    streamed: list[int] = []
    streamed_lp: list[int] = []
    first = None
    for chunk in client.completions.create(model=MODEL, prompt="Tell me a short fact about Python:", max_tokens=30,
                                           temperature=0, stream=True, logprobs=1,
                                           extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True}):
        streamed_lp += [int(t.removeprefix("token_id:")) for t in chunk.choices[0].logprobs.tokens]
        first = first or chunk.choices[0].prompt_token_ids  # type: ignore[attr-defined]
        streamed += chunk.choices[0].token_ids  # type: ignore[attr-defined]
    assert first and streamed == streamed_lp


# vLLM: tests/entrypoints/openai/basic/test_return_token_ids.py
def test_chat_completion_with_emoji_and_token_ids(client, tokenizer):
    messages = [{"role": "system", "content": "You like to use emojis in your responses."},
                {"role": "user", "content": "Repeat after me: I love cats 🐱"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50, temperature=0, logprobs=True,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids and r.choices[0].message.content is not None  # type: ignore[attr-defined]
    decoded_prompt = tokenizer.decode(r.prompt_token_ids)  # type: ignore[attr-defined]
    assert "I love cats 🐱" in decoded_prompt
    collected: list[int] = []
    first = True
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50, temperature=0,
                                                stream=True, extra_body={"return_token_ids": True}):
        if first:
            assert tokenizer.decode(chunk.prompt_token_ids) == decoded_prompt  # type: ignore[attr-defined]
            first = False
        else:
            assert "prompt_token_ids" not in chunk.model_dump()
        if chunk.choices and "token_ids" in chunk.choices[0].model_dump():
            collected += chunk.choices[0].token_ids or []  # type: ignore[attr-defined]
    assert collected


