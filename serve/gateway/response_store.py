"""Stored responses (`store`, `previous_response_id`), kept by the gateway, not the engine.

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
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from serve.gateway.errors import APIError

PREFIX = "llmserve:responses:"


def not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")


def input_items(inp: Any) -> list[Any]:
    return [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp)


def output_text_of(item: dict[str, Any]) -> str:
    return "".join(p.get("text") or "" for p in item.get("content") or []
                   if isinstance(p, dict) and p.get("type") == "output_text")


def output_text(body: dict[str, Any]) -> str:
    return "".join(output_text_of(i) for i in body.get("output") or []
                   if isinstance(i, dict) and i.get("type") == "message")


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


def expand(payload: dict[str, Any], record: dict[str, Any] | None) -> tuple[dict[str, Any], list[Any]]:
    """(the request to forward, the whole conversation as input items). The engine gets the whole
    conversation and `store: false`: the gateway, not the engine, keeps state."""
    items = [*(record["items"] if record else []), *input_items(payload.get("input", ""))]
    sent = {k: v for k, v in payload.items() if k != "previous_response_id"}
    sent["input"] = items
    sent["store"] = False
    return sent, items


Record = dict[str, Any]  # {owner, response, items[, request]}


class ResponseStore:
    """Stored responses: {owner, response, items, turns} per id, in Redis (or in this process without
    one, bounded and expiring alike). A background response's record also holds the request it runs
    (`request`). A key's records expire after its own TTL when it has one, never after the gateway's."""

    def __init__(self, redis_url: str | None, ttl_s: float, timeout_s: float = 2.0, *, max_bytes: int = 1 << 20,
                 max_turns: int = 64, max_local: int = 10_000, ttl_by_key: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes, self.max_turns, self.max_local = max_bytes, max_turns, max_local
        self.ttl_by_key = ttl_by_key or {}
        self._clock = clock
        self._local: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (expires at, record)
        self._r: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self._r = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    @property
    def redis(self) -> Any:
        """The Redis client every gateway shares, or None (state in this process only)."""
        return self._r

    def ttl(self, owner: str) -> float:
        return min(self.ttl_s, self.ttl_by_key.get(owner, self.ttl_s))

    async def put(self, rid: str, owner: str, response: dict[str, Any], items: list[Any],
                  request: dict[str, Any] | None = None, turns: int = 1) -> bool:
        """Store a record; False (nothing stored) when it is larger than `max_bytes`."""
        record: Record = {"owner": owner, "response": response, "items": items, "turns": turns}
        if request is not None:
            record["request"] = request
        raw = json.dumps(record, separators=(",", ":"))
        if len(raw) > self.max_bytes:
            return False
        await self._write(rid, raw, self.ttl(owner))
        return True

    async def _write(self, rid: str, raw: str, ttl_s: float | None) -> None:
        """`ttl_s` None: keep the record's expiry as it is."""
        if self._r is None:
            expires = self._local[rid][0] if ttl_s is None and rid in self._local else self._clock() + (ttl_s or 0)
            self._local[rid] = (expires, raw)
            self._local.move_to_end(rid)
            while len(self._local) > self.max_local:
                self._local.popitem(last=False)
        elif ttl_s is None:
            await self._r.set(PREFIX + rid, raw, keepttl=True)
        else:
            await self._r.set(PREFIX + rid, raw, ex=max(1, int(ttl_s)))

    async def record(self, rid: str) -> Record | None:
        """Any owner's record (for the background runner, which runs it as its owner)."""
        if self._r is None:
            held = self._local.get(rid)
            if held is not None and held[0] <= self._clock():
                del self._local[rid]
                held = None
            raw = held[1] if held is not None else None
        else:
            raw = await self._r.get(PREFIX + rid)
        return None if raw is None else dict(json.loads(raw))

    async def get(self, rid: str, owner: str) -> Record:
        """The record of `rid` if `owner` created it; a 404 otherwise (unknown and foreign alike)."""
        record = await self.record(rid)
        if record is None or record.get("owner") != owner:
            raise not_found(rid)
        return record

    async def update(self, rid: str, change: Callable[[Record], Record | None]) -> Record | None:
        """Read, change and write one record atomically (a cancel and the runner's result race);
        `change` returning None leaves it as it is. Returns what was written, or None."""
        if self._r is None:
            current = await self.record(rid)
            new = change(current) if current is not None else None
            if new is not None:
                await self._write(rid, json.dumps(new, separators=(",", ":")), None)
            return new
        from redis.exceptions import WatchError

        key = PREFIX + rid
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    new = change(json.loads(raw)) if raw is not None else None
                    if new is None:
                        await pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.set(key, json.dumps(new, separators=(",", ":")), keepttl=True)
                    await pipe.execute()
                    return new
                except WatchError:
                    continue  # changed between read and write: read again

    async def delete(self, rid: str, owner: str) -> None:
        await self.get(rid, owner)
        if self._r is None:
            self._local.pop(rid, None)
        else:
            await self._r.delete(PREFIX + rid)

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()
