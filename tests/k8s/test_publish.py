"""What the chart names is published (issue 28): CI builds both images with buildx on every push and,
on a version tag, pushes them to GHCR under exactly the names and tags the chart's values use, and
the chart as an OCI artifact; NOTES.txt and docs/operations.md say what to override for a private
registry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.support import CHART, CPU_DEV, PRODUCTION, ROOT, helm_template, one

WORKFLOW = ROOT / ".github" / "workflows" / "images.yaml"


def _workflow() -> dict[str, Any]:
    assert WORKFLOW.is_file(), "no CI workflow builds the images"
    wf = yaml.safe_load(WORKFLOW.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as true
    return wf


def _version() -> str:
    m = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m
    return m.group(1)


def _step(job: dict[str, Any], action: str) -> dict[str, Any]:
    [step] = [s for s in job["steps"] if s.get("uses", "").startswith(action + "@")]
    return step


def test_every_push_builds_both_images_and_a_tag_pushes_them() -> None:
    wf = _workflow()
    assert wf["on"]["push"]["tags"] == ["v*"] and "branches" in wf["on"]["push"]
    job = wf["jobs"]["image"]
    variants = {m["variant"]: m for m in job["strategy"]["matrix"]["include"]}
    assert set(variants) == {"cpu", "gpu"}
    for m in variants.values():
        assert (ROOT / m["dockerfile"]).is_file()
    _step(job, "docker/setup-buildx-action")
    build = _step(job, "docker/build-push-action")["with"]
    assert build["push"] == "${{ github.ref_type == 'tag' }}", "pushed on a tag only, built on every push"
    assert build["tags"] == "${{ env.IMAGE }}:${{ needs.version.outputs.version }}${{ matrix.suffix }}"
    assert "login-action" in str(job["steps"]) and job["permissions"]["packages"] == "write"
    version_job = " ".join(s.get("run", "") for s in wf["jobs"]["version"]["steps"])
    assert "pyproject.toml" in version_job and "Chart.yaml" in version_job and 'v$version' in version_job


def test_the_charts_defaults_name_exactly_what_ci_publishes() -> None:
    wf = _workflow()
    image, version = wf["env"]["IMAGE"], _version()
    variants = {m["variant"]: m["suffix"] for m in wf["jobs"]["image"]["strategy"]["matrix"]["include"]}
    published = {f"{image}:{version}{suffix}" for suffix in variants.values()}
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version, "one version: pyproject, chart, images"
    named = set()
    for args in ((), ("-f", CPU_DEV), ("-f", PRODUCTION)):
        spec = one(helm_template(*args), "RayService")["spec"]["rayClusterConfig"]
        named |= {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]}
    assert named == published, (named, published)
    assert f"{image}:{version}-gpu" in named, "values-production.yaml names the CUDA image"
    makefile = (ROOT / "Makefile").read_text()
    assert f"IMAGE_REPO ?= {image}\n" in makefile, "make image builds the same names"
    push = " ".join(s.get("run", "") for s in wf["jobs"]["chart"]["steps"])
    assert 'helm push "dist/llmserve-${{ needs.version.outputs.version }}.tgz" "${CHART_REPO}"' in push
    assert wf["env"]["CHART_REPO"] == "oci://ghcr.io/llmserve/charts"
    assert "if: github.ref_type == 'tag'" in WORKFLOW.read_text().split("Push the chart")[1]


def test_notes_and_docs_say_what_to_override_for_a_private_registry() -> None:
    from tests.k8s.support import run, tool

    notes = run([tool("helm"), "install", "--dry-run=client", "llm", str(CHART)])
    notes = notes[notes.index("NOTES:"):]
    for value in ("image.repository", "imagePullSecrets", "redis.image.repository", "tests.image"):
        assert value in notes, value
    ops = (ROOT / "docs" / "operations.md").read_text()
    section = ops[ops.index("### A private registry"):]
    section = section[: section.index("\n### ", 5)]
    for value in ("`image.repository`", "`imagePullSecrets`", "`redis.image.repository`", "`tests.image`"):
        assert value in section, value
    # The pull secret reaches every pod that pulls an image.
    objs = helm_template("--set", "imagePullSecrets[0].name=regcred")
    pods = [one(objs, "StatefulSet")["spec"]["template"]["spec"], one(objs, "Pod")["spec"]]
    spec = one(objs, "RayService")["spec"]["rayClusterConfig"]
    pods += [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    assert all(p.get("imagePullSecrets") == [{"name": "regcred"}] for p in pods)


def test_the_workflow_is_valid_yaml_for_actions() -> None:
    wf = _workflow()
    for name, job in wf["jobs"].items():
        assert job["runs-on"] == "ubuntu-latest", name
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), (name, step)
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
    assert Path(WORKFLOW).read_text().startswith("#")
