"""Resolve a model's `source` to something vLLM loads: a local directory, a hub id, or the tiny
model the project builds once and caches."""

from __future__ import annotations

import os

from serve.config import ModelSpec
from serve.contract.paths import cache_dir
from serve.model.tiny import TinySource


def resolve_source(spec: ModelSpec) -> str:
    """Return the path or hub id vLLM should load; builds the tiny model on first use."""
    if not spec.is_builtin_tiny:
        return spec.source
    return resolve_tiny(spec.tiny)


def resolve_tiny(tiny: TinySource) -> str:
    """The cache directory of this seed and shape, built there on first use."""
    from serve.model.tiny import build_tiny_model, is_built

    path = cache_dir() / tiny.dir_name
    if not is_built(path):
        # Build into a temporary sibling and rename, so a crash never leaves a half model behind
        # and two processes racing both end with a complete one.
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        build_tiny_model(tmp, seed=tiny.seed, shape=tiny.overrides)
        try:
            tmp.rename(path)
        except OSError:
            if not is_built(path):
                raise
    return str(path)
