"""serve/engine/head.py without Ray: a child that inherited the driver's record of its head must not
stop it, and the owner's stop ends the keeper through its stdin (end of file) and reaps it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from serve.engine.head import ENV, stop_head


def _keeper_like() -> tuple[int, int]:
    """A child that, like the keeper, runs until its stdin reaches end of file."""
    r, w = os.pipe()
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "import os\nwhile os.read(0, 1): pass"],
                         os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
    os.close(r)
    return pid, w


def test_a_process_that_inherited_the_record_leaves_the_head_alone(monkeypatch):
    pid, w = _keeper_like()
    try:
        monkeypatch.setenv(ENV, f"{os.getppid()}:{pid}:{w}")  # written by another process (our parent)
        stop_head(timeout_s=1)
        os.fstat(w)  # still open
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still running
        assert os.environ[ENV] == f"{os.getppid()}:{pid}:{w}"
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_the_owner_stops_its_head_by_end_of_file(monkeypatch):
    pid, w = _keeper_like()
    monkeypatch.setenv(ENV, f"{os.getpid()}:{pid}:{w}")
    started = time.monotonic()
    stop_head(timeout_s=30)
    assert time.monotonic() - started < 10  # ended by end of file, not the SIGKILL after 30 s
    assert ENV not in os.environ
    try:
        os.fstat(w)
        raise AssertionError("the write end is still open")
    except OSError:
        pass
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0  # reaped: no such pid
