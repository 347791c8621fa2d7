"""Per-key rate limits on requests/min and tokens/min, shared by every gateway replica via Redis.

Each limit is a token bucket updated atomically by a Lua script (serve/policies/ratelimit.py
holds the arithmetic). If Redis is unreachable the gateway keeps limiting with in-process buckets
(per replica, so looser) instead of failing requests or letting everything through.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve.policies.ratelimit import LUA_ACQUIRE, LUA_SETTLE, LUA_TAKE, Bucket, Verdict, settle, take

logger = logging.getLogger("llmserve.ratelimit")


@dataclass(frozen=True)
class LimitResult:
    allowed: bool
    limit_name: str  # "requests" | "tokens" (which one refused, or the last checked)
    retry_after_s: float
    headers: dict[str, str]


class RateLimiter:
    def __init__(self, redis_url: str | None, op_timeout_s: float = 0.2, retry_after_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._local: dict[str, Bucket] = {}
        self._slots: dict[str, dict[str, float]] = {}  # per key: slot id -> expiry (without Redis)
        self._redis = None
        self._script: Any = None
        self._settle: Any = None
        self._acquire: Any = None
        self._down_until = 0.0
        self._retry_after_s = retry_after_s
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(redis_url, socket_timeout=op_timeout_s,
                                            socket_connect_timeout=op_timeout_s)
            self._script = self._redis.register_script(LUA_TAKE)
            self._settle = self._redis.register_script(LUA_SETTLE)
            self._acquire = self._redis.register_script(LUA_ACQUIRE)

    def _redis_up(self, now: float) -> bool:
        return self._redis is not None and now >= self._down_until

    def _redis_failed(self, now: float, e: Exception) -> None:
        self._down_until = now + self._retry_after_s
        logger.warning("redis rate limiting failed (%s); limiting per gateway replica for %.0fs",
                       e, self._retry_after_s)

    async def _take(self, bucket_key: str, capacity: float, per_minute: float, cost: float) -> Verdict:
        now = self._clock()
        if self._redis_up(now):
            try:
                allowed, tokens = await self._script(keys=[bucket_key], args=[capacity, per_minute, cost, now])
                tokens = float(tokens)
                rate = per_minute / 60.0
                need = 0.0 if allowed else min(cost, capacity) - tokens
                return Verdict(bool(allowed), tokens, need / rate, (capacity - tokens) / rate)
            except Exception as e:
                self._redis_failed(now, e)
        verdict, self._local[bucket_key] = take(self._local.get(bucket_key), capacity, per_minute, cost, now)
        return verdict

    async def check(self, key_name: str, rpm: int | None, tpm: int | None, tokens: int) -> LimitResult:
        headers: dict[str, str] = {}
        for name, per_minute, cost in (("requests", rpm, 1), ("tokens", tpm, tokens)):
            if per_minute is None:
                continue
            v = await self._take(f"llmserve:rl:{name}:{key_name}", per_minute, per_minute, cost)
            headers[f"x-ratelimit-limit-{name}"] = str(per_minute)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(v.remaining)))
            headers[f"x-ratelimit-reset-{name}"] = f"{v.reset_s:.3f}s"
            if not v.allowed:
                retry = max(1, math.ceil(v.retry_after_s))
                headers["Retry-After"] = str(retry)
                return LimitResult(False, name, v.retry_after_s, headers)
        return LimitResult(True, "", 0.0, headers)

    async def settle(self, key_name: str, tpm: int, delta: float) -> None:
        """Give `delta` tokens back to the key's token bucket (a reservation larger than the usage
        the engine reported); a negative delta charges more."""
        if not delta:
            return
        bucket_key = f"llmserve:rl:tokens:{key_name}"
        now = self._clock()
        if self._redis_up(now):
            try:
                await self._settle(keys=[bucket_key], args=[tpm, tpm, delta, now])
                return
            except Exception as e:
                self._redis_failed(now, e)
        bucket = settle(self._local.get(bucket_key), tpm, tpm, delta, now)
        if bucket is not None:
            self._local[bucket_key] = bucket

    async def acquire(self, key_name: str, limit: int, slot: str, hold_s: float) -> bool:
        """Take one of the key's `limit` concurrency slots for at most `hold_s` (a slot whose
        gateway died is free again then); False when all are taken."""
        slots_key = f"llmserve:conc:{key_name}"
        now = self._clock()
        if self._redis_up(now):
            try:
                return bool(await self._acquire(keys=[slots_key], args=[limit, slot, now + hold_s, now]))
            except Exception as e:
                self._redis_failed(now, e)
        held = {s: t for s, t in self._slots.get(slots_key, {}).items() if t > now}
        if len(held) >= limit:
            self._slots[slots_key] = held
            return False
        held[slot] = now + hold_s
        self._slots[slots_key] = held
        return True

    async def release(self, key_name: str, slot: str) -> None:
        slots_key = f"llmserve:conc:{key_name}"
        self._slots.get(slots_key, {}).pop(slot, None)
        now = self._clock()
        if self._redis_up(now):
            try:
                await self._redis.zrem(slots_key, slot)  # type: ignore[union-attr]
            except Exception as e:
                self._redis_failed(now, e)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
