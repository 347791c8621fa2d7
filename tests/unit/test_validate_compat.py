"""The gateway accepts what vLLM's server accepts, field by field (issue 25).

vLLM's own request models (installed vLLM 0.32) are the oracle: for each value below, the gateway
must accept it exactly when vLLM's pydantic model does, and hand on the value vLLM would use.
"""

from __future__ import annotations

from typing import Any

import pytest

from serve.config import Config
from serve.gateway.errors import APIError
from serve.gateway.validate import coerce, default_model
from tests.support import validate

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def gateway(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The payload the engine would get, or None for a 400."""
    try:
        coerce(path, body)
        validate(path, body, 100)
    except APIError as e:
        assert e.status == 400 and e.param
        return None
    return body


def vllm(path: str, body: dict[str, Any]) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = ChatCompletionRequest if path == CHAT else CompletionRequest
    try:
        return model.model_validate(body)
    except Exception:
        return None


CASES = [
    (CHAT, "logprobs", v) for v in ("true", "false", "1", "yes", "off", 1, 0, "maybe", 2, [])
] + [
    (CHAT, name, v) for name in ("max_tokens", "max_completion_tokens", "n", "seed")
    for v in ("5", "5.0", 5.0, 5.5, "five", [])
] + [
    (CHAT, name, v) for name in ("temperature", "top_p") for v in ("0.5", "1", 1, "hot")
] + [
    (CHAT, "stream", v) for v in ("true", "no", "x")
] + [
    (CHAT, "top_logprobs", v) for v in ("5", 5.0, 5.5)
] + [
    (COMPLETIONS, "logprobs", v) for v in ("2", 2.0, "true", 2.5)
] + [
    (COMPLETIONS, "echo", v) for v in ("true", "on", "sure")
] + [
    (COMPLETIONS, "max_tokens", v) for v in ("7", "seven")
]


@pytest.mark.parametrize("path,name,value", CASES)
def test_a_field_is_accepted_and_coerced_exactly_as_vllm_does(path, name, value):
    body: dict[str, Any] = {"model": "m", **({"messages": MSG} if path == CHAT else {"prompt": "hi"}), name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    theirs = vllm(path, dict(body))
    ours = gateway(path, dict(body))
    assert (ours is None) == (theirs is None), (ours, theirs)
    if ours is not None:
        expected = getattr(theirs, name)
        # An integer where vLLM takes a float stays as sent (vLLM reads the same JSON number).
        kept_int = type(expected) is float and type(ours[name]) is int
        assert ours[name] == expected and (kept_int or type(ours[name]) is type(expected))


@pytest.mark.parametrize("role", ["my-custom-role", "narrator"])
@pytest.mark.parametrize("content", ["what is 1+1?", [{"type": "text", "text": "what is 1+1?"}]])
def test_a_custom_role_is_accepted_as_vllm_accepts_it(role, content):
    body = {"model": "m", "messages": [{"role": role, "content": content}]}
    assert vllm(CHAT, dict(body)) is not None
    assert gateway(CHAT, dict(body)) is not None


@pytest.mark.parametrize("role", [None, 3, "", ["user"]])
def test_a_role_that_is_not_a_name_is_refused_naming_it(role):
    with pytest.raises(APIError) as e:
        validate(CHAT, {"messages": [{"role": role, "content": "x"}]}, 10)
    assert e.value.status == 400 and e.value.param == "messages.[0].role"


def test_a_refused_string_names_its_parameter():
    with pytest.raises(APIError) as e:
        coerce(CHAT, {"messages": MSG, "logprobs": "maybe"})
    assert (e.value.status, e.value.param) == (400, "logprobs")
    with pytest.raises(APIError) as e:
        coerce(CHAT, {"messages": MSG, "stream": True, "stream_options": {"include_usage": "perhaps"}})
    assert e.value.param == "stream_options.include_usage"


def test_coercion_reports_a_change_so_the_engine_gets_the_coerced_body():
    body: dict[str, Any] = {"messages": MSG, "stream": "true", "stream_options": {"include_usage": "1"}}
    assert coerce(CHAT, body) is True
    assert body["stream"] is True and body["stream_options"]["include_usage"] is True
    assert coerce(CHAT, {"messages": MSG, "stream": True, "n": 2}) is False


def test_responses_coerce_their_own_fields():
    body = {"input": "hi", "stream": "false", "max_output_tokens": "16", "temperature": "0"}
    assert coerce("/v1/responses", body) is True
    assert body == {"input": "hi", "stream": False, "max_output_tokens": 16, "temperature": 0.0}


def _config(**gateway: Any) -> Config:
    models = [{"name": "a", "source": "builtin://tiny"}, {"name": "b", "source": "builtin://tiny"}]
    return Config.model_validate({"models": models, "gateway": gateway})


def test_the_configured_default_model_serves_a_request_without_one():
    body: dict[str, Any] = {"input": "hi"}
    assert default_model(_config(default_model="b"), body) is True and body["model"] == "b"
    named = {"model": "a"}
    assert default_model(_config(default_model="b"), named) is False and named == {"model": "a"}


def test_without_a_default_only_a_single_model_is_implied():
    one = Config.model_validate({"models": [{"name": "solo", "source": "builtin://tiny"}]})
    body: dict[str, Any] = {}
    assert default_model(one, body) is True and body == {"model": "solo"}
    body = {}
    assert default_model(_config(), body) is False and body == {}


def test_a_default_model_must_be_configured():
    with pytest.raises(ValueError, match="default_model"):
        _config(default_model="nope")


def test_an_integer_for_a_number_is_left_as_sent() -> None:
    """`temperature: 0` stays the integer 0 (not 0.0): the body is forwarded as the client's own
    bytes and its head-cache key is the one `llmserve cache build` stored the answer under."""
    body = {"messages": MSG, "temperature": 0, "top_p": 1}
    assert coerce(CHAT, body) is False
    assert type(body["temperature"]) is int and type(body["top_p"]) is int
