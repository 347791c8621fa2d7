"""Offline checks of rendered Kubernetes manifests: tools, rendering, schema validation.

Nothing here talks to a cluster. Built-in kinds are validated with kubernetes-validate (strict: unknown
fields are errors); KubeRay kinds against the CRDs in ../shared/k8s-schemas/kuberay (their
openAPIV3Schema turned into a JSON Schema that rejects unknown fields, as the API server's structural
pruning would silently drop them); Prometheus Operator kinds structurally.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llmserve"
OBSERVABILITY = CHART / "files"
KUSTOMIZE = ROOT / "k8s"
OVERLAYS = ["cpu-dev", "gpu-production"]
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
KUBERAY_CRDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion is >=1.26); validate against a current one.
KUBERNETES_VERSION = "1.31.0"

# The chart's values files and the renders every test of the chart covers.
CPU_DEV = str(CHART / "values-cpu-dev.yaml")
PRODUCTION = str(CHART / "values-production.yaml")
EVERYTHING = ("ingress.enabled=true,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,"
              "metrics.prometheusRule.enabled=true,batchJob.enabled=true,modelCache.type=pvc,"
              "modelCache.storageClassName=nfs-rwx")
CASES = {
    "default": (),
    "cpu-dev": ("-f", CPU_DEV),
    "production": ("-f", PRODUCTION),
    "cpu-dev-everything": ("-f", CPU_DEV, "--set", EVERYTHING),
    "production-batch": ("-f", PRODUCTION, "--set", "batchJob.enabled=true"),
}
# Provider presets, each over values-production.yaml (helm/llmserve/values-<provider>.yaml).
PRESETS = {p: str(CHART / f"values-{p}.yaml") for p in ("gke", "eks", "gfd")}
CASES |= {f"production-{p}": ("-f", PRODUCTION, "-f", file) for p, file in PRESETS.items()}
# The values files each case renders with, in order (a case's --set overrides aside).
CASE_FILES = {case: [a for i, a in enumerate(args) if i and args[i - 1] == "-f"] for case, args in CASES.items()}
VALUES_FILES = {"default": None, "cpu-dev": CPU_DEV, "production": PRODUCTION}


def merge_values(base: dict, over: dict) -> dict:
    """Helm's values merge: mappings merge, anything else replaces, null deletes."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_values(out[k], v)
        else:
            out[k] = v
    return out


def values_of(case: str) -> dict:
    """The values a case renders with (without its --set overrides)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for file in CASE_FILES[case]:
        values = merge_values(values, yaml.safe_load(Path(file).read_text()))
    return values


_INSTALL_HINT = {
    "helm": "run `make k8s-tools` (installs helm into .tools/bin)",
    "promtool": "run `make k8s-tools` (installs Debian's prometheus package)",
    "kubectl": "install kubectl (it provides `kubectl kustomize`)",
}

YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def tool(name: str) -> str:
    """Path of a CLI tool from .tools/bin or PATH; a missing tool fails the test (never a skip)."""
    local = ROOT / ".tools" / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found in .tools/bin or PATH: {_INSTALL_HINT[name]}", pytrace=False)
    return found


def run(args: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc.stdout


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=YamlLoader) if d]


@functools.cache
def helm_template(*args: str, release: str = "llm") -> tuple[dict[str, Any], ...]:
    out = run([tool("helm"), "template", release, str(CHART), "--namespace", "llm", *args])
    return tuple(docs(out))


@functools.cache
def kustomize(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(docs(run([tool("kubectl"), "kustomize", str(KUSTOMIZE / "overlays" / overlay)])))


# --- KubeRay CRDs as JSON Schema -------------------------------------------------------------------

def _strict(node: Any) -> Any:
    """openAPIV3Schema -> JSON Schema: int-or-string and nullable spelled out, and every object with
    `properties` (and no x-kubernetes-preserve-unknown-fields) closed with additionalProperties: false."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / "kuberay" / KUBERAY_CRDS[kind]
    if not path.is_file():
        pytest.fail(f"KubeRay CRD {path} is missing (expected in ../shared/k8s-schemas)", pytrace=False)
    crd = yaml.load(path.read_text(), Loader=YamlLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def _monitoring_errors(obj: dict[str, Any]) -> list[str]:
    """Prometheus Operator kinds: the fields that matter, with their types."""
    spec, kind, errs = obj.get("spec") or {}, obj["kind"], []
    if kind == "PrometheusRule":
        groups = spec.get("groups")
        if not isinstance(groups, list) or not groups:
            return ["spec.groups must be a non-empty list"]
        for g in groups:
            unknown = set(g) - {"name", "interval", "rules", "limit", "partial_response_strategy"}
            if unknown or not isinstance(g.get("name"), str):
                errs.append(f"group {g.get('name')}: unknown keys {sorted(unknown)} or no name")
            for r in g.get("rules", []):
                if not isinstance(r.get("expr"), str) or not (r.get("alert") or r.get("record")):
                    errs.append(f"group {g.get('name')}: rule without expr/alert: {r}")
                if set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}:
                    errs.append(f"rule {r.get('alert')}: unknown keys")
        return errs
    endpoints_key = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}.get(kind)
    if endpoints_key is None:
        return [f"unexpected monitoring kind {kind}"]
    if not isinstance((spec.get("selector") or {}).get("matchLabels"), dict):
        errs.append("spec.selector.matchLabels must be a mapping")
    endpoints = spec.get(endpoints_key)
    if not isinstance(endpoints, list) or not endpoints:
        errs.append(f"spec.{endpoints_key} must be a non-empty list")
    for ep in endpoints or []:
        if not isinstance(ep.get("port"), str) or not str(ep.get("path", "/metrics")).startswith("/"):
            errs.append(f"bad endpoint {ep}")
        if set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}:
            errs.append(f"endpoint with unknown keys: {sorted(ep)}")
    return errs


