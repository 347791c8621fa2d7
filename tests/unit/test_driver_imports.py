"""`llmserve run`'s driver runs the gateway: it must never import vLLM or torch (~500 MB and ~20 s
of CPU it never uses; issue 17). Models are deployed by import path through Serve's declarative
config, as KubeRay deploys the chart's, so only Serve's build task and the replicas import them.
These tests check both halves: the driver's path stays clean, and the import path builds the
very application the driver used to build itself."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from serve.config import Config, load_config
from serve.engine.cluster import serve_deploy_config, with_other_apps

ROOT = Path(__file__).resolve().parents[2]

# The whole start of `llmserve run` short of the processes Ray would start: the CLI's parser,
# start_stack (deploy_models down to the Serve client, the batch worker) with Ray's edges faked,
# and the gateway app through its lifespan. Prints the deployed config and what is imported.
DRIVER = textwrap.dedent("""
    import asyncio, json, sys

    import ray.serve
    import ray.serve.context

    import serve.engine.cluster as cluster
    import serve.launch.batch_worker as batch_actor
    import serve.launch.local
    from serve.cli import build_parser
    from serve.config import load_config
    from serve.gateway.server import build_gateway, listen, ray_snapshot_source, gateway_uvicorn_config

    deployed = []

    class FakeClient:  # Serve's controller client, without a controller
        def get_serve_details(self):
            return {"applications": {}, "target_capacity": None}

        def deploy_apps(self, schema, _blocking=True):
            deployed.append(schema.model_dump(mode="json", exclude_unset=True))

    class FakeRegistry:
        class snapshot:
            @staticmethod
            def remote():
                async def empty():
                    return {}
                return empty()

    ray.serve.start = lambda **kw: None
    ray.serve.context._get_global_client = lambda: FakeClient()
    cluster.connect_ray = lambda config: None
    cluster.get_registry = lambda namespace: FakeRegistry()
    batch_actor.start_batch_worker = lambda config: None

    args = build_parser().parse_args(["run", "--port", "0"])
    config = load_config(args.config)
    config.gateway.port = 0
    config.gateway.metrics_port = 0
    phases = []
    registry = serve.launch.local.start_stack(config, phases.append)
    app = build_gateway(config, ray_snapshot_source(registry))
    gateway_uvicorn_config(app, config)
    for s in listen(app, config):
        s.close()

    from starlette.testclient import TestClient

    with TestClient(app) as client:  # the lifespan: discovery, cache, limiter, lifecycle
        assert client.get("/v1/models").status_code == 200
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "torch"))
    print(json.dumps({"heavy": heavy, "deployed": deployed, "phases": phases}))
