"""`POST /v1/embeddings`: a whole answer, always deterministic (so always cacheable), no cascade."""

from __future__ import annotations

import time
import uuid
from typing import Any

from serve.gateway.dialects.base import Dialect
from serve.gateway.validate import validate_embeddings


class Embeddings(Dialect):
    path = "/v1/embeddings"
    task = "embed"
    deterministic = True  # an embedding does not sample: the same input always gives the same vector

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        validate_embeddings(payload)

    def refresh(self, body: dict[str, Any]) -> None:
        body["id"] = f"cache-{uuid.uuid4().hex[:24]}"
        body["created"] = int(time.time())