def validate(obj: dict[str, Any]) -> None:
    """Fail with every schema error of one rendered object."""
    import kubernetes_validate

    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = f"{kind}/{(obj.get('metadata') or {}).get('name')}"
    if api == "ray.io/v1":
        errs = _errors(crd_validator(kind), obj)
    elif api == "monitoring.coreos.com/v1":
        errs = _monitoring_errors(obj)
    else:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            errs = []
        except kubernetes_validate.ValidationError as e:
            errs = [f"{'/'.join(map(str, e.path))}: {e.message}"]
    assert not errs, f"{name} does not validate:\n  " + "\n  ".join(errs)


def by_kind(objs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# --- serveConfigV2 ---------------------------------------------------------------------------------

def check_serve_config_v2(text: str) -> tuple[dict[str, Any], Any]:
    """Parse a RayService's serveConfigV2 and check it the way Serve and llmserve will read it:
    ServeDeploySchema (plus no keys it would silently ignore), one app per model whose args load as
    ModelSpec, and the gateway app whose args.config loads as the whole Config."""
    import importlib

    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from serve.config import Config, ModelSpec

    raw = yaml.safe_load(text)
    assert isinstance(raw, dict), "serveConfigV2 is not a YAML mapping"
    ServeDeploySchema.model_validate(raw)
    assert set(raw) <= set(ServeDeploySchema.model_fields), f"keys Serve ignores: {set(raw)}"
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), f"app {app['name']}: unknown keys"
        for dep in app.get("deployments", []):
            assert set(dep) <= set(DeploymentSchema.model_fields), f"app {app['name']}: bad deployment {dep}"
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
    assert raw["proxy_location"] == "Disabled"

    apps = {a["name"]: a for a in raw["applications"]}
    gateway = apps.pop("gateway")
    assert gateway["import_path"] == "serve.launch.gateway_replica:build"
    assert gateway["route_prefix"] is None
    assert set(gateway["args"]) == {"config", "replicas"}
    config = Config.model_validate(gateway["args"]["config"])
    assert isinstance(gateway["args"]["replicas"], int) and gateway["args"]["replicas"] >= 1
    assert config.gateway.host == "0.0.0.0", "the gateway must listen on the pod IP"

    assert list(apps) == [m.name for m in config.models], "one Serve application per model, in order"
    for model in config.models:
        app = apps[model.name]
        assert app["import_path"] == "serve.launch.engine_replica:build"
        assert app["route_prefix"] is None
        assert set(app["args"]) == {"model", "namespace", "adapter_roots"}
        assert ModelSpec.model_validate(app["args"]["model"]) == model
        assert app["args"]["namespace"] == config.ray.namespace
    return raw, config


