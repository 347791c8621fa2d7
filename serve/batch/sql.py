"""The statements both SQL backends run (SqlStore), and the SQLite backend: one file, the default
of `llmserve run`. PostgreSQL runs the same statements (`serve/batch/pg.py`)."""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from serve.batch.files import FileBytes, FileTooLarge, LocalFiles, QuotaExceeded
from serve.batch.store import ACTIVE, ANONYMOUS, BatchStore, allowed, merge, new_id


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
    _owner_lock = ""  # a statement taking a lock on one owner until the transaction ends ("?": owner)

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
                        max_bytes: int | None = None, file_id: str | None = None,
                        quota: int | None = None) -> dict[str, Any]:
        fid = file_id or new_id("file")
        cap = max_bytes
        if quota is not None:  # stop writing at the quota, not after the whole upload
            room = quota - self.usage(owner)
            if room <= 0:
                raise QuotaExceeded(quota)
            cap = room if max_bytes is None else min(max_bytes, room)
        try:
            size = self.files.put(fid, fileobj, max_bytes=cap)
        except FileTooLarge as e:
            if cap is not None and cap != max_bytes:
                raise QuotaExceeded(quota or 0) from e
            raise
        try:  # the row last: no pod is told of a file whose bytes are not all there
            with self._tx() as run:
                if quota is not None:  # again under the owner's lock: two uploads racing the quota
                    if self._owner_lock:
                        run(self._owner_lock, (owner,))
                    if self._usage(run, owner) + size > quota:
                        raise QuotaExceeded(quota)
                run("INSERT INTO files (id, purpose, filename, bytes, created_at, path, deleted, owner) "
                    "VALUES (?,?,?,?,?,?,0,?)", (fid, purpose, filename, size, int(time.time()), fid, owner))
        except BaseException:
            if file_id is None:  # an id of our own: nobody else's bytes can be under it
                self.files.delete(fid)
            raise
        return self.get_file(fid, owner=owner) or {}

    @staticmethod
    def _usage(run: Run, owner: str) -> int:
        rows = run("SELECT COALESCE((SELECT SUM(bytes) FROM files WHERE owner=? AND deleted=0), 0) + "
                   "COALESCE((SELECT SUM(LENGTH(r.body)) FROM results r JOIN batches b ON b.id = r.batch_id "
                   "WHERE b.owner=?), 0)", (owner, owner)).fetchall()
        return int(rows[0][0])

    def usage(self, owner: str) -> int:
        with self._tx(write=False) as run:
            return self._usage(run, owner)

    def purge(self, before: int, limit: int = 1000) -> tuple[int, int]:
        marks = ",".join("?" * len(ACTIVE))
        with self._tx() as run:
            run(f"DELETE FROM results WHERE batch_id IN (SELECT id FROM batches WHERE status NOT IN ({marks}))",
                ACTIVE)
            batches = run(f"DELETE FROM batches WHERE status NOT IN ({marks}) AND created_at < ?",
                          (*ACTIVE, before)).rowcount
        inputs = {b["input_file_id"] for b in self.active_batches()}
        rows = self._rows("SELECT id FROM files WHERE created_at < ? OR deleted=1 ORDER BY created_at LIMIT ?",
                          (before, limit + len(inputs)))
        files = 0
        for (fid,) in rows:
            if fid in inputs:  # a running batch still reads it; it goes once the batch has finished
                continue
            # Marked first, as delete_file does: a reader that finds the row finds the bytes.
            self._count("UPDATE files SET deleted=1 WHERE id=?", (fid,))
            self.files.delete(fid)
            files += self._count("DELETE FROM files WHERE id=? AND deleted=1", (fid,))
        return files, batches

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

    def result_page(self, batch_id: str, ok: bool, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        rows = self._rows("SELECT line_no, body FROM results WHERE batch_id=? AND ok=? AND line_no > ? "
                          "ORDER BY line_no LIMIT ?", (batch_id, int(ok), after, limit))
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    def drop_results(self, batch_id: str) -> None:
        marks = ",".join("?" * len(ACTIVE))
        self._count(f"DELETE FROM results WHERE batch_id=? AND NOT EXISTS (SELECT 1 FROM batches WHERE id=? "
                    f"AND status IN ({marks}))", (batch_id, batch_id, *ACTIVE))


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
    not for pods sharing a network volume. A write transaction holds the whole database (BEGIN
    IMMEDIATE), so it needs no owner lock."""

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
