"""The Responses API's event stream: a whole response replayed as events, and a stream read back
to its final response."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from serve.sse_events import Event, EventParser


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def replay(body: dict[str, Any]) -> Iterator[bytes]:
    """A whole response (cache hit, accepted student) as the Responses event stream."""
    seq = 0
    pending = {**body, "status": "in_progress", "output": [], "usage": None}
    yield _event("response.created", seq, response=pending)
    seq += 1
    yield _event("response.in_progress", seq, response=pending)
    for idx, item in enumerate(body.get("output") or []):
        seq += 1
        started = {**item, "status": "in_progress", "content": []} if item.get("type") == "message" else item
        yield _event("response.output_item.added", seq, output_index=idx, item=started)
        if item.get("type") == "message":
            for cidx, part in enumerate(item.get("content") or []):
                seq += 1
                empty = {**part, "text": "", "logprobs": []} if part.get("type") == "output_text" else part
                yield _event("response.content_part.added", seq, item_id=item.get("id"), output_index=idx,
                             content_index=cidx, part=empty)
                if part.get("type") == "output_text":
                    seq += 1
                    yield _event("response.output_text.delta", seq, item_id=item.get("id"), output_index=idx,
                                 content_index=cidx, delta=part.get("text") or "",
                                 logprobs=part.get("logprobs") or [])
                    seq += 1
                    yield _event("response.output_text.done", seq, item_id=item.get("id"), output_index=idx,
                                 content_index=cidx, text=part.get("text") or "",
                                 logprobs=part.get("logprobs") or [])
                seq += 1
                yield _event("response.content_part.done", seq, item_id=item.get("id"), output_index=idx,
                             content_index=cidx, part=part)
        seq += 1
        yield _event("response.output_item.done", seq, output_index=idx, item=item)
    seq += 1
    # vLLM ends every stream with response.completed, an incomplete one too (its `status` says
    # so), and the SDK's stream helper waits for exactly that event.
    yield _event("response.completed", seq, response=body)


class ResponsesAssembler:
    """Reads a Responses event stream; `response()` is the final response object, once the stream
    ended with response.completed (the engine puts the whole response there), else None."""

    FINAL = ("response.completed", "response.incomplete", "response.failed")

    def __init__(self) -> None:
        self._parser = EventParser()
        self.final: dict[str, Any] | None = None
        self.kind = ""

    def feed(self, chunk: bytes) -> None:
        for ev in self._parser.feed(chunk):
            self.take(ev)

    def take(self, ev: Event) -> None:
        """Fold in one event. vLLM names every event (`event:`), so only a final one is parsed."""
        if ev.event is not None and ev.event not in self.FINAL:
            return
        try:
            obj = ev.json()
        except ValueError:
            return
        if isinstance(obj, dict) and obj.get("type") in self.FINAL and isinstance(obj.get("response"), dict):
            self.kind, self.final = obj["type"], obj["response"]

    @property
    def done(self) -> bool:
        return self.final is not None

    def response(self) -> dict[str, Any] | None:
        return self.final if self.kind == "response.completed" else None
