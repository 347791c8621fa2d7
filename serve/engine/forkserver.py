"""CPU engine cores fork from a server that imported vLLM while the replica did.

A replica process imports vLLM's stack (~15 s on a 2-core box) before it can ask vLLM for its
engine core, and vLLM then starts the engine core with spawn: a fresh interpreter that imports the
same stack again (~15 s), after the first, while the machine's other core idles. Spawn is what vLLM
insists on in a Ray actor (``_maybe_force_spawn``), and rightly: forking a Ray worker copies its
gRPC threads mid-call.

Python's forkserver start method keeps spawn's clean child and drops the wait. Ray runs
``prestart`` first thing in the replica's worker process (the replica's environment names it as
the worker's setup hook: deployments.py, for CPU engines): once the worker knows it is a Serve
replica, it starts the fork server, a fresh interpreter (not a fork of the Ray worker) that imports
the engine core's modules on the other core while the replica imports its own. When vLLM starts
the engine core, the server forks it from that state (lifeline.py points vLLM's launcher here).

What a spawned child would get and a fork server's would not, the child gets here:
- the environment: a forked child inherits the server's, taken when the replica started, while
  vLLM sets variables for its engine core just before it starts it; ``EnvForwardingProcess``
  carries the replica's environment of that moment into the child;
- a watch on its replica: the server is the child's parent, so the engine core's lifeline watches
  the replica's pid, not its parent's (lifeline.py).

The server holds ~640 MB of RSS (torch and vLLM, imported), most of it shared with the engine core
it forked, and exits once the replica and its engine cores have. GPU engines keep vLLM's spawn: the
server would import torch before Ray assigns the replica its GPUs, and that path is not measured.

Ray's side of this is private surface, touched here only: the environment variable Ray's workers
read their setup hook from (what ``ray.init(runtime_env={"worker_process_setup_hook": ...})`` sets
for a job; an actor's own runtime_env does not honour that key), and the prefix of a Serve
replica's actor name. A Ray actor's children inherit its runtime_env, so the hook runs in each (Ray
Serve LLM's usage-report actor, for one); only a Serve replica starts a server.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from serve.engine import private

logger = logging.getLogger("llmserve.engine")

# In a replica's environment (deployments.py): vLLM's launcher starts engine cores from the fork server.
ENV = "LLMSERVE_ENGINE_FORKSERVER"

# What an engine core imports before it serves (module names; the server imports each and skips
# one that is not there). The first is the target vLLM's launcher pickles (lifeline.run_engine_core).
ENGINE_CORE_MODULES = ("serve.engine.lifeline", "serve.engine.forkserver", "vllm.v1.engine.core",
                       "vllm.v1.executor.uniproc_executor", "vllm.v1.worker.cpu_worker")

# What Ray's worker runs first thing (ray.get_runtime_context is the only thing it needs).
SETUP_HOOK = f"{__name__}.prestart"
# How a Serve replica's actor name starts (private.SERVE_REPLICA_PREFIX; test_private_surface
# holds the two equal). Not imported: the hook's thread would import ray.serve while the
# worker's main thread imports it too, and one of them would find it half initialized.
SERVE_REPLICA_PREFIX = "SERVE_REPLICA::"


def worker_environment() -> dict[str, str]:
    """The environment variables a CPU engine's replica gets for this (deployments.py)."""
    return {ENV: "1", private.WORKER_SETUP_HOOK_ENV.load(): SETUP_HOOK}


def prestart(wait_s: float = 60.0, poll_s: float = 0.01,
             runtime_context: Callable[[], Any] | None = None) -> threading.Thread:
    """Ray's setup hook: returns at once. A Ray worker learns which actor it runs a few ms after
    its setup hook ran, so a thread waits for that and starts the fork server if it is a Serve
    replica. Never raises (Ray would end the worker), and never sets the environment (the main
    thread may be reading it in C). `runtime_context`: Ray's, unless a test gives its own."""

    def start_if_replica() -> None:
        try:
            if runtime_context is None:
                import ray

                context = ray.get_runtime_context()
            else:
                context = runtime_context()
            deadline = time.monotonic() + wait_s
            while context.get_actor_id() is None:
                if time.monotonic() > deadline:
                    return
                time.sleep(poll_s)
            if (context.get_actor_name() or "").startswith(SERVE_REPLICA_PREFIX):
                start_server()
        except Exception:  # the engine core is then spawned, as vLLM does by itself
            logger.warning("could not start the engine core's fork server", exc_info=True)

    thread = threading.Thread(target=start_if_replica, name="llmserve-forkserver", daemon=True)
    thread.start()
    return thread


def start_server() -> None:
    """Start this process's fork server, preloading the engine core's modules, unless it runs."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(ENGINE_CORE_MODULES))
    forkserver.ensure_running()


class EnvForwardingProcess(multiprocessing.context.ForkServerProcess):
    """A fork server's child that runs with its starter's environment as of ``start()``, as a
    spawned child would, rather than with the server's, which dates from the server's start."""

    def start(self) -> None:
        self._starter_environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        _keep_process_title_settable()
        for key in set(os.environ) - set(self._starter_environ):
            del os.environ[key]
        for key, value in self._starter_environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        super().run()


def _keep_process_title_settable() -> None:
    """setproctitle (vLLM names its processes with it: VLLM::EngineCore) finds a process's argv
    from where its environment starts, the first time it is used. Once the environment has been
    rewritten it finds nothing, and every title set later is lost: use it first."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.getproctitle()


class EngineCoreContext(multiprocessing.context.ForkServerContext):
    Process = EnvForwardingProcess


def engine_core_context(environ: Any = os.environ) -> multiprocessing.context.BaseContext | None:
    """The context vLLM's launcher starts engine cores with in this process: the fork server's
    where the replica's environment asks for it, else None (vLLM's own). The server is the one
    ``prestart`` started, or one started now (no time saved, nothing lost)."""
    if environ.get(ENV) != "1":
        return None
    start_server()
    return EngineCoreContext()
