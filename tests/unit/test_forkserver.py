"""A CPU engine's core forks from a server its replica started first thing (serve/engine/forkserver.py).

The server is started in a child interpreter of each test that needs one: a fork server outlives
nothing but the process that started it, and this test session checks that nothing it started is
left at its end. vLLM's launcher is patched as the replica patches it (lifeline.py); Ray's runtime
context is a stand-in (no cluster starts)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray._common.utils import load_class  # how Ray's worker loads its setup hook
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray._private.workers import default_worker

from serve.config import ModelSpec
from serve.engine import forkserver, lifeline, private
from serve.engine.deployments import llm_config_for

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import multiprocessing, os, sys
    sys.path.insert(0, {root!r})
    from serve.engine.forkserver import EngineCoreContext

    def child(out):
        import setproctitle
        setproctitle.setproctitle("VLLM::EngineCore")  # what vLLM's engine core calls itself
        with open(f"/proc/{{os.getpid()}}/cmdline", "rb") as f:
            title = f.read().split(b"\\0")[0].decode()
        out.send((os.environ.get("SET_LATE"), os.environ.get("GONE_LATE"), title, os.getppid()))

    if __name__ == "__main__":
        os.environ["GONE_LATE"] = "1"
        multiprocessing.get_context("forkserver").set_forkserver_preload(["setproctitle"])
        from multiprocessing import forkserver
        forkserver.ensure_running()
        # Set and unset after the server started (vLLM sets its engine core's just before it starts it).
        os.environ["SET_LATE"] = "yes"
        del os.environ["GONE_LATE"]
        ctx = EngineCoreContext()
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=child, args=(theirs,))
        p.start()
        print(repr((*ours.recv(), os.getpid())))
        p.join()
""")


def test_a_fork_server_child_gets_its_starters_environment_and_can_name_itself(tmp_path):
    script = tmp_path / "starter.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    set_late, gone_late, title, child_parent, starter = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert child_parent != starter  # it really was forked by the server, not by its starter
    assert (set_late, gone_late) == ("yes", None)
    assert title == "VLLM::EngineCore"


def test_engine_cores_start_from_the_server_only_where_the_replicas_environment_asks(monkeypatch):
    started = []
    monkeypatch.setattr(forkserver, "start_server", lambda: started.append(1))
    assert forkserver.engine_core_context({}) is None
    assert forkserver.engine_core_context({forkserver.ENV: "0"}) is None
    assert started == []
    context = forkserver.engine_core_context({forkserver.ENV: "1"})
    assert isinstance(context, forkserver.EngineCoreContext)
    assert context.get_start_method() == "forkserver"
    assert context.Process is forkserver.EnvForwardingProcess
    assert started == [1]  # the prestarted server, or one started now


def _prestart(monkeypatch, actor_ids: list, name: str | None) -> list[int]:
    started: list[int] = []
    ids = iter(actor_ids)
    monkeypatch.setattr(forkserver, "start_server", lambda: started.append(1))
    context = SimpleNamespace(get_actor_id=lambda: next(ids, actor_ids[-1]), get_actor_name=lambda: name)
    thread = forkserver.prestart(wait_s=0.5, poll_s=0.001, runtime_context=lambda: context)
    assert isinstance(thread, threading.Thread)
    thread.join(5)
    assert not thread.is_alive()
    return started


def test_the_setup_hook_starts_a_server_in_a_serve_replica_once_the_worker_knows_it_is_one(monkeypatch):
    # A worker learns its actor a few ms after the hook ran: the hook must not give up at None.
    replica = f"{forkserver.SERVE_REPLICA_PREFIX}tiny#engine:tiny#ab12"
    assert _prestart(monkeypatch, [None, None, "actor-1"], replica) == [1]


def test_the_setup_hook_starts_nothing_in_the_actors_a_replica_starts(monkeypatch):
    # A replica's children inherit its runtime_env, hook included (Ray Serve LLM's usage reporter).
    assert _prestart(monkeypatch, ["actor-2"], "LLM_SERVE_TELEMETRY") == []
    assert _prestart(monkeypatch, [None], None) == []  # a task's worker: never an actor


def test_the_setup_hook_never_raises_into_rays_worker(monkeypatch):
    def broken() -> None:
        raise OSError("no fork server here")

    monkeypatch.setattr(forkserver, "start_server", broken)
    context = SimpleNamespace(get_actor_id=lambda: "a", get_actor_name=lambda: forkserver.SERVE_REPLICA_PREFIX + "x")
    errors: list[BaseException | None] = []
    hook = threading.excepthook
    # Only the hook's own thread: other threads of this session (Ray's) report through it too.
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value)
                        if args.thread is not None and args.thread.name == "llmserve-forkserver" else hook(args))
    forkserver.prestart(runtime_context=lambda: context).join(5)
    assert errors == []


def test_ray_runs_the_hook_named_in_a_workers_environment():
    """What the replica's environment relies on in Ray: its worker reads the setup hook's name from
    this variable at start and loads it by that name (an actor's runtime_env key
    `worker_process_setup_hook` is honoured for a job's runtime_env only)."""
    env = forkserver.worker_environment()
    assert env[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] == forkserver.SETUP_HOOK
    assert load_class(forkserver.SETUP_HOOK) is forkserver.prestart
    source = inspect.getsource(default_worker)
    assert "os.getenv(\n        ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in source
    assert "load_and_execute_setup_hook(worker_process_setup_hook_key)" in source
    assert private.SERVE_REPLICA_PREFIX.load() == forkserver.SERVE_REPLICA_PREFIX


@pytest.mark.parametrize("accelerator,own_env,expected", [
    ("cpu", {}, True),
    ("cpu", {forkserver.ENV: "0"}, False),  # a model may turn it off
    ("gpu", {}, False),  # GPU engines keep vLLM's spawn: not measured
])
def test_cpu_engines_replicas_start_their_fork_server(accelerator, own_env, expected):
    spec = ModelSpec(name="m", source="/models/m", accelerator=accelerator, env=own_env)
    env = llm_config_for(spec, "ns").runtime_env["env_vars"]
    assert (env.get(forkserver.ENV) == "1") is expected
    assert (env.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR) == forkserver.SETUP_HOOK) is (accelerator == "cpu")


def test_vllms_launcher_gets_the_fork_servers_context_where_the_replica_has_one(monkeypatch):
    from vllm.v1.engine import utils as launcher
    from vllm.v1.engine.core import EngineCoreProc

    monkeypatch.setattr(EngineCoreProc, "run_engine_core", EngineCoreProc.__dict__["run_engine_core"])
    monkeypatch.setattr(lifeline, "_ORIGINAL", None)
    vllms = launcher.get_mp_context
    monkeypatch.setattr(launcher, "get_mp_context", vllms)
    monkeypatch.setattr(forkserver, "start_server", lambda: None)
    lifeline.tie_engine_cores_to_replica()
    patched = launcher.get_mp_context
    lifeline.tie_engine_cores_to_replica()  # idempotent: never wraps itself
    assert launcher.get_mp_context is patched

    monkeypatch.delenv(forkserver.ENV, raising=False)
    assert launcher.get_mp_context().get_start_method() == vllms().get_start_method()
    monkeypatch.setenv(forkserver.ENV, "1")
    assert isinstance(launcher.get_mp_context(), forkserver.EngineCoreContext)
