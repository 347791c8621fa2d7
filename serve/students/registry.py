"""Where the student lifecycle keeps its state: Redis, shared by every gateway replica.

- evals:      llmserve:evals:<adapter>        newest-first list of evaluation records
- adapters:   llmserve:adapters               adapter name -> {base, path}: loaded at runtime
- overrides:  llmserve:routes:overrides       route -> {"student"|"target": model}
- history:    llmserve:routes:history:<route> newest-first list of every change
Gateways poll adapters and overrides with their replica discovery and swap routes atomically.
"""

from __future__ import annotations

import json
import time
from typing import Any

EVALS = "llmserve:evals:"
ADAPTERS = "llmserve:adapters"
OVERRIDES = "llmserve:routes:overrides"
HISTORY = "llmserve:routes:history:"


class LifecycleStore:
    def __init__(self, redis_url: str, timeout_s: float = 5.0) -> None:
        import redis.asyncio as aioredis

        self._r = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def close(self) -> None:
        await self._r.aclose()

    # ---- evaluations ---------------------------------------------------------------------------
    async def record_eval(self, adapter: str, record: dict[str, Any]) -> None:
        await self._r.lpush(EVALS + adapter, json.dumps({**record, "adapter": adapter, "at": time.time()}))

    async def latest_eval(self, adapter: str) -> dict[str, Any] | None:
        raw = await self._r.lindex(EVALS + adapter, 0)
        return json.loads(raw) if raw else None

    # ---- adapters and routes -------------------------------------------------------------------
    async def register_adapter(self, name: str, base: str, path: str) -> None:
        await self._r.hset(ADAPTERS, name, json.dumps({"base": base, "path": path}))

    async def adapters(self) -> dict[str, dict[str, str]]:
        return {_s(k): json.loads(v) for k, v in (await self._r.hgetall(ADAPTERS)).items()}

    async def overrides(self) -> dict[str, dict[str, str]]:
        return {_s(k): json.loads(v) for k, v in (await self._r.hgetall(OVERRIDES)).items()}

    async def history(self, route: str, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(x) for x in await self._r.lrange(HISTORY + route, 0, limit - 1)]

    async def move(self, route: str, field: str, model: str, previous: str, action: str, reason: str) -> None:
        """Point a route's `field` (student or target) at `model`, and record the change."""
        entry = {"at": time.time(), "action": action, "field": field, "from": previous, "to": model,
                 "reason": reason}
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(OVERRIDES, route, json.dumps({field: model}))
        pipe.lpush(HISTORY + route, json.dumps(entry))
        await pipe.execute()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
