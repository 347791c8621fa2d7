"""What chat completions and completions share: answers made of `choices`, streamed as
`data:` chunks ending in `[DONE]`, with usage in a chunk of its own (serve/gateway/sse.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from serve.config import TierPrompt
from serve.gateway.dialects.base import Charge, Conversation, Dialect, EventTap, Keep, View, with_cost
from serve.gateway.sse import COMPLETE_FINISH, StreamAssembler, replay
from serve.policies.tier_prompt import apply_chat, apply_completion
from serve.sse_events import Event


def complete(body: dict[str, Any]) -> bool:
    """Every choice ended normally (as a stored stream must; an aborted or errored choice is not
    what the same request gets next time)."""
    return all(c.get("finish_reason") in COMPLETE_FINISH for c in body.get("choices") or [])


def _fresh_tool_call_ids(choice: Any) -> Any:
    """A choice whose tool calls have new ids (a copy: a cached entry's choices are shared by every hit)."""
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("tool_calls"), list):
        return choice
    calls = message["tool_calls"]
    fresh = [{**c, "id": f"{c['id'].rsplit('-', 1)[0]}-{uuid.uuid4().hex[:24]}"}
             if isinstance(c, dict) and isinstance(c.get("id"), str) else c for c in calls]
    return {**choice, "message": {**message, "tool_calls": fresh}}


class ChoicesTap(EventTap):
    """Bills the usage chunk (asked for by the gateway if not by the client, then dropped again),
    puts the cost into it, and rebuilds the whole answer for the cache. Reads whole events
    (serve/sse_events.py), so a usage chunk split across two reads is still billed."""

    def __init__(self, charge: Charge, keep: Keep | None, strip_usage: bool, prompt_tokens: int) -> None:
        super().__init__(charge, prompt_tokens)
        self.keep, self.strip = keep, strip_usage
        self.assembler = StreamAssembler() if keep is not None else None

    def feed(self, chunk: bytes) -> bytes:
        events = self.parser.feed(chunk)
        self.usage.events += len(events)
        if len(events) == 1 and self.assembler is None and not events[0].has_usage:
            return events[0].raw  # the common chunk: one event, relayed untouched
        return b"".join(self._event(ev) for ev in events)

    def _event(self, ev: Event) -> bytes:
        if self.assembler is not None:
            self.assembler.take(ev)
            if self.assembler.done:
                # Stored before the last bytes go out: a client that hangs up right after [DONE]
                # cancels the relay before it would run past its loop.
                whole = self.assembler.response()
                if whole is not None and self.keep is not None:
                    self.keep(whole)
                self.assembler = None
        return self._bill(ev) if ev.has_usage else ev.raw

    def _bill(self, ev: Event) -> bytes:
        try:
            obj = ev.json()
        except ValueError:
            return ev.raw
        if obj is None or not isinstance(obj.get("usage"), dict):
            return ev.raw
        cost = self.usage.bill(obj["usage"])
        if self.strip and not obj.get("choices"):
            return b""  # the usage-only chunk the client did not ask for
        if self.strip:
            obj["usage"] = None
        else:
            with_cost(obj, cost)
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class ChoicesDialect(Dialect):
    """Chat completions and completions."""

    task = "generate"
    cascades = True
    shadowable = True
    chat = False

    def view(self, payload: dict[str, Any]) -> View:
        field = "max_completion_tokens" if self.chat and "max_completion_tokens" in payload else "max_tokens"
        limit = payload.get(field)
        n = payload.get("n")
        n = n if isinstance(n, int) else 1
        prompt = payload.get("prompt")
        # A list of prompts (strings, or lists of token ids) is one completion each.
        prompts = len(prompt) if not self.chat and isinstance(prompt, list) and prompt and \
            isinstance(prompt[0], (str, list)) else 1
        return View(stream=bool(payload.get("stream")),
                    include_usage=bool((payload.get("stream_options") or {}).get("include_usage")),
                    n=n, choices=n * prompts,
                    max_output_tokens=limit if isinstance(limit, int) else None, max_tokens_field=field)

    def cacheable(self, body: dict[str, Any]) -> bool:
        return complete(body)

    def refresh(self, body: dict[str, Any]) -> None:
        body["id"] = f"cache-{uuid.uuid4().hex[:24]}"
        body["created"] = int(time.time())

    run_fields = ("kv_transfer_params", "ec_transfer_params")  # vLLM's, for the run that made it

    def for_request(self, body: dict[str, Any], payload: dict[str, Any], conversation: Conversation | None) -> None:
        super().for_request(body, payload, conversation)
        if isinstance(body.get("choices"), list):  # tool call ids are made per request, like the answer's
            body["choices"] = [_fresh_tool_call_ids(c) for c in body["choices"]]

    def replay(self, body: dict[str, Any], view: View) -> Iterable[bytes]:
        return replay(body, view.include_usage)

    def with_prompt(self, payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
        return apply_chat(payload, prompt) if self.chat else apply_completion(payload, prompt)

    def student_request(self, payload: dict[str, Any], view: View, student: str,
                        cap: int | None) -> tuple[dict[str, Any], bool]:
        req = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
        req["model"] = student
        req["logprobs"] = True if self.chat else max(1, int(payload.get("logprobs") or 1))
        if cap is not None:  # the cap bounds the buffer; a prefix-decided answer is not buffered
            asked = view.max_output_tokens
            req[view.max_tokens_field] = min(asked, cap) if asked is not None else cap
        return req, bool(payload.get("logprobs"))

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        for c in body.get("choices", []):
            c["logprobs"] = None

    def prefix_decidable(self, view: View) -> bool:
        # One choice (the relay follows one stream), streamed.
        return view.stream and view.n == 1

    def stream_request(self, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        # Streams are billed from their usage chunk: ask for it, and drop it again if the client
        # did not ask for it.
        if (payload.get("stream_options") or {}).get("include_usage"):
            return payload, False
        return {**payload, "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True}}, True

    def tap(self, charge: Charge, keep: Keep | None, strip_usage: bool, prompt_tokens: int) -> ChoicesTap:
        return ChoicesTap(charge, keep, strip_usage, prompt_tokens)