def pod_templates(cluster_spec: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(group spec, pod template) of the head and every worker group of a RayCluster spec."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [(g, g["template"]) for g in groups]


def check_pod_references(cluster_spec: dict[str, Any], names: dict[str, set[str]]) -> None:
    """Every volume mount has a volume, and every ConfigMap/Secret/PVC a volume names is rendered
    too (names: kind -> rendered names; external ones are listed by the caller)."""
    for group, tpl in pod_templates(cluster_spec):
        spec = tpl["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{group.get('groupName', 'head')}: mount {m['name']} has no volume"
            ports = [p["containerPort"] for p in c.get("ports", [])]
            assert len(ports) == len(set(ports)), f"duplicate container ports {ports}"
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in names["Secret"], f"env {env['name']}: Secret {ref['name']} is not there"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in names["ConfigMap"], v
            if "secret" in v:
                assert v["secret"]["secretName"] in names["Secret"], v
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in names["PersistentVolumeClaim"], v


def gateway_service(objs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's API Service as KubeRay creates it from the RayService's serveService
    (common/service.go BuildServeService): its name, labels and ports kept, its selector the active
    RayCluster's pods with ray.io/serve=true (`<active>` stands for the cluster's generated name)."""
    svc = copy.deepcopy(one(objs, "RayService")["spec"]["serveService"])
    svc["kind"] = "Service"
    svc["spec"]["selector"] = {"ray.io/cluster": "<active>", "ray.io/serve": "true"}
    return svc


def check_gateway_wiring(objs: tuple[dict[str, Any], ...] | list[dict[str, Any]], serve_config_v2: dict[str, Any],
                         config: Any) -> None:
    """The Service reaches the gateway: it selects exactly the pods whose Ray nodes declare the
    resource each gateway replica takes (llmserve_gateway, one per pod) and the batch worker's
    (llmserve_gateway_host), on serve.gateway.port, and there are enough of them."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    svc = gateway_service(objs)
    [port] = svc["spec"]["ports"]
    # KubeRay keeps a user port only under a `serve*` name; the named target reaches only the pods
    # that declare it (engine-only workers wear ray.io/serve=true too).
    assert port["name"] == "serve" and port["targetPort"] == "serve"
    exclude_head = bool(one(objs, "RayService")["spec"].get("excludeHeadPodFromServeSvc"))
    cluster = one(objs, "RayService")["spec"]["rayClusterConfig"]
    gateway_app = next(a for a in serve_config_v2["applications"] if a["name"] == "gateway")
    overrides = {d["name"]: d for d in gateway_app["deployments"]}
    # The batch worker (a deployment of the gateway app when batch is on) runs on a gateway pod
    # too: it reads the gateways' stored files, and the NetworkPolicy counts on where it runs.
    assert set(overrides) == ({"gateway", "batch-worker"} if config.batch.enabled else {"gateway"})
    assert overrides["gateway"]["ray_actor_options"]["resources"] == {"llmserve_gateway": 1}
    for override in overrides.values():
        assert override["ray_actor_options"]["num_cpus"] == 0
        # No label selector: Serve would run the app's build task on that pool and pin its result
        # there (the pod could never be scaled down); Ray's default autoscaler ignores selectors.
        assert "label_selector" not in override["ray_actor_options"]
    asked = [o["ray_actor_options"]["resources"] for o in overrides.values()]
    hosts = 0
    for group, tpl in pod_templates(cluster):
        names = {p.get("name"): p["containerPort"] for p in tpl["spec"]["containers"][0].get("ports", [])}
        selected = "serve" in names and not ("groupName" not in group and exclude_head)
        declared = _get_custom_resources({}, group.get("rayStartParams") or {}, group.get("groupName", "head"))
        pinned = all(all(declared.get(k, 0) >= n for k, n in res.items()) for res in asked)
        assert selected == pinned, f"group {group.get('groupName', 'head')}: Service and gateway placement differ"
        assert declared.get("llmserve_gateway", 0) in ((1,) if selected else (0,))
        if selected:
            [container] = tpl["spec"]["containers"]
            assert config.gateway.port in [p["containerPort"] for p in container["ports"]]
            hosts += group.get("maxReplicas", 1)
    assert 1 <= gateway_app["args"]["replicas"] <= hosts, "more gateway replicas than pods that may host one"
