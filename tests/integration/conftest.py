"""One Ray cluster, one set of real vLLM-CPU engines and one gateway for the whole test session.

Starting engines costs minutes on 2 cores, so everything integration-level shares them: two tiny
generate models with different seeds (a student and a teacher) and a tiny embedding model.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from serve.config import Config

pytestmark = pytest.mark.integration

ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 16,
          "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


def stack_config(port: int) -> Config:
    return Config.model_validate({
        "models": [
            {"name": "tiny-a", "source": "builtin://tiny?seed=1", "accelerator": "cpu", "engine": ENGINE},
            {"name": "tiny-b", "source": "builtin://tiny?seed=2", "accelerator": "cpu", "engine": ENGINE},
            {"name": "tiny-embed", "source": "builtin://tiny?seed=1", "accelerator": "cpu", "task": "embed",
             "engine": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}},
        ],
        "gateway": {"host": "127.0.0.1", "port": port, "request_timeout_s": 60},
        "ray": {"num_cpus": 8, "namespace": "llmserve-test"},
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, config: Config, registry, server, thread):
        self.config = config
        self.registry = registry
        self.server = server
        self.thread = thread
        self.base_url = f"http://127.0.0.1:{config.gateway.port}/v1"

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="test", max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    import uvicorn

    from serve.engine.cluster import deploy_models, shutdown, wait_for_engines
    from serve.gateway.server import build_gateway, ray_snapshot_source, uvicorn_config

    os.environ.setdefault("LLMSERVE_CACHE_DIR", str(tmp_path_factory.getbasetemp().parent / "llmserve-cache"))
    config = stack_config(free_port())
    registry = deploy_models(config)
    try:
        wait_for_engines(registry, [m.name for m in config.models], timeout_s=900)
        app = build_gateway(config, ray_snapshot_source(registry))
        server = uvicorn.Server(uvicorn_config(app, config))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        yield Stack(config, registry, server, thread)
        server.should_exit = True
        thread.join(timeout=40)
    finally:
        shutdown(config)
