"""Which batch store a configuration names, opened: PostgreSQL when `batch.database_url` is set (several
pods), else SQLite. Kept apart from the store's interface so neither backend's module imports the
other's."""

from __future__ import annotations

from pathlib import Path

from serve.batch.files import LocalFiles
from serve.batch.sql import SqliteStore
from serve.batch.store import BatchStore
from serve.config import Config
from serve.contract.paths import cache_dir


def open_store(config: Config) -> BatchStore:
    """The store a configuration names: PostgreSQL at `batch.database_url`, else SQLite (default
    under the project's cache directory); file bytes in `batch.storage_dir`."""
    base = cache_dir() / "batch"
    files = LocalFiles(Path(config.batch.storage_dir).expanduser() if config.batch.storage_dir else base / "files")
    if config.batch.database_url:
        from serve.batch.pg import PostgresStore  # psycopg is loaded only where it is used

        return PostgresStore(config.batch.database_url, files)
    db = Path(config.batch.db_path).expanduser() if config.batch.db_path else base / "batch.db"
    return SqliteStore(db, files)
