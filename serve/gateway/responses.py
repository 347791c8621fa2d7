"""The Responses API (`POST /v1/responses`): forwarded to the engine's own /v1/responses, with the
state, the cascade signal and the replays the gateway adds.

Why the gateway keeps the state: vLLM stores responses in the engine *process* (and only with
VLLM_ENABLE_RESPONSES_API_STORE), so `previous_response_id` fails as soon as the next turn lands on
another replica, another gateway, or a restarted engine. Here a stored response is kept in Redis
(shared by every gateway, with a TTL and its owner's key name); a request naming
`previous_response_id` is expanded into the conversation's input items before it is forwarded with
`store: false`, so any replica of any model in the route can answer it, and the head cache keys on
the whole conversation. Another key's response id is a 404, exactly like an unknown one.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from serve.gateway.errors import APIError, bad_request

logger = logging.getLogger("llmserve.responses")

RESPONSES = "/v1/responses"
PREFIX = "llmserve:responses:"
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")


def check_supported(payload: dict[str, Any]) -> None:
    """What this gateway does not do gets a clear 400, not a silent difference."""
    if payload.get("background"):
        raise bad_request("`background` responses are not supported by this gateway.", param="background")
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
    inp = payload.get("input")
    if not isinstance(inp, (str, list)):
        raise bad_request("`input` must be a string or a list of input items.", param="input")
    prev = payload.get("previous_response_id")
    if prev is not None and not isinstance(prev, str):
        raise bad_request("`previous_response_id` must be a string.", param="previous_response_id")
    mot = payload.get("max_output_tokens")
    if mot is not None and (not isinstance(mot, int) or isinstance(mot, bool) or mot < 1):
        raise bad_request("`max_output_tokens` must be an integer of at least 1.", param="max_output_tokens")


def input_items(inp: Any) -> list[Any]:
    return [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp)


def output_as_input(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A response's output items in the form the next turn's `input` takes them."""
    items: list[dict[str, Any]] = []
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            items.append({"role": "assistant", "content": output_text_of(item)})
        elif item.get("type") == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments") if k in item})
    return items


def output_text_of(item: dict[str, Any]) -> str:
    return "".join(p.get("text") or "" for p in item.get("content") or []
                   if isinstance(p, dict) and p.get("type") == "output_text")


def output_text(body: dict[str, Any]) -> str:
    return "".join(output_text_of(i) for i in body.get("output") or []
                   if isinstance(i, dict) and i.get("type") == "message")


class ResponseStore:
    """Stored responses: {owner, response, items} per id, in Redis (or in this process without one)."""

    def __init__(self, redis_url: str | None, ttl_s: float, timeout_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._local: dict[str, str] = {}
        self._r: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self._r = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def put(self, rid: str, owner: str, response: dict[str, Any], items: list[Any]) -> None:
        raw = json.dumps({"owner": owner, "response": response, "items": items}, separators=(",", ":"))
        if self._r is None:
            self._local[rid] = raw
            return
        await self._r.set(PREFIX + rid, raw, ex=max(1, int(self.ttl_s)))

    async def get(self, rid: str, owner: str) -> dict[str, Any]:
        """The record of `rid` if `owner` created it; a 404 otherwise (unknown and foreign alike)."""
        raw = self._local.get(rid) if self._r is None else await self._r.get(PREFIX + rid)
        if raw is None:
            raise _not_found(rid)
        record: dict[str, Any] = json.loads(raw)
        if record.get("owner") != owner:
            raise _not_found(rid)
        return record

    async def delete(self, rid: str, owner: str) -> None:
        await self.get(rid, owner)
        if self._r is None:
            self._local.pop(rid, None)
        else:
            await self._r.delete(PREFIX + rid)

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()


def expand(payload: dict[str, Any], record: dict[str, Any] | None) -> tuple[dict[str, Any], list[Any]]:
    """(the request to forward, the whole conversation as input items). The engine gets the whole
    conversation and `store: false`: the gateway, not the engine, keeps state."""
    items = [*(record["items"] if record else []), *input_items(payload.get("input", ""))]
    sent = {k: v for k, v in payload.items() if k != "previous_response_id"}
    sent["input"] = items
    sent["store"] = False
    return sent, items


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


def student_request(payload: dict[str, Any], student: str, max_tokens: int) -> dict[str, Any]:
    """The student's call: not streamed, with the output logprobs the cascade decides on."""
    req = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    req["model"] = student
    include = [i for i in req.get("include") or [] if i != LOGPROBS_INCLUDE]
    req["include"] = [*include, LOGPROBS_INCLUDE]
    asked = payload.get("max_output_tokens")
    req["max_output_tokens"] = min(asked, max_tokens) if isinstance(asked, int) else max_tokens
    return req


def strip_logprobs(body: dict[str, Any]) -> None:
    for item in body.get("output") or []:
        for part in (item.get("content") or []) if isinstance(item, dict) else []:
            if isinstance(part, dict) and "logprobs" in part:
                part["logprobs"] = []


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
        self._buf = b""
        self.final: dict[str, Any] | None = None
        self.kind = ""

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while b"\n\n" in self._buf:
            event, self._buf = self._buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                try:
                    obj = json.loads(line[6:])
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("type") in self.FINAL and isinstance(obj.get("response"), dict):
                    self.kind, self.final = obj["type"], obj["response"]

    @property
    def done(self) -> bool:
        return self.final is not None

    def response(self) -> dict[str, Any] | None:
        return self.final if self.kind == "response.completed" else None


def cacheable(body: dict[str, Any]) -> bool:
    """A whole answer the same request would get again: completed, or cut at max_output_tokens
    (as chat's finish_reason "length"); never a failed or cancelled one."""
    status = body.get("status")
    return status == "completed" or (status == "incomplete" and finish_reason(body) == "length")


def fresh_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


async def tap_final(chunks: AsyncIterator[bytes], on_final: Any) -> AsyncIterator[bytes]:
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


async def run(store: ResponseStore, owner: str, payload: dict[str, Any],
              route: Any) -> Any:  # route: (payload) -> Awaitable[Answer]; returns the Answer
    """One Responses request: expand `previous_response_id` from the store (the owner's only), run
    the route on the whole conversation, and keep the answer when `store` is true (the default)."""
    from serve.gateway.answer import Answer

    prev = payload.get("previous_response_id")
    try:
        record = await store.get(prev, owner) if prev else None
    except APIError as e:
        return Answer.error(e)
    except Exception as e:  # Redis unreachable: the conversation cannot be continued right now
        logger.warning("response store unreachable: %s", e)
        return Answer.error(APIError(503, "The response store is unavailable; retry shortly.",
                                     code="store_unavailable", headers={"Retry-After": "5"}))
    sent, items = expand(payload, record)
    answer = await route(sent)
    keep = payload.get("store", True) is not False
    if answer.status != 200:
        return answer

    async def save(body: dict[str, Any]) -> None:
        try:
            await store.put(str(body.get("id")), owner, body, [*items, *output_as_input(body)])
        except Exception as e:  # the answer still goes out; only the follow-up turn would fail
            logger.warning("could not store response %s: %s", body.get("id"), e)

    if answer.body is not None:
        answer.body["previous_response_id"] = prev
        answer.body["store"] = keep
        if keep:
            await save(answer.body)
    elif keep and answer.chunks is not None:
        answer.chunks = tap_final(answer.chunks, save)
    return answer
