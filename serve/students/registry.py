"""Where the student lifecycle keeps its state: Redis, shared by every gateway replica.

- evals:      llmserve:evals:<adapter>           newest-first list of evaluation records (with digest)
- adapters:   llmserve:adapters                  adapter name -> {base, path, digest}: loaded at runtime
- overrides:  llmserve:routes:overrides          route -> {"student"|"target": model[, "min_mean_logprob": t]}
- promotions: llmserve:routes:promotions:<route> newest-first stack of promotions not rolled back
- history:    llmserve:routes:history:<route>    newest-first list of every change
Gateways poll adapters and overrides with their replica discovery and swap routes atomically.

An adapter is known by its content digest, not its name: an evaluation records the digest of the
weights it scored and a promotion may only load weights with that digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

EVALS = "llmserve:evals:"
CALIBRATIONS = "llmserve:calibrations:"
ADAPTERS = "llmserve:adapters"
OVERRIDES = "llmserve:routes:overrides"
PROMOTIONS = "llmserve:routes:promotions:"
HISTORY = "llmserve:routes:history:"
# The cascade threshold a promotion may carry with its student (`students promote --threshold`):
# calibrated for that student, it stands and falls with the promotion.
THRESHOLD = "min_mean_logprob"


class AdapterError(ValueError):
    """A path that is not a PEFT adapter directory."""


def adapter_digest(path: str | os.PathLike[str]) -> str:
    """sha256 over every file of an adapter directory: each file's relative path, size and bytes,
    in sorted path order, so renaming, adding or changing any file (weights or adapter_config.json)
    changes the digest, and copying the directory elsewhere does not."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{path} is not a directory")
    if not (root / "adapter_config.json").is_file():
        raise AdapterError(f"{path} has no adapter_config.json: not a PEFT adapter directory")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root).as_posix().encode()
        # Length-prefixed fields: no two different trees can feed the hash the same byte stream.
        h.update(len(rel).to_bytes(8, "big") + rel + f.stat().st_size.to_bytes(8, "big"))
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


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

    async def record_calibration(self, adapter: str, record: dict[str, Any]) -> None:
        await self._r.lpush(CALIBRATIONS + adapter, json.dumps({**record, "adapter": adapter, "at": time.time()}))

    async def latest_calibration(self, adapter: str) -> dict[str, Any] | None:
        raw = await self._r.lindex(CALIBRATIONS + adapter, 0)
        return json.loads(raw) if raw else None

    # ---- adapters and routes -------------------------------------------------------------------
    async def register_adapter(self, name: str, base: str, path: str, digest: str) -> None:
        await self._r.hset(ADAPTERS, name, json.dumps({"base": base, "path": path, "digest": digest}))

    async def adapters(self) -> dict[str, dict[str, str]]:
        return {_s(k): json.loads(v) for k, v in (await self._r.hgetall(ADAPTERS)).items()}

    async def adapter(self, name: str) -> dict[str, str] | None:
        raw = await self._r.hget(ADAPTERS, name)
        return json.loads(raw) if raw else None

    async def overrides(self) -> dict[str, dict[str, str]]:
        return {_s(k): json.loads(v) for k, v in (await self._r.hgetall(OVERRIDES)).items()}

    async def history(self, route: str, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(x) for x in await self._r.lrange(HISTORY + route, 0, limit - 1)]

    async def promotions(self, route: str) -> list[dict[str, Any]]:
        """Promotions of `route` that a rollback would undo, newest first."""
        return [json.loads(x) for x in await self._r.lrange(PROMOTIONS + route, 0, -1)]

    async def promote(self, route: str, field: str, model: str, previous: str, reason: str,
                      digest: str | None = None, settings: dict[str, Any] | None = None,
                      evidence: dict[str, Any] | None = None) -> None:
        """Point a route's `field` (student or target) at `model`, with `settings` that belong to
        it (the cascade threshold calibrated for a student); remember what it replaced (the route's
        override, or none: the configured value) so a rollback restores exactly that."""
        from redis.exceptions import WatchError

        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # Watched: a concurrent promote or rollback makes this one retry on fresh state.
                    await pipe.watch(OVERRIDES, PROMOTIONS + route)
                    raw = await pipe.hget(OVERRIDES, route)
                    entry = {"at": time.time(), "action": "promote", "field": field, "from": previous, "to": model,
                             "reason": reason, "digest": digest, "settings": settings or {},
                             "evidence": evidence or {}}  # the gate's verdict and the calibration, recorded
                    pushed = {**entry, "override_before": json.loads(raw) if raw else None}
                    pipe.multi()
                    pipe.hset(OVERRIDES, route, json.dumps({field: model, **(settings or {})}))
                    pipe.lpush(PROMOTIONS + route, json.dumps(pushed))
                    pipe.lpush(HISTORY + route, json.dumps(entry))
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def rollback(self, route: str) -> dict[str, Any] | None:
        """Undo the newest promotion still in force and drop it from the stack, so the next rollback
        undoes the one before. None when there is nothing left to undo."""
        from redis.exceptions import WatchError

        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(OVERRIDES, PROMOTIONS + route)
                    raw = await pipe.lindex(PROMOTIONS + route, 0)
                    if raw is None:
                        await pipe.unwatch()
                        return None
                    last = json.loads(raw)
                    entry = {"at": time.time(), "action": "rollback", "field": last["field"], "from": last["to"],
                             "to": last["from"], "reason": f"rollback of the promotion of {last['to']}"}
                    pipe.multi()
                    pipe.lpop(PROMOTIONS + route)
                    if last["override_before"] is None:  # the route goes back to its configured value
                        pipe.hdel(OVERRIDES, route)
                    else:
                        pipe.hset(OVERRIDES, route, json.dumps(last["override_before"]))
                    pipe.lpush(HISTORY + route, json.dumps(entry))
                    await pipe.execute()
                    return dict(last)
                except WatchError:
                    continue


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
