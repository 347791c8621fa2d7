"""Runs batches on the online engines, at a bounded concurrency so online traffic keeps priority.

Why the online engines and not a separate offline vLLM: on a small cluster a second engine copy
per model doubles memory and start time, while continuous batching already fills idle decode
slots with batch work; capping `batch.concurrency` keeps batch lines from crowding out online
requests. Each finished line is committed to the store before the next is counted, so a killed
worker resumes where it stopped with no line lost or repeated. (`llmserve batch run` is the
server-less path: vLLM's own offline run_batch.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serve.batch.lines import BadLine, Line, bad_line_record, jsonl, output_record, parse
from serve.batch.store import BatchStore

logger = logging.getLogger("llmserve.batch")

# (url path, request body) -> (HTTP status, response body). The gateway's own request path.
Call = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


class BatchRunner:
    def __init__(self, store: BatchStore, call: Call, concurrency: int = 4, poll_s: float = 1.0,
                 progress_every: int = 5, retry_s: float = 1.0, max_retries: int = 120) -> None:
        self.store = store
        self.call = call
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.progress_every = progress_every
        self.retry_s = retry_s
        self.max_retries = max_retries

    async def _call(self, line: Line) -> tuple[int, dict[str, Any]]:
        """Answer one line. Busy or not-yet-ready engines (429/503) are waited for, not failed:
        a batch has hours, and a restarting replica is not the line's fault."""
        body = {**line.body, "stream": False}
        for attempt in range(self.max_retries + 1):
            try:
                status, resp = await self.call(line.url, body)
            except Exception as e:  # a failing request goes to the error file; the rest go on
                status, resp = 500, {"error": {"message": str(e), "code": "batch_worker_error"}}
            if status not in (429, 503) or attempt == self.max_retries:
                return status, resp
            await asyncio.sleep(self.retry_s)
        raise AssertionError("unreachable")

    async def run_forever(self) -> None:
        while True:
            try:
                worked = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("batch worker loop failed; retrying")
                worked = False
            if not worked:
                await asyncio.sleep(self.poll_s)

    async def run_once(self) -> bool:
        batches = await asyncio.to_thread(self.store.active_batches)
        for b in batches:
            await self.process(b["id"])
        return bool(batches)

    def _cancelled(self, batch_id: str) -> bool:
        b = self.store.get_batch(batch_id)
        return b is None or b["status"] in ("cancelling", "cancelled")

    async def process(self, batch_id: str) -> None:
        s = self.store
        batch = await asyncio.to_thread(s.get_batch, batch_id)
        if batch is None:
            return
        now = int(time.time())
        if batch["status"] == "cancelling":
            await self._finish(batch_id, "cancelled")
            return
        if batch["status"] in ("validating", "in_progress") and now > batch["expires_at"]:
            await self._finish(batch_id, "expired")
            return
        content = await asyncio.to_thread(s.file_content, batch["input_file_id"])
        if content is None:
            s.update_batch(batch_id, status="failed", failed_at=now,
                           errors={"object": "list", "data": [{"code": "file_not_found", "message":
                                                                "the input file was deleted"}]})
            return
        items = parse(content, batch["endpoint"])
        if batch["status"] == "validating":
            s.update_batch(batch_id, status="in_progress", in_progress_at=now,
                           request_counts={"total": len(items), "completed": 0, "failed": 0})
        done = await asyncio.to_thread(s.done_lines, batch_id)
        for item in items:  # bad lines go straight to the error file
            if isinstance(item, BadLine) and item.line_no not in done:
                s.put_result(batch_id, item.line_no, item.custom_id, False, bad_line_record(item))
        todo: asyncio.Queue[Line] = asyncio.Queue()
        for item in items:
            if isinstance(item, Line) and item.line_no not in done:
                todo.put_nowait(item)
        finished = 0

        async def work() -> None:
            nonlocal finished
            while not todo.empty():
                if self._cancelled(batch_id):
                    return
                line = todo.get_nowait()
                status, resp = await self._call(line)
                ok = 200 <= status < 300
                await asyncio.to_thread(s.put_result, batch_id, line.line_no, line.custom_id, ok,
                                        output_record(line.custom_id, status, resp))
                finished += 1
                if finished % self.progress_every == 0:
                    await self._progress(batch_id)

        await asyncio.gather(*(work() for _ in range(self.concurrency)))
        await self._finish(batch_id, "cancelled" if self._cancelled(batch_id) else "completed")

    async def _progress(self, batch_id: str) -> None:
        ok, bad = await asyncio.to_thread(self.store.result_counts, batch_id)
        self.store.update_batch(batch_id, request_counts={"completed": ok, "failed": bad})

    async def _finish(self, batch_id: str, final: str) -> None:
        s = self.store
        now = int(time.time())
        if final == "completed":
            s.update_batch(batch_id, status="finalizing", finalizing_at=now)
        ok_records = await asyncio.to_thread(s.results, batch_id, True)
        bad_records = await asyncio.to_thread(s.results, batch_id, False)
        changes: dict[str, Any] = {}
        if ok_records:
            changes["output_file_id"] = s.put_file(jsonl(ok_records), f"{batch_id}_output.jsonl", "batch_output")["id"]
        if bad_records:
            changes["error_file_id"] = s.put_file(jsonl(bad_records), f"{batch_id}_error.jsonl", "batch_output")["id"]
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        s.update_batch(batch_id, status=final, **{stamp: int(time.time())},
                       request_counts={"completed": len(ok_records), "failed": len(bad_records)}, **changes)
        logger.info("batch %s %s: %d ok, %d failed", batch_id, final, len(ok_records), len(bad_records))


def new_batch(batch_id: str, input_file_id: str, endpoint: str, completion_window: str,
              metadata: dict[str, Any] | None) -> dict[str, Any]:
    now = int(time.time())
    hours = int(completion_window.rstrip("h")) if completion_window.rstrip("h").isdigit() else 24
    return {
        "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
        "completion_window": completion_window, "status": "validating", "output_file_id": None,
        "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + hours * 3600,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
    }


def response_json(resp: Any) -> tuple[int, dict[str, Any]]:
    """(status, body) of a Starlette response the gateway produced."""
    body = getattr(resp, "body", b"") or b"{}"
    try:
        return resp.status_code, json.loads(body)
    except ValueError:
        return resp.status_code, {"error": {"message": body.decode("utf-8", "replace")[:500]}}
