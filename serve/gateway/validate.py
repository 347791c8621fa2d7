"""Request validation at the gateway: reject what is malformed before it costs an engine anything.

Checks the structure and types OpenAI's API defines; value checks that need the model (context
length, max_tokens against it) stay with vLLM, whose errors the gateway normalizes.
"""

from __future__ import annotations

from typing import Any

from serve.gateway.dialects.responses import RESPONSES, check_supported
from serve.gateway.errors import APIError, bad_request

TOKENIZER_PATHS = ("/tokenize", "/detokenize")

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
RESPONSE_FORMATS = {"text", "json_object", "json_schema"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_int(p: dict[str, Any], name: str, lo: int, hi: int | None = None) -> None:
    v = p.get(name)
    if v is None:
        return
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"`{name}` must be an integer {rng}.", param=name)


def _opt_num(p: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = p.get(name)
    if v is not None and (not _is_num(v) or not lo <= v <= hi):
        raise bad_request(f"`{name}` must be a number between {lo} and {hi}.", param=name)


def _common(p: dict[str, Any], max_stop: int = 16) -> None:
    _opt_int(p, "max_tokens", 1)
    _opt_int(p, "max_completion_tokens", 1)
    _opt_int(p, "n", 1, 128)
    _opt_int(p, "seed", -(2**63), 2**63 - 1)
    _opt_num(p, "temperature", 0, 2)
    _opt_num(p, "top_p", 0, 1)
    _opt_num(p, "presence_penalty", -2, 2)
    _opt_num(p, "frequency_penalty", -2, 2)
    stop = p.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list) and len(stop) <= max_stop and all(isinstance(s, str) and s for s in stop)
    ):
        raise bad_request(f"`stop` must be a string or a list of up to {max_stop} non-empty strings.", param="stop")
    so = p.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise bad_request("`stream_options` must be an object with a boolean `include_usage`.",
                          param="stream_options")
    user = p.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("`user` must be a string.", param="user")


def _content_ok(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in content)


def validate_chat(p: dict[str, Any], max_messages: int) -> None:
    msgs = p.get("messages")
    if not isinstance(msgs, list):
        raise bad_request("`messages` must be an array of message objects.", param="messages")
    if not msgs:
        raise bad_request("`messages` must contain at least one message.", param="messages")
    if len(msgs) > max_messages:
        raise bad_request(f"`messages` has {len(msgs)} messages; at most {max_messages} are allowed.",
                          param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object.", param=f"messages.[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {sorted(ROLES)}, not {role!r}.",
                              param=f"messages.[{i}].role")
        content = m.get("content")
        if not _content_ok(content):
            raise bad_request(f"messages[{i}].content must be a string or an array of content parts.",
                              param=f"messages.[{i}].content")
        if content is None and role != "assistant":
            raise bad_request(f"messages[{i}].content is required for role {role!r}.",
                              param=f"messages.[{i}].content")
        if content is None and not m.get("tool_calls") and not m.get("function_call"):
            raise bad_request(f"messages[{i}] has neither content nor tool calls.", param=f"messages.[{i}]")
    _common(p)
    lp = p.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise bad_request("`logprobs` must be a boolean.", param="logprobs")
    _opt_int(p, "top_logprobs", 0, 20)
    rf = p.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in RESPONSE_FORMATS:
            raise bad_request("`response_format.type` must be one of text, json_object, json_schema.",
                              param="response_format")
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name", ""), str) or not isinstance(
                    js.get("schema", {}), dict):
                raise bad_request("`response_format.json_schema` must be an object with a `schema` object.",
                                  param="response_format")


def validate_completion(p: dict[str, Any]) -> None:
    prompt = p.get("prompt")
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and (
        all(isinstance(x, str) for x in prompt) or all(_is_int(x) for x in prompt)
        or all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in prompt)))
    if not ok:
        raise bad_request("`prompt` must be a string, a list of strings, or token ids.", param="prompt")
    _common(p)
    _opt_int(p, "logprobs", 0, 20)
    echo = p.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad_request("`echo` must be a boolean.", param="echo")


def validate_embeddings(p: dict[str, Any]) -> None:
    x = p.get("input")
    ok = isinstance(x, str) or (isinstance(x, list) and x and (
        all(isinstance(s, str) for s in x) or all(_is_int(t) for t in x)
        or all(isinstance(s, list) and all(_is_int(t) for t in s) for s in x)))
    if not ok:
        raise bad_request("`input` must be a string, a list of strings, or token ids.", param="input")
    fmt = p.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad_request("`encoding_format` must be float or base64.", param="encoding_format")


def validate(path: str, payload: dict[str, Any], max_messages: int) -> None:
    """Raise APIError(400) naming the offending parameter."""
    if path.endswith("/chat/completions"):
        validate_chat(payload, max_messages)
    elif path.endswith("/completions"):
        validate_completion(payload)
    elif path.endswith("/embeddings"):
        validate_embeddings(payload)
    elif path == RESPONSES:
        _opt_num(payload, "temperature", 0, 2)
        _opt_num(payload, "top_p", 0, 1)
        check_supported(payload)
    elif path in TOKENIZER_PATHS and not isinstance(
            payload.get("prompt", payload.get("messages", payload.get("tokens"))), (str, list)):
        raise bad_request("Send `prompt` (or `messages`) to tokenize, or `tokens` to detokenize.")


__all__ = ["APIError", "validate"]