""")


def run_driver(tmp_path: Path) -> dict[str, Any]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LLMSERVE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_driver_imports_neither_vllm_nor_torch(tmp_path):
    out = run_driver(tmp_path)
    assert out["heavy"] == []
    # What it submitted is the config serve_deploy_config gives (the one checked below).
    [deployed] = out["deployed"]
    assert deployed["applications"] == serve_deploy_config(load_config(None))["applications"]
    assert deployed["proxy_location"] == "Disabled"
    # The phases `llmserve run` prints (and bench/start.py reads), in order.
    assert out["phases"] == ["Ray started", "models deployed: tiny (Serve builds and loads them now)",
                             "batch worker started"]


def rich_config() -> Config:
    """Every engine argument the args carry: adapters, Redis, adapter roots, autoscaling, env."""
    return Config.model_validate({
        "models": [
            {"name": "tiny-a", "source": "builtin://tiny?seed=1", "accelerator": "cpu",
             "engine": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True},
             "env": {"FOO": "1"}, "adapters": [{"name": "tiny-a-faq", "path": "/data/adapters/faq"}],
             "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}},
            {"name": "big", "source": "org/model", "accelerator": "gpu", "task": "embed",
             "deployment": {"num_gpus": 1, "accelerator_type": "L4", "replicas": 2}},
        ],
        "cache": {"redis_url": "redis://127.0.0.1:6379/0"},
        "gateway": {"adapter_roots": ["/data/adapters"]},
        "ray": {"namespace": "ns1"},
    })


@pytest.mark.parametrize("config", [load_config(None), rich_config()], ids=["default", "rich"])
def test_the_deploy_config_is_valid_and_builds_the_same_apps(config, monkeypatch):
    """Each application, imported and called as Serve's build task does (args through JSON),
    builds what build_engine_app builds for the model in the driver: the same LLMConfig, the same
    deployment class, name and bind arguments."""
    import ray.serve.llm
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from serve.engine import deployments

    ray_before = ray.is_initialized()
    deploy = serve_deploy_config(config)
    schema = ServeDeploySchema.model_validate(deploy)
    assert [a.name for a in schema.applications] == [m.name for m in config.models]
    assert all(a.route_prefix is None for a in schema.applications)
    assert schema.proxy_location == "Disabled"

    # Resolving builtin://tiny would build it: both sides get the same stand-in path.
    monkeypatch.setattr(deployments, "resolve_source", lambda spec: f"/models/{spec.name}")
    calls: list[tuple[Any, dict[str, Any]]] = []
    real = ray.serve.llm.build_llm_deployment

    def recording(llm_config: Any, **kwargs: Any) -> Any:
        calls.append((llm_config, kwargs))
        return real(llm_config, **kwargs)

    monkeypatch.setattr(ray.serve.llm, "build_llm_deployment", recording)
    # get_deployment_options reads the caller's runtime_env; outside a Ray worker that call would
    # start a whole local Ray cluster (auto-init) and leave it for atexit. A driver with no
    # runtime_env of its own sees an empty one, which is what this stands for.
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env={}))
    for spec, app in zip(config.models, deploy["applications"], strict=True):
        module, attr = app["import_path"].split(":")
        args = json.loads(json.dumps(app["args"]))  # what reaches the build task
        built = getattr(importlib.import_module(module), attr)(copy.deepcopy(args))
        assert isinstance(built, serve.Application)
        expected = deployments.build_engine_app(spec, config.ray.namespace, config.gateway.adapter_roots)
        assert isinstance(expected, serve.Application)
        (got_cfg, got_kw), (want_cfg, want_kw) = calls[-2:]
        assert got_cfg.model_dump() == want_cfg.model_dump()
        assert got_kw == want_kw
        assert got_cfg.model_loading_config.model_id == spec.name
    assert ray.is_initialized() == ray_before  # (the integration session's Ray may be up already)


def test_other_owners_declarative_apps_are_kept_and_ours_replaced():
    ours = serve_deploy_config(load_config(None))
    theirs = {"name": "theirs", "import_path": "pkg.app:build", "route_prefix": "/x"}
    details = {
        "target_capacity": 50.0,
        "applications": {
            "theirs": {"source": "declarative", "status": "RUNNING", "deployed_app_config": theirs},
            # Ours, deployed before with other args: replaced by the new config, not duplicated.
            "tiny": {"source": "declarative", "status": "RUNNING",
                     "deployed_app_config": {"name": "tiny", "import_path": "old:build"}},
            "handmade": {"source": "imperative", "status": "RUNNING", "deployed_app_config": None},
            "going": {"source": "declarative", "status": "DELETING",
                      "deployed_app_config": {"name": "going", "import_path": "pkg.going:build"}},
        },
    }
    merged = with_other_apps(ours, details)
    assert merged["applications"] == [*ours["applications"], theirs]
    assert merged["target_capacity"] == 50.0
    assert with_other_apps(ours, {})["applications"] == ours["applications"]


class App:
    """serve.status()'s view of one application."""

    def __init__(self, status: str, deployments: int = 0, message: str = "") -> None:
        self.status, self.message = status, message
        self.deployments = {f"engine:{i}": object() for i in range(deployments)}


class Registry:
    """The registry actor's snapshots, one a poll (ray.get is the identity here)."""

    def __init__(self, snaps: list[dict[str, list]]) -> None:
        self.snaps = snaps
        self.snapshot = self

    def remote(self) -> dict[str, list]:
        return self.snaps.pop(0) if len(self.snaps) > 1 else self.snaps[0]


@pytest.fixture
def polls(monkeypatch):
    """Feed wait_for_engines Serve's application states, one a poll, without Ray."""
    import ray

    from serve.engine import cluster

    states: list[dict[str, App]] = []
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(cluster, "_serve_apps", lambda: states.pop(0) if len(states) > 1 else states[0])
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    return states


