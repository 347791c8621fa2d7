"""What the students commands share: the lifecycle store, the labels as batch lines and their
answers, and where the gateway serves an adapter from (the client and a Batch API run: cli/common.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serve.config import Config, load_config


def redis_url(args: argparse.Namespace) -> str:
    url = args.redis_url or load_config(args.config).cache.redis_url
    if not url:
        raise SystemExit("llmserve: the student lifecycle keeps its records in Redis: pass --redis-url")
    return str(url)


@contextlib.asynccontextmanager
async def lifecycle_store(args: argparse.Namespace) -> AsyncIterator[Any]:
    from serve.students.registry import LifecycleStore

    store = LifecycleStore(redis_url(args))
    try:
        yield store
    finally:
        await store.close()


def answer_text(body: dict[str, Any]) -> str:
    from serve.policies.cascade import choice_text

    return choice_text(body["choices"][0]) if body.get("choices") else ""


def batch_lines(labels: list[dict[str, Any]], model: str) -> list[str]:
    return [json.dumps({"custom_id": lab["id"], "method": "POST", "url": "/v1/chat/completions",
                        "body": {**lab["request"], "model": model}}) for lab in labels]


def read_labels(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


async def served_adapter(store: Any, config: Config, name: str) -> dict[str, Any] | None:
    """Where the gateway serves adapter `name` from: its runtime registration (a load through the
    gateway, possibly replacing configured weights), else its configuration; None if neither."""
    from serve.students.registry import AdapterError, adapter_digest

    registered = await store.adapter(name)
    if registered is not None:
        return {**registered, "digest": registered.get("digest") or None, "source": "runtime"}
    for m in config.models:
        for a in m.adapters:
            if a.name == name:
                try:
                    digest: str | None = adapter_digest(a.path)
                except (AdapterError, OSError):
                    digest = None  # unreadable here: nothing can be tied to it
                return {"base": m.name, "path": a.path, "digest": digest, "source": "config"}
    return None


def digest_or_exit(path: str, prefix: str) -> str:
    from serve.students.registry import AdapterError, adapter_digest

    try:
        return adapter_digest(path)
    except (AdapterError, OSError) as e:
        raise SystemExit(f"{prefix}: {e}") from e
