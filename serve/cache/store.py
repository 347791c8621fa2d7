"""Head-cache storage: an in-process LRU in front of Redis, namespaced per route, with TTLs.

Redis is what makes the cache shared by every gateway replica and what the batch pipeline fills.
It is optional at run time: if Redis is down the store says so (``redis_up``) and answers misses
from the LRU alone, and it stops trying for ``retry_after_s`` so a dead Redis costs no latency.

Invalidation reaches every gateway through a per-route generation counter in Redis
(``llmserve:cachegen:<route>``). The generation is part of every entry's key, in Redis and in each
gateway's LRU. `invalidate` increments it (and deletes the old entries); every gateway polls the
generations of the routes it has seen (`follow_invalidations`, one MGET) and drops a route's LRU
entries when its generation moves. Once a gateway has seen a new generation, no lookup can reach
an entry of an older one, and an answer looked up before an invalidation is not stored after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import quote

logger = logging.getLogger("llmserve.cache")

PREFIX = "llmserve:cache"
GEN_PREFIX = "llmserve:cachegen"


@dataclass
class CacheEntry:
    response: dict[str, Any]  # the answer body, without what belonged to the request that made it
    model: str  # the model that produced it: a hit is valid only while the route still serves it
    created_at: float
    batch_id: str | None = None
    route: str = ""
    # The content digest of the weights that produced it (runtime adapters; None for weights the
    # catalog never hashed): a hit is valid only while the model is served from the same weights.
    digest: str | None = None
    # What filling it cost, for entries filled offline (`cache build`): the model's price per million
    # tokens and the batch discount it was billed at ({input_per_million, output_per_million,
    # batch_factor}), and that price times the answer's usage. None: stored online (billed then).
    price: dict[str, float] | None = None
    cost_usd: float | None = None

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> CacheEntry:
        # Fields a newer writer added are ignored: during a rolling upgrade an older gateway still
        # reads the entries a newer `cache build` wrote (the price and cost of a fill, say).
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class LRU:
    """Bounded in entries and in bytes (an entry's size is its stored JSON, measured once when it is
    put): one tenant's long answers cannot grow a gateway's memory past `max_bytes`."""

    def __init__(self, size: int, clock: Callable[[], float] = time.time, max_bytes: int | None = None) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, CacheEntry, int]] = OrderedDict()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CacheEntry | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, entry, _ = item
        if expires <= self._clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        self._drop(key)
        nbytes = len(entry.dumps().encode())
        if self._max_bytes is not None and nbytes > self._max_bytes:
            return  # larger than the whole budget: Redis may keep it, this process does not
        self._data[key] = (self._clock() + ttl_s, entry, nbytes)
        self._bytes += nbytes
        while len(self._data) > self._size or (self._max_bytes is not None and self._bytes > self._max_bytes):
            _, (_, _, n) = self._data.popitem(last=False)
            self._bytes -= n

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._bytes -= item[2]

    def drop_prefix(self, prefix: str) -> int:
        keys = [k for k in self._data if k.startswith(prefix)]
        for k in keys:
            self._drop(k)
        return len(keys)

    def __len__(self) -> int:
        return len(self._data)


def _segment(route: str) -> str:
    """A route's name as one key segment: quoted, so a `:` or a glob character in a name can never
    make one route's keys match another route's prefix or SCAN pattern."""
    return quote(route, safe="")


def _text(k: str | bytes) -> str:
    return k.decode() if isinstance(k, bytes) else k


class HeadCache:
    def __init__(
        self,
        redis_url: str | None,
        lru_size: int = 10_000,
        lru_max_bytes: int | None = None,
        default_ttl_s: float = 86_400,
        op_timeout_s: float = 0.2,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lru = LRU(lru_size, clock, lru_max_bytes)
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
        self._gens: dict[str, int] = {}  # route -> the generation this process last saw
        # (route, key) -> the generation a lookup missed under. An answer computed for that lookup
        # is stored only if the generation has not moved since: an answer that was being computed
        # while someone invalidated the route may be exactly what they meant to drop. Bounded like
        # the LRU: a lookup whose answer is never stored (an error, a bypass) must not leak.
        self._missed: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._missed_cap = lru_size

    @staticmethod
    def full_key(route: str, gen: int, key: str) -> str:
        return f"{PREFIX}:{_segment(route)}:{gen}:{key}"

    @staticmethod
    def gen_key(route: str) -> str:
        return f"{GEN_PREFIX}:{_segment(route)}"

    @staticmethod
    def _route_prefix(route: str) -> str:
        return f"{PREFIX}:{_segment(route)}:"

    @property
    def redis_configured(self) -> bool:
        return self._redis is not None

    @property
    def redis_up(self) -> bool:
        return self._redis is not None and self._clock() >= self._down_until

    def generation(self, route: str) -> int | None:
        """The route's generation as this process last saw it (None: not seen yet)."""
        return self._gens.get(route)

    def _failed(self, op: str, exc: Exception) -> None:
        self.redis_errors += 1
        self._down_until = self._clock() + self._retry_after_s
        logger.warning("redis %s failed (%s); serving without the shared cache for %.0fs",
                       op, exc, self._retry_after_s)

    def _observe(self, route: str, gen: int) -> bool:
        """Adopt a route's generation; on a change drop its LRU entries. Any change counts, not
        only an increase: a Redis that lost its data starts again at 0, and must not leave a
        gateway serving what it held before."""
        if self._gens.get(route) == gen:
            return False
        self._gens[route] = gen
        self._lru.drop_prefix(self._route_prefix(route))
        return True

    def _note_miss(self, route: str, key: str) -> None:
        self._missed[(route, key)] = self._gens.setdefault(route, 0)
        self._missed.move_to_end((route, key))
        while len(self._missed) > self._missed_cap:
            self._missed.popitem(last=False)

    async def _generation(self, route: str) -> int:
        """The route's generation, read from Redis the first time this process meets the route."""
        if route not in self._gens and self.redis_up:
            try:
                self._observe(route, int(await self._redis.get(self.gen_key(route)) or 0))
            except Exception as e:
                self._failed("generation", e)
        return self._gens.setdefault(route, 0)

    async def get(self, route: str, key: str) -> CacheEntry | None:
        gen = self._gens.get(route)
        if gen is not None:
            entry = self._lru.get(self.full_key(route, gen, key))
            if entry is not None:
                return entry
        if not self.redis_up:
            self._note_miss(route, key)
            return None
        for _ in range(2):  # again only when this very lookup found the generation moved
            gen = self._gens.get(route, 0)
            fk = self.full_key(route, gen, key)
            try:
                # One round trip: the generation travels with the entry, so a Redis read is never
                # of an older generation than Redis holds at that moment.
                pipe = self._redis.pipeline(transaction=False)
                pipe.get(self.gen_key(route))
                pipe.get(fk)
                pipe.ttl(fk)
                raw_gen, raw, ttl = await pipe.execute()
                current = int(raw_gen or 0)
            except Exception as e:
                self._failed("get", e)
                self._note_miss(route, key)
                return None
            self._observe(route, current)
            if current == gen:
                break
        else:  # moved again during the second try: a miss under the newest generation
            self._note_miss(route, key)
            return None
        if raw is None:
            self._note_miss(route, key)
            return None
        try:
            entry = CacheEntry.loads(raw)
        except (ValueError, TypeError):  # not an entry this version can read: a miss, not a crash
            self._note_miss(route, key)
            return None
        self._lru.put(fk, entry, ttl if ttl > 0 else self._ttl)
        return entry

    async def put(self, route: str, key: str, entry: CacheEntry, ttl_s: float | None = None) -> None:
        await self.put_many(route, [(key, entry)], ttl_s)

    async def put_many(
        self, route: str, items: Iterable[tuple[str, CacheEntry]], ttl_s: float | None = None
    ) -> int:
        """Bulk write (the batch pipeline fills the cache this way). Returns entries written; an
        answer to a lookup made before the route's last invalidation is not written."""
        ttl = ttl_s or self._ttl
        gen = await self._generation(route)
        pairs = [(self.full_key(route, gen, k), e) for k, e in items
                 if self._missed.pop((route, k), gen) == gen]
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
        return {_text(k): int(v) for k, v in raw.items()}

    async def list_keys(self, route: str, limit: int = 10_000) -> list[str]:
        """The keys of the route's current generation in Redis."""
        if not self.redis_up:
            return []
        prefix = self.full_key(route, await self._generation(route), "")
        out: list[str] = []
        try:
            async for k in self._redis.scan_iter(match=prefix + "*", count=500):
                out.append(_text(k)[len(prefix):])
                if len(out) >= limit:
                    break
        except Exception as e:
            self._failed("scan", e)
        return out

    async def invalidate(self, route: str) -> int:
        """Drop every entry of a route: here at once, in every gateway within one poll interval of
        `follow_invalidations`, and in Redis. Returns the number of entries dropped."""
        prefix = self._route_prefix(route)
        n = self._lru.drop_prefix(prefix)
        try:
            if not self.redis_up:
                raise ConnectionError("redis is down or not configured")
            gen = int(await self._redis.incr(self.gen_key(route)))
        except Exception as e:
            if self._redis is not None:
                self._failed("invalidate", e)
            # Only this process is reached; a new local generation still keeps an answer looked
            # up before now from being stored after it.
            self._gens[route] = self._gens.get(route, 0) + 1
            return n
        self._observe(route, gen)
        keep = f"{prefix}{gen}:"  # written after the increment: already the new generation's
        try:
            old = [k async for k in self._redis.scan_iter(match=prefix + "*", count=500)
                   if not _text(k).startswith(keep)]
            deleted = 0
            for i in range(0, len(old), 1000):
                deleted += int(await self._redis.delete(*old[i:i + 1000]))
            n = max(n, deleted)
        except Exception as e:  # the old generation is unreachable already; its keys expire by TTL
            self._failed("invalidate", e)
        return n

    async def sync_generations(self) -> list[str]:
        """One poll of the generations of every route this process has seen (one MGET); drops the
        LRU entries of each route whose generation moved, and returns those routes."""
        routes = list(self._gens)
        if not routes or not self.redis_up:
            return []
        try:
            raw = await self._redis.mget([self.gen_key(r) for r in routes])
            gens = [int(v or 0) for v in raw]
        except Exception as e:
            self._failed("generations", e)
            return []
        return [r for r, g in zip(routes, gens, strict=True) if self._observe(r, g)]

    async def follow_invalidations(self, interval_s: float = 0.5) -> None:
        """Run for the gateway's life: an invalidation made anywhere reaches this process's LRU
        within `interval_s` (plus one Redis round trip). Returns at once without Redis: then the
        only invalidations are this process's own."""
        if self._redis is None:
            return
        while True:
            await self.sync_generations()
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
