"""Cost of a request in USD, from token usage and per-million-token prices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Price:
    input_per_million: float = 0.0
    output_per_million: float = 0.0


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of an OpenAI usage object; malformed usage counts as zero."""
    if not isinstance(usage, dict):
        return 0, 0

    def num(v: Any) -> int:
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else 0

    if "input_tokens" in usage or "output_tokens" in usage:  # the Responses API's names
        return num(usage.get("input_tokens")), num(usage.get("output_tokens"))
    return num(usage.get("prompt_tokens")), num(usage.get("completion_tokens"))


def cost_usd(prompt_tokens: int, completion_tokens: int, price: Price) -> float:
    return (prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million) / 1e6
