"""Session-wide check: whatever the tests started (Ray, vLLM engine cores and workers) is stopped
when they end. An orphaned engine on a 2-core box takes cycles from every later run, so a session
that leaves one behind fails, naming it."""

from __future__ import annotations

import time

import psutil
import pytest

# What our stacks start: vLLM's processes name themselves with setproctitle; Ray's by binary or title.
MARKERS = ("VLLM::", "ray::", "gcs_server", "raylet", "dashboard/agent.py", "log_monitor.py", "bin/postgres",
           "postgres: ", "redis-server")
_STARTED = time.time()


def leftovers(since: float) -> list[psutil.Process]:
    """Our processes still running: descendants of this session, and orphans (re-parented to init)
    born since it started. (Not another session's live processes: those are nobody's leftovers.)"""
    me = psutil.Process()
    ours = {p.pid for p in me.children(recursive=True)}
    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            orphan = p.info["ppid"] == 1 and p.info["create_time"] >= since - 1
            if ((p.info["pid"] in ours or orphan) and p.info["status"] != psutil.STATUS_ZOMBIE
                    and any(m in cmd for m in MARKERS)):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + 30  # engine cores get their lifeline's grace to shut down cleanly
    left = leftovers(_STARTED)
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = leftovers(_STARTED)
    if not left:
        return
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
            p.kill()  # do not let them spoil what runs next; the session still fails
        except psutil.NoSuchProcess:
            continue
    print("\nprocesses started by the tests outlived them:\n  " + "\n  ".join(names))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
