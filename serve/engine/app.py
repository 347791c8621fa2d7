"""Serve application builders, for `serve run` / KubeRay `serveConfigV2` import paths.

    applications:
      - name: tiny
        import_path: serve.engine.app:build
        args: {model: {...one entry of `models`...}, namespace: llmserve, adapter_roots: [...]}
"""

from __future__ import annotations

import os
from typing import Any

from serve.config import ModelSpec
from serve.engine.deployments import build_engine_app

# What Serve imports to build a model's application: the chart's serveConfigV2 and `llmserve run`
# (serve/engine/cluster.py serve_deploy_config) name it. Importing this module is cheap (vLLM is
# imported only when build() runs), so the driver may name it without importing vLLM.
IMPORT_PATH = f"{__name__}:build"


def build(args: dict[str, Any]) -> Any:  # -> ray.serve.Application
    spec = ModelSpec.model_validate(args["model"])
    # The Redis URL (runtime-promoted adapters) comes with the args or the pod's environment: the
    # chart sets LLMSERVE__CACHE__REDIS_URL from a Secret (the same override the gateway reads).
    redis_url = (args.get("redis_url") or os.environ.get("LLMSERVE__CACHE__REDIS_URL")
                 or os.environ.get("LLMSERVE_REDIS_URL"))
    # Runtime adapters load only from these directories (the gateway's adapter_roots; the chart
    # passes them): without them an engine refuses every promotion.
    return build_engine_app(spec, str(args.get("namespace", "llmserve")), redis_url,
                            [str(r) for r in args.get("adapter_roots") or ()])
