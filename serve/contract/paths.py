"""Paths every side agrees on: the directories runtime adapters may be loaded from (a gateway
checks a promotion against them, an engine checks what it loads from the runtime registry), and
the project's cache directory (tiny models, the default batch store)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ADAPTER_ROOTS_ENV = "LLMSERVE_ADAPTER_ROOTS"


def cache_dir() -> Path:
    """`LLMSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/llmserve` (default ~/.cache/llmserve)."""
    base = os.environ.get("LLMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmserve"
    )
    return Path(base)


def adapter_roots() -> list[str]:
    """Directories runtime adapters may be loaded from (env LLMSERVE_ADAPTER_ROOTS, os.pathsep-separated)."""
    return [r for r in os.environ.get(ADAPTER_ROOTS_ENV, "").split(os.pathsep) if r]


def path_under_roots(path: str, roots: Iterable[str]) -> bool:
    """Whether `path` is inside one of `roots` once symlinks and `..` are resolved (an absolute
    path only: a relative one would depend on the replica's working directory)."""
    if not os.path.isabs(path):
        return False
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) == base:
            return True
    return False


def runtime_adapters_for(entries: Mapping[Any, Any], base: str, roots: Iterable[str]
                         ) -> tuple[list[dict[str, str]], list[str]]:
    """Split the runtime adapter registry (name -> JSON `{base, path, ...}`, as stored in Redis)
    into the adapters of `base` a replica may load, `[{name, path}]`, and the names of those it must
    not load because their path lies outside `roots` (no roots: none may be loaded)."""
    roots = list(roots)
    allowed: list[dict[str, str]] = []
    refused: list[str] = []
    for raw_name, raw in entries.items():
        meta = json.loads(raw)
        if meta.get("base") != base:
            continue
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        path = meta.get("path")
        if isinstance(path, str) and path_under_roots(path, roots):
            allowed.append({"name": name, "path": path})
        else:
            refused.append(name)
    return allowed, refused
