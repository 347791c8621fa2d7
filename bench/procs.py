"""The processes our stacks start, found by what they call themselves. Shared by the tests'
session check (tests/conftest.py: nothing the tests started outlives them), `make bench-start`
(bench/start.py: nothing a stopped `llmserve run` started outlives it), and the CPU each process
of a serving tree spends, by role (`make bench`, bench/profile.py)."""

from __future__ import annotations

import ctypes
import sys

import psutil

# A CPU engine replica's fork server (serve/engine/forkserver.py): an ordinary python command line.
FORKSERVER = "from multiprocessing.forkserver import main"
# What our stacks start: vLLM's processes name themselves with setproctitle; Ray's by binary or title.
MARKERS = ("VLLM::", "ray::", "gcs_server", "raylet", "dashboard/agent.py", "log_monitor.py", "bin/postgres",
           "postgres: ", "redis-server", FORKSERVER)


# A process's role from its command line (setproctitle names for vLLM and Ray workers); the first
# match wins, so the specific titles come before "ray::", which every Ray worker's title has.
TITLES = (("ServeReplica:", "engine replica"), ("VLLM::EngineCore", "engine core"), ("VLLM::Worker", "VLLM::Worker"),
          ("ServeController", "Serve controller"), ("dashboard/agent.py", "dashboard agent"),
          ("runtime_env/agent/main.py", "runtime env agent"), ("log_monitor.py", "log monitor"),
          ("ray::IDLE", "idle Ray workers"),
          (FORKSERVER, "engine fork server"))
# Ray's C++ daemons, matched on the executable only: other processes' arguments name them
# (a worker's `--raylet-name=.../raylet`).
BINARIES = ("raylet", "gcs_server")


def classify(cmd: str, is_root: bool = False, root_label: str = "gateway") -> str:
    """The role of a process of a serving tree from its command line; `is_root`: the server
    process itself (`llmserve run`: the gateway; bare vLLM: its API server), whose title is an
    ordinary python command line."""
    if is_root:
        return root_label
    for marker, label in TITLES:
        if marker in cmd:
            return label
    if cmd.startswith("ray::"):  # another actor: its class ("ray::EngineRegistry.snapshot" -> ray::EngineRegistry)
        return "ray::" + cmd[5:].split(" ", 1)[0].split(".", 1)[0]
    exe = cmd.split(" ", 1)[0].rsplit("/", 1)[-1]
    return exe if exe in BINARIES else "other"


def tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def cpu_seconds(root: psutil.Process, root_label: str = "gateway") -> dict[int, tuple[str, float]]:
    """{pid: (role, user+system CPU seconds)} for every process of root's tree now."""
    out = {}
    for p in tree(root):
        try:
            t = p.cpu_times()
            out[p.pid] = (classify(cmdline(p), p.pid == root.pid, root_label), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role spent between two snapshots ({pid: (label, seconds)}); a process born
    in between is charged all of its CPU; one that ended in between is lost (not measurable)."""
    out: dict[str, float] = {}
    for pid, (label, secs) in after.items():
        out[label] = out.get(label, 0.0) + secs - before.get(pid, (label, 0.0))[1]
    return out


def cpu_ms_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], completed: int,
                       extra_s: dict[str, float] | None = None) -> dict[str, float]:
    """Each role's CPU between two snapshots, the tree's `total`, and any `extra_s` (seconds of
    processes outside the tree), in ms per completed request, most first; no request counts as one."""
    cpu = cpu_by_label(before, after)
    cpu["total"] = sum(cpu.values())
    cpu.update(extra_s or {})
    return {k: round(v * 1000 / max(completed, 1), 3) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}


def machine_busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot (every process, ours or not)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


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


def uss_mb(p: psutil.Process) -> float:
    """Memory only this process holds (what its exit would free): a forked process's RSS also
    counts the pages it still shares with its parent and siblings."""
    try:
        return float(p.memory_full_info().uss) / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return float("nan")
