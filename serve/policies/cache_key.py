"""Head-cache keys: a hash of the normalised request.

Two requests share a key exactly when they would get the same deterministic answer: same route,
same (normalised) messages or prompt, and the same value for every parameter that changes the
output. Parameters that only change the transport (stream, stream_options, user) are left out,
so a streamed and a plain request hit the same entry.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# Every request field that changes what the model returns.
OUTPUT_PARAMS = (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
    "top_logprobs", "response_format", "tools", "tool_choice", "echo", "suffix", "best_of",
)

_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Normalization:
    whitespace: bool = True  # collapse runs of whitespace and strip ends
    case: bool = False  # lower-case text (only where the route says answers do not depend on case)


def normalize_text(text: str, norm: Normalization) -> str:
    if norm.whitespace:
        text = _WS.sub(" ", text).strip()
    if norm.case:
        text = text.lower()
    return text


def _normalize_content(content: Any, norm: Normalization) -> Any:
    if isinstance(content, str):
        return normalize_text(content, norm)
    if isinstance(content, list):  # content parts: normalise the text parts, keep the rest as is
        return [
            {**p, "text": normalize_text(p["text"], norm)}
            if isinstance(p, dict) and isinstance(p.get("text"), str) else p
            for p in content
        ]
    return content


def normalized_query(payload: dict[str, Any], norm: Normalization) -> Any:
    """The part of a request that says what is asked: messages (chat) or prompt (completions)."""
    if "messages" in payload:
        msgs = payload.get("messages")
        if not isinstance(msgs, list):
            return msgs
        return [
            {**m, "content": _normalize_content(m.get("content"), norm)} if isinstance(m, dict) else m
            for m in msgs
        ]
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return normalize_text(prompt, norm)
    return prompt


def is_deterministic(payload: dict[str, Any], route_cacheable: bool = False) -> bool:
    """Only deterministic requests are looked up: temperature 0, or a route marked cacheable.

    OpenAI's default temperature is 1, so a request without one is not deterministic."""
    if route_cacheable:
        return True
    t = payload.get("temperature")
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0


def cache_key(route: str, payload: dict[str, Any], norm: Normalization = Normalization()) -> str:
    kind = "chat" if "messages" in payload else "completion"
    material = {
        "route": route,
        "kind": kind,
        "query": normalized_query(payload, norm),
        "params": {k: payload[k] for k in OUTPUT_PARAMS if payload.get(k) is not None},
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
