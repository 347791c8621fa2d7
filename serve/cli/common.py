"""What several command groups share: an OpenAI client for a running gateway, following a batch to
its end, a Batch API run, and the arguments naming a gateway."""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from typing import Any


def openai_client(args: argparse.Namespace, timeout_s: float = 120) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=args.url, api_key=args.api_key or os.environ.get("LLMSERVE_API_KEY", "none"),
                  max_retries=2, timeout=timeout_s)


def wait_for_batch(client: Any, batch_id: str, timeout_s: float, quiet: bool = False) -> Any:
    """Poll a batch to a final state, with a progress bar of its request counts."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    with tqdm(desc=batch_id, unit="req", disable=quiet) as bar:
        while True:
            b = client.batches.retrieve(batch_id)
            rc = b.request_counts
            if rc is not None:
                bar.total = rc.total or None
                bar.n = rc.completed + rc.failed
                bar.set_postfix(status=b.status, failed=rc.failed)
                bar.refresh()
            if b.status in ("completed", "failed", "expired", "cancelled"):
                return b
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {b.status} after {timeout_s:.0f}s")
            time.sleep(1)


def run_batch(client: Any, lines: list[str], timeout_s: float) -> tuple[str, dict[str, dict[str, Any]]]:
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



def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    """Where a running gateway is, and how long to wait on it."""
    p.add_argument("--url", default=os.environ.get("LLMSERVE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", help="default: $LLMSERVE_API_KEY")
    p.add_argument("--timeout", type=float, default=3600)
