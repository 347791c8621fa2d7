"""Closed engines: the engine secret, the guard in front of vLLM's app, adapter roots, and the
secret reaching engines (runtime_env) and leaving the gateway (HttpUpstream)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import types

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve.config import ModelSpec
from serve.contract import paths, secret
from serve.contract.paths import path_under_roots, runtime_adapters_for
from serve.contract.secret import RequireEngineSecret, ensure_engine_secret

SECRET = "s3cret-engine-token-0123456789"


def test_ensure_engine_secret_generates_once_and_keeps_a_given_one(monkeypatch):
    monkeypatch.delenv(secret.ENV, raising=False)
    assert secret.engine_secret() is None
    first = ensure_engine_secret()
    assert len(first) >= 32 and os.environ[secret.ENV] == first
    assert ensure_engine_secret() == first  # idempotent: the running engines keep theirs
    monkeypatch.setenv(secret.ENV, SECRET)
    assert ensure_engine_secret() == SECRET


@pytest.mark.parametrize("bad", ["short", "has$dollar-0123456789", "has space 0123456789"])
def test_a_secret_ray_or_http_would_mangle_is_refused(monkeypatch, bad):
    monkeypatch.setenv(secret.ENV, bad)
    with pytest.raises(ValueError, match=secret.ENV):
        secret.engine_secret()


def _engine_app() -> TestClient:
    """Stands in for vLLM's app: inference, LoRA loading, SageMaker's routes, the probe."""
    async def ok(request):
        return JSONResponse({"path": request.url.path})

    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/invocations", "/adapters", "/tokenize", "/health", "/llmserve/stats"]
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths])
    return TestClient(RequireEngineSecret(app, SECRET))


GUARDED = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/load_lora_adapter",
           "/v1/unload_lora_adapter", "/invocations", "/adapters", "/tokenize", "/health/"]


@pytest.mark.parametrize("path", GUARDED)
def test_guard_refuses_every_route_without_the_secret(path):
    client = _engine_app()
    for headers in [{}, {"Authorization": "Bearer wrong-secret-0123456789"},
                    {"Authorization": f"Basic {SECRET}"}, {"Authorization": SECRET},
                    {"Authorization": f"Bearer {SECRET}x"}]:
        r = client.post(path, json={}, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"


def test_guard_passes_the_secret_and_leaves_the_probe_open():
    client = _engine_app()
    r = client.post("/v1/chat/completions", json={}, headers={"Authorization": f"bearer {SECRET}"})
    assert r.status_code == 200 and r.json() == {"path": "/v1/chat/completions"}
    assert client.get("/health").status_code == 200
    assert client.get("/llmserve/stats").status_code == 200


def test_paths_under_roots(tmp_path):
    root = tmp_path / "adapters"
    (root / "a").mkdir(parents=True)
    (tmp_path / "adapters-evil").mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert path_under_roots(str(root / "a"), [str(root)])
    assert path_under_roots(str(root / "a"), [str(tmp_path / "other"), str(root)])
    assert not path_under_roots(str(root / "a"), [])
    assert not path_under_roots(str(tmp_path / "adapters-evil"), [str(root)])  # a prefix is not a parent
    assert not path_under_roots(str(root / ".." / "outside"), [str(root)])
    assert not path_under_roots(str(root / "link"), [str(root)])  # a symlink out of the root
    assert not path_under_roots("adapters/a", [str(root)])  # relative: depends on the replica's cwd


def test_runtime_adapters_only_under_the_roots_and_for_this_base(tmp_path):
    root = tmp_path / "adapters"
    entries = {
        b"good": json.dumps({"base": "m", "path": str(root / "good")}),
        b"far": json.dumps({"base": "m", "path": "/etc"}),
        b"other-base": json.dumps({"base": "n", "path": str(root / "x")}),
        b"no-path": json.dumps({"base": "m"}),
    }
    allowed, refused = runtime_adapters_for(entries, "m", [str(root)])
    assert allowed == [{"name": "good", "path": str(root / "good")}]
    assert refused == ["far", "no-path"]
    assert runtime_adapters_for(entries, "m", []) == ([], ["good", "far", "no-path"])


def _fake_llm_config(monkeypatch):
    """LLMConfig's kwargs as given (importing ray.serve.llm loads vLLM: half a minute on 2 cores)."""
    fake = types.ModuleType("ray.serve.llm")
    fake.LLMConfig = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "ray.serve.llm", fake)


def test_llm_config_carries_adapter_roots_and_never_the_secret(monkeypatch):
    """Serve logs a deployment's options and the dashboard shows them: the secret reaches engines
    through the raylet's environment only, and a model's env cannot set another one."""
    from serve.engine.deployments import llm_config_for

    _fake_llm_config(monkeypatch)
    monkeypatch.setenv(secret.ENV, SECRET)
    spec = ModelSpec(name="m", source="org/model", env={secret.ENV: "from-the-yaml-0123456789"})
    config = llm_config_for(spec, "ns", adapter_roots=["/data/a", "/data/b"])
    env = config["runtime_env"]["env_vars"]
    assert secret.ENV not in env and SECRET not in repr(config)
    assert env[paths.ADAPTER_ROOTS_ENV] == os.pathsep.join(["/data/a", "/data/b"])
    env = llm_config_for(ModelSpec(name="m", source="org/model"), "ns")["runtime_env"]["env_vars"]
    assert paths.ADAPTER_ROOTS_ENV not in env


def test_http_upstream_sends_the_secret_when_given():
    from aiohttp import web

    from serve.gateway.upstream import HttpUpstream

    seen: list[dict[str, str]] = []

    async def handler(request):
        seen.append(dict(request.headers))
        return web.json_response({"ok": True})

    async def main():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        try:
            for up in (HttpUpstream(secret=SECRET), HttpUpstream()):
                r = await up.post(f"http://127.0.0.1:{port}", "/v1/chat/completions", b"{}", stream=False,
                                  timeout_s=5)
                await up.close()
                assert r.status == 200
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert seen[0]["Authorization"] == f"Bearer {SECRET}"
    assert "Authorization" not in seen[1]
