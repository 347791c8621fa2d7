"""Durable Batch API state: metadata in SQLite, file bytes in a storage directory.

Nothing lives only in memory: a gateway or worker restart finds every file, batch and finished
result where it left them. Each finished line is one row keyed by (batch, line), which is what
makes a resumed batch neither lose nor repeat a line.

Every file and batch has an owner (the API key's name). Reads take `owner`: a name sees only that
name's objects, exactly as if the others did not exist; None means any owner, for the worker and
for an admin who asked for it. The argument has no default, so a forgotten filter is a TypeError
rather than a leak.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from serve.config import Config

ANONYMOUS = "anonymous"  # the owner of everything made while auth is off

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL, path TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
  owner TEXT NOT NULL DEFAULT 'anonymous');
CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY, data TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
  owner TEXT NOT NULL DEFAULT 'anonymous');
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS results (
  batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, ok INTEGER NOT NULL,
  body TEXT NOT NULL, PRIMARY KEY (batch_id, line_no));
"""
# After the owner column is known to exist (a database from before owners gains it first).
OWNER_INDEXES = """
CREATE INDEX IF NOT EXISTS files_owner ON files(owner, created_at);
CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created_at);
"""

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CHUNK = 1024 * 1024


class FileTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The file is larger than {limit} bytes.")
        self.limit = limit


