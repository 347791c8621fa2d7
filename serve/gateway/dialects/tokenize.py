"""`POST /tokenize` and `POST /detokenize`: vLLM's tokenizer endpoints, answered by the engine of
the model that would answer the route first (a tokenizer belongs to a model: no cache, cascade,
fallback or cost)."""

from __future__ import annotations

from typing import Any

from serve.gateway.dialects.base import Dialect
from serve.gateway.errors import bad_request


class Tokenizer(Dialect):
    routed = False

    def __init__(self, path: str) -> None:
        self.path = path

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        if not isinstance(payload.get("prompt", payload.get("messages", payload.get("tokens"))), (str, list)):
            raise bad_request("Send `prompt` (or `messages`) to tokenize, or `tokens` to detokenize.")
