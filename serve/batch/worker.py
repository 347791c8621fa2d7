"""Runs batches on the online engines, at a bounded concurrency so online traffic keeps priority.

Why the online engines and not a separate offline vLLM: on a small cluster a second engine copy
per model doubles memory and start time, while continuous batching already fills idle decode
slots with batch work; capping `batch.concurrency` keeps batch lines from crowding out online
requests. Each finished line is committed to the store before the next is counted, so a killed
worker resumes where it stopped with no line lost or repeated. (`llmserve batch run` is the
server-less path: vLLM's own offline run_batch.)

Every line is sent as its batch's owner, so the owner's rate limits pace the batch. Batches of
different owners run side by side and a line waiting for its owner's budget holds no slot: one
tenant's throttled batch never holds up another's. An input file is read a line at a time, and
an owner's batches run one after another, so the worker's memory does not grow with what one
tenant uploads. Files and finished batches past batch.retention_s are purged here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

from serve.batch.files import ChunkReader
from serve.batch.lines import (
    BadLine,
    Line,
    bad_line_record,
    count_lines,
    jsonl,
    output_record,
    parse_lines,
    read_lines,
    window_hours,
)
from serve.batch.store import BatchStore, EmptyFile

logger = logging.getLogger("llmserve.batch")

# (owner, url path, request body) -> (HTTP status, response body): the gateway's own request path,
# admitted with the owner's key. A 429 body may carry "retry_after_s" (seconds) as a hint.
Call = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]
MAX_HINT_S = 30.0  # a longer hint is slept in pieces, so a cancel is seen within this


class BatchRunner:
    def __init__(self, store: BatchStore, call: Call, concurrency: int = 4, poll_s: float = 1.0,
                 progress_every: int = 5, retry_s: float = 1.0, max_retries: int = 120,
                 clock: Callable[[], float] = time.time, worker_id: str | None = None,
                 lease_s: float = 60.0, max_lines: int = 50_000, max_line_bytes: int = 16 * 1024 * 1024,
                 retention_s: float = 30 * 86400, purge_every_s: float = 300.0) -> None:
        self.store = store
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes  # a longer line is a bad line, never read whole
        self.retention_s = retention_s
        self.purge_every_s = purge_every_s
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

    def _startable(self, batch: dict[str, Any], owner: str | None, busy: set[str]) -> bool:
        """One running batch per owner: a batch is read a line at a time, so what a worker holds
        grows with the owners it serves, not with the batches one tenant submits. A cancel or an
        expiry is only bookkeeping and never waits for the owner's running batch."""
        if owner is None:
            return False
        quick = batch["status"] == "cancelling" or self.clock() > batch["expires_at"]
        return quick or owner not in busy

    async def _purge(self) -> None:
        files, batches = await asyncio.to_thread(self.store.purge, int(self.clock() - self.retention_s))
        if files or batches:
            logger.info("purged %d files and %d batches older than %ds", files, batches, self.retention_s)

    async def run_forever(self) -> None:
        """Batches of different owners run side by side, so a batch that waits (for its owner's
        budget, say) does not keep other owners' batches from starting; an owner's own batches run
        one after another. Expired files and batches are purged every `purge_every_s`."""
        self._slots = asyncio.Semaphore(self.concurrency)
        running: dict[str, tuple[str, asyncio.Task[None]]] = {}  # batch id -> (owner, task)
        next_purge = 0.0
        try:
            while True:
                try:
                    for bid, (_, task) in list(running.items()):
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
                        if b["id"] in running:
                            continue
                        owner = await asyncio.to_thread(self.store.batch_owner, b["id"])
                        busy = {o for o, _ in running.values()}
                        if owner is not None and self._startable(b, owner, busy) and await self._claim(b["id"]):
                            running[b["id"]] = (owner, asyncio.create_task(self.process(b["id"])))
                    if self.clock() >= next_purge:
                        next_purge = self.clock() + self.purge_every_s
                        await self._purge()
                except Exception:
                    logger.exception("batch worker loop failed; retrying")
                await asyncio.sleep(self.poll_s)
        finally:
            for _, task in running.values():
                task.cancel()

    async def run_once(self) -> bool:
        """Run every active batch to its end (tests and one-shot tools): owners side by side, each
        owner's batches one after another, as run_forever does."""
        self._slots = asyncio.Semaphore(self.concurrency)
        by_owner: dict[str, list[str]] = {}
        for b in await asyncio.to_thread(self.store.active_batches):
            owner = await asyncio.to_thread(self.store.batch_owner, b["id"])
            if owner is not None and await self._claim(b["id"]):
                by_owner.setdefault(owner, []).append(b["id"])

        async def in_turn(ids: list[str]) -> None:
            for bid in ids:
                try:
                    await self.process(bid)
                finally:
                    await asyncio.to_thread(self.store.release_batch, bid, self.worker_id)

        await asyncio.gather(*(in_turn(ids) for ids in by_owner.values()))
        return bool(by_owner)

    async def _claim(self, batch_id: str) -> bool:
        return await asyncio.to_thread(self.store.claim_batch, batch_id, self.worker_id, self.lease_s)

    def _cancelled(self, batch_id: str) -> bool:
        b = self.store.get_batch(batch_id, owner=None)
        return b is None or b["status"] in ("cancelling", "cancelled")

    def _stopped(self, batch_id: str, expires_at: float) -> bool:
        return self.clock() > expires_at or self._cancelled(batch_id)

    async def _fail(self, batch_id: str, code: str, message: str) -> None:
        await asyncio.to_thread(self.store.update_batch, batch_id, owner=None, status="failed",
                                failed_at=int(self.clock()),
                                errors={"object": "list", "data": [{"code": code, "message": message}]})

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
        f = await asyncio.to_thread(s.open_file, batch["input_file_id"], owner=owner)
        if f is None:
            await self._fail(batch_id, "file_not_found", "the input file was deleted")
            return
        with f:
            await self._run_lines(batch_id, owner, batch, f)

    async def _run_lines(self, batch_id: str, owner: str, batch: dict[str, Any], f: BinaryIO) -> None:
        """Stream the input file: each line is read when a slot is free for it, never the whole
        file (an upload may be 200 MB); only the line numbers already done are held."""
        s = self.store
        if batch["status"] == "validating":
            total = await asyncio.to_thread(count_lines, f, self.max_line_bytes)
            if total > self.max_lines:
                await self._fail(batch_id, "too_many_requests",
                                 f"the input file has {total} requests; a batch may have at most {self.max_lines}")
                return
            f.seek(0)
            s.update_batch(batch_id, owner=None, status="in_progress", in_progress_at=int(self.clock()),
                           request_counts={"total": total, "completed": 0, "failed": 0})
        done = await asyncio.to_thread(s.done_lines, batch_id)
        items = parse_lines(read_lines(f, self.max_line_bytes), batch["endpoint"])
        reading = asyncio.Lock()  # one reader of the file at a time; the generator is not reentrant
        seen = 0  # items read so far (every one must be answered for the batch to complete)
        finished = 0
        expires_at = batch["expires_at"]

        async def next_line() -> Line | None:
            nonlocal seen
            async with reading:
                while (item := await asyncio.to_thread(next, items, None)) is not None:
                    seen += 1
                    if item.line_no in done:
                        continue
                    if isinstance(item, BadLine):  # bad lines go straight to the error file
                        await asyncio.to_thread(s.put_result, batch_id, item.line_no, item.custom_id, False,
                                                bad_line_record(item))
                        continue
                    return item
                return None

        async def work() -> None:
            nonlocal finished
            while not self._stopped(batch_id, expires_at) and (line := await next_line()) is not None:
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
        read_all = await asyncio.to_thread(next, items, None) is None
        left = not read_all or len(await asyncio.to_thread(s.done_lines, batch_id)) < seen
        # Lines are left only when work stopped early: for a cancel, or for the deadline.
        final = "cancelled" if self._cancelled(batch_id) else "expired" if left else "completed"
        await self._finish(batch_id, owner, final)

    async def _progress(self, batch_id: str) -> None:
        ok, bad = await asyncio.to_thread(self.store.result_counts, batch_id)
        self.store.update_batch(batch_id, owner=None, request_counts={"completed": ok, "failed": bad})

    def _write_records(self, batch_id: str, owner: str, ok: bool, name: str) -> str | None:
        """The batch's ok or failed records as one of the owner's files, streamed from the store
        page by page; None when there are none."""
        chunks = (jsonl([r]) for r in self.store.iter_results(batch_id, ok))
        try:
            return str(self.store.put_file_stream(ChunkReader(chunks), name, "batch_output",  # type: ignore[arg-type]
                                                  owner=owner)["id"])
        except EmptyFile:
            return None

    async def _finish(self, batch_id: str, owner: str, final: str) -> None:
        s = self.store
        now = int(self.clock())
        if final == "completed":
            s.update_batch(batch_id, owner=None, status="finalizing", finalizing_at=now)
        ok, bad = await asyncio.to_thread(s.result_counts, batch_id)
        changes: dict[str, Any] = {}
        # Output and error files belong to the batch's owner: nobody else can list or read them.
        for field, is_ok, suffix in (("output_file_id", True, "output"), ("error_file_id", False, "error")):
            fid = await asyncio.to_thread(self._write_records, batch_id, owner, is_ok, f"{batch_id}_{suffix}.jsonl")
            if fid is not None:
                changes[field] = fid
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        s.update_batch(batch_id, owner=None, status=final, **{stamp: int(self.clock())},
                       request_counts={"completed": ok, "failed": bad}, **changes)
        # The files hold the records now: keeping the rows too would count them twice to the quota.
        await asyncio.to_thread(s.drop_results, batch_id)
        logger.info("batch %s %s: %d ok, %d failed", batch_id, final, ok, bad)


def new_batch(batch_id: str, input_file_id: str, endpoint: str, completion_window: str,
              metadata: dict[str, Any] | None) -> dict[str, Any]:
    now = int(time.time())
    hours = window_hours(completion_window) or 24
    return {
        "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
        "completion_window": completion_window, "status": "validating", "output_file_id": None,
        "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + hours * 3600,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
    }

