"""Request validation at the gateway: reject what is malformed before it costs an engine anything.

Checks the structure and types OpenAI's API defines; value checks that need the model (context
length, max_tokens against it) stay with vLLM, whose errors the gateway normalizes. First `coerce`
applies the type coercions vLLM's request models apply (pydantic's lax mode: `"true"` for a bool,
`"5"` for an int), field by field with the types vLLM declares, so the gateway accepts exactly what
a vLLM server accepts and every later reader (stream, n, max tokens, the engine) sees the coerced value.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from serve.config import Config
from serve.gateway.errors import bad_request

# Roles with OpenAI's rules for content; vLLM also takes any other string as a custom role
# (its CustomChatCompletionMessageParam), which the chat template renders by name.
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
RESPONSE_FORMATS = {"text", "json_object", "json_schema"}


# The types vLLM 0.32's request models declare for the fields the gateway reads or checks
# (chat_completion/protocol.py, completion/protocol.py, responses/protocol.py, StreamOptions).
_BOOL: TypeAdapter[Any] = TypeAdapter(bool)
_INT: TypeAdapter[Any] = TypeAdapter(int)
_NUM: TypeAdapter[Any] = TypeAdapter(float)
_SAMPLING: dict[str, TypeAdapter[Any]] = {"temperature": _NUM, "top_p": _NUM, "presence_penalty": _NUM,
                                          "frequency_penalty": _NUM, "seed": _INT, "stream": _BOOL}
_COERCED: dict[str, dict[str, TypeAdapter[Any]]] = {
    "/v1/chat/completions": {**_SAMPLING, "logprobs": _BOOL, "echo": _BOOL, "max_tokens": _INT,
                             "max_completion_tokens": _INT, "n": _INT},
    "/v1/completions": {**_SAMPLING, "echo": _BOOL, "max_tokens": _INT, "n": _INT},
    "/v1/responses": {"temperature": _NUM, "top_p": _NUM, "stream": _BOOL, "store": _BOOL, "background": _BOOL,
                      "max_output_tokens": _INT},
}
# vLLM checks these before coercion and takes only a JSON number (`"5"` is refused), then an int.
_NUMBER_ONLY = {"/v1/chat/completions": ("top_logprobs", "prompt_logprobs"),
                "/v1/completions": ("logprobs", "prompt_logprobs")}
_WORD = {_BOOL: "a boolean", _INT: "an integer", _NUM: "a number"}


def _coerce_field(p: dict[str, Any], name: str, adapter: TypeAdapter[Any], where: str = "") -> bool:
    v = p.get(name)
    if v is None or (adapter is _NUM and isinstance(v, int) and not isinstance(v, bool)):
        # An integer is already a JSON number: left as sent, so the request (its bytes, and the
        # head-cache key a batch-filled entry was stored under) stays what the client wrote.
        return False
    try:
        new = adapter.validate_python(v)
    except ValidationError:
        raise bad_request(f"`{where}{name}` must be {_WORD[adapter]}.", param=f"{where}{name}") from None
    changed = type(new) is not type(v) or new != v
    p[name] = new
    return changed


def coerce(path: str, payload: dict[str, Any]) -> bool:
    """Coerce `payload` in place as vLLM's request model for `path` would; True if a value changed.
    A value vLLM refuses gets a 400 naming the parameter."""
    fields = _COERCED.get(path)
    if fields is None:
        return False
    changed = False
    for name, adapter in fields.items():
        changed |= _coerce_field(payload, name, adapter)
    if path != "/v1/responses":
        for name in _NUMBER_ONLY[path]:
            v = payload.get(name)
            if v is not None and not isinstance(v, (int, float)):
                raise bad_request(f"`{name}` must be an integer.", param=name)
            changed |= _coerce_field(payload, name, _INT)
        so = payload.get("stream_options")
        if isinstance(so, dict):
            for name in ("include_usage", "continuous_usage_stats"):
                changed |= _coerce_field(so, name, _BOOL, where="stream_options.")
    return changed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN/Infinity; JSON does not


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body parsed as a JSON object, or a 400: never a 500 for bytes that are not UTF-8,
    NaN, or nesting deeper than the parser's recursion limit."""
    try:
        payload = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
    except RecursionError as e:
        raise bad_request("The JSON body of your request is nested too deeply.") from e
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    return payload


def default_model(config: Config, payload: dict[str, Any]) -> bool:
    """Name the configured default model in a request sent without `model`; True if it did."""
    if payload.get("model") is not None or (name := config.default_model()) is None:
        return False
    payload["model"] = name
    return True


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
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage"), (bool, type(None)))):
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
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role must be a string such as {sorted(ROLES)}, not {role!r}.",
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
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str) or rf["type"] not in RESPONSE_FORMATS:
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


def stream_options_object(p: dict[str, Any]) -> None:
    """`stream_options`, where an API has it or not, is an object (or absent)."""
    so = p.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("`stream_options` must be an object.", param="stream_options")


def validate_embeddings(p: dict[str, Any]) -> None:
    x = p.get("input")
    ok = isinstance(x, str) or (isinstance(x, list) and x and (
        all(isinstance(s, str) for s in x) or all(_is_int(t) for t in x)
        or all(isinstance(s, list) and all(_is_int(t) for t in s) for s in x)))
    if not ok:
        raise bad_request("`input` must be a string, a list of strings, or token ids.", param="input")
    stream_options_object(p)
    fmt = p.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad_request("`encoding_format` must be float or base64.", param="encoding_format")
