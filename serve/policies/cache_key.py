"""Head-cache keys: a hash of the whole normalised request.

Two requests share a key only when they would get the same deterministic answer. The key hashes
every field of the request except an explicit allowlist of fields known not to change the output
(`NON_OUTPUT_FIELDS`): a parameter nobody listed here, such as one a new vLLM release adds and the
validator passes through, changes the key by default instead of sharing an entry by accident.
The endpoint is part of the key too, so chat, completions and embeddings never collide.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"

# Fields that cannot change what the engine returns. Only add a field here with the reason it is
# safe: a wrong entry makes two different answers share one cache entry.
NON_OUTPUT_FIELDS = frozenset({
    "model",  # the route's name, already the key's namespace (the engine model is the route's choice)
    "stream",  # transport: a streamed answer is the same answer in chunks
    "stream_options",  # include_usage / continuous_usage_stats: only where usage is reported
    "user",  # an end-user id for abuse tracking; the engine ignores it
    "request_id",  # vLLM's id for logs and aborts; clients may send a fresh one per request
    "priority",  # vLLM's scheduling priority: changes when an answer comes, not what it is
})
# Deliberately NOT listed (they stay in the key): cache_salt (a tenant sets it to stay isolated
# from others' prefix cache, so it must isolate head-cache entries too), metadata/store/service_tier
# (not known to be inert in every engine version), and every sampling or decoding parameter.

_WS = re.compile(r"\s+")
# Bump when the key material or what an entry holds changes, so old entries can never match
# (3: entries made before per-request fields were stripped still hold another tenant's `user`).
_KEY_VERSION = 3


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
    """The part of a request that says what is asked: messages (chat) or prompt (completions).
    An embedding request's `input` is not normalised: whitespace changes an embedding."""
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


def endpoint_for(payload: dict[str, Any]) -> str:
    """The endpoint a logged request body was sent to, for callers that have only the body."""
    if "messages" in payload:
        return CHAT_PATH
    if "input" in payload and "prompt" not in payload:
        return EMBEDDINGS_PATH
    return COMPLETIONS_PATH


def is_deterministic(payload: dict[str, Any], route_cacheable: bool = False, path: str = "") -> bool:
    """Only deterministic requests are looked up: temperature 0, an embedding, or a route marked
    cacheable.

    OpenAI's default temperature is 1, so a generate request without one is not deterministic.
    An embedding does not sample: the same input always gives the same vector."""
    if route_cacheable or path.endswith("/embeddings"):
        return True
    t = payload.get("temperature")
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0


def cache_key(route: str, path: str, payload: dict[str, Any], norm: Normalization = Normalization(),
              owner: str | None = None, prompts: str | None = None) -> str:
    """sha256 over route, endpoint, the normalised query and every other field but
    NON_OUTPUT_FIELDS (a key's `cache_salt` among them). A field set to null is the same as an
    absent one (vLLM's default). `owner`: the API key whose entry this is, on a route whose cache
    is scoped per key (None: shared by the route's keys). `prompts`: the digest of the route's
    per-tier prompts (serve/policies/tier_prompt.py), which the client's request does not show but
    the answer depends on: a changed teacher or student prompt keys every request anew."""
    query_field = "messages" if "messages" in payload else "prompt" if "prompt" in payload else None
    material = {
        "v": _KEY_VERSION,
        "route": route,
        "owner": owner,
        "path": path,
        "query": normalized_query(payload, norm),
        **({"prompts": prompts} if prompts is not None else {}),  # absent: keys made before prompts existed hold
        "params": {k: v for k, v in payload.items()
                   if k not in NON_OUTPUT_FIELDS and k != query_field and v is not None},
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def apply_cache_salt(payload: dict[str, Any], salt: str | None) -> bool:
    """Put an API key's `cache_salt` into its request (in place), replacing whatever the client
    sent: vLLM then shares prefix-cache blocks only between requests of the same salt, and the
    head-cache key, which hashes the field, keeps the key's entries apart too. True if changed."""
    if salt is None or payload.get("cache_salt") == salt:
        return False
    payload["cache_salt"] = salt
    return True
