"""Durable Batch API state: metadata in SQLite, file bytes in a storage directory.

Nothing lives only in memory: a gateway or worker restart finds every file, batch and finished
result where it left them. Each finished line is one row keyed by (batch, line), which is what
makes a resumed batch neither lose nor repeat a line.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from serve.config import Config

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL, path TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY, data TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS results (
  batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, ok INTEGER NOT NULL,
  body TEXT NOT NULL, PRIMARY KEY (batch_id, line_no));
"""

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


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
        self._lock = threading.Lock()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- files ---------------------------------------------------------------------------------
    def put_file(self, content: bytes, filename: str, purpose: str, file_id: str | None = None) -> dict[str, Any]:
        fid = file_id or new_id("file")
        path = self.storage / fid
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)  # a crash leaves no half file under the real name
        now = int(time.time())
        self._q("INSERT INTO files VALUES (?,?,?,?,?,?,0)", (fid, purpose, filename, len(content), now, str(path)))
        return self.get_file(fid) or {}

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        rows = self._q("SELECT id, purpose, filename, bytes, created_at FROM files WHERE id=? AND deleted=0",
                       (file_id,))
        if not rows:
            return None
        fid, purpose, filename, size, created = rows[0]
        return {"id": fid, "object": "file", "bytes": size, "created_at": created, "filename": filename,
                "purpose": purpose, "status": "processed", "status_details": None}

    def list_files(self, purpose: str | None = None, limit: int = 100, after: str | None = None
                   ) -> list[dict[str, Any]]:
        sql, args = "SELECT id FROM files WHERE deleted=0", []
        if purpose:
            sql += " AND purpose=?"
            args.append(purpose)
        if after:
            sql += " AND created_at <= (SELECT created_at FROM files WHERE id=?) AND id != ?"
            args += [after, after]
        rows = self._q(sql + " ORDER BY created_at DESC, id LIMIT ?", (*args, limit))
        return [f for (fid,) in rows if (f := self.get_file(fid))]

    def file_content(self, file_id: str) -> bytes | None:
        rows = self._q("SELECT path FROM files WHERE id=? AND deleted=0", (file_id,))
        return Path(rows[0][0]).read_bytes() if rows else None

    def delete_file(self, file_id: str) -> bool:
        rows = self._q("SELECT path FROM files WHERE id=? AND deleted=0", (file_id,))
        if not rows:
            return False
        self._q("UPDATE files SET deleted=1 WHERE id=?", (file_id,))
        Path(rows[0][0]).unlink(missing_ok=True)
        return True

    # ---- batches -------------------------------------------------------------------------------
    def put_batch(self, batch: dict[str, Any]) -> None:
        self._q("INSERT OR REPLACE INTO batches VALUES (?,?,?,?)",
                (batch["id"], json.dumps(batch), batch["status"], batch["created_at"]))

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._q("SELECT data FROM batches WHERE id=?", (batch_id,))
        return json.loads(rows[0][0]) if rows else None

    def update_batch(self, batch_id: str, **changes: Any) -> dict[str, Any] | None:
        """Read-modify-write under the lock, so the API (cancel) and the worker do not race."""
        with self._lock:
            rows = self._db.execute("SELECT data FROM batches WHERE id=?", (batch_id,)).fetchall()
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

    def list_batches(self, limit: int = 20, after: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT data FROM batches", []
        if after:
            sql += " WHERE created_at <= (SELECT created_at FROM batches WHERE id=?) AND id != ?"
            args += [after, after]
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
