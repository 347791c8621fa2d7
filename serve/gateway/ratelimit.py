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

from serve.policies.ratelimit import LUA_TAKE, Bucket, Verdict, take

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
        self._redis = None
        self._script = None
        self._down_until = 0.0
        self._retry_after_s = retry_after_s
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(redis_url, socket_timeout=op_timeout_s,
                                            socket_connect_timeout=op_timeout_s)
            self._script = self._redis.register_script(LUA_TAKE)

    async def _take(self, bucket_key: str, capacity: float, per_minute: float, cost: float) -> Verdict:
        now = self._clock()
        if self._script is not None and now >= self._down_until:
            try:
                allowed, tokens = await self._script(keys=[bucket_key], args=[capacity, per_minute, cost, now])
                tokens = float(tokens)
                rate = per_minute / 60.0
                need = 0.0 if allowed else min(cost, capacity) - tokens
                return Verdict(bool(allowed), tokens, need / rate, (capacity - tokens) / rate)
            except Exception as e:
                self._down_until = now + self._retry_after_s
                logger.warning("redis rate limiting failed (%s); limiting per gateway replica for %.0fs",
                               e, self._retry_after_s)
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

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
