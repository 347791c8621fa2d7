"""The engine replica's composition root: the Serve application of one model, built from one entry of
`models` by Serve's build task, for `llmserve run` and KubeRay's `serveConfigV2` alike.

    applications:
      - name: tiny
        import_path: serve.launch.engine_replica:build
        args: {model: {...one entry of `models`...}, namespace: llmserve, adapter_roots: [...]}
"""

from __future__ import annotations

from typing import Any

from serve.config import ModelSpec
from serve.engine.deployments import build_engine_app

# What Serve imports to build a model's application: the chart's serveConfigV2 and `llmserve run`
# (serve/engine/cluster.py ENGINE_APP, which names it as a string so the engine package does not
# import the launch package above it). vLLM is imported only when build() runs.
IMPORT_PATH = f"{__name__}:build"


def build(args: dict[str, Any]) -> Any:  # -> ray.serve.Application
    spec = ModelSpec.model_validate(args["model"])
    # No Redis URL here: the replica reads it from its own environment (serve/engine/direct.py),
    # never from these args or its runtime_env, which Serve logs and its dashboard shows.
    # Runtime adapters load only from these directories (the gateway's adapter_roots; the chart
    # passes them): without them an engine refuses every promotion.
    return build_engine_app(spec, str(args.get("namespace", "llmserve")),
                            [str(r) for r in args.get("adapter_roots") or ()])
