"""Every private Ray / Ray Serve LLM / vLLM name the project touches is listed in
serve/engine/private.py, still exists in the installed versions, and is imported nowhere else."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

from serve.engine import forkserver, private

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_MODULE = ROOT / "serve" / "engine" / "private.py"


def test_every_listed_name_exists_in_the_installed_ray_and_vllm():
    """One test, so Ray's and vLLM's modules are imported once (vLLM's take seconds)."""
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vLLM's deprecated `python -m ...run_batch` warns on import
        for entry in private.NAMES:
            try:
                entry.check()
            except Exception as e:
                missing.append(f"{entry.module}:{entry.name} ({type(e).__name__}: {e})")
    assert not missing, "moved or renamed in the installed Ray/vLLM: " + "; ".join(missing)


def test_the_list_is_complete_and_holds_the_copies_made_from_it():
    assert len(private.NAMES) >= 20
    assert private.VLLM_ENGINE in private.NAMES and private.ENGINE_CORE_RUN in private.NAMES
    # forkserver keeps its own copy (it may not import Ray Serve on the setup hook's thread).
    assert private.SERVE_REPLICA_PREFIX.load() == forkserver.SERVE_REPLICA_PREFIX


def test_check_fails_on_a_name_that_is_gone():
    for gone in (private.Private("ray.serve.llm", "LLMServer._no_such_method", "test"),
                 private.Private("ray", "init", "test", in_source='"_no_such_keyword"')):
        try:
            gone.check()
        except AttributeError:
            continue
        raise AssertionError(f"{gone} passed its check")


def is_private(module: str, names: list[str]) -> bool:
    """A Ray or vLLM import that is not public: a `_`-segment in its path or an imported `_name`,
    or anything of vLLM's (the project uses vLLM only through Ray Serve LLM and its HTTP app)."""
    top = module.split(".")[0]
    if top == "vllm":
        return True
    if top != "ray":
        return False
    return any(p.startswith("_") for p in module.split(".")) or any(n.startswith("_") for n in names)


def private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [a.name for a in node.names]
            if is_private(node.module, names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if is_private(a.name, []):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}")
    return found


def test_no_module_but_private_py_imports_a_private_name():
    found = [line for p in sorted((ROOT / "serve").rglob("*.py")) if p != PRIVATE_MODULE
             for line in private_imports(p)]
    assert not found, "import it through serve/engine/private.py: " + "; ".join(found)
