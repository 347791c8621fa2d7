"""`POST /v1/chat/completions`."""

from __future__ import annotations

from typing import Any

from serve.gateway.dialects.choices import ChoicesDialect
from serve.gateway.validate import validate


class ChatCompletions(ChoicesDialect):
    path = "/v1/chat/completions"
    chat = True

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        validate(self.path, payload, max_messages)
