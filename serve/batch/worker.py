"""Runs batches on the online engines, at a bounded concurrency so online traffic keeps priority.

Why the online engines and not a separate offline vLLM: on a small cluster a second engine copy
per model doubles memory and start time, while continuous batching already fills idle decode
slots with batch work; capping `batch.concurrency` keeps batch lines from crowding out online
requests. Each finished line is committed to the store before the next is counted, so a killed
worker resumes where it stopped with no line lost or repeated. (`llmserve batch run` is the
server-less path: vLLM's own offline run_batch.)

Every line is sent as its batch's owner, so the owner's rate limits pace the batch. Batches run
side by side and a line waiting for its owner's budget holds no slot: one tenant's throttled
batch never holds up another's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from serve.batch.lines import BadLine, Line, bad_line_record, jsonl, output_record, parse
from serve.batch.store import BatchStore

logger = logging.getLogger("llmserve.batch")

# (owner, url path, request body) -> (HTTP status, response body): the gateway's own request path,
# admitted with the owner's key. A 429 body may carry "retry_after_s" (seconds) as a hint.
Call = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]
MAX_HINT_S = 30.0  # a longer hint is slept in pieces, so a cancel is seen within this


class BatchRunner:
    def __init__(self, store: BatchStore, call: Call, concurrency: int = 4, poll_s: float = 1.0,
                 progress_every: int = 5, retry_s: float = 1.0, max_retries: int = 120,
                 clock: Callable[[], float] = time.time, worker_id: str | None = None,
                 lease_s: float = 60.0) -> None:
        self.store = store
        # A batch is run by the worker holding its lease (renewed every poll): two workers (a
        # replaced replica and its successor, say) never run the same batch twice.
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_s = lease_s
        self.call = call
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.progress_every = progress_every
        self.retry_s = retry_s
        self.max_retries = max_retries
        self.clock = clock
        self._slots = asyncio.Semaphore(concurrency)  # lines in flight, over all batches

    def _wait_s(self, resp: dict[str, Any]) -> float:
        hint = resp.get("retry_after_s") if isinstance(resp, dict) else None
        if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint > 0:
            return min(float(hint), MAX_HINT_S)
        return self.retry_s

    async def _call(self, owner: str, line: Line, batch_id: str, expires_at: float
                    ) -> tuple[int, dict[str, Any]] | None:
        """Answer one line, or None if the batch was cancelled or expired while the line waited.

        429 is the owner's own rate limit: the budget refills, so the line waits for as long as
        the batch may run (until it is cancelled or expires) and never fails for it; a batch
        larger than a minute's budget is the normal case. 503 (no ready replica, overloaded) is
        waited for up to max_retries: a restarting replica is not the line's fault, but a model
        that stays down should fail lines rather than hold the batch for a day."""
        body = {**line.body, "stream": False}
        unavailable = 0
        while True:
            async with self._slots:  # held only while the request is in flight, not while waiting
                try:
                    status, resp = await self.call(owner, line.url, body)
                except Exception as e:  # a failing request goes to the error file; the rest go on
                    status, resp = 500, {"error": {"message": str(e), "code": "batch_worker_error"}}
            if status == 503 and unavailable < self.max_retries:
                unavailable += 1
            elif status != 429:
                return status, resp
            await asyncio.sleep(self._wait_s(resp))
            if self._stopped(batch_id, expires_at):
                return None

    async def run_forever(self) -> None:
        """One task per active batch, so a batch that waits (for its owner's budget, say) does not
        keep batches submitted after it from starting."""
        self._slots = asyncio.Semaphore(self.concurrency)
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    for bid, task in list(running.items()):
                        if task.done():
                            del running[bid]
                            await asyncio.to_thread(self.store.release_batch, bid, self.worker_id)
                            if not task.cancelled() and task.exception() is not None:
                                logger.error("batch %s failed in the worker; retrying", bid,
                                             exc_info=task.exception())
                        elif not await self._claim(bid):
                            logger.warning("batch %s: lease lost to another worker; stopping here", bid)
                            task.cancel()
                    for b in await asyncio.to_thread(self.store.active_batches):
                        if b["id"] not in running and await self._claim(b["id"]):
                            running[b["id"]] = asyncio.create_task(self.process(b["id"]))
                except Exception:
                    logger.exception("batch worker loop failed; retrying")
                await asyncio.sleep(self.poll_s)
        finally:
            for task in running.values():
                task.cancel()

    async def run_once(self) -> bool:
        """Run every active batch to its end, side by side (tests and one-shot tools)."""
        self._slots = asyncio.Semaphore(self.concurrency)
        batches = [b for b in await asyncio.to_thread(self.store.active_batches) if await self._claim(b["id"])]
        try:
            await asyncio.gather(*(self.process(b["id"]) for b in batches))
        finally:
            for b in batches:
                await asyncio.to_thread(self.store.release_batch, b["id"], self.worker_id)
        return bool(batches)

    async def _claim(self, batch_id: str) -> bool:
        return await asyncio.to_thread(self.store.claim_batch, batch_id, self.worker_id, self.lease_s)

    def _cancelled(self, batch_id: str) -> bool:
        b = self.store.get_batch(batch_id, owner=None)
        return b is None or b["status"] in ("cancelling", "cancelled")

    def _stopped(self, batch_id: str, expires_at: float) -> bool:
        return self.clock() > expires_at or self._cancelled(batch_id)

    async def process(self, batch_id: str) -> None:
        s = self.store
        batch = await asyncio.to_thread(s.get_batch, batch_id, owner=None)
        owner = await asyncio.to_thread(s.batch_owner, batch_id)
        if batch is None or owner is None:
            return
        now = int(self.clock())
        if batch["status"] == "cancelling":
            await self._finish(batch_id, owner, "cancelled")
            return
        if batch["status"] in ("validating", "in_progress") and now > batch["expires_at"]:
            await self._finish(batch_id, owner, "expired")
            return
        # Only the owner's own file, even though the API checked at creation.
        content = await asyncio.to_thread(s.file_content, batch["input_file_id"], owner=owner)
        if content is None:
            s.update_batch(batch_id, owner=None, status="failed", failed_at=now,
                           errors={"object": "list", "data": [{"code": "file_not_found", "message":
                                                                "the input file was deleted"}]})
            return
        items = parse(content, batch["endpoint"])
        if batch["status"] == "validating":
            s.update_batch(batch_id, owner=None, status="in_progress", in_progress_at=now,
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
        expires_at = batch["expires_at"]

        async def work() -> None:
            nonlocal finished
            while not todo.empty():
                if self._stopped(batch_id, expires_at):
                    return
                line = todo.get_nowait()
                answer = await self._call(owner, line, batch_id, expires_at)
                if answer is None:  # stopped while waiting: the line stays unanswered
                    return
                status, resp = answer
                ok = 200 <= status < 300
                await asyncio.to_thread(s.put_result, batch_id, line.line_no, line.custom_id, ok,
                                        output_record(line.custom_id, status, resp))
                finished += 1
                if finished % self.progress_every == 0:
                    await self._progress(batch_id)

        await asyncio.gather(*(work() for _ in range(self.concurrency)))
        left = {i.line_no for i in items} - await asyncio.to_thread(s.done_lines, batch_id)
        # Lines are left only when work stopped early: for a cancel, or for the deadline.
        final = "cancelled" if self._cancelled(batch_id) else "expired" if left else "completed"
        await self._finish(batch_id, owner, final)

    async def _progress(self, batch_id: str) -> None:
        ok, bad = await asyncio.to_thread(self.store.result_counts, batch_id)
        self.store.update_batch(batch_id, owner=None, request_counts={"completed": ok, "failed": bad})

    async def _finish(self, batch_id: str, owner: str, final: str) -> None:
        s = self.store
        now = int(self.clock())
        if final == "completed":
            s.update_batch(batch_id, owner=None, status="finalizing", finalizing_at=now)
        ok_records = await asyncio.to_thread(s.results, batch_id, True)
        bad_records = await asyncio.to_thread(s.results, batch_id, False)
        changes: dict[str, Any] = {}
        # Output and error files belong to the batch's owner: nobody else can list or read them.
        if ok_records:
            changes["output_file_id"] = s.put_file(jsonl(ok_records), f"{batch_id}_output.jsonl", "batch_output",
                                                   owner=owner)["id"]
        if bad_records:
            changes["error_file_id"] = s.put_file(jsonl(bad_records), f"{batch_id}_error.jsonl", "batch_output",
                                                  owner=owner)["id"]
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        s.update_batch(batch_id, owner=None, status=final, **{stamp: int(self.clock())},
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

