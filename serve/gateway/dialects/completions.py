"""`POST /v1/completions`."""

from __future__ import annotations

from typing import Any

from serve.gateway.dialects.choices import ChoicesDialect
from serve.gateway.validate import coerce, validate_completion


class Completions(ChoicesDialect):
    path = "/v1/completions"
    chat = False

    def coerce(self, payload: dict[str, Any]) -> bool:
        return coerce(self.path, payload)

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        validate_completion(payload)
