"""Head-cache storage: an in-process LRU in front of Redis, namespaced per route, with TTLs.

Redis is what makes the cache shared by every gateway replica and what the batch pipeline fills.
It is optional at run time: if Redis is down the store says so (``redis_up``) and answers misses
from the LRU alone, and it stops trying for ``retry_after_s`` so a dead Redis costs no latency.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger("llmserve.cache")

PREFIX = "llmserve:cache"


@dataclass
class CacheEntry:
    response: dict[str, Any]  # the OpenAI response body (chat.completion or text_completion)
    model: str  # the model that produced it (provenance)
    created_at: float
    batch_id: str | None = None
    route: str = ""

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> CacheEntry:
        return cls(**json.loads(raw))


class LRU:
    def __init__(self, size: int, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, CacheEntry]] = OrderedDict()

    def get(self, key: str) -> CacheEntry | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, entry = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        self._data[key] = (self._clock() + ttl_s, entry)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def drop_prefix(self, prefix: str) -> int:
        keys = [k for k in self._data if k.startswith(prefix)]
        for k in keys:
            del self._data[k]
        return len(keys)

    def __len__(self) -> int:
        return len(self._data)


class HeadCache:
    def __init__(
        self,
        redis_url: str | None,
        lru_size: int = 10_000,
        default_ttl_s: float = 86_400,
        op_timeout_s: float = 0.2,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lru = LRU(lru_size, clock)
        self._ttl = default_ttl_s
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(
                redis_url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s,
                health_check_interval=30,
            )
        self.redis_errors = 0

    @staticmethod
    def full_key(route: str, key: str) -> str:
        return f"{PREFIX}:{route}:{key}"

    @property
    def redis_configured(self) -> bool:
        return self._redis is not None

    @property
    def redis_up(self) -> bool:
        return self._redis is not None and self._clock() >= self._down_until

    def _failed(self, op: str, exc: Exception) -> None:
        self.redis_errors += 1
        self._down_until = self._clock() + self._retry_after_s
        logger.warning("redis %s failed (%s); serving without the shared cache for %.0fs",
                       op, exc, self._retry_after_s)

    async def get(self, route: str, key: str) -> CacheEntry | None:
        fk = self.full_key(route, key)
        entry = self._lru.get(fk)
        if entry is not None or not self.redis_up:
            return entry
        try:
            raw = await self._redis.get(fk)
            ttl = await self._redis.ttl(fk) if raw is not None else -2
        except Exception as e:
            self._failed("get", e)
            return None
        if raw is None:
            return None
        entry = CacheEntry.loads(raw)
        self._lru.put(fk, entry, ttl if ttl > 0 else self._ttl)
        return entry

    async def put(self, route: str, key: str, entry: CacheEntry, ttl_s: float | None = None) -> None:
        await self.put_many(route, [(key, entry)], ttl_s)

    async def put_many(
        self, route: str, items: Iterable[tuple[str, CacheEntry]], ttl_s: float | None = None
    ) -> int:
        """Bulk write (the batch pipeline fills the cache this way). Returns entries written."""
        ttl = ttl_s or self._ttl
        pairs = [(self.full_key(route, k), e) for k, e in items]
        for fk, e in pairs:
            self._lru.put(fk, e, ttl)
        if self.redis_up and pairs:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for fk, e in pairs:
                    pipe.set(fk, e.dumps(), ex=max(1, int(ttl)))
                await pipe.execute()
            except Exception as e:
                self._failed("put", e)
        return len(pairs)

    async def record(self, route: str, hit: bool) -> None:
        """Count a lookup in Redis, so `llmserve cache stats` sees every gateway replica's hit rate."""
        if not self.redis_up:
            return
        try:
            await self._redis.hincrby(f"llmserve:cachestats:{route}", "hits" if hit else "misses", 1)
        except Exception as e:
            self._failed("record", e)

    async def stats(self, route: str) -> dict[str, int]:
        if not self.redis_up:
            return {}
        try:
            raw = await self._redis.hgetall(f"llmserve:cachestats:{route}")
        except Exception as e:
            self._failed("stats", e)
            return {}
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    async def list_keys(self, route: str, limit: int = 10_000) -> list[str]:
        if not self.redis_up:
            return []
        prefix = self.full_key(route, "")
        out: list[str] = []
        try:
            async for k in self._redis.scan_iter(match=prefix + "*", count=500):
                out.append((k.decode() if isinstance(k, bytes) else k)[len(prefix):])
                if len(out) >= limit:
                    break
        except Exception as e:
            self._failed("scan", e)
        return out

    async def invalidate(self, route: str) -> int:
        """Drop every entry of a route's namespace, locally and in Redis."""
        prefix = self.full_key(route, "")
        n = self._lru.drop_prefix(prefix)
        if self.redis_up:
            try:
                keys = [k async for k in self._redis.scan_iter(match=prefix + "*", count=500)]
                if keys:
                    n = max(n, int(await self._redis.delete(*keys)))
            except Exception as e:
                self._failed("invalidate", e)
        return n

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
