"""docs/operations.md's Prerequisites, Install and Upgrades against the chart, so they cannot drift.

Prerequisites: every Secret the rendered chart creates or references (secretKeyRef, secret volumes,
secretName) and every value naming an existing Secret is in its table with the keys it must hold;
the Kubernetes and KubeRay versions are Chart.yaml's and the CRDs'; storage, GPU, monitoring and
NetworkPolicy needs of the rendered objects are named. Install: each command's values files exist,
each `helm install` renders, every Secret it needs is created before it with the keys it needs.
Upgrades: each row of the change table is what KubeRay 1.7.0 does with the two renders, by its own
rule (`ray-operator/controllers/ray/rayservice_controller.go`: isClusterSpecHashEqual,
shouldUpdateCluster, shouldPrepareNewCluster; `utils/util.go`: GenerateHashWithoutReplicasAndWorkersToDelete).
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.support import CHART, ROOT, SCHEMAS, by_kind, helm_template, one, pod_templates

OPS = ROOT / "docs" / "operations.md"
RELEASE = "rel"
# The chart's resource prefix for release RELEASE, and how the docs write it.
RENDERED_PREFIX, DOC_PREFIX = f"{RELEASE}-llmserve-", "<release>-llmserve-"
EXT = "ext-secret"
# What a value needs set besides itself to be used at all.
ENABLERS = {"redis.external.existingSecret": ("--set", "redis.enabled=false")}
# KubeRay releases by the sha256 of their CRDs (rayclusters, rayjobs, rayservices, in that order):
# 1.7.0's helm-chart/kuberay-operator/crds/, which ../shared/k8s-schemas/kuberay holds (commit feeaf72).
KUBERAY_CRD_RELEASES = {"b314e01ea04b69a3d512cff65a4cc8cb": "1.7.0"}
UPGRADE_TYPES = ("NewCluster", "None", "NewClusterWithIncrementalUpgrade")  # rayservice_types.go


# --- the document ----------------------------------------------------------------------------------

def section(title: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level (lines in
    fenced code blocks are never headings)."""
    lines, out, level, fenced = OPS.read_text().splitlines(), [], 0, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+) (.*)", line)
        if m and level and len(m.group(1)) <= level:
            break
        if level:
            out.append(line)
        elif m and m.group(2).strip() == title:
            level = len(m.group(1))
    assert level, f"docs/operations.md has no section {title!r}"
    return "\n".join(out)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def row_with(text: str, *needles: str) -> str:
    """The one table row naming every needle in backticks."""
    rows = [r for r in table_rows(text) if all(f"`{n}`" in r for n in needles)]
    assert len(rows) == 1, f"expected one table row naming {needles}, got {rows}"
    return rows[0]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the fenced bash blocks, continuations joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


# --- rendered objects ------------------------------------------------------------------------------

def secret_refs(node: Any, volume: str | None = None) -> Iterator[tuple[str, str | None, str | None]]:
    """(Secret name, key or None, pod volume name or None) of every reference below node."""
    if isinstance(node, dict):
        if isinstance(node.get("secretKeyRef"), dict):
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"], None
        if isinstance(node.get("secret"), dict) and "name" in node:
            yield node["secret"]["secretName"], None, node["name"]
        elif isinstance(node.get("secretName"), str):
            yield node["secretName"], None, None
        for k, v in node.items():
            if k not in ("secretKeyRef", "secret"):
                yield from secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from secret_refs(v)


def created(objs: tuple[dict[str, Any], ...]) -> dict[str, set[str]]:
    return {s["metadata"]["name"]: set(s.get("data") or {}) | set(s.get("stringData") or {})
            for s in by_kind(objs, "Secret")}


