"""Fixtures of the unit tests: a real Redis where the logic under test is Redis's (Lua scripts,
generations, lists), started once per module."""

from __future__ import annotations

import shutil

import pytest

from tests.support import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()