def test_wait_for_engines_reports_each_build_once_then_ready(polls):
    from serve.engine.cluster import wait_for_engines

    polls += [{"a": App("DEPLOYING"), "b": App("DEPLOYING")},
              {"a": App("DEPLOYING", 1), "b": App("DEPLOYING")},
              {"a": App("DEPLOYING", 1), "b": App("DEPLOYING", 1)},
              {"a": App("RUNNING", 1), "b": App("RUNNING", 1)}]
    registry = Registry([{}, {}, {"a": [("r1", "http://a")]}, {"a": [("r1", "http://a")], "b": [("r2", "http://b")]}])
    built: list[str] = []
    snap = wait_for_engines(registry, ["a", "b"], timeout_s=60, on_built=built.append)
    assert built == ["a", "b"]
    assert snap == {"a": [("r1", "http://a")], "b": [("r2", "http://b")]}


def test_a_failed_build_is_an_engine_start_error_with_serves_message(polls):
    from serve.engine.cluster import EngineStartError, wait_for_engines

    message = "Deploying app 'a' failed with exception:\nValueError: unknown builtin shape"
    polls += [{"a": App("DEPLOYING")}, {"a": App("DEPLOY_FAILED", message=message)}]
    with pytest.raises(EngineStartError) as e:
        wait_for_engines(Registry([{}]), ["a"], timeout_s=2)
    assert str(e.value) == f"a: {message}"


def test_bench_start_reads_the_phases_llmserve_run_prints(capsys):
    """The lines cmd_run prints are the ones `make bench-start` times (bench/start.py)."""
    from bench.start import durations, parse_phase, timeline
    from serve.cli.run import Phases

    phases = Phases()
    print("llmserve: starting Ray and the engines (the first start builds the tiny model)...")
    for what in ("Ray started", "models deployed: tiny (Serve builds and loads them now)", "batch worker started",
                 "gateway on http://127.0.0.1:8000/v1 (engines are loading; /health says when)",
                 "tiny: application built, engine loading", "engines ready"):
        phases(what)
    print("llmserve: ready after 45s: http://127.0.0.1:8000/v1")
    # Arrival times as the bench would note them: one second a line.
    lines = [(float(i), line) for i, line in enumerate(capsys.readouterr().out.splitlines())]
    events = timeline(lines)
    assert events == {"process up": 0.0, "Ray started": 1.0, "models deployed": 2.0, "batch worker started": 3.0,
                      "gateway on": 4.0, "tiny built": 5.0, "engines ready": 6.0, "ready": 7.0}
    assert durations(events, ["tiny"]) == {"Ray start": 1.0, "model build": 3.0, "engine load": 1.0,
                                           "first request": 1.0}
    what, seconds = parse_phase(lines[1][1]) or ("", -1.0)
    assert what == "Ray started" and 0 <= seconds < 5  # seconds since the command started


@pytest.mark.parametrize("observability", [False, True])
def test_a_local_ray_records_metrics_and_task_events_only_when_asked(observability, monkeypatch):
    """connect_ray starts a local Ray without metrics collection or task events unless
    `ray.observability` (nothing reads them in a local run); joining a cluster passes neither."""
    import ray

    from serve.engine import cluster

    calls: list[dict[str, Any]] = []
    heads: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    # The local head starts in a keeper process of its own session (serve/engine/head.py) with these
    # arguments; the driver then joins it at the address the keeper prints.
    monkeypatch.setattr(cluster, "start_head", lambda kw: heads.append(kw) or "127.0.0.1:6379")
    config = Config.model_validate({"models": [{"name": "m", "source": "builtin://tiny", "accelerator": "cpu"}],
                                    "ray": {"observability": observability}})
    cluster.connect_ray(config)
    quiet = {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}
    assert heads[-1].get("_system_config") == (None if observability else quiet)
    assert calls[-1]["address"] == "127.0.0.1:6379" and "_system_config" not in calls[-1]
    config.ray.address = "auto"
    cluster.connect_ray(config)
    assert len(heads) == 1 and "_system_config" not in calls[-1] and calls[-1]["address"] == "auto"
