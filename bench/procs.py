"""The processes our stacks start, found by what they call themselves. Shared by the tests'
session check (tests/conftest.py: nothing the tests started outlives them) and `make bench-start`
(bench/start.py: nothing a stopped `llmserve run` started outlives it)."""

from __future__ import annotations

import ctypes
import sys

import psutil

# What our stacks start: vLLM's processes name themselves with setproctitle; Ray's by binary or title.
MARKERS = ("VLLM::", "ray::", "gcs_server", "raylet", "dashboard/agent.py", "log_monitor.py", "bin/postgres",
           "postgres: ", "redis-server")


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def leftovers(since: float, orphans: bool = True) -> list[psutil.Process]:
    """Our processes still running: descendants of this process, and (with `orphans`) orphans
    re-parented to init born since `since` (a time.time()). The orphans are a guess: on a shared
    machine another session's daemons (`ray start` re-parents its own to init) match it too, so
    a subreaper (become_subreaper) counts only its descendants and kills nothing else."""
    me = psutil.Process()
    ours = {p.pid for p in me.children(recursive=True)}
    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            orphan = orphans and p.info["ppid"] == 1 and p.info["create_time"] >= since - 1
            if ((p.info["pid"] in ours or orphan) and p.info["status"] != psutil.STATUS_ZOMBIE
                    and any(m in cmd for m in MARKERS)):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def become_subreaper() -> bool:
    """Make this process the one its descendants' orphans are re-parented to (Linux
    PR_SET_CHILD_SUBREAPER), so `leftovers` finds them among its descendants wherever they would
    otherwise go (init, or a container's or a job runner's own subreaper, where `ppid == 1` would
    miss them). False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def rss_mb(p: psutil.Process) -> float:
    try:
        return float(p.memory_info().rss) / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return float("nan")
