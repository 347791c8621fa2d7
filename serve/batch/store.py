"""Durable Batch API state: the store's interface, the SQL its backends share, and SQLite.

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

import fcntl
import io
import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from serve.batch.files import CHUNK as CHUNK  # re-exported: callers import the upload errors from here
from serve.batch.files import EmptyFile as EmptyFile
from serve.batch.files import FileBytes, LocalFiles
from serve.batch.files import FileTooLarge as FileTooLarge
from serve.config import Config

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
                        max_bytes: int | None = None, file_id: str | None = None) -> dict[str, Any]:
        """Copy `fileobj` into the store a chunk at a time, never whole in memory. Raises
        FileTooLarge past `max_bytes` and EmptyFile for no bytes; then, as on any failure,
        nothing is stored."""

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
    def results(self, batch_id: str, ok: bool) -> list[dict[str, Any]]: ...

    @abstractmethod
    def close(self) -> None: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> list[Any]: ...


Run = Callable[[str, Sequence[Any]], Cursor]  # execute one statement ("?" placeholders)


def _mine(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """SQL condition and its argument for `owner` (None: any owner)."""
    return ("1=1", ()) if owner is None else ("owner=?", (owner,))


class SqlStore(BatchStore):
    """The statements both backends run. They differ in connections and transactions (`_tx`), in
    how a read-modify-write locks its row, and in the database's clock."""

    files: FileBytes
    _for_update = ""  # appended to the SELECT of a read-modify-write
    _now = ""  # the database's clock in epoch seconds: one clock for leases taken on any pod

    @abstractmethod
    def _tx(self, write: bool = True) -> Any:
        """A context manager: one transaction, yielding a Run; committed on a clean exit."""

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._tx(write=False) as run:
            return run(sql, args).fetchall()

    def _count(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._tx() as run:
            return run(sql, args).rowcount

    # ---- files ---------------------------------------------------------------------------------
    def put_file_stream(self, fileobj: BinaryIO, filename: str, purpose: str, *, owner: str,
                        max_bytes: int | None = None, file_id: str | None = None) -> dict[str, Any]:
        fid = file_id or new_id("file")
        size = self.files.put(fid, fileobj, max_bytes=max_bytes)
        try:  # the row last: no pod is told of a file whose bytes are not all there
            self._count("INSERT INTO files (id, purpose, filename, bytes, created_at, path, deleted, owner) "
                        "VALUES (?,?,?,?,?,?,0,?)", (fid, purpose, filename, size, int(time.time()), fid, owner))
        except BaseException:
            if file_id is None:  # an id of our own: nobody else's bytes can be under it
                self.files.delete(fid)
            raise
        return self.get_file(fid, owner=owner) or {}

    def get_file(self, file_id: str, *, owner: str | None) -> dict[str, Any] | None:
        cond, who = _mine(owner)
        rows = self._rows("SELECT id, purpose, filename, bytes, created_at FROM files "
                          f"WHERE id=? AND deleted=0 AND {cond}", (file_id, *who))
        if not rows:
            return None
        fid, purpose, filename, size, created = rows[0]
        return {"id": fid, "object": "file", "bytes": size, "created_at": created, "filename": filename,
                "purpose": purpose, "status": "processed", "status_details": None}

    def list_files(self, *, owner: str | None, purpose: str | None = None, limit: int = 100,
                   after: str | None = None) -> list[dict[str, Any]]:
        cond, who = _mine(owner)
        sql, args = f"SELECT id FROM files WHERE deleted=0 AND {cond}", [*who]
        if purpose:
            sql += " AND purpose=?"
            args.append(purpose)
        if after:  # someone else's id as the cursor finds nothing, as an unknown id does
            sql += f" AND created_at <= (SELECT created_at FROM files WHERE id=? AND {cond}) AND id != ?"
            args += [after, *who, after]
        rows = self._rows(sql + " ORDER BY created_at DESC, id LIMIT ?", (*args, limit))
        return [f for (fid,) in rows if (f := self.get_file(fid, owner=owner))]

    def _exists(self, file_id: str, owner: str | None) -> bool:
        cond, who = _mine(owner)
        return bool(self._rows(f"SELECT 1 FROM files WHERE id=? AND deleted=0 AND {cond}", (file_id, *who)))

    def file_path(self, file_id: str, *, owner: str | None) -> Path | None:
        return self.files.local_path(file_id) if self._exists(file_id, owner) else None

    def open_file(self, file_id: str, *, owner: str | None) -> BinaryIO | None:
        if not self._exists(file_id, owner):
            return None
        try:
            return self.files.open(file_id)
        except FileNotFoundError:  # deleted between the row check and the open
            return None

    def delete_file(self, file_id: str, *, owner: str | None) -> bool:
        cond, who = _mine(owner)
        if self._count(f"UPDATE files SET deleted=1 WHERE id=? AND deleted=0 AND {cond}", (file_id, *who)) != 1:
            return False
        self.files.delete(file_id)
        return True

    # ---- batches -------------------------------------------------------------------------------
    def put_batch(self, batch: dict[str, Any], *, owner: str) -> None:
        self._count("INSERT INTO batches (id, data, status, created_at, owner) VALUES (?,?,?,?,?) "
                    "ON CONFLICT (id) DO UPDATE SET data=excluded.data, status=excluded.status, "
                    "created_at=excluded.created_at, owner=excluded.owner, worker=NULL, lease_until=0",
                    (batch["id"], json.dumps(batch), batch["status"], batch["created_at"], owner))

    def get_batch(self, batch_id: str, *, owner: str | None) -> dict[str, Any] | None:
        cond, who = _mine(owner)
        rows = self._rows(f"SELECT data FROM batches WHERE id=? AND {cond}", (batch_id, *who))
        return json.loads(rows[0][0]) if rows else None

    def batch_owner(self, batch_id: str) -> str | None:
        rows = self._rows("SELECT owner FROM batches WHERE id=?", (batch_id,))
        return str(rows[0][0]) if rows else None

    def update_batch(self, batch_id: str, *, owner: str | None, **changes: Any) -> dict[str, Any] | None:
        cond, who = _mine(owner)
        with self._tx() as run:  # the row stays locked from this read to the write
            rows = run(f"SELECT data, status FROM batches WHERE id=? AND {cond}{self._for_update}",
                       (batch_id, *who)).fetchall()
            if not rows:
                return None
            batch, status = json.loads(rows[0][0]), rows[0][1]
            if not allowed(status, changes.get("status", status)):
                return batch
            batch = merge(batch, changes)
            run("UPDATE batches SET data=?, status=? WHERE id=?", (json.dumps(batch), batch["status"], batch_id))
            return batch

    def list_batches(self, *, owner: str | None, limit: int = 20, after: str | None = None
                     ) -> list[dict[str, Any]]:
        cond, who = _mine(owner)
        sql, args = f"SELECT data FROM batches WHERE {cond}", [*who]
        if after:
            sql += f" AND created_at <= (SELECT created_at FROM batches WHERE id=? AND {cond}) AND id != ?"
            args += [after, *who, after]
        rows = self._rows(sql + " ORDER BY created_at DESC, id LIMIT ?", (*args, limit))
        return [json.loads(r[0]) for r in rows]

    def active_batches(self) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(ACTIVE))
        rows = self._rows(f"SELECT data FROM batches WHERE status IN ({marks}) ORDER BY created_at", ACTIVE)
        return [json.loads(r[0]) for r in rows]

    def claim_batch(self, batch_id: str, worker: str, lease_s: float) -> bool:
        # One conditional UPDATE: two workers cannot both see the batch free and both take it.
        marks = ",".join("?" * len(ACTIVE))
        return self._count(
            f"UPDATE batches SET worker=?, lease_until={self._now} + ? WHERE id=? AND status IN ({marks}) "
            f"AND (worker IS NULL OR worker=? OR lease_until < {self._now})",
            (worker, float(lease_s), batch_id, *ACTIVE, worker)) == 1

    def release_batch(self, batch_id: str, worker: str) -> None:
        self._count("UPDATE batches SET worker=NULL, lease_until=0 WHERE id=? AND worker=?", (batch_id, worker))

    # ---- results -------------------------------------------------------------------------------
    def done_lines(self, batch_id: str) -> set[int]:
        return {r[0] for r in self._rows("SELECT line_no FROM results WHERE batch_id=?", (batch_id,))}

    def put_result(self, batch_id: str, line_no: int, custom_id: str, ok: bool, body: dict[str, Any]) -> bool:
        marks = ",".join("?" * len(ACTIVE))
        return self._count(
            "INSERT INTO results (batch_id, line_no, custom_id, ok, body) SELECT ?,?,?,?,? WHERE EXISTS "
            f"(SELECT 1 FROM batches WHERE id=? AND status IN ({marks})) ON CONFLICT (batch_id, line_no) DO NOTHING",
            (batch_id, line_no, custom_id, int(ok), json.dumps(body), batch_id, *ACTIVE)) == 1

    def result_counts(self, batch_id: str) -> tuple[int, int]:
        by = dict(self._rows("SELECT ok, COUNT(*) FROM results WHERE batch_id=? GROUP BY ok", (batch_id,)))
        return int(by.get(1, 0)), int(by.get(0, 0))

    def results(self, batch_id: str, ok: bool) -> list[dict[str, Any]]:
        rows = self._rows("SELECT body FROM results WHERE batch_id=? AND ok=? ORDER BY line_no", (batch_id, int(ok)))
        return [json.loads(r[0]) for r in rows]


