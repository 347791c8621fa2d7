"""`POST /v1/responses`: forwarded to the engine's own /v1/responses, with the state
(serve/gateway/response_store.py), the cascade signal and the replays the gateway adds."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import MappingProxyType
from typing import Any

from serve.config import TierPrompt
from serve.gateway.answer import Answer
from serve.gateway.background import BackgroundQueue
from serve.gateway.dialects.base import Charge, Conversation, Dialect, EventTap, Keep, View, with_cost
from serve.gateway.dialects.responses_events import ResponsesAssembler, replay
from serve.gateway.errors import APIError, bad_request
from serve.gateway.response_store import ResponseStore, expand, output_as_input, output_text
from serve.gateway.validate import coerce, stream_options_object
from serve.policies.tier_prompt import apply_responses
from serve.sse_events import Event, encode

logger = logging.getLogger("llmserve.responses")

RESPONSES = "/v1/responses"
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _num(payload: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = payload.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
        raise bad_request(f"`{name}` must be a number between {lo} and {hi}.", param=name)


def check_supported(payload: dict[str, Any]) -> None:
    """What this gateway does not do gets a clear 400, not a silent difference."""
    _num(payload, "temperature", 0, 2)
    _num(payload, "top_p", 0, 1)
    bg = payload.get("background")
    if bg is not None and not isinstance(bg, bool):
        raise bad_request("`background` must be a boolean.", param="background")
    if bg and payload.get("store") is False:
        raise bad_request("background can only be used when `store` is true", param="background")
    if bg and payload.get("stream"):
        raise bad_request("A background response is polled (GET /v1/responses/{id}), not streamed; "
                          "send `stream: false`.", param="stream")
    for name in ("conversation", "prompt"):
        if payload.get(name) is not None:
            raise bad_request(f"`{name}` is not supported by this gateway; send the input (and "
                              f"`previous_response_id`) instead.", param=name)
    tools = payload.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise bad_request("`tools` must be a list of tool objects.", param="tools")
        other = sorted({str(t.get("type")) for t in tools} - {"function"})
        if other:
            raise bad_request(f"Only function tools are supported; not {other}.", param="tools")
    include = payload.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) for i in include)):
        raise bad_request("`include` must be a list of strings.", param="include")
    stream_options_object(payload)
    text = payload.get("text")
    if text is not None and not (isinstance(text, dict) and isinstance(text.get("format", {}), (dict, type(None)))):
        raise bad_request("`text` must be an object whose `format` is an object.", param="text")
    inp = payload.get("input")
    if not isinstance(inp, (str, list)):
        raise bad_request("`input` must be a string or a list of input items.", param="input")
    prev = payload.get("previous_response_id")
    if prev is not None and not isinstance(prev, str):
        raise bad_request("`previous_response_id` must be a string.", param="previous_response_id")
    mot = payload.get("max_output_tokens")
    if mot is not None and (not isinstance(mot, int) or isinstance(mot, bool) or mot < 1):
        raise bad_request("`max_output_tokens` must be an integer of at least 1.", param="max_output_tokens")


def finish_reason(body: dict[str, Any]) -> str:
    details = body.get("incomplete_details") or {}
    if body.get("status") == "incomplete" and details.get("reason") == "max_output_tokens":
        return "length"
    return "stop" if body.get("status") == "completed" else str(body.get("status"))


def as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses body as one chat choice, so the cascade policy judges it like chat."""
    tokens: list[dict[str, Any]] = []
    for item in body.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and isinstance(part.get("logprobs"), list):
                    tokens += [t for t in part["logprobs"] if isinstance(t, dict)]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": output_text(body)},
                         "logprobs": {"content": tokens} if tokens else None,
                         "finish_reason": finish_reason(body)}]}


