"""Server-sent events: replaying a whole response as a stream, and reading a stream back whole.

A head-cache hit or an accepted cascade answer exists as one JSON body; a streaming client must
still get the chunk sequence an engine would send (role, content, tool calls, logprobs,
finish_reason, optional usage, [DONE]), so the SDK's stream helpers rebuild the same message.

The other direction decides what the head cache may keep: `StreamAssembler.response()` is the body
a non-streamed request would have got, or None. None whenever the stream is incomplete, broken, or
carries anything the assembler does not know how to put back together (reasoning text, token ids,
a field a new vLLM adds): an answer that is not certainly equal is not stored. Field names follow
vLLM 0.32's protocol (entrypoints/openai/{chat_completion,completion}/protocol.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from serve.sse_events import Event, EventParser

DONE = b"data: [DONE]\n\n"

CHAT_CHUNK = "chat.completion.chunk"
COMPLETION_OBJECT = "text_completion"
# Finish reasons of a whole answer. `abort`, `error` and unknown ones mean the engine did not
# finish the answer it would give again: never cached.
COMPLETE_FINISH = frozenset({"stop", "length", "tool_calls"})

# Fields the assembler can rebuild exactly. Any other field that is not null makes the stream
# "unknown" (not stored); null fields are what vLLM sends for unset options.
_TOP_KNOWN = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint"})
_CHAT_CHOICE_KNOWN = frozenset({"index", "delta", "logprobs", "finish_reason", "stop_reason"})
_TEXT_CHOICE_KNOWN = frozenset({"index", "text", "logprobs", "finish_reason", "stop_reason"})
_DELTA_KNOWN = frozenset({"role", "content", "tool_calls"})
_TOOL_KNOWN = frozenset({"index", "id", "type", "function"})
_FUNCTION_KNOWN = frozenset({"name", "arguments"})
_CHAT_LOGPROBS_KNOWN = frozenset({"content"})
_TEXT_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
# Message and choice fields replay carries as they are; everything else it leaves out.
_MESSAGE_REPLAYED = ("role", "content", "tool_calls")
_CHOICE_REPLAYED = ("index", "message", "text", "logprobs", "finish_reason", "stop_reason")


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _unknown(obj: dict[str, Any], known: frozenset[str]) -> bool:
    return any(v is not None for k, v in obj.items() if k not in known)


# ---- body -> stream --------------------------------------------------------------------------
def replay(response: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """Chunks for a chat.completion or text_completion body, in the order vLLM sends them."""
    chat = response.get("object") == "chat.completion"
    base: dict[str, Any] = {"id": response.get("id"), "object": CHAT_CHUNK if chat else COMPLETION_OBJECT,
                            "created": response.get("created"), "model": response.get("model")}
    if response.get("system_fingerprint") is not None:
        base["system_fingerprint"] = response["system_fingerprint"]
    for choice in response.get("choices", []):
        for c in (_chat_choice_chunks(choice) if chat else _text_choice_chunks(choice)):
            yield _event({**base, "choices": [c]})
    if include_usage:
        yield _event({**base, "choices": [], "usage": response.get("usage")})
    yield DONE


def _finish(choice: dict[str, Any], logprobs: Any) -> dict[str, Any]:
    """The last chunk of a choice: finish_reason, stop_reason if the body has one, and the extra
    choice fields (e.g. token_ids) as they are."""
    last: dict[str, Any] = {"logprobs": logprobs, "finish_reason": choice.get("finish_reason")}
    if "stop_reason" in choice:
        last["stop_reason"] = choice["stop_reason"]
    last.update({k: v for k, v in choice.items() if k not in _CHOICE_REPLAYED and v is not None})
    return last


def _chat_choice_chunks(choice: dict[str, Any]) -> Iterator[dict[str, Any]]:
    idx = choice.get("index", 0)
    msg = choice.get("message") or {}
    logprobs = choice.get("logprobs")
    yield {"index": idx, "delta": {"role": msg.get("role") or "assistant", "content": ""},
           "logprobs": None, "finish_reason": None}
    # Fields a reasoning parser or a later API adds (e.g. `reasoning`) stream before the content.
    extra = {k: v for k, v in msg.items() if k not in _MESSAGE_REPLAYED and v is not None}
    if extra:
        yield {"index": idx, "delta": extra, "logprobs": None, "finish_reason": None}
    content = msg.get("content")
    if content:
        # Logprobs ride with the content they describe, as in an engine's stream.
        yield {"index": idx, "delta": {"content": content}, "logprobs": logprobs, "finish_reason": None}
        logprobs = None
    for pos, tc in enumerate(msg.get("tool_calls") or []):
        # One delta per call, whole: the SDK concatenates id/name/arguments by `index`.
        fn = tc.get("function") or {}
        yield {"index": idx, "delta": {"tool_calls": [{
            "index": pos, "id": tc.get("id"), "type": tc.get("type", "function"),
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""}}]},
            "logprobs": None, "finish_reason": None}
    yield {"index": idx, "delta": {}, **_finish(choice, logprobs)}


def _text_choice_chunks(choice: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield {"index": choice.get("index", 0), "text": choice.get("text") or "",
           **_finish(choice, choice.get("logprobs"))}


# ---- stream -> body --------------------------------------------------------------------------
@dataclass
class _Choice:
    pieces: list[str] = field(default_factory=list)  # content (chat) or text (completions)
    role: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    has_stop_reason: bool = False


class StreamAssembler:
    """Rebuilds the whole response from a stream's chunks (to cache a streamed answer)."""

    def __init__(self) -> None:
        self._parser = EventParser()
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self.broken = False  # an error event, bad JSON, or data after a choice finished or [DONE]
        self.unknown = False  # a field it cannot reassemble: the answer is not stored
        self.done = False  # saw `data: [DONE]`

    def feed(self, chunk: bytes) -> None:
        for ev in self._parser.feed(chunk):
            self.take(ev)

    def take(self, ev: Event) -> None:
        """Fold in one event (for a caller that already cut the stream into events)."""
        if ev.done:
            self.done = True
        elif self.done:
            self.broken = True
        elif ev.data:  # comments (": ping") carry no answer
            self._take(ev.data)

    def _take(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            self.broken = True
            return
        if not isinstance(obj, dict) or "error" in obj:
            self.broken = True
            return
        kind = obj.get("object")
        if kind not in (CHAT_CHUNK, COMPLETION_OBJECT) or self.meta.get("object", kind) != kind \
                or _unknown(obj, _TOP_KNOWN):
            self.unknown = True
            return
        if not self.meta:
            self.meta = {k: obj.get(k) for k in ("id", "created", "model", "object")}
        if obj.get("system_fingerprint") is not None:
            self.meta["system_fingerprint"] = obj["system_fingerprint"]
        if obj.get("usage") is not None:
            self.usage = obj["usage"]
        for c in obj.get("choices") or []:
            if not isinstance(c, dict) or not self._take_choice(c, kind == CHAT_CHUNK):
                self.unknown = True

    def _take_choice(self, c: dict[str, Any], chat: bool) -> bool:
        """Fold one choice chunk in; False when it holds something this cannot reassemble."""
        idx = c.get("index")
        if not isinstance(idx, int) or _unknown(c, _CHAT_CHOICE_KNOWN if chat else _TEXT_CHOICE_KNOWN):
            return False
        ch = self.choices.setdefault(idx, _Choice())
        if ch.finish_reason is not None:  # nothing may follow a choice's finish
            self.broken = True
            return True
        ok = self._take_delta(ch, c.get("delta")) if chat else self._take_text(ch, c.get("text"))
        ok = ok and self._take_logprobs(ch, c.get("logprobs"), chat)
        if "stop_reason" in c:
            ch.has_stop_reason, ch.stop_reason = True, c["stop_reason"]
        if c.get("finish_reason") is not None:
            ch.finish_reason = c["finish_reason"]
        return ok

    @staticmethod
    def _take_text(ch: _Choice, text: Any) -> bool:
        if text is None:
            return True
        if not isinstance(text, str):
            return False
        ch.pieces.append(text)
        return True

    @staticmethod
    def _take_delta(ch: _Choice, delta: Any) -> bool:
        if delta is None:
            return True
        if not isinstance(delta, dict) or _unknown(delta, _DELTA_KNOWN):
            return False
        if delta.get("role") is not None:
            if not isinstance(delta["role"], str) or ch.role not in (None, delta["role"]):
                return False
            ch.role = delta["role"]
        content = delta.get("content")
        if content is not None:
            if not isinstance(content, str):  # e.g. echoed content parts: not rebuilt
                return False
            ch.pieces.append(content)
        for tc in delta.get("tool_calls") or []:
            if not isinstance(tc, dict) or not isinstance(tc.get("index"), int) or _unknown(tc, _TOOL_KNOWN):
                return False
            fn = tc.get("function") or {}
            if not isinstance(fn, dict) or _unknown(fn, _FUNCTION_KNOWN):
                return False
            acc = ch.tool_calls.setdefault(tc["index"], {"id": "", "type": None, "name": "", "arguments": ""})
            # As the SDK accumulates: strings concatenate, `type` is assigned.
            for k, v in (("id", tc.get("id")), ("name", fn.get("name")), ("arguments", fn.get("arguments"))):
                if v is not None:
                    if not isinstance(v, str):
                        return False
                    acc[k] += v
            if tc.get("type") is not None:
                acc["type"] = tc["type"]
        return True

    @staticmethod
    def _take_logprobs(ch: _Choice, lp: Any, chat: bool) -> bool:
        if lp is None:
            return True
        if not isinstance(lp, dict) or _unknown(lp, _CHAT_LOGPROBS_KNOWN if chat else frozenset(_TEXT_LOGPROBS)):
            return False
        fields = ("content",) if chat else _TEXT_LOGPROBS
        if ch.logprobs is None:
            ch.logprobs = {f: [] for f in fields}
        for f in fields:
            part = lp.get(f)
            if part is None:
                continue
            if not isinstance(part, list):
                return False
            ch.logprobs[f].extend(part)
        return True

    def response(self) -> dict[str, Any] | None:
        """The body the same request would have got unstreamed, or None when that is not certain."""
        if self.broken or self.unknown or not self.done or not self.choices:
            return None
        if any(ch.finish_reason not in COMPLETE_FINISH for ch in self.choices.values()):
            return None
        chat = self.meta.get("object") == CHAT_CHUNK
        choices = [self._choice(i, self.choices[i], chat) for i in sorted(self.choices)]
        body: dict[str, Any] = {"id": self.meta.get("id"), "object": "chat.completion" if chat else COMPLETION_OBJECT,
                                "created": self.meta.get("created"), "model": self.meta.get("model"),
                                "choices": choices, "usage": self.usage}
        if self.meta.get("system_fingerprint") is not None:
            body["system_fingerprint"] = self.meta["system_fingerprint"]
        return body

    @staticmethod
    def _choice(i: int, ch: _Choice, chat: bool) -> dict[str, Any]:
        text = "".join(ch.pieces)
        out: dict[str, Any] = {"index": i}
        if chat:
            calls = [{"id": c["id"], "type": c["type"] or "function",
                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for _, c in sorted(ch.tool_calls.items())]
            # With tool calls and no text the unstreamed message says content null, as OpenAI does.
            msg: dict[str, Any] = {"role": ch.role or "assistant", "content": text if text or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            out["message"] = msg
        else:
            out["text"] = text
        out["logprobs"] = ch.logprobs
        out["finish_reason"] = ch.finish_reason
        if ch.has_stop_reason:
            out["stop_reason"] = ch.stop_reason
        return out
