"""`POST /v1/completions`."""

from __future__ import annotations

from typing import Any

from serve.gateway.dialects.choices import ChoicesDialect
from serve.gateway.validate import validate


class Completions(ChoicesDialect):
    path = "/v1/completions"
    chat = False

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        validate(self.path, payload, max_messages)
