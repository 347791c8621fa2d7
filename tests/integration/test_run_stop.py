"""`llmserve run` as a user runs it: ready, answering, then each stop a user's tools send (SIGTERM or
SIGINT, to the process or to its whole process group): within 10 s the documented exit code, no
error printed, and every process it started (Ray's daemons and workers, the vLLM engine core) gone. (Last in the
session: it starts a second, independent Ray cluster next to the shared one.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench.procs import FORKSERVER
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.destructive]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Each stop a user's tools send: SIGTERM to the process (Kubernetes, `kill`), SIGTERM to its whole
# process group (systemd's control-group kill, `kill -TERM -<pgid>`), SIGINT to the process, and
# SIGINT to the group (Ctrl-C in a terminal). Exit codes: 0 for SIGTERM (a drained gateway did
# what was asked), 130 for SIGINT (serve/cli/__init__.py main, the shell's convention).
#
# Every stop costs a fresh `llmserve run` (~70 s beside the shared stack on 2 cores), and CI's 25
# minutes hold two: SIGTERM to the process (Kubernetes) and SIGINT to the group (Ctrl-C), which
# between them take both handlers and both targets. The other two pairings run with
# LLMSERVE_ALL_STOPS=1 (the CI at e3cb3a3 took ~23 minutes of its 25 with all four).
_EVERY_STOP = pytest.mark.skipif(not os.environ.get("LLMSERVE_ALL_STOPS"), reason=(
    "~70 s each of CI's 25 minutes; the CI pair covers both handlers and both targets; LLMSERVE_ALL_STOPS=1 runs it"))
STOPS = [pytest.param(signal.SIGTERM, "driver", 0, id="SIGTERM-driver"),
         pytest.param(signal.SIGTERM, "group", 0, id="SIGTERM-group", marks=_EVERY_STOP),
         pytest.param(signal.SIGINT, "driver", 130, id="SIGINT-driver", marks=_EVERY_STOP),
         pytest.param(signal.SIGINT, "group", 130, id="SIGINT-group")]
STOP_S = 10.0  # issue 25: every stop ends everything it started within 10 s
ERRORS = re.compile(r"Traceback|Error|ERROR|Failed to connect")


@pytest.mark.parametrize(("sig", "target", "code"), STOPS)
def test_llmserve_run_stops_every_process_it_started(tmp_path, stack, sig, target, code):
    from openai import OpenAI

    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "LLMSERVE__GATEWAY__METRICS_PORT": str(metrics_port)}
    env.pop("LLMSERVE_ENGINE_SECRET", None)  # `llmserve run` makes its own
    log_path, err_path = tmp_path / "run.log", tmp_path / "run.err"
    with open(log_path, "wb") as log, open(err_path, "wb") as err:
        # Its own session, so that a signal to its group reaches nothing of pytest's.
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "run", "--port", str(port)], env=env,
                                stdout=log, stderr=err, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 900
        while b"llmserve: ready after" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()[-3000:] + err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.choices[0].message.content is not None
        started = psutil.Process(proc.pid).children(recursive=True)
        titles = [" ".join(p.cmdline()) for p in started]
        assert any("VLLM::EngineCore" in t for t in titles), titles  # the tree really holds an engine
        assert any(t.split(" ", 1)[0].endswith("/gcs_server") for t in titles), titles  # and Ray's daemons
        # The engine core was forked by its replica's fork server, which the replica started first
        # thing (serve/engine/forkserver.py), rather than spawned after the replica's import.
        core = next(p for p in started if "VLLM::EngineCore" in " ".join(p.cmdline()))
        server = core.parent()
        assert FORKSERVER in " ".join(server.cmdline()), titles
        assert "ServeReplica:tiny:" in " ".join(server.parent().cmdline()), titles

        signalled = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            exited = proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            exited = None
        alive = [p for p in started if _alive(p)]
        while alive and time.monotonic() < signalled + STOP_S:
            time.sleep(0.2)
            alive = [p for p in alive if _alive(p)]
        took = time.monotonic() - signalled
        print(f"{sig.name} to the {target}: exit {exited}, every process gone after {took:.1f}s")  # -rP shows it
        out = log_path.read_text()[-3000:] + err_path.read_text()[-3000:]
        assert exited == code, out
        assert not alive, ([" ".join(p.cmdline())[:120] for p in alive], out)
        assert took < STOP_S, out
        errors = [line for line in err_path.read_text().splitlines() if ERRORS.search(line)]
        assert not errors, errors
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in started:  # what a failed stop left spoils no later test
            if _alive(p):
                p.kill()
