"""Serve application builders, for `serve run` / KubeRay `serveConfigV2` import paths.

    applications:
      - name: tiny
        import_path: serve.engine.app:build
        args: {model: {...one entry of `models`...}, namespace: llmserve}
"""

from __future__ import annotations

from typing import Any

from serve.config import ModelSpec
from serve.engine.deployments import build_engine_app


def build(args: dict[str, Any]) -> Any:  # -> ray.serve.Application
    spec = ModelSpec.model_validate(args["model"])
    return build_engine_app(spec, str(args.get("namespace", "llmserve")), args.get("redis_url"))