class EmptyFile(ValueError):
    def __init__(self) -> None:
        super().__init__("The file is empty.")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _mine(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """SQL condition and its argument for `owner` (None: any owner)."""
    return ("1=1", ()) if owner is None else ("owner=?", (owner,))


class BatchStore:
    def __init__(self, db_path: str | Path, storage_dir: str | Path) -> None:
        self.storage = Path(storage_dir)
        self.storage.mkdir(parents=True, exist_ok=True)
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: callers use it from threads (asyncio.to_thread).
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for table in ("files", "batches"):  # a store written before owners existed: all anonymous
            if "owner" not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL DEFAULT '{ANONYMOUS}'")
        self._db.executescript(OWNER_INDEXES)
        self._lock = threading.Lock()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- files ---------------------------------------------------------------------------------
    def put_file(self, content: bytes, filename: str, purpose: str, *, owner: str,
                 file_id: str | None = None) -> dict[str, Any]:
        return self.put_file_stream(io.BytesIO(content), filename, purpose, owner=owner, file_id=file_id)

    def put_file_stream(self, fileobj: BinaryIO, filename: str, purpose: str, *, owner: str,
                        max_bytes: int | None = None, file_id: str | None = None) -> dict[str, Any]:
        """Copy `fileobj` into the store a chunk at a time, never whole in memory.

        Raises FileTooLarge past `max_bytes` and EmptyFile for no bytes; either way, and on any
        other failure, nothing is stored (the temp file goes, no row is written)."""
        fid = file_id or new_id("file")
        path = self.storage / fid
        tmp = path.with_suffix(".tmp")
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := fileobj.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    out.write(chunk)
            if size == 0:
                raise EmptyFile()
            os.replace(tmp, path)  # a crash leaves no half file under the real name
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        now = int(time.time())
        self._q("INSERT INTO files (id, purpose, filename, bytes, created_at, path, deleted, owner) "
                "VALUES (?,?,?,?,?,?,0,?)", (fid, purpose, filename, size, now, str(path), owner))
        return self.get_file(fid, owner=owner) or {}

    def get_file(self, file_id: str, *, owner: str | None) -> dict[str, Any] | None:
        cond, who = _mine(owner)
        rows = self._q("SELECT id, purpose, filename, bytes, created_at FROM files "
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
        rows = self._q(sql + " ORDER BY created_at DESC, id LIMIT ?", (*args, limit))
        return [f for (fid,) in rows if (f := self.get_file(fid, owner=owner))]

    def file_path(self, file_id: str, *, owner: str | None) -> Path | None:
        cond, who = _mine(owner)
        rows = self._q(f"SELECT path FROM files WHERE id=? AND deleted=0 AND {cond}", (file_id, *who))
        return Path(rows[0][0]) if rows else None

    def file_content(self, file_id: str, *, owner: str | None) -> bytes | None:
        path = self.file_path(file_id, owner=owner)
        return path.read_bytes() if path else None

    def delete_file(self, file_id: str, *, owner: str | None) -> bool:
        path = self.file_path(file_id, owner=owner)
        if path is None:
            return False
        self._q("UPDATE files SET deleted=1 WHERE id=?", (file_id,))
        path.unlink(missing_ok=True)
        return True

    # ---- batches -------------------------------------------------------------------------------
    def put_batch(self, batch: dict[str, Any], *, owner: str) -> None:
        self._q("INSERT OR REPLACE INTO batches (id, data, status, created_at, owner) VALUES (?,?,?,?,?)",
                (batch["id"], json.dumps(batch), batch["status"], batch["created_at"], owner))

    def get_batch(self, batch_id: str, *, owner: str | None) -> dict[str, Any] | None:
        cond, who = _mine(owner)
        rows = self._q(f"SELECT data FROM batches WHERE id=? AND {cond}", (batch_id, *who))
        return json.loads(rows[0][0]) if rows else None

    def batch_owner(self, batch_id: str) -> str | None:
        rows = self._q("SELECT owner FROM batches WHERE id=?", (batch_id,))
        return str(rows[0][0]) if rows else None

    def update_batch(self, batch_id: str, *, owner: str | None, **changes: Any) -> dict[str, Any] | None:
        """Read-modify-write under the lock, so the API (cancel) and the worker do not race."""
        cond, who = _mine(owner)
        with self._lock:
            rows = self._db.execute(f"SELECT data FROM batches WHERE id=? AND {cond}", (batch_id, *who)).fetchall()
            if not rows:
                return None
            batch = json.loads(rows[0][0])
            for k, v in changes.items():
                if k == "request_counts":
                    batch["request_counts"] = {**batch.get("request_counts", {}), **v}
                else:
                    batch[k] = v
            self._db.execute("UPDATE batches SET data=?, status=? WHERE id=?",
                             (json.dumps(batch), batch["status"], batch_id))
            return batch

    def list_batches(self, *, owner: str | None, limit: int = 20, after: str | None = None
                     ) -> list[dict[str, Any]]:
        cond, who = _mine(owner)
        sql, args = f"SELECT data FROM batches WHERE {cond}", [*who]
        if after:
            sql += f" AND created_at <= (SELECT created_at FROM batches WHERE id=? AND {cond}) AND id != ?"
            args += [after, *who, after]
        rows = self._q(sql + " ORDER BY created_at DESC, id LIMIT ?", (*args, limit))
        return [json.loads(r[0]) for r in rows]

    def active_batches(self) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(ACTIVE))
        rows = self._q(f"SELECT data FROM batches WHERE status IN ({marks}) ORDER BY created_at", ACTIVE)
        return [json.loads(r[0]) for r in rows]

    # ---- results (the checkpoint) --------------------------------------------------------------
    def done_lines(self, batch_id: str) -> set[int]:
        return {r[0] for r in self._q("SELECT line_no FROM results WHERE batch_id=?", (batch_id,))}

    def put_result(self, batch_id: str, line_no: int, custom_id: str, ok: bool, body: dict[str, Any]) -> bool:
        """Record one finished line; False if it was already recorded (never twice)."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?)",
                                   (batch_id, line_no, custom_id, int(ok), json.dumps(body)))
            return cur.rowcount == 1

    def result_counts(self, batch_id: str) -> tuple[int, int]:
        rows = self._q("SELECT ok, COUNT(*) FROM results WHERE batch_id=? GROUP BY ok", (batch_id,))
        by = dict(rows)
        return int(by.get(1, 0)), int(by.get(0, 0))

    def results(self, batch_id: str, ok: bool) -> list[dict[str, Any]]:
        rows = self._q("SELECT body FROM results WHERE batch_id=? AND ok=? ORDER BY line_no", (batch_id, int(ok)))
        return [json.loads(r[0]) for r in rows]


def open_store(config: Config) -> BatchStore:
    """The store a configuration names (default: under the project's cache directory)."""
    from serve.engine.models import cache_dir

    base = cache_dir() / "batch"
    db = Path(config.batch.db_path).expanduser() if config.batch.db_path else base / "batch.db"
    files = Path(config.batch.storage_dir).expanduser() if config.batch.storage_dir else base / "files"
    return BatchStore(db, files)
