"""The batch store in PostgreSQL, for several gateway replicas and a batch worker on different pods.

The statements are SqlStore's (serve/batch/sql.py); what PostgreSQL adds is that they hold
across machines: a read-modify-write locks its row (SELECT ... FOR UPDATE, so a cancel and the
worker's completion are applied one after the other, each seeing the other's result), a claim is
one conditional UPDATE whose condition PostgreSQL re-checks on the row it waited for, and leases
run on the database's clock rather than each pod's. File bytes stay behind `FileBytes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from serve.batch.files import FileBytes, LocalFiles
from serve.batch.sql import Cursor, Run, SqlStore

# Taken for the schema's creation: gateways and the worker starting together would otherwise race
# in CREATE TABLE IF NOT EXISTS, which is not safe against a concurrent create of the same table.
SCHEMA_LOCK = 0x6C6C6D73_62617463  # "llmsbatc"

SCHEMA = [
    # `path` only mirrors SQLite's table (bytes are found by id through FileBytes).
    "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, "
    "bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, path TEXT NOT NULL, deleted SMALLINT NOT NULL DEFAULT 0, "
    "owner TEXT NOT NULL)",
    # The batch object is always read and written whole, so it is kept as the JSON text the API returns.
    "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, data TEXT NOT NULL, status TEXT NOT NULL, "
    "created_at BIGINT NOT NULL, owner TEXT NOT NULL, worker TEXT, lease_until DOUBLE PRECISION NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS batches_status ON batches(status)",
    "CREATE INDEX IF NOT EXISTS files_owner ON files(owner, created_at)",
    "CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created_at)",
    "CREATE TABLE IF NOT EXISTS results (batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, "
    "custom_id TEXT NOT NULL, ok SMALLINT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (batch_id, line_no))",
]


class PostgresStore(SqlStore):
    _for_update = " FOR UPDATE"
    _now = "extract(epoch from clock_timestamp())::float8"
    # Two uploads of one owner check its quota one after the other (a sum cannot be locked FOR UPDATE).
    _owner_lock = "SELECT pg_advisory_xact_lock(hashtext(?))"

    def __init__(self, url: str, files: str | Path | FileBytes, *, max_connections: int = 4,
                 connect_timeout_s: float = 30.0) -> None:
        self.files = LocalFiles(files) if isinstance(files, (str, Path)) else files
        # A pool, not one connection: the API calls the store from several threads at once, and
        # a connection broken by a database restart is replaced instead of failing every call.
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=False, name="llmserve-batch",
                                    check=ConnectionPool.check_connection)
        self._pool.open(wait=True, timeout=connect_timeout_s)
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for stmt in SCHEMA:
                    conn.execute(stmt)
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Run]:
        with self._pool.connection() as conn:  # commits on a clean exit, rolls back on an error

            def run(sql: str, args: Sequence[Any]) -> Cursor:
                return conn.execute(sql.replace("?", "%s"), args)

            yield run

    def close(self) -> None:
        self._pool.close()
