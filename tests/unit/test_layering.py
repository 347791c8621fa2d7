"""The shape of serve/: no import cycles, no module past ~400 lines, and the layering rules.

Read from the source with `ast` (nothing is imported), so the test is fast and sees every import,
a function-level one included: a cycle closed inside a function is still two modules that cannot be
understood, tested or moved one without the other."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "serve"
MAX_LINES = 400

# Modules over MAX_LINES still being split, each with who splits it; an entry that no longer holds
# fails test_no_module_over_400_lines, so the list cannot hide a new one. None today.
KNOWN_LONG: dict[str, str] = {}
# Cycles still being removed, as frozensets of module names, the same way. None today
# (gateway/routes.py <-> cascade_stream.py and batch/pg.py <-> batch/store.py were, issue 25).
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SERVE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The serve.* modules `name` imports anywhere in its body (`from a import b` counts as a.b
    when a.b is a module, else as a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m == "serve" or m.startswith("serve.")} - {name}


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imported(name, path, known) if m in known} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_that():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [frozenset({"a", "b", "c"})]


def test_imports_are_read_at_every_level_and_relative_ones_resolved():
    edges = graph()
    # A function-level import (serve/batch/backends.py imports pg inside open_store).
    assert "serve.batch.pg" in edges["serve.batch.backends"]
    assert "serve.contract.paths" in edges["serve.engine.models"]


def test_no_import_cycles():
    found = [c for c in cycles(graph()) if c not in KNOWN_CYCLES]
    assert not found, "modules importing each other: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_known_cycles_still_exist():
    """A known exception that no longer holds is removed from the list, so it cannot hide a new one."""
    found = set(cycles(graph()))
    stale = [c for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"no longer cycles, remove from KNOWN_CYCLES: {stale}"


def test_no_module_over_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    over = {n: lines for n, lines in long.items() if lines > MAX_LINES and n not in KNOWN_LONG}
    assert not over, f"modules over {MAX_LINES} lines (split along a seam the data has): {over}"
    stale = [n for n in KNOWN_LONG if long.get(n, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines, remove from KNOWN_LONG: {stale}"


@pytest.mark.parametrize("side", ["serve.gateway", "serve.batch"])
def test_gateways_and_batch_never_import_the_engine(side):
    """They share with engines only serve/contract (registry, secret, paths)."""
    bad = {f"{m} -> {t}" for m, ts in graph().items() if m.startswith(side) for t in ts
           if t.startswith("serve.engine")}
    assert not bad, bad


def test_contract_imports_no_side():
    bad = {f"{m} -> {t}" for m, ts in graph().items() if m.startswith("serve.contract") for t in ts
           if t.startswith(("serve.gateway", "serve.engine", "serve.batch"))}
    assert not bad, bad


# Besides the standard library: the typed config and its validation (pydantic; jsonschema, which the
# cascade's JSON-schema judge calls: a pure function of its arguments, no I/O; referencing, jsonschema's
# own $ref resolver, given an empty registry so that nothing is ever fetched).
POLICY_IMPORTS = ("pydantic", "jsonschema", "referencing", "serve.policies", "serve.config")


def test_policies_stay_pure():
    import sys

    bad = set()
    for name, path in modules().items():
        if not name.startswith("serve.policies"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            for t in targets:
                top = t.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                if not any(t == p or t.startswith(p + ".") for p in POLICY_IMPORTS):
                    bad.add(f"{name} imports {t}")
    assert not bad, bad


# The process kinds' composition roots sit on top: only the CLI (the demo included) starts them.
LAUNCHERS = ("serve.launch", "serve.cli")


def test_only_the_cli_imports_the_launch_package():
    bad = {f"{m} -> {t}" for m, ts in graph().items() if not m.startswith(LAUNCHERS) for t in ts
           if t.startswith("serve.launch")}
    assert not bad, bad
