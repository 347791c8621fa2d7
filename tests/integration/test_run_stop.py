"""`llmserve run` as a user runs it: ready, answering, then SIGTERM: exit 0, no error printed, and
every process it started (Ray's daemons and workers, the vLLM engine core) gone. (Last in the
session: it starts a second, independent Ray cluster next to the shared one.)"""

from __future__ import annotations

import os
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


def test_llmserve_run_stops_every_process_it_started(tmp_path, stack):
    from openai import OpenAI

    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "LLMSERVE__GATEWAY__METRICS_PORT": str(metrics_port)}
    env.pop("LLMSERVE_ENGINE_SECRET", None)  # `llmserve run` makes its own
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "run", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while b"llmserve: ready after" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.choices[0].message.content is not None
        started = psutil.Process(proc.pid).children(recursive=True)
        titles = [" ".join(p.cmdline()) for p in started]
        assert any("VLLM::EngineCore" in t for t in titles), titles  # the tree really holds an engine
        # The engine core was forked by its replica's fork server, which the replica started first
        # thing (serve/engine/forkserver.py), rather than spawned after the replica's import.
        core = next(p for p in started if "VLLM::EngineCore" in " ".join(p.cmdline()))
        server = core.parent()
        assert FORKSERVER in " ".join(server.cmdline()), titles
        assert "ServeReplica:tiny:" in " ".join(server.parent().cmdline()), titles

        proc.send_signal(signal.SIGTERM)  # to the process, as Kubernetes or systemd would
        assert proc.wait(120) == 0, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 30  # an engine core's lifeline allows it a clean shutdown
        alive = [p for p in started if _alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in alive if _alive(p)]
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        text = log_path.read_text()
        assert "Traceback" not in text and "Failed to connect to GCS" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
