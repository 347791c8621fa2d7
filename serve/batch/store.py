"""Durable Batch API state: the store's interface. The SQL its backends share and SQLite are in
`serve/batch/sql.py`, PostgreSQL in `serve/batch/pg.py`, the choice between them in `backends.py`.

Nothing lives only in memory: a gateway or worker restart finds every file, batch and finished
result where it left them. Each finished line is one row keyed by (batch, line), which is what
makes a resumed batch neither lose nor repeat a line. File bytes go through `serve/batch/files.py`.

Every file and batch has an owner (the API key's name). Reads take `owner`: a name sees only that
name's objects, exactly as if the others did not exist; None means any owner, for the worker and
for an admin who asked for it. The argument has no default, so a forgotten filter is a TypeError
rather than a leak.

Several processes may share one store (gateways and the batch worker, each with its own store
object), so every change of state is one atomic step in the database, never a read in Python
followed by a blind write: a status moves only along TRANSITIONS, checked under the row's lock (a
cancel racing the worker's completion ends in whichever came first, never a mix of both); a batch
is worked by the one worker holding its lease (`claim_batch`); a line is recorded once. SQLite
(here, the default of `llmserve run`) locks between processes on one machine, not on a network
volume: several pods use PostgreSQL (`serve/batch/pg.py`, chosen by `batch.database_url`).
"""

from __future__ import annotations

import io
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from serve.batch.files import CHUNK as CHUNK  # re-exported: callers import the upload errors from here
from serve.batch.files import EmptyFile as EmptyFile
from serve.batch.files import FileTooLarge as FileTooLarge
from serve.batch.files import QuotaExceeded as QuotaExceeded

ANONYMOUS = "anonymous"  # the owner of everything made while auth is off

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
# A status and the statuses a batch may reach it from; a terminal status is final.
TRANSITIONS: dict[str, frozenset[str]] = {
    "validating": frozenset(),  # only put_batch makes one
    "in_progress": frozenset({"validating"}),
    "finalizing": frozenset({"in_progress"}),
    "completed": frozenset({"finalizing"}),
    "failed": frozenset({"validating", "in_progress", "finalizing"}),
    "expired": frozenset({"validating", "in_progress"}),
    "cancelling": frozenset({"validating", "in_progress", "finalizing"}),
    "cancelled": frozenset({"cancelling"}),
}


def allowed(current: str, new: str) -> bool:
    """May a batch in `current` be written with status `new`? Keeping the status (progress
    counts, a second cancel) is allowed only while the batch is active."""
    if current in TERMINAL:
        return False
    return new == current or current in TRANSITIONS.get(new, frozenset())


