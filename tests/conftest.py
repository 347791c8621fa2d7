"""Session-wide check: whatever the tests started (Ray, vLLM engine cores and workers) is stopped
when they end. An orphaned engine on a 2-core box takes cycles from every later run, so a session
that leaves one behind fails, naming it."""

from __future__ import annotations

import time

import psutil
import pytest

from bench.procs import become_subreaper, leftovers

_STARTED = time.time()
# Orphans of what the tests start (`ray start` daemons, engine cores whose parent died) are
# re-parented to this process, so they are found among its descendants. Without it they go to init
# and only a guess (orphans born since the session started) finds them, which on a shared machine
# also takes, and kills, another session's Ray cluster.
_SUBREAPER = become_subreaper()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `destructive` take parts of the shared stack away (Redis, a replica, a second Ray
    cluster beside the first), so they run after every other test of the session, in their
    collected order; the sort is stable, so everything else keeps its order too."""
    items.sort(key=lambda item: item.get_closest_marker("destructive") is not None)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + 30  # engine cores get their lifeline's grace to shut down cleanly
    left = leftovers(_STARTED, orphans=not _SUBREAPER)
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = leftovers(_STARTED, orphans=not _SUBREAPER)
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
