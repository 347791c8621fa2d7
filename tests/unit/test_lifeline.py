"""An engine core must not outlive its replica (serve/engine/lifeline.py)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PARENT = textwrap.dedent("""
    import multiprocessing as mp, signal, sys, time
    sys.path.insert(0, {root!r})

    def child():
        from serve.engine.lifeline import exit_with_parent
        exit_with_parent(poll_s=0.1, grace_s=2)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # vLLM's engine core exits cleanly on it
        while True:
            time.sleep(1)

    if __name__ == "__main__":
        ctx = mp.get_context({method!r})
        if {method!r} == "forkserver":  # a CPU engine replica's engine core (serve/engine/forkserver.py)
            ctx.set_forkserver_preload(["serve.engine.lifeline"])
        p = ctx.Process(target=child)
        p.start()
        print(p.pid, flush=True)
        time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (init reaps it); /proc says which it is.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_child_ends_when_the_process_that_started_it_is_killed(tmp_path, method):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(ROOT), method=method))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1)  # ten of the lifeline's polls: it must not mistake a fork server for a dead parent
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)  # what an abrupt replica death looks like to the child
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the child outlived its parent"
    finally:
        parent.kill()


def test_replicas_start_engine_cores_through_the_lifeline():
    from vllm.v1.engine.core import EngineCoreProc

    from serve.engine import lifeline

    original = EngineCoreProc.__dict__["run_engine_core"]
    try:
        lifeline.tie_engine_cores_to_replica()
        lifeline.tie_engine_cores_to_replica()  # idempotent: never wraps itself
        assert EngineCoreProc.run_engine_core is lifeline.run_engine_core
        assert lifeline._ORIGINAL is original.__func__
        # spawn pickles the target by reference: the child imports our module, not vLLM's class.
        assert b"serve.engine.lifeline" in pickle.dumps(EngineCoreProc.run_engine_core)
    finally:
        EngineCoreProc.run_engine_core = original
        lifeline._ORIGINAL = None


def test_without_pidfds_the_lifeline_asks_until_the_process_is_gone(monkeypatch):
    from serve.engine import lifeline

    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")  # ENOSYS: Linux before 5.3

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    started = time.monotonic()
    reaper = threading.Thread(target=sleeper.wait)  # as the process's parent would
    reaper.start()
    lifeline._wait_for_exit(sleeper.pid, poll_s=0.05)
    assert 0.5 < time.monotonic() - started < 10
    reaper.join()