def values_paths(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from values_paths(v, f"{prefix}{k}.")
    yield prefix.rstrip("."), node


def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def secret_values() -> list[str]:
    """Every value that names an existing Secret: the `existingSecret` ones, and the test's key."""
    paths = [p for p, _ in values_paths(default_values()) if p.split(".")[-1] == "existingSecret"]
    return [*paths, "tests.apiKeySecret.name"]


# --- Prerequisites ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [(), ("-f", str(CHART / "values-cpu-dev.yaml"))], ids=["default", "cpu-dev"])
def test_secrets_the_chart_creates_are_listed_with_their_keys(args: tuple[str, ...]) -> None:
    objs = helm_template(*args, release=RELEASE)
    secrets = created(objs)
    assert secrets, "the chart creates no Secret?"
    text = section("Prerequisites")
    for name, keys in secrets.items():
        assert name.startswith(RENDERED_PREFIX), name
        row_with(text, DOC_PREFIX + name.removeprefix(RENDERED_PREFIX), *sorted(keys))


@pytest.mark.parametrize("value", secret_values())
def test_each_value_naming_a_secret_is_listed_with_its_keys(value: str) -> None:
    base = helm_template(*ENABLERS.get(value, ()), release=RELEASE)
    alt = helm_template(*ENABLERS.get(value, ()), "--set", f"{value}={EXT}", release=RELEASE)
    refs = [r for r in secret_refs(list(alt)) if r[0] == EXT]
    assert refs, f"{value}={EXT} is referenced by nothing the chart renders"
    keys = {key for _, key, _ in refs if key}
    # A Secret mounted whole holds the keys of the chart's own one it replaces.
    replaced = {n: k for n, k in created(base).items() if n not in created(alt)}
    for _, _, volume in refs:
        if volume:
            [chart_secret] = {n for n, _, v in secret_refs(list(base)) if v == volume}
            keys |= replaced[chart_secret]
    row_with(section("Prerequisites"), value, *sorted(keys))


def test_every_value_the_secrets_table_names_exists() -> None:
    paths = {p for p, _ in values_paths(default_values())}
    for row in table_rows(section("Prerequisites"))[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for value in re.findall(r"`([\w.\[\]]+)`", cells[2]):
            # `ingress.tls[].secretName`: a field of a list's entries, which the defaults may not show.
            assert value.split("[]")[0] in paths, f"the Secrets table names a value the chart lacks: {value}"


def kuberay_release() -> str:
    files = ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"]
    digest = hashlib.sha256(b"".join((SCHEMAS / "kuberay" / f).read_bytes() for f in files)).hexdigest()[:32]
    assert digest in KUBERAY_CRD_RELEASES, (
        f"../shared/k8s-schemas/kuberay holds other CRDs (sha256 {digest}): find their KubeRay release, add it to "
        "KUBERAY_CRD_RELEASES and update docs/operations.md (Prerequisites, Install, Upgrades)")
    return KUBERAY_CRD_RELEASES[digest]


def test_versions_are_the_charts_and_the_crds() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    text = section("Prerequisites")
    kube = re.fullmatch(r">=\s*(\d+\.\d+)(?:\.0)?(?:-0)?", chart["kubeVersion"])
    assert kube, chart["kubeVersion"]
    assert f"**Kubernetes >= {kube.group(1)}**" in text
    kuberay_min = re.fullmatch(r"kuberay-operator >= ([\d.]+)", chart["annotations"]["llmserve.io/requires"])
    assert kuberay_min, chart["annotations"]
    assert f"**KubeRay operator >= {kuberay_min.group(1)}**" in text
    assert f"**KubeRay {kuberay_release()}**" in text
    installs = [a for a in shell_commands(section("Install")) if a[:2] == ["helm", "install"] and "kuberay" in a[3]]
    assert [a[a.index("--version") + 1] for a in installs] == [kuberay_release()], installs


def test_cluster_needs_of_the_production_render_are_named() -> None:
    values_file = CHART / "values-production.yaml"
    objs = helm_template("-f", str(values_file), release=RELEASE)
    text = section("Prerequisites")
    for kind in {o["kind"] for o in objs if o["apiVersion"].startswith("monitoring.coreos.com/")}:
        assert f"`{kind}`" in text, kind
    assert by_kind(objs, "NetworkPolicy") and "**NetworkPolicy**" in text
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    if any("nvidia.com/gpu" in str(g["template"]["spec"]["containers"][0].get("resources"))
           for g in cluster["workerGroupSpecs"]):
        assert "`nvidia.com/gpu`" in text
    # Node labels the production groups select on come from the cloud or GPU Feature Discovery.
    prod = yaml.safe_load(values_file.read_text())
    for group in prod["workerGroups"]:
        labels = set(group.get("nodeSelector") or {}) | set(re.findall(r"'key': '([^']+)'", str(group.get("affinity"))))
        for label in labels - {"kubernetes.io/hostname"}:
            assert f"`{label}`" in text, f"group {group['name']} needs node label {label}"
    for path, value in values_paths(default_values()):
        if path.endswith("storageClassName"):
            assert f"`{path}`" in text, path
        if path == "modelCache.accessModes" and "ReadWriteMany" in value:
            assert "**ReadWriteMany**" in text


# --- Install ---------------------------------------------------------------------------------------

def _namespace(argv: list[str]) -> str:
    for flag in ("-n", "--namespace"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return "default"


def _plain(argv: list[str]) -> list[str]:
    """argv without its namespace option (`kubectl -n NS wait ...` -> `kubectl wait ...`)."""
    out, skip = [], False
    for a in argv:
        if skip or a in ("-n", "--namespace"):
            skip = not skip
            continue
        out.append(a)
    return out


def _template_args(argv: list[str]) -> list[str]:
    """`helm install NAME CHART ...` -> the options `helm template` takes the same way."""
    out = []
    for i, a in enumerate(argv):
        if a in ("-f", "--values", "--set", "--set-string", "--set-json"):
            out += [a, argv[i + 1]]
    return out


def test_install_commands_render_and_create_every_secret_they_need() -> None:
    commands = shell_commands(section("Install"))
    made: dict[tuple[str, str], set[str]] = {}
    installed, tested = set(), set()
    for argv in commands:
        if _plain(argv)[:3] == ["kubectl", "create", "secret"]:
            kind, name = _plain(argv)[3:5]
            keys = {"tls.crt", "tls.key"} if kind == "tls" else {
                a.split("=", 2)[1] for a in argv if a.startswith(("--from-literal=", "--from-file="))}
            made[(_namespace(argv), name)] = keys
        if argv[:2] == ["helm", "test"]:
            tested.add((argv[2], _namespace(argv)))
        if argv[:2] != ["helm", "install"] or argv[3] != "helm/llmserve":
            continue
        release, ns, args = argv[2], _namespace(argv), _template_args(argv)
        for file in args[1::2][: args.count("-f")]:
            assert (ROOT / file).is_file(), f"{' '.join(argv)}: no values file {file}"
        objs = helm_template(*args, release=release)
        defaults = helm_template(release=release)
        own = created(objs)
        for name, key, volume in secret_refs(list(objs)):
            if name in own:
                continue
            assert (ns, name) in made, f"`helm install {release}` needs Secret {name} in {ns}, created before it"
            if key:
                need = {key}
            elif volume:  # mounted whole: the keys of the chart's own Secret on that volume
                need = set().union(*(created(defaults).get(n, set())
                                     for n, _, v in secret_refs(list(defaults)) if v == volume))
            else:  # an Ingress' tls[].secretName
                need = {"tls.crt", "tls.key"}
            assert need <= made[(ns, name)], f"Secret {name} is created without keys {need - made[(ns, name)]}"
        installed.add((release, ns))
        waits = [a for a in commands if _plain(a)[:2] == ["kubectl", "wait"] and _namespace(a) == ns]
        # The gateway pods are those the API Service reaches: they declare its named target port.
        cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
        gateway_labels = [{**tpl["metadata"].get("labels", {}), "app.kubernetes.io/instance": release}
                          for _, tpl in pod_templates(cluster)
                          if "serve" in [p.get("name") for p in tpl["spec"]["containers"][0].get("ports", [])]
                          and tpl["metadata"].get("labels", {}).get("llmserve.io/gateway") == "true"]
        assert gateway_labels
        for wait in waits:
            selector = dict(kv.split("=") for kv in wait[wait.index("-l") + 1].split(","))
            assert all(selector.items() <= labels.items() for labels in gateway_labels), (selector, gateway_labels)
        assert waits, f"Install: no `kubectl wait` for the gateway pods of {release} in {ns}"
        for policy in by_kind(objs, "NetworkPolicy"):
            for match in re.findall(r"'namespaceSelector': \{'matchLabels': \{'([^']+)': '([^']+)'\}", str(policy)):
                if match[0] == "kubernetes.io/metadata.name":  # set by the API server: the namespace
                    # by name, which must be where Install puts the KubeRay operator
                    assert any(argv[:3] == ["helm", "install", "kuberay-operator"] and _namespace(argv) == match[1]
                               for argv in commands), f"no kuberay-operator installed in {match[1]}"
                    continue
                assert any(_plain(a)[:3] == ["kubectl", "label", "namespace"] and "=".join(match) in a
                           for a in commands), \
                    f"NetworkPolicy {policy['metadata']['name']} admits namespaces labelled {match}: label one"
    assert len(installed) == 2, f"Install should install the CPU dev and the production values: {installed}"
    assert tested == installed, f"every release is `helm test`ed: installed {installed}, tested {tested}"


# --- Upgrades --------------------------------------------------------------------------------------

def hashed(cluster: dict[str, Any]) -> dict[str, Any]:
    """What GenerateHashWithoutReplicasAndWorkersToDelete hashes of a RayClusterSpec."""
    spec = copy.deepcopy(cluster)
    spec.pop("upgradeStrategy", None)
    spec.pop("suspend", None)  # rayClusterSpecForHashing
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        for field in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(field, None)
        (group.get("scaleStrategy") or {}).pop("workersToDelete", None)
        group["template"]["spec"].pop("tolerations", None)
        group["template"]["spec"].pop("schedulingGates", None)
    return spec


def kuberay_effect(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What KubeRay does when RayService `after` replaces `before` on a running cluster."""
    old, new = before["rayClusterConfig"], after["rayClusterConfig"]
    if hashed(old) == hashed(new):
        if before["serveConfigV2"] != after["serveConfigV2"]:
            return "in place"
        return "not applied" if old != new else "no change"
    n = len(old.get("workerGroupSpecs", []))
    prefix = {**new, "workerGroupSpecs": new.get("workerGroupSpecs", [])[:n]}
    if len(new.get("workerGroupSpecs", [])) > n and hashed(prefix) == hashed(old):
        return "in place"
    return "new cluster"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(values: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node: Any = values
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[leaf] = value
    return apply


TINY2 = {"name": "tiny2", "source": "builtin://tiny?seed=2", "accelerator": "cpu", "engine": {"dtype": "float32"}}
# (docs' name of the value, change to the default values, effect)
UPGRADE_ROWS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("serve.models", lambda v: v["serve"]["models"].append(TINY2), "in place"),
    ("serve.routes", _set("serve.routes", [{"name": "r", "target": "tiny"}]), "in place"),
    ("serve.models[].deployment.autoscaling", _set("serve.models.0.deployment.autoscaling.max_replicas", 3),
     "in place"),
    ("serve.gateway.request_timeout_s", _set("serve.gateway.request_timeout_s", 77), "in place"),
    ("workerGroups", lambda v: v["workerGroups"].append({**v["workerGroups"][0], "name": "more"}), "in place"),
    ("image.tag", _set("image.tag", "9.9.9"), "new cluster"),
    ("rayVersion", _set("rayVersion", "9.9.9"), "new cluster"),
    ("workerGroups[].resources", _set("workerGroups.0.resources.requests.cpu", "5"), "new cluster"),
    ("head.resources", _set("head.resources.requests.cpu", "3"), "new cluster"),
    ("extraEnv", _set("extraEnv", [{"name": "X", "value": "y"}]), "new cluster"),
    ("probes", _set("probes.readiness.periodSeconds", 7), "new cluster"),
    ("serve.gateway.port", _set("serve.gateway.port", 9000), "new cluster"),
    ("serve.gateway.adapter_roots", _set("serve.gateway.adapter_roots", ["/model-cache/adapters"]), "new cluster"),
    ("autoscaler.idleTimeoutSeconds", _set("autoscaler.idleTimeoutSeconds", 61), "new cluster"),
    ("engineSecret.existingSecret", _set("engineSecret.existingSecret", "other"), "new cluster"),
    ("workerGroups[].replicas", _set("workerGroups.0.replicas", 2), "not applied"),
    ("workerGroups[].minReplicas", _set("workerGroups.0.minReplicas", 0), "not applied"),
    ("workerGroups[].maxReplicas", _set("workerGroups.0.maxReplicas", 3), "not applied"),
    ("workerGroups[].tolerations", _set("workerGroups.0.tolerations", [{"key": "k", "operator": "Exists"}]),
     "not applied"),
]
EFFECTS = ("in place", "new cluster", "not applied")


@pytest.mark.parametrize(("value", "change", "effect"), UPGRADE_ROWS, ids=[r[0] for r in UPGRADE_ROWS])
def test_upgrade_table_is_what_kuberay_does(value: str, change: Callable, effect: str, tmp_path: Path) -> None:
    values = default_values()
    change(values)
    changed = tmp_path / "values.yaml"
    changed.write_text(yaml.safe_dump(values))
    before = one(helm_template(release=RELEASE), "RayService")["spec"]
    after = one(helm_template("-f", str(changed), release=RELEASE), "RayService")["spec"]
    assert kuberay_effect(before, after) == effect
    row = row_with(section("Upgrades"), value)
    assert [e for e in EFFECTS if f"**{e}**" in row] == [effect], row


def test_upgrade_strategies_and_their_gpu_cost() -> None:
    text = section("Upgrades")
    default = default_values()["rayService"]["upgradeStrategy"]["type"]
    assert f"the chart's default is `{default}`" in text
    for kind in UPGRADE_TYPES:
        assert f"- **`{kind}`**" in text, kind
    crd = (SCHEMAS / "kuberay" / "ray.io_rayservices.yaml").read_text()
    assert "clusterUpgradeOptions" in crd, "the docs describe NewClusterWithIncrementalUpgrade, the CRD lacks it"
    assert f"KubeRay {kuberay_release()}'s source" in text
    # The GPU arithmetic of values-production.yaml: a new cluster starts at each group's replicas.
    prod = yaml.safe_load((CHART / "values-production.yaml").read_text())
    start = sum(g["replicas"] * g["gpus"] for g in prod["workerGroups"])
    peak = sum(g["maxReplicas"] * g["gpus"] for g in prod["workerGroups"])
    load = max(m["deployment"]["autoscaling"]["replica_start_s"] for m in prod["serve"]["models"])
    assert f"{start} GPUs on top of the old cluster's {start} (quiet) to {peak}" in text
    assert f"twice the groups' maximum, {2 * peak} GPUs" in text
    assert f"`replica_start_s: {load}`" in text
