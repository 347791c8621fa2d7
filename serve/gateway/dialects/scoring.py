"""vLLM's scoring endpoints for embedding models: `POST /v1/score` (pairs of texts: `text_1` and
`text_2`, or `queries` with `documents` or `items`, or `data_1` and `data_2`) and `POST /v1/rerank`
(Jina's and Cohere's shape: a `query`, `documents`, `top_n`), with vLLM's own unversioned and v2
paths. Whole answers, deterministic (cached like embeddings), billed for their prompt tokens."""

from __future__ import annotations

import time
import uuid
from typing import Any

from serve.gateway.dialects.base import Dialect
from serve.gateway.errors import bad_request

# The request forms vLLM's ScoreRequest takes, each a pair of fields.
SCORE_PAIRS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))


def _input_ok(v: Any) -> bool:
    """A ScoreInput (a string, or content parts) or a non-empty list of them."""
    if isinstance(v, str):
        return True
    return isinstance(v, list) and bool(v) and all(isinstance(x, (str, dict, list)) for x in v)


def _top_level_ints(p: dict[str, Any], *names: str) -> None:
    for name in names:
        v = p.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise bad_request(f"`{name}` must be a non-negative integer.", param=name)


class _Scoring(Dialect):
    task = "embed"
    deterministic = True  # no sampling: the same pair always scores the same

    def __init__(self, path: str) -> None:
        self.path = path

    def refresh(self, body: dict[str, Any]) -> None:
        body["id"] = f"cache-{uuid.uuid4().hex[:24]}"
        if "created" in body:
            body["created"] = int(time.time())

    def zero_usage(self) -> dict[str, Any]:
        return {"prompt_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}


class Score(_Scoring):
    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        pair = next((p for p in SCORE_PAIRS if p[0] in payload and p[1] in payload), None)
        if pair is None:
            raise bad_request("Send the texts to score as `text_1` and `text_2` (or `queries` with `documents` "
                              "or `items`, or `data_1` and `data_2`).", param="text_1")
        for name in pair:
            if not _input_ok(payload[name]):
                raise bad_request(f"`{name}` must be a string or a non-empty list.", param=name)
        _top_level_ints(payload, "truncate_prompt_tokens", "max_tokens_per_query", "max_tokens_per_doc")


class Rerank(_Scoring):
    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        query = payload.get("query")
        if not isinstance(query, (str, dict, list)) or not query:
            raise bad_request("`query` must be a non-empty string.", param="query")
        if not _input_ok(payload.get("documents")):
            raise bad_request("`documents` must be a string or a non-empty list.", param="documents")
        _top_level_ints(payload, "top_n", "truncate_prompt_tokens", "max_tokens_per_query", "max_tokens_per_doc")