def chat_view_of_request(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a Responses request the cascade policy reads, in chat's names (text.format ->
    response_format), so a json_schema request escalates on a student answer that fails it."""
    fmt = (payload.get("text") or {}).get("format") if isinstance(payload.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {}


def cacheable(body: dict[str, Any]) -> bool:
    """A whole answer the same request would get again: completed, or cut at max_output_tokens
    (as chat's finish_reason "length"); never a failed or cancelled one."""
    status = body.get("status")
    return status == "completed" or (status == "incomplete" and finish_reason(body) == "length")


def fresh_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class ResponsesTap(EventTap):
    """Bills a Responses stream from its final event (which carries the whole response), puts the
    cost into that event, and keeps the whole response for the cache."""

    def __init__(self, charge: Charge, keep: Keep | None, prompt_tokens: int) -> None:
        super().__init__(charge, prompt_tokens)
        self.keep = keep
        self.assembler: ResponsesAssembler | None = ResponsesAssembler()

    def feed(self, chunk: bytes) -> bytes:
        events = self.parser.feed(chunk)
        self.usage.events += sum(ev.event == "response.output_text.delta" for ev in events)
        return b"".join(self._event(ev) for ev in events)

    def _event(self, ev: Event) -> bytes:
        if self.assembler is None:
            return ev.raw
        self.assembler.take(ev)
        if not self.assembler.done:
            return ev.raw
        assembler, self.assembler = self.assembler, None
        cost = self.usage.bill((assembler.final or {}).get("usage"))
        whole = assembler.response()
        if whole is not None and self.keep is not None and cacheable(whole):
            self.keep(whole)  # before the last bytes go out (a client may hang up right after)
        try:
            obj = ev.json() or {}
        except ValueError:
            return ev.raw
        with_cost(obj.get("response") or {}, cost)
        return encode(json.dumps(obj, separators=(",", ":")), ev.event)


async def _tap_final(chunks: AsyncIterator[bytes], on_final: Callable[[dict[str, Any]], Awaitable[Any]]
                     ) -> AsyncIterator[bytes]:
    """Pass a stream through; call `on_final(response)` once response.completed has been seen,
    before the event goes out (a client that hangs up right after still leaves it stored)."""
    assembler = ResponsesAssembler()
    async for chunk in chunks:
        if not assembler.done:
            assembler.feed(chunk)
            final = assembler.response()
            if final is not None:
                await on_final(final)
        yield chunk


class Responses(Dialect):
    path = RESPONSES
    task = "generate"
    cascades = True

    def __init__(self, store: ResponseStore, background: BackgroundQueue) -> None:
        self.store = store
        self.background = background

    def coerce(self, payload: dict[str, Any]) -> bool:
        return coerce(self.path, payload)

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        check_supported(payload)

    def view(self, payload: dict[str, Any]) -> View:
        limit = payload.get("max_output_tokens")
        # A Responses stream always ends with its usage (in response.completed).
        return View(stream=bool(payload.get("stream")), include_usage=True, choices=1,
                    max_output_tokens=limit if isinstance(limit, int) else None,
                    max_tokens_field="max_output_tokens")

    async def deferred(self, payload: dict[str, Any], key: str) -> Answer | None:
        """`background: true`: a queued response now; a runner answers it later
        (serve/gateway/background.py). The id is the gateway's, never the client's."""
        if not payload.get("background"):
            return None
        rid = fresh_id()
        shell = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "queued",
                 "background": True, "model": payload.get("model"), "output": [], "usage": None, "error": None,
                 "incomplete_details": None, "store": True, "instructions": payload.get("instructions"),
                 "max_output_tokens": payload.get("max_output_tokens"), "metadata": payload.get("metadata"),
                 "previous_response_id": payload.get("previous_response_id"), "temperature": payload.get("temperature"),
                 "top_p": payload.get("top_p"), "tools": payload.get("tools") or [],
                 "tool_choice": payload.get("tool_choice", "auto"), "parallel_tool_calls": True,
                 "text": payload.get("text") or {"format": {"type": "text"}}}
        request = {k: v for k, v in payload.items() if k != "request_id"}
        try:
            await self.background.submit(rid, key, request, shell)
        except APIError:
            raise
        except Exception as e:  # Redis unreachable: nothing was queued
            logger.warning("background queue unreachable: %s", e)
            raise APIError(503, "The response store is unavailable; retry shortly.",
                           code="store_unavailable", headers={"Retry-After": "5"}) from e
        return Answer(200, shell)

    async def before(self, payload: dict[str, Any], key: str) -> tuple[dict[str, Any], Conversation | None]:
        """Expand `previous_response_id` from the store (the owner's only) into the whole
        conversation, which is what the route then runs on."""
        prev = payload.get("previous_response_id")
        try:
            record = await self.store.get(prev, key) if prev else None
        except APIError:
            raise
        except Exception as e:  # Redis unreachable: the conversation cannot be continued right now
            logger.warning("response store unreachable: %s", e)
            raise APIError(503, "The response store is unavailable; retry shortly.",
                           code="store_unavailable", headers={"Retry-After": "5"}) from e
        sent, items = expand(payload, record)
        # vLLM names a response after the client's request_id: the gateway's stored ids must be
        # the engine's random ones, never a name a client chose (another key's id, say).
        sent.pop("request_id", None)
        turns = int(record.get("turns", 1)) + 1 if record else 1
        # Bounded state: a chain a key may grow without end would fill the store for every tenant.
        if turns > self.store.max_turns:
            raise bad_request(f"This conversation has reached {self.store.max_turns} turns, the most one "
                              f"previous_response_id chain may have; start a new one.", param="previous_response_id")
        if record is not None and len(json.dumps(items)) > self.store.max_bytes:
            raise bad_request(f"The conversation of `{prev}` is larger than the {self.store.max_bytes} bytes this "
                              f"gateway keeps for one; start a new one.", param="previous_response_id")
        return sent, Conversation(prev, items, payload.get("store", True) is not False, turns)

    async def after(self, conversation: Conversation | None, key: str, answer: Answer) -> Answer:
        """Keep the answer when `store` is true (the default)."""
        if answer.status != 200 or conversation is None:
            return answer
        keep, items = conversation.store, conversation.items

        async def save(body: dict[str, Any]) -> bool:
            try:
                return await self.store.put(str(body.get("id")), key, body, [*items, *output_as_input(body)],
                                            turns=conversation.turns)
            except Exception as e:  # the answer still goes out; only the follow-up turn would fail
                logger.warning("could not store response %s: %s", body.get("id"), e)
                return False

        if answer.body is not None:
            answer.body["previous_response_id"] = conversation.previous_response_id
            answer.body["store"] = keep
            if keep and not await save(answer.body):
                answer.body["store"] = False  # too large to keep (or the store is away): say so
        elif keep and answer.chunks is not None:
            answer.chunks = _tap_final(answer.chunks, save)
        return answer

    def cacheable(self, body: dict[str, Any]) -> bool:
        return cacheable(body)

    def zero_usage(self) -> dict[str, Any]:
        return {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}

    def refresh(self, body: dict[str, Any]) -> None:
        body["id"], body["created_at"] = fresh_id(), int(time.time())

    # What vLLM's ResponsesResponse echoes of the request (`user` is not in the cache key) or made
    # for that run; `previous_response_id` and `store` are the gateway's (`for_request`).
    echoed = MappingProxyType({"user": None, "metadata": None, "safety_identifier": None, "prompt_cache_key": None,
                               "service_tier": "auto", "previous_response_id": None, "store": True})
    run_fields = ("metrics", "kv_transfer_params", "ec_transfer_params")

    def for_request(self, body: dict[str, Any], payload: dict[str, Any], conversation: Conversation | None) -> None:
        super().for_request(body, payload, conversation)
        if conversation is not None:  # the route ran on the expanded conversation, without these
            body["previous_response_id"], body["store"] = conversation.previous_response_id, conversation.store
        if isinstance(body.get("output"), list):  # output item ids are made per response (copied: the
            body["output"] = [  # entry's own items are shared by every hit)
                {**item, "id": f"{item['id'].split('_', 1)[0]}_{uuid.uuid4().hex}"}
                if isinstance(item, dict) and isinstance(item.get("id"), str) else item for item in body["output"]]

    def replay(self, body: dict[str, Any], view: View) -> Iterable[bytes]:
        return replay(body)

    def with_prompt(self, payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
        return apply_responses(payload, prompt)

    def student_request(self, payload: dict[str, Any], view: View, student: str,
                        cap: int | None) -> tuple[dict[str, Any], bool]:
        req = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
        req["model"] = student
        asked = LOGPROBS_INCLUDE in (payload.get("include") or [])
        req["include"] = [*(i for i in req.get("include") or [] if i != LOGPROBS_INCLUDE), LOGPROBS_INCLUDE]
        if cap is not None:
            req["max_output_tokens"] = min(view.max_output_tokens, cap) if view.max_output_tokens else cap
        return req, asked

    def judged(self, payload: dict[str, Any], body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return chat_view_of_request(payload), as_chat(body)

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        for item in body.get("output") or []:
            for part in (item.get("content") or []) if isinstance(item, dict) else []:
                if isinstance(part, dict) and "logprobs" in part:
                    part["logprobs"] = []

    def tap(self, charge: Charge, keep: Keep | None, strip_usage: bool, prompt_tokens: int) -> ResponsesTap:
        return ResponsesTap(charge, keep, prompt_tokens)
