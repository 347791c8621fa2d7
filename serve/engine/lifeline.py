"""An engine core dies with the replica that started it.

vLLM runs its engine core (`VLLM::EngineCore`, and under it any `VLLM::Worker`) in a child process
of the replica and stops it from the replica's shutdown path. When the replica dies any other way,
the child is re-parented to init and runs on: every stop that signals a whole process group (a
`killpg` of `llmserve run`, Ctrl-C's SIGINT, a `timeout`), a Ray worker killed for a failed health
check, an OOM kill, `ray.shutdown()` racing a replica's graceful stop. On a 2-core box one such
orphan (~750 MB, 10-40% of a core) spoils every later measurement.

So the replica starts its engine cores through `run_engine_core`, which first starts a lifeline
thread in the child: once the replica has exited, the child sends itself SIGTERM, which vLLM's
own handler turns into a clean shutdown of the engine core and its workers; if that hangs, it
exits hard. It watches the replica's pid (a pidfd), not its own parent: an engine core forked by
the replica's fork server (serve/engine/forkserver.py) has the server as parent.

This is the only place that touches vLLM's engine-core launch (`EngineCoreProc.run_engine_core`,
the entry point, and `vllm.v1.engine.utils.get_mp_context`, where the launcher gets its
multiprocessing context: private surfaces): an upgrade of vLLM is checked here.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from serve.engine import private
from serve.engine.forkserver import engine_core_context

logger = logging.getLogger("llmserve.engine")

_ORIGINAL: Callable[..., Any] | None = None  # vLLM's entry point, in the process that patched it


def exit_with_parent(poll_s: float = 0.5, grace_s: float = 10.0) -> threading.Thread:
    """Start a daemon thread that ends this process once the process that started it is gone:
    SIGTERM first (the process's own clean shutdown), then a hard exit after `grace_s`."""
    import multiprocessing

    # The pid multiprocessing was started from, not getppid(): a fork server's child has the server
    # as its parent, and if the starter died before this line ran, getppid() would already name init.
    started_by = multiprocessing.parent_process()
    starter = started_by.pid if started_by is not None and started_by.pid else os.getppid()

    def watch() -> None:
        _wait_for_exit(starter, poll_s)
        logger.warning("process %d that started this one is gone; shutting down (pid %d)", starter, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="llmserve-lifeline", daemon=True)
    thread.start()
    return thread


def _wait_for_exit(pid: int, poll_s: float) -> None:
    """Return once `pid` has exited (a zombie counts as exited)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (Linux < 5.3): ask every poll_s; a zombie still answers signal 0
        while _exists(pid):
            time.sleep(poll_s)
        return
    try:
        # A pidfd reads ready once the process has exited, before its parent reaps it.
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def run_engine_core(*args: Any, **kwargs: Any) -> Any:
    """vLLM's engine-core entry point, with a lifeline to the replica. Runs in the child: under
    spawn this module is imported fresh there, and under a fork server (CPU engines) it was imported
    by the server, which never patched vLLM's class; under fork, `_ORIGINAL` came along."""
    exit_with_parent()
    if _ORIGINAL is not None:
        return _ORIGINAL(*args, **kwargs)
    return private.ENGINE_CORE_RUN.load()(*args, **kwargs)


def tie_engine_cores_to_replica() -> None:
    """Make engine cores started from this process from now on use `run_engine_core`, from this
    process's fork server where it has one (forkserver.py). Idempotent."""
    global _ORIGINAL
    launcher = private.ENGINE_CORE_MP_CONTEXT.owner()
    EngineCoreProc = private.ENGINE_CORE_RUN.owner()

    if EngineCoreProc.run_engine_core is not run_engine_core:
        _ORIGINAL = EngineCoreProc.run_engine_core
        # vLLM's launcher reads the attribute when it starts the process, and spawn pickles the
        # target by reference: the child imports this module and calls run_engine_core.
        EngineCoreProc.run_engine_core = staticmethod(run_engine_core)
    if not getattr(launcher.get_mp_context, "llmserve", False):
        launcher.get_mp_context = _engine_core_mp_context(launcher.get_mp_context)


def _engine_core_mp_context(vllm_context: Callable[[], Any]) -> Callable[[], Any]:
    def get_mp_context() -> Any:
        # vLLM's first: it also prepares the environment its child inherits (RAY_ADDRESS in Ray).
        context = vllm_context()
        return engine_core_context() or context

    get_mp_context.llmserve = True  # type: ignore[attr-defined]
    return get_mp_context