SQLITE_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, "
    "bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, data TEXT NOT NULL, status TEXT NOT NULL, "
    "created_at INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS batches_status ON batches(status)",
    "CREATE TABLE IF NOT EXISTS results (batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, "
    "custom_id TEXT NOT NULL, ok INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (batch_id, line_no))",
]
# Columns added since the first release: a database from before gains them (old rows: anonymous, unclaimed).
SQLITE_ADDED = [("files", "owner", f"TEXT NOT NULL DEFAULT '{ANONYMOUS}'"),
                ("batches", "owner", f"TEXT NOT NULL DEFAULT '{ANONYMOUS}'"),
                ("batches", "worker", "TEXT"), ("batches", "lease_until", "REAL NOT NULL DEFAULT 0")]
SQLITE_INDEXES = ["CREATE INDEX IF NOT EXISTS files_owner ON files(owner, created_at)",
                  "CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created_at)"]


class SqliteStore(SqlStore):
    """One SQLite file: safe for threads and for processes on one machine (SQLite's own locks),
    not for pods sharing a network volume."""

    _now = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, db_path: str | Path, files: str | Path | FileBytes) -> None:
        self.files = LocalFiles(files) if isinstance(files, (str, Path)) else files
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: callers use it from threads (asyncio.to_thread).
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        # Stores opening together take turns: two connections switching a new file to WAL at once
        # can deadlock on SQLite's locks, and SQLite then answers "database is locked" at once
        # instead of waiting out the busy timeout (about 2% of six-way races here).
        with open(f"{db_path}.init-lock", "a") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)  # released when the file closes
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._tx() as run:  # one process creates or migrates; another starting with it waits
                for stmt in SQLITE_SCHEMA:
                    run(stmt, ())
                for table, column, decl in SQLITE_ADDED:
                    if column not in {row[1] for row in run(f"PRAGMA table_info({table})", ()).fetchall()}:
                        run(f"ALTER TABLE {table} ADD COLUMN {column} {decl}", ())
                for stmt in SQLITE_INDEXES:
                    run(stmt, ())

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Run]:
        with self._lock:
            # IMMEDIATE takes the write lock up front, so a read-modify-write of another process
            # cannot interleave; a read needs only a snapshot (WAL).
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db.execute
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(config: Config) -> BatchStore:
    """The store a configuration names: PostgreSQL at `batch.database_url`, else SQLite (default
    under the project's cache directory); file bytes in `batch.storage_dir`."""
    from serve.contract.paths import cache_dir

    base = cache_dir() / "batch"
    files = LocalFiles(Path(config.batch.storage_dir).expanduser() if config.batch.storage_dir else base / "files")
    if config.batch.database_url:
        from serve.batch.pg import PostgresStore  # psycopg is loaded only where it is used

        return PostgresStore(config.batch.database_url, files)
    db = Path(config.batch.db_path).expanduser() if config.batch.db_path else base / "batch.db"
    return SqliteStore(db, files)
