"""serve/launch: the import paths Serve and the chart name resolve to the one builder of each
process kind, and the driver names the engine builder without importing it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def resolve(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_the_driver_names_the_engine_replica_builder():
    from serve.engine import cluster
    from serve.launch import engine_replica

    assert cluster.ENGINE_APP == engine_replica.IMPORT_PATH
    assert resolve(cluster.ENGINE_APP) is engine_replica.build
    apps = cluster.serve_deploy_config(_config())["applications"]
    assert {a["import_path"] for a in apps} == {"serve.launch.engine_replica:build"}


def test_the_driver_imports_no_launch_module_for_the_engines():
    """cluster.py names the builder as a string: importing it must not pull the launch package in
    (in a fresh interpreter: this one has imported the launch modules for the other tests)."""
    code = ("import sys, serve.engine.cluster; "
            "print(sorted(m for m in sys.modules if m.startswith('serve.launch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _config():
    from serve.config import Config

    return Config.model_validate({"models": [{"name": "m", "source": "builtin:tiny"}]})
