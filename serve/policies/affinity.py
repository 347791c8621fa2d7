"""Cache-aware replica choice: requests that share a prompt prefix go to the same replica, so
vLLM's prefix cache there already holds their KV blocks; load still wins when that replica is
clearly busier than the others."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

# prefix_affinity's rendezvous key: the prompt's first characters (serve/gateway/backends.py).
AFFINITY_CHARS = 256


def prefix_key(payload: dict[str, Any], chars: int = AFFINITY_CHARS) -> str | None:
    """The first `chars` characters of the prompt as the model sees it (system + first turns)."""
    if isinstance(payload.get("messages"), list):
        parts, size = [], 0
        for m in payload["messages"]:
            if isinstance(m, dict):
                c = m.get("content")
                parts.append(f"{m.get('role')}:{c if isinstance(c, str) else ''}")
                size += len(parts[-1]) + 1
                if size >= chars:  # a long conversation is not joined whole for its first characters
                    break
        text = "\n".join(parts)
    elif isinstance(payload.get("prompt"), str):
        text = payload["prompt"]
    else:
        return None
    return text[:chars] if text else None


def rendezvous(key: str, candidates: Sequence[str]) -> str:
    """Highest-random-weight hashing: stable per key, and only 1/N of keys move when a replica
    joins or leaves."""
    return max(candidates, key=lambda c: hashlib.blake2b(f"{key}|{c}".encode(), digest_size=8).digest())
