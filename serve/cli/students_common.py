"""What the students commands share: the gateway's client, the lifecycle store, a Batch API run,
and where the gateway serves an adapter from."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serve.cli.common import wait_for_batch
from serve.config import Config, load_config


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=args.url, api_key=args.api_key or os.environ.get("LLMSERVE_API_KEY", "none"),
                  max_retries=2, timeout=300)


def _redis_url(args: argparse.Namespace) -> str:
    url = args.redis_url or load_config(args.config).cache.redis_url
    if not url:
        raise SystemExit("llmserve: the student lifecycle keeps its records in Redis: pass --redis-url")
    return str(url)


@contextlib.asynccontextmanager
async def _store(args: argparse.Namespace) -> AsyncIterator[Any]:
    from serve.students.registry import LifecycleStore

    store = LifecycleStore(_redis_url(args))
    try:
        yield store
    finally:
        await store.close()


def _run_batch(client: Any, lines: list[str], timeout_s: float) -> tuple[str, dict[str, dict[str, Any]]]:
    """Run lines through the gateway's Batch API; returns (batch id, custom_id -> response body)."""
    f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_for_batch(client, b.id, timeout_s)
    out: dict[str, dict[str, Any]] = {}
    if b.output_file_id:
        for raw in client.files.content(b.output_file_id).text.splitlines():
            rec = json.loads(raw)
            if (rec.get("response") or {}).get("status_code") == 200:
                out[rec["custom_id"]] = rec["response"]["body"]
    return b.id, out


def _text(body: dict[str, Any]) -> str:
    from serve.policies.cascade import choice_text

    return choice_text(body["choices"][0]) if body.get("choices") else ""


def _lines(labels: list[dict[str, Any]], model: str) -> list[str]:
    return [json.dumps({"custom_id": lab["id"], "method": "POST", "url": "/v1/chat/completions",
                        "body": {**lab["request"], "model": model}}) for lab in labels]


def _read_labels(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


async def _served(store: Any, config: Config, name: str) -> dict[str, Any] | None:
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


def _digest_or_exit(path: str, prefix: str) -> str:
    from serve.students.registry import AdapterError, adapter_digest

    try:
        return adapter_digest(path)
    except (AdapterError, OSError) as e:
        raise SystemExit(f"{prefix}: {e}") from e