def merge(batch: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`batch` with `changes` applied; request_counts are merged key by key."""
    out = dict(batch)
    for k, v in changes.items():
        out[k] = {**batch.get("request_counts", {}), **v} if k == "request_counts" else v
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class BatchStore(ABC):
    """What the API and the worker use. Each method is safe to call from several processes at once."""

    # ---- files ---------------------------------------------------------------------------------
    @abstractmethod
    def put_file_stream(self, fileobj: BinaryIO, filename: str, purpose: str, *, owner: str,
                        max_bytes: int | None = None, file_id: str | None = None,
                        quota: int | None = None) -> dict[str, Any]:
        """Copy `fileobj` into the store a chunk at a time, never whole in memory. Raises
        FileTooLarge past `max_bytes`, QuotaExceeded where the owner's usage (`usage`) would pass
        `quota`, and EmptyFile for no bytes; then, as on any failure, nothing is stored."""

    @abstractmethod
    def usage(self, owner: str) -> int:
        """Bytes `owner` holds: its files (uploads and batch outputs) and its batches' results."""

    @abstractmethod
    def purge(self, before: int, limit: int = 1000) -> tuple[int, int]:
        """Delete, rows and bytes, the finished batches and the files created before `before`
        (epoch s), except the input of an active batch, and the results of every finished batch;
        at most `limit` files a call. Returns (files, batches) deleted."""

    def put_file(self, content: bytes, filename: str, purpose: str, *, owner: str,
                 file_id: str | None = None) -> dict[str, Any]:
        return self.put_file_stream(io.BytesIO(content), filename, purpose, owner=owner, file_id=file_id)

    @abstractmethod
    def get_file(self, file_id: str, *, owner: str | None) -> dict[str, Any] | None: ...

    @abstractmethod
    def list_files(self, *, owner: str | None, purpose: str | None = None, limit: int = 100,
                   after: str | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def file_path(self, file_id: str, *, owner: str | None) -> Path | None:
        """A local path of the bytes (None: no such file, or bytes that are not on this machine)."""

    @abstractmethod
    def open_file(self, file_id: str, *, owner: str | None) -> BinaryIO | None: ...

    def file_content(self, file_id: str, *, owner: str | None) -> bytes | None:
        """The whole file in memory: for tests and small files; the worker streams (open_file)."""
        f = self.open_file(file_id, owner=owner)
        if f is None:
            return None
        with f:
            return f.read()

    @abstractmethod
    def delete_file(self, file_id: str, *, owner: str | None) -> bool:
        """True for the one caller that deleted it; False if absent, not owner's, or already gone."""

    # ---- batches -------------------------------------------------------------------------------
    @abstractmethod
    def put_batch(self, batch: dict[str, Any], *, owner: str) -> None: ...

    @abstractmethod
    def get_batch(self, batch_id: str, *, owner: str | None) -> dict[str, Any] | None: ...

    @abstractmethod
    def batch_owner(self, batch_id: str) -> str | None: ...

    @abstractmethod
    def update_batch(self, batch_id: str, *, owner: str | None, **changes: Any) -> dict[str, Any] | None:
        """Apply `changes` atomically and return the batch as stored; None if there is no such
        batch for `owner`. A status change that TRANSITIONS does not allow from the status found
        (another writer came first) changes nothing: the batch comes back as it is, so a caller
        that cares compares the returned status with the one it asked for."""

    @abstractmethod
    def list_batches(self, *, owner: str | None, limit: int = 20, after: str | None = None
                     ) -> list[dict[str, Any]]: ...

    @abstractmethod
    def active_batches(self) -> list[dict[str, Any]]: ...

    @abstractmethod
    def claim_batch(self, batch_id: str, worker: str, lease_s: float) -> bool:
        """Take an active batch for `worker` until `lease_s` from now, or renew its own lease:
        True for exactly one worker at a time; a lease not renewed in time can be taken over."""

    @abstractmethod
    def release_batch(self, batch_id: str, worker: str) -> None:
        """Give the lease up (only `worker`'s own), so another worker need not wait it out."""

    # ---- results (the checkpoint) --------------------------------------------------------------
    @abstractmethod
    def done_lines(self, batch_id: str) -> set[int]: ...

    @abstractmethod
    def put_result(self, batch_id: str, line_no: int, custom_id: str, ok: bool, body: dict[str, Any]) -> bool:
        """Record one finished line of an active batch; False if it was already recorded (never
        twice) or the batch is no longer active."""

    @abstractmethod
    def result_counts(self, batch_id: str) -> tuple[int, int]: ...

    @abstractmethod
    def result_page(self, batch_id: str, ok: bool, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to `limit` (line, record) of the batch's ok or failed lines after line `after`, in order."""

    def iter_results(self, batch_id: str, ok: bool, page: int = 500) -> Iterator[dict[str, Any]]:
        """Every ok or failed record of a batch, in line order, a page at a time."""
        after = -1
        while rows := self.result_page(batch_id, ok, after, page):
            yield from (body for _, body in rows)
            after = rows[-1][0]

    def results(self, batch_id: str, ok: bool) -> list[dict[str, Any]]:
        return list(self.iter_results(batch_id, ok))

    @abstractmethod
    def drop_results(self, batch_id: str) -> None:
        """Forget a finished batch's results (its output and error files hold them now)."""

    @abstractmethod
    def close(self) -> None: ...
