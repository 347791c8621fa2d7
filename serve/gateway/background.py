"""Background responses (`POST /v1/responses` with `background: true`): answered at once with a
`queued` response, run later where batch lines run, polled with `GET /v1/responses/{id}`,
cancelled with `POST /v1/responses/{id}/cancel`.

The state is the stored response (serve/gateway/response_store.py, in Redis: any gateway answers a
poll or a cancel), whose `status` moves queued -> in_progress -> completed | failed | cancelled;
the queue is a Redis list every runner takes from. A runner runs the request as its owner, through
the same service as any request (serve/gateway/service.py `call_as`), and watches the record while
it runs: a cancel on any gateway stops it (the engine aborts a request whose connection closes).
Without Redis the state lives in one gateway process, which then runs its own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serve.gateway.errors import APIError
from serve.gateway.response_store import Record, ResponseStore, expand, output_as_input

logger = logging.getLogger("llmserve.background")

QUEUE = "llmserve:responses:queue"
RESPONSES = "/v1/responses"
PENDING = ("queued", "in_progress")
# (owner, path, body, prepaid) -> (status, body): a request run as its owner's.
Call = Callable[[str, str, dict[str, Any], bool], Awaitable[tuple[int, dict[str, Any]]]]


class BackgroundQueue:
    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self._local: asyncio.Queue[str] = asyncio.Queue()  # without Redis: this process's queue

    async def submit(self, rid: str, owner: str, request: dict[str, Any], shell: dict[str, Any]) -> None:
        if not await self.store.put(rid, owner, shell, [], request=request):
            raise APIError(400, f"The request is larger than the {self.store.max_bytes} bytes a background "
                                f"response may keep.", param="input")
        if self.store.redis is None:
            self._local.put_nowait(rid)
        else:
            await self.store.redis.rpush(QUEUE, rid)

    async def take(self, timeout_s: float) -> str | None:
        if self.store.redis is None:
            try:
                return await asyncio.wait_for(self._local.get(), timeout_s)
            except asyncio.TimeoutError:
                return None
        got = await self.store.redis.blpop([QUEUE], timeout=timeout_s)
        return None if got is None else (got[1].decode() if isinstance(got[1], bytes) else str(got[1]))

    async def cancel(self, rid: str, owner: str) -> dict[str, Any]:
        """Cancel a queued or running background response of `owner` (vLLM's rules: a synchronous
        response cannot be cancelled; a finished one is returned as it is)."""
        record = await self.store.get(rid, owner)
        if "request" not in record:
            raise APIError(400, "Cannot cancel a synchronous response.", param="response_id")

        def cancelled(r: Record) -> Record | None:
            if r["response"].get("status") not in PENDING:
                return None
            return {**r, "response": {**r["response"], "status": "cancelled"}}

        changed = await self.store.update(rid, cancelled)
        final = changed if changed is not None else await self.store.get(rid, owner)
        body: dict[str, Any] = final["response"]
        return body


class BackgroundRunner:
    """Takes queued background responses and runs them, `concurrency` at a time."""

    def __init__(self, queue: BackgroundQueue, call: Call, concurrency: int = 4, poll_s: float = 0.5) -> None:
        self.queue = queue
        self.store = queue.store
        self.call = call
        self.poll_s = poll_s
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run_forever(self) -> None:
        try:
            while True:
                await self._slots.acquire()
                try:
                    rid = await self.queue.take(1.0)
                except asyncio.CancelledError:
                    raise
                except Exception:  # Redis away: try again shortly, as every other Redis user does
                    logger.warning("background queue unreachable", exc_info=True)
                    rid = None
                    await asyncio.sleep(1.0)
                if rid is None:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run_released(rid))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _run_released(self, rid: str) -> None:
        try:
            await self.run_one(rid)
        except Exception:
            logger.exception("background response %s failed", rid)
        finally:
            self._slots.release()

    async def run_one(self, rid: str) -> None:
        def start(r: Record) -> Record | None:
            if r["response"].get("status") != "queued":
                return None  # cancelled before it started (or taken twice)
            return {**r, "response": {**r["response"], "status": "in_progress"}}

        record = await self.store.update(rid, start)
        if record is None:
            return
        owner, request = str(record["owner"]), dict(record["request"])
        # Run whole (a poll sees the answer when it is done) and unstored: the record under this
        # response's id is what a follow-up turn continues from. Admission charged it at submit.
        sent = {**{k: v for k, v in request.items() if k != "background"}, "stream": False, "store": False}
        work = asyncio.ensure_future(self.call(owner, RESPONSES, sent, True))
        while not work.done():
            await asyncio.wait({work}, timeout=self.poll_s)
            if not work.done() and (await self._status(rid)) == "cancelled":
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                return
        status, body = work.result()
        items = await self._conversation(owner, request, body) if status == 200 else []

        def finish(r: Record) -> Record | None:
            if r["response"].get("status") == "cancelled":
                return None
            shell = r["response"]
            if status != 200:
                return {**r, "response": {**shell, "status": "failed", "error": body.get("error"),
                                          "completed_at": int(time.time())}}
            done = {**body, "id": rid, "created_at": shell.get("created_at"), "background": True,
                    "store": True, "previous_response_id": request.get("previous_response_id")}
            return {**r, "response": done, "items": items}

        await self.store.update(rid, finish)

    async def _status(self, rid: str) -> str | None:
        record = await self.store.record(rid)
        return None if record is None else record["response"].get("status")

    async def _conversation(self, owner: str, request: dict[str, Any], body: dict[str, Any]) -> list[Any]:
        """What a follow-up turn naming this response continues: the whole conversation."""
        prev = request.get("previous_response_id")
        try:
            record = await self.store.get(prev, owner) if prev else None
        except APIError:
            record = None
        return [*expand(request, record)[1], *output_as_input(body)]
