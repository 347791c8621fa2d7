"""What a route produced, before it is HTTP: a JSON body or a stream of SSE bytes, plus who answered
and what it cost (in `headers`). The service returns one; the HTTP edge (`to_response` in
serve/gateway/app.py), the batch worker and tests consume it directly, so nothing parses a
Starlette response back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from serve.gateway.errors import APIError


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | None = None  # the whole answer (success or OpenAI-shaped error)
    chunks: AsyncIterator[bytes] | None = None  # an SSE stream (status 200), when streaming
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, e: APIError, headers: dict[str, str] | None = None) -> Answer:
        return cls(e.status, e.body(), headers={**e.headers, **(headers or {})})

    @classmethod
    def engine_error(cls, status: int, normalized: bytes, headers: dict[str, str]) -> Answer:
        return cls(status, json.loads(normalized), headers=headers)

    @classmethod
    def replayed(cls, chunks: Iterable[bytes], headers: dict[str, str]) -> Answer:
        """A whole answer (cache hit, accepted student) streamed to a streaming client."""

        async def gen() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        return cls(200, chunks=gen(), headers=headers)

    @property
    def served_by(self) -> str:
        return self.headers.get("x-llmserve-served-by", "-")
