"""Prompt sizing for the load users, kept apart from locustfile.py so unit tests can import it
without importing locust (which monkey-patches the whole process with gevent).

The long-prompt user must stay under the model's context or every request is a 400 from vLLM.
The gateway reports the context as `max_model_len` on each /v1/models entry, as vLLM does.
"""

from __future__ import annotations

import random
from typing import Any

SUMMARISE = "Summarise the above."  # the long user's question after its context
TOPICS = ["order", "refund", "password", "delivery", "invoice", "warranty", "address", "payment", "login"]
# Used only when the model entry does not say: the smallest context the project deploys.
DEFAULT_MAX_MODEL_LEN = 512
# Byte-level BPE (the tiny model, GPT-2/Llama-3 style) and byte-fallback tokenizers never need more
# than one token per ASCII character, so sizing at one char per token is safe for any of them,
# whatever their merges. (Counting ~4 chars per token is English-on-a-big-vocabulary; the tiny
# model's 1k vocabulary gives ~2.2 on these words, which would overflow the context.)
MAX_TOKENS_PER_CHAR = 1
# The chat template's own tokens and the short user turn after the context.
TEMPLATE_RESERVE_TOKENS = 64
LONG_FILL = 0.7  # of the room left: long enough to be prefill-heavy, with a margin


def context_length(entry: Any) -> tuple[int, str]:
    """(max_model_len, where it came from) for one /v1/models entry: "model" or "default"."""
    value = entry.get("max_model_len") if isinstance(entry, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, "model"
    return DEFAULT_MAX_MODEL_LEN, "default"


def long_context_chars(max_model_len: int, max_tokens: int, fill: float = LONG_FILL) -> int:
    """Characters of context that fit, with the answer's max_tokens, into the model's context."""
    room = max_model_len - max_tokens - TEMPLATE_RESERVE_TOKENS
    return max(0, int(room * fill / MAX_TOKENS_PER_CHAR))


def long_context(rng: random.Random, chars: int, words: list[str]) -> str:
    """Random words from `words`, space-separated, at most `chars` characters long."""
    out: list[str] = []
    size = -1  # no space before the first word
    while True:
        word = rng.choice(words)
        if size + 1 + len(word) > chars:
            return " ".join(out)
        out.append(word)
        size += 1 + len(word)
