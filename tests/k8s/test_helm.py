"""The Helm chart: lints, renders with each values file, and every rendered object validates; the
serveConfigV2 is what Serve and llmserve will accept; the pieces reference each other correctly."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess

import pytest
import yaml

from tests.k8s.support import (
    CASE_FILES,
    CASES,
    CHART,
    CPU_DEV,
    PRESETS,
    VALUES_FILES,
    by_kind,
    check_gateway_wiring,
    check_pod_references,
    check_serve_config_v2,
    gateway_service,
    helm_template,
    one,
    pod_templates,
    tool,
    validate,
    values_of,
)


@pytest.mark.parametrize("case", [*VALUES_FILES, *(f"production-{p}" for p in PRESETS)])
def test_helm_lint_strict(case: str) -> None:
    files = [a for f in CASE_FILES[case] for a in ("-f", f)]
    proc = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_object_validates(case: str) -> None:
    objs = helm_template(*CASES[case])
    kinds = {o["kind"] for o in objs}
    assert {"RayService", "Service", "ConfigMap", "PodDisruptionBudget", "Pod"} <= kinds, kinds
    for obj in objs:
        validate(obj)


def test_optional_objects_render_when_enabled() -> None:
    kinds = [o["kind"] for o in helm_template(*CASES["cpu-dev-everything"])]
    for kind in ("Ingress", "ServiceMonitor", "PodMonitor", "PrometheusRule", "RayJob", "PersistentVolumeClaim"):
        assert kinds.count(kind) == 1, kind
    assert not {"Ingress", "ServiceMonitor", "RayJob"} & {o["kind"] for o in helm_template(*CASES["cpu-dev"])}


@pytest.mark.parametrize("case", list(CASES))
def test_serve_config_v2_is_what_serve_and_llmserve_accept(case: str) -> None:
    from serve.config import Config

    objs = helm_template(*CASES[case])
    raw, config = check_serve_config_v2(one(objs, "RayService")["spec"]["serveConfigV2"])
    values = values_of(case)
    # The gateway gets the whole `serve:` values, unchanged.
    assert config == Config.model_validate(values["serve"])
    gateway = next(a for a in raw["applications"] if a["name"] == "gateway")
    assert gateway["args"]["replicas"] == values["gateway"]["replicas"]
    # The mounted config file holds the same configuration.
    cm = next(c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-config"))
    assert Config.model_validate(yaml.safe_load(cm["data"]["config.yaml"])) == config
    check_gateway_wiring(objs, raw, config)


@pytest.mark.parametrize("case", list(CASES))
def test_pods_reference_rendered_or_declared_objects(case: str) -> None:
    objs = helm_template(*CASES[case])
    values = values_of(case)
    names = {k: {o["metadata"]["name"] for o in by_kind(objs, k)}
             for k in ("ConfigMap", "Secret", "PersistentVolumeClaim")}
    names["Secret"] |= {values.get("existingSecret") or "", values["hfToken"]["existingSecret"],
                        values["engineSecret"]["existingSecret"], values["redis"]["auth"]["existingSecret"],
                        values["redis"]["external"]["existingSecret"],
                        values["batchStore"]["postgresql"]["existingSecret"]} - {""}
    names["PersistentVolumeClaim"].add(values["modelCache"].get("existingClaim") or "")
    for kind in ("RayService", "RayJob"):
        for obj in by_kind(objs, kind):
            spec = obj["spec"]["rayClusterConfig" if kind == "RayService" else "rayClusterSpec"]
            check_pod_references(spec, names)


def test_production_gpu_cluster() -> None:
    from serve.config import Config

    objs = helm_template(*CASES["production"])
    service = one(objs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    _, config = check_serve_config_v2(service["spec"]["serveConfigV2"])
    assert config == Config.model_validate(values_of("production")["serve"])
    gpu_groups = []
    for group, tpl in pod_templates(cluster):
        spec = tpl["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes["model-cache"]
        [container] = spec["containers"]
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        limits = container["resources"].get("limits", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(limits["nvidia.com/gpu"])
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            # Which GPU nodes: a provider preset's selectors (tests/k8s/test_presets.py).
            assert group["maxReplicas"] > group["minReplicas"] or group["maxReplicas"] == 1
    assert len(gpu_groups) == 2
    for model in config.models:
        assert model.accelerator == "gpu" and "/" in model.source, "real hub models"
        assert model.deployment.autoscaling is not None, f"{model.name}: Serve autoscaling_config"
        need = model.engine.tensor_parallel_size * max(model.deployment.num_gpus, 1)
        assert any(g >= need for g in gpu_groups), f"{model.name} needs a pod with {need} GPUs"


def test_cpu_dev_requests_no_gpu() -> None:
    objs = helm_template(*CASES["cpu-dev"])
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(objs))
    _, config = check_serve_config_v2(one(objs, "RayService")["spec"]["serveConfigV2"])
    for model in config.models:
        assert model.source.startswith("builtin://tiny?seed=") and model.accelerator == "cpu"
        assert model.engine.dtype == "float32" and model.engine.enforce_eager is True
    assert one(objs, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_api_keys_are_hashed_into_the_secret() -> None:
    from serve.config import ApiKey

    objs = helm_template(*CASES["cpu-dev"])
    [keys_secret] = [s for s in by_kind(objs, "Secret") if "keys.yaml" in s.get("data", {})]
    text = base64.b64decode(keys_secret["data"]["keys.yaml"]).decode()
    assert "sk-llmserve-dev" not in text
    keys = [ApiKey.model_validate(k) for k in yaml.safe_load(text)["keys"]]
    assert [(k.name, k.sha256) for k in keys] == [("dev", hashlib.sha256(b"sk-llmserve-dev").hexdigest())]
    # `helm test` sends the clear key from a hook Secret, to the gateway Service.
    [test_key] = [s for s in by_kind(objs, "Secret") if "api-key" in s.get("data", {})]
    assert test_key["metadata"]["annotations"]["helm.sh/hook"] == "test"
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    svc = gateway_service(objs)
    assert 'base="http://{}:{}"'.format(svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]) in script
    assert re.search(r"grep -q '\"id\": \*\"tiny-a\"'", script)  # what it checks: tests/k8s/test_helm_test.py


def test_production_uses_the_existing_secret() -> None:
    objs = helm_template(*CASES["production"])
    assert not [s for s in by_kind(objs, "Secret") if "keys.yaml" in s.get("data", {})]
    pod = one(objs, "Pod")
    assert "env" not in pod["spec"]["containers"][0], "no clear key in values: the test sends none"


def _ray_containers(objs: tuple[dict, ...]) -> list[dict]:
    clusters = [o["spec"]["rayClusterConfig"] for o in by_kind(objs, "RayService")]
    clusters += [o["spec"]["rayClusterSpec"] for o in by_kind(objs, "RayJob")]
    return [c for cluster in clusters for _, tpl in pod_templates(cluster) for c in tpl["spec"]["containers"]]


@pytest.mark.parametrize("case", list(CASES))
def test_engines_are_closed_and_bound_to_the_pod_ip(case: str) -> None:
    objs = helm_template(*CASES[case])
    values = values_of(case)
    name = values["engineSecret"]["existingSecret"] or "llm-llmserve-engine"
    containers = _ray_containers(objs)
    assert len(containers) >= 2
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["LLMSERVE_ENGINE_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "engine-secret"}
        assert env["LLMSERVE_BIND_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert "LLMSERVE_ADAPTER_ROOTS" not in env  # no serve.gateway.adapter_roots in these values
    generated = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == name]
    if values["engineSecret"]["existingSecret"]:
        assert generated == []
    else:
        [secret] = generated
        value = base64.b64decode(secret["data"]["engine-secret"]).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{48}", value), "what serve/contract/secret.py accepts"


def test_adapter_roots_reach_every_ray_container() -> None:
    objs = helm_template("-f", CPU_DEV, "--set", "serve.gateway.adapter_roots={/adapters/a,/adapters/b}")
    for c in _ray_containers(objs):
        assert {"name": "LLMSERVE_ADAPTER_ROOTS", "value": "/adapters/a:/adapters/b"} in c["env"]


def test_prometheus_rule_carries_the_alert_file() -> None:
    from tests.k8s.support import OBSERVABILITY

    rule = one(helm_template(*CASES["cpu-dev-everything"]), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"]
    dashboard = next(c for c in by_kind(helm_template(), "ConfigMap") if c["metadata"]["name"].endswith("dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["llmserve.json"].strip() == (OBSERVABILITY / "dashboard.json").read_text().strip()


def test_batch_job_runs_the_configured_entrypoint_without_gateways() -> None:
    job = one(helm_template(*CASES["production-batch"]), "RayJob")
    assert job["spec"]["entrypoint"].startswith("llmserve cache build ")
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["l4", "a100x2"]
    for _, tpl in pod_templates(job["spec"]["rayClusterSpec"]):
        assert tpl["metadata"]["labels"]["app.kubernetes.io/component"] == "batch"
        assert "llmserve.io/gateway" not in tpl["metadata"]["labels"]


@pytest.mark.parametrize("args, message", [
    (("--set", "serve.gateway.host=127.0.0.1"), "0.0.0.0"),
    (("--set", "gateway.replicas=2"), "gateway.replicas (2) exceeds"),
    (("--set", "head.gateway=false"), "no pod can host the gateway"),
    (("--set", "imageTag=1"), "additional properties 'imageTag' not allowed"),
    (("--set", "serve.models=null"), "models"),
])
def test_bad_values_are_refused(args: tuple[str, ...], message: str) -> None:
    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), "-f", CPU_DEV, *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def _value_keys(text: str) -> list[tuple[str, bool]]:
    """(dotted path, has a `# --` comment) of every key of values.yaml that is a value: a key with a
    `# --` comment, or an undocumented key that has no keys below it and is not inside a documented
    value (the contents of a documented value are its default, not values of their own)."""
    lines = text.splitlines()
    out: list[tuple[str, bool]] = []
    stack: list[tuple[int, str, bool]] = []  # indent, path, documented
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z0-9_.-]+):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --")
        if not documented and any(doc for _, _, doc in stack):
            continue
        path = ".".join([p for _, p, _ in stack[-1:]] + [key])
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        is_parent = line.rstrip().endswith(":") and re.match(rf"^ {{{indent + 1},}}[A-Za-z0-9_.-]+:", nxt)
        if documented or not is_parent:
            out.append((path, documented))
        stack.append((indent, path, documented))
    return out


def test_every_value_is_documented_in_values_and_readme() -> None:
    keys = _value_keys((CHART / "values.yaml").read_text())
    assert len(keys) > 50
    assert [p for p, doc in keys if not doc] == [], "values without a `# --` comment"
    readme = (CHART / "README.md").read_text()
    assert [p for p, _ in keys if f"| `{p}` |" not in readme] == [], "values missing from the README table"


@pytest.mark.parametrize("case, warns", [("default", True), ("cpu-dev", False), ("production", False)])
def test_notes_render_and_warn_about_missing_keys(case: str, warns: bool) -> None:
    file = VALUES_FILES[case]
    proc = subprocess.run([tool("helm"), "install", "llm", str(CHART), "--dry-run=client", "--namespace", "llm",
                           *(["-f", file] if file else [])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "helm test llm -n llm" in notes
    assert ("no API keys are configured" in notes) == warns


def test_metrics_are_served_only_on_a_cluster_internal_service() -> None:
    """Gateway metrics name keys and per-key spend: the public Service carries only the API port,
    and the ServiceMonitor scrapes the ClusterIP metrics Service on serve.gateway.metrics_port."""
    objs = helm_template(*CASES["production"])
    services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in by_kind(objs, "Service")}
    assert "gateway" not in services, "the API Service is KubeRay's, from the RayService's serveService"
    assert [p["name"] for p in gateway_service(objs)["spec"]["ports"]] == ["serve"]
    metrics = services["gateway-metrics"]["spec"]
    assert metrics["type"] == "ClusterIP" and [p["port"] for p in metrics["ports"]] == [9464]
    [monitor] = by_kind(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway-metrics"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_api_key_entries_take_every_field_the_gateway_reads() -> None:
    """values.schema.json's apiKeys items are serve/config.py's ApiKey (plus the clear `key` the chart
    hashes): a field added there is usable from the chart's values."""
    import json

    from serve.config import ApiKey

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["apiKeys"]["items"]
    assert set(schema["properties"]) == set(ApiKey.model_fields) | {"key"}
    objs = helm_template("-f", CPU_DEV, "--set", "apiKeys[0].name=ops,apiKeys[0].key=sk-ops,apiKeys[0].admin=true")
    [secret] = [s for s in by_kind(objs, "Secret") if "keys.yaml" in s.get("data", {})]
    [key] = yaml.safe_load(base64.b64decode(secret["data"]["keys.yaml"]))["keys"]
    assert ApiKey.model_validate(key).admin is True
