"""Server-sent events: replaying a whole response as a stream, and reading a stream back whole.

A head-cache hit or an accepted cascade answer exists as one JSON body; a streaming client must
still get OpenAI's chunk sequence (role, content, finish_reason, optional usage, [DONE]).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

DONE = b"data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def replay(response: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """Chunks for a chat.completion or text_completion body, in OpenAI's order."""
    chat = response.get("object") == "chat.completion"
    base = {"id": response.get("id"), "created": response.get("created"), "model": response.get("model"),
            "object": "chat.completion.chunk" if chat else "text_completion"}
    for choice in response.get("choices", []):
        idx = choice.get("index", 0)
        if chat:
            msg = choice.get("message") or {}
            yield _event({**base, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
            yield _event({**base, "choices": [{"index": idx, "delta": {"content": msg.get("content") or ""},
                                               "logprobs": choice.get("logprobs"), "finish_reason": None}]})
            yield _event({**base, "choices": [{"index": idx, "delta": {}, "logprobs": None,
                                               "finish_reason": choice.get("finish_reason")}]})
        else:
            yield _event({**base, "choices": [{"index": idx, "text": choice.get("text") or "",
                                               "logprobs": choice.get("logprobs"),
                                               "finish_reason": choice.get("finish_reason")}]})
    if include_usage:
        yield _event({**base, "choices": [], "usage": response.get("usage")})
    yield DONE


class StreamAssembler:
    """Rebuilds the whole response from a stream's chunks (to cache a streamed answer)."""

    def __init__(self) -> None:
        self._buf = b""
        self.meta: dict[str, Any] = {}
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.broken = False
        self.done = False  # saw `data: [DONE]`

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while b"\n\n" in self._buf:
            event, self._buf = self._buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line == DONE.strip():
                    self.done = True
                    continue
                if not line.startswith(b"data: "):
                    continue
                try:
                    obj = json.loads(line[6:])
                except ValueError:
                    self.broken = True
                    continue
                if "error" in obj:
                    self.broken = True
                    continue
                self.meta = {k: obj.get(k) for k in ("id", "created", "model", "object")}
                if obj.get("usage"):
                    self.usage = obj["usage"]
                for c in obj.get("choices") or []:
                    i = c.get("index", 0)
                    piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                    if piece:
                        self.texts.setdefault(i, []).append(piece)
                    if c.get("finish_reason"):
                        self.finish[i] = c["finish_reason"]

    def response(self) -> dict[str, Any] | None:
        if self.broken or not self.finish:
            return None
        chat = self.meta.get("object") == "chat.completion.chunk"
        choices = []
        for i in sorted(self.finish):
            text = "".join(self.texts.get(i, []))
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": self.finish[i]})
        return {"id": self.meta.get("id"), "object": "chat.completion" if chat else "text_completion",
                "created": self.meta.get("created"), "model": self.meta.get("model"), "choices": choices,
                "usage": self.usage}
