"""Paths every side agrees on: the directories runtime adapters may be loaded from (a gateway
checks a promotion against them, an engine checks what it loads from the runtime registry), the
content-addressed store runtime adapters are copied into before they are hashed and loaded, and
the project's cache directory (tiny models, the default batch store)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
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


class UnsafeAdapter(ValueError):
    """An adapter directory the gateway will not copy: a symlink or a special file inside it."""


STORE_DIR = ".llmserve-adapters"  # under the first adapter root: engines read what they may load


def adapter_store(roots: Iterable[str]) -> Path:
    """Where runtime adapters are copied before they are hashed and loaded: inside the first adapter
    root (which engines accept, and which on Kubernetes is the volume they share with the gateway),
    or the cache directory when there are no roots (only configured adapters load then)."""
    roots = list(roots)
    return Path(roots[0]) / STORE_DIR if roots else cache_dir() / "adapters"


def _copy_tree(src: str, dst: Path) -> None:
    """Copy the regular files and directories under `src` into `dst`, refusing any symlink, at any
    depth, and anything that is not a regular file. Files are opened without following links, so a
    file swapped for a link after the walk saw it is refused too."""
    for entry in os.scandir(src):
        if entry.is_symlink():
            raise UnsafeAdapter(f"{entry.path} is a symbolic link")
        if entry.is_dir(follow_symlinks=False):
            (dst / entry.name).mkdir()
            _copy_tree(entry.path, dst / entry.name)
            continue
        if not entry.is_file(follow_symlinks=False):
            raise UnsafeAdapter(f"{entry.path} is not a regular file")
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:  # ELOOP: it became a link
            raise UnsafeAdapter(f"{entry.path} could not be opened without following links: {e}") from e
        with os.fdopen(fd, "rb") as fin:
            if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
                raise UnsafeAdapter(f"{entry.path} is not a regular file")
            with open(dst / entry.name, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def _check_private(store: Path) -> None:
    """Only this process's user may write the store: a copy in it is trusted as it was hashed (one
    stored before is reused by its digest), so a store another user could write, or a link to one,
    would let them change weights after the check."""
    st = os.lstat(store)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeAdapter(f"the adapter store {store} is not a directory")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UnsafeAdapter(f"the adapter store {store} may be written by other users")


def _read_only(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
        os.chmod(dirpath, 0o555)


def snapshot_adapter(src: str, store: Path, digest_of: Callable[[Path], str]) -> tuple[str, str]:
    """Copy the adapter directory `src` into the content-addressed `store` and return (the copy's
    path, its digest). The digest is taken of the copy, which only this process writes, and the
    copy is what engines load: the files a tenant can still change at `src` are never what is
    hashed or loaded. A directory with a symlink anywhere inside is refused (UnsafeAdapter)."""
    store.mkdir(mode=0o755, parents=True, exist_ok=True)
    _check_private(store)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    try:
        _copy_tree(src, tmp)
        digest = digest_of(tmp)
        final = store / digest
        if final.is_dir():  # the same weights were stored before: one copy serves every name
            return str(final), digest
        _read_only(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # stored meanwhile by a concurrent load of the same weights
            if not final.is_dir():
                raise
        return str(final), digest
    finally:
        if tmp.exists():
            _make_writable(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _make_writable(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
