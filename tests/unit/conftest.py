"""Fixtures of the unit tests: a real Redis where the logic under test is Redis's (Lua scripts,
generations, lists), started once per module; a real PostgreSQL for the batch store, started once
per session (initdb costs seconds; each test takes a fresh database from it)."""

from __future__ import annotations

import shutil

import pytest

from tests.support import PostgresServer, RedisServer, postgres_bin


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    if postgres_bin("postgres") is None or postgres_bin("initdb") is None:
        pytest.skip("PostgreSQL is not installed (make system-deps installs it)")
    with PostgresServer() as server:
        yield server
