"""A tenant's JSON Schema checked off the gateway's event loop, in worker processes it can kill.

The cascade escalates a student answer that fails the requested schema, so the gateway validates
text against a schema a client wrote. That schema may be hostile: a catastrophic `pattern` keeps
`re` busy for hours, and `anyOf` over `$ref`s can make the work exponential. Neither a thread
(Python cannot stop one) nor `re` has a timeout, so each check runs in a small worker process
(`python -m serve.gateway.schema_check`, one JSON line in, one out) that is killed, and replaced
on the next check, when it overruns `timeout_s`. The verdict is then None: the answer escalates.

Workers start on the first schema check, so a gateway whose requests name no schema never starts
one. Each one reads from a pipe this process holds: when the gateway exits, its stdin closes and
the worker ends with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import select
import subprocess
import sys
import weakref
from typing import Any

from serve.policies.cascade import schema_verdict

logger = logging.getLogger("llmserve.schema_check")

# A student answer is bounded by max_student_tokens; an honest schema checks it in milliseconds.
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_WORKERS = 2
# Starting a worker (an interpreter importing jsonschema) is not the tenant's time: bounded apart.
START_TIMEOUT_S = 30.0
READY = b"ready\n"


class _Worker:
    def __init__(self) -> None:
        # The worker imports this package as its parent did (a Ray runtime_env's working_dir, say).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.gateway.schema_check"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        if not ready or self.proc.stdout.readline() != READY:
            logger.warning("a JSON Schema worker did not start; schema checks escalate until one does")
            self.kill()

    def ask(self, line: bytes, timeout_s: float) -> bool | None:
        """The worker's verdict, or None when it overran `timeout_s` or died (it is then killed)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
            answer = self.proc.stdout.readline() if ready else b""
        except (OSError, ValueError):  # a worker that failed to start: its pipes are closed
            answer = b""
        if not answer:
            self.kill()
            return None
        verdict = json.loads(answer).get("ok")
        return verdict if isinstance(verdict, bool) else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _kill_all(idle: queue.Queue[_Worker | None]) -> None:
    while True:
        try:
            w = idle.get_nowait()
        except queue.Empty:
            return
        if w is not None:
            w.kill()


class SchemaChecker:
    """At most `workers` checks at a time; a check that waits for a free worker or for its answer
    longer than `timeout_s` (all together) gets None. Safe to use from any event loop or thread."""

    def __init__(self, workers: int = DEFAULT_WORKERS, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        # Slots: None is a worker not started yet (or killed), started when a check takes the slot.
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)
        weakref.finalize(self, _kill_all, self._idle)

    def _check(self, line: bytes) -> bool | None:
        try:
            worker = self._idle.get(timeout=self.timeout_s)
        except queue.Empty:
            return None  # every worker is busy (with hostile schemas, likely): do not queue behind them
        try:
            if worker is None or not worker.alive():
                worker = _Worker()
            verdict = worker.ask(line, self.timeout_s)
            if not worker.alive():
                # Killed for overrunning: its replacement starts now, on the time of the request
                # that caused it, not of the next one.
                worker = _Worker()
            return verdict
        finally:
            self._idle.put(worker)

    async def check(self, pairs: list[tuple[str, dict[str, Any]]]) -> list[bool | None]:
        """A verdict per (text, schema): True, False, or None when it could not be checked in time."""
        out: list[bool | None] = []
        for text, schema in pairs:
            try:
                line = json.dumps({"text": text, "schema": schema}).encode() + b"\n"
            except (ValueError, RecursionError):
                out.append(None)
                continue
            out.append(await asyncio.to_thread(self._check, line))
        return out

    def close(self) -> None:
        _kill_all(self._idle)


def _serve() -> None:
    """The worker: one JSON line {text, schema} in, one {ok} out, until stdin closes."""
    schema_verdict("{}", {"type": "object"})  # imports jsonschema before saying it is ready
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    for raw in sys.stdin.buffer:
        try:
            job = json.loads(raw)
            ok = schema_verdict(job["text"], job["schema"])
        except Exception:
            ok = None
        sys.stdout.write(json.dumps({"ok": ok}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
