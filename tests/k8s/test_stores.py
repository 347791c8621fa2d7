"""Redis and the batch store: every Ray pod gets their URLs from Secrets (never from the RayService),
the chart's Redis is closed and persistent, and the values that would leak a password or share one
SQLite file between gateways are refused."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.cluster.kubelet import expand
from tests.k8s.support import (
    CASES,
    CHART,
    CPU_DEV,
    PRODUCTION,
    by_kind,
    helm_template,
    one,
    pod_templates,
    tool,
    validate,
)

REDIS_URL = "LLMSERVE__CACHE__REDIS_URL"
DATABASE_URL = "LLMSERVE__BATCH__DATABASE_URL"


def _ray_envs(objs: tuple[dict[str, Any], ...]) -> list[list[dict[str, Any]]]:
    """The env list of every Ray container (serving cluster and batch RayJob)."""
    clusters = [o["spec"]["rayClusterConfig"] for o in by_kind(objs, "RayService")]
    clusters += [o["spec"]["rayClusterSpec"] for o in by_kind(objs, "RayJob")]
    envs = [c["env"] for cluster in clusters for _, tpl in pod_templates(cluster) for c in tpl["spec"]["containers"]]
    assert len(envs) >= 2
    return envs


def _expand(env: list[dict[str, Any]], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment a container sees: secretKeyRef resolved, then $(VAR) expanded from the
    variables defined earlier in the list only (Kubernetes' rule; a later one stays literal)."""
    seen: dict[str, str] = {}
    for e in env:
        if "value" in e:
            seen[e["name"]] = expand(e["value"], seen)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            seen[e["name"]] = secrets.get((ref["name"], ref["key"]), "<unresolved>")
    return seen


@pytest.mark.parametrize("case", ["default", "cpu-dev", "cpu-dev-everything"])
def test_every_ray_pod_reaches_the_charts_redis_with_its_password(case: str) -> None:
    objs = helm_template(*CASES[case])
    [secret] = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == "llm-llmserve-redis"]
    assert set(secret["data"]) == {"redis-password"}
    for env in _ray_envs(objs):
        names = [e["name"] for e in env]
        assert names.index("LLMSERVE_REDIS_PASSWORD") < names.index(REDIS_URL), "$(VAR) needs the password first"
        seen = _expand(env, {("llm-llmserve-redis", "redis-password"): "pw"})
        assert seen[REDIS_URL] == "redis://:pw@llm-llmserve-redis:6379/0"
        assert DATABASE_URL not in seen


def test_an_external_redis_comes_from_its_secret() -> None:
    objs = helm_template("-f", CPU_DEV, "--set", "redis.enabled=false,redis.external.existingSecret=my-redis")
    assert not [o for o in objs if "redis" in o["metadata"]["name"]]
    for env in _ray_envs(objs):
        [url] = [e for e in env if e["name"] == REDIS_URL]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}
        assert "LLMSERVE_REDIS_PASSWORD" not in [e["name"] for e in env]


def test_without_redis_no_pod_gets_a_url_and_the_notes_say_what_is_lost() -> None:
    args = ["-f", CPU_DEV, "--set", "redis.enabled=false"]
    for env in _ray_envs(helm_template(*args)):
        assert not {REDIS_URL, "LLMSERVE_REDIS_PASSWORD"} & {e["name"] for e in env}
    proc = subprocess.run([tool("helm"), "install", "llm", str(CHART), "--dry-run=client", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adapters\npromoted at runtime do not reach engine replicas started later" in proc.stdout


def test_the_charts_redis() -> None:
    objs = helm_template("-f", CPU_DEV)
    sts = one(objs, "StatefulSet")
    assert sts["metadata"]["name"] == "llm-llmserve-redis" and sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "redis:7.4-alpine"
    seen = _expand(c["env"], {("llm-llmserve-redis", "redis-password"): "pw"})
    args = [re.sub(r"\$\((\w+)\)", lambda m: seen[m.group(1)], a) for a in c["command"] + c["args"]]
    assert args[0] == "redis-server"
    assert args[args.index("--requirepass") + 1] == "pw"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert "redis-cli" in " ".join(probe["exec"]["command"]) and "ping" in " ".join(probe["exec"]["command"])
    assert seen["REDISCLI_AUTH"] == "pw", "the probes' redis-cli authenticates"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    svc = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "llm-llmserve-redis")
    assert svc["spec"]["type"] == "ClusterIP" and [p["port"] for p in svc["spec"]["ports"]] == [6379]
    assert all(svc["spec"]["selector"].get(k) == v for k, v in sts["spec"]["template"]["metadata"]["labels"].items())
    for obj in (sts, svc):
        validate(obj)


def test_redis_without_persistence_uses_an_empty_dir_and_an_existing_secret() -> None:
    objs = helm_template("-f", CPU_DEV, "--set", "redis.persistence.enabled=false,redis.auth.existingSecret=pw")
    sts = one(objs, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert sts["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert not [s for s in by_kind(objs, "Secret") if "redis" in s["metadata"]["name"]]
    for env in _ray_envs(objs):
        [pw] = [e for e in env if e["name"] == "LLMSERVE_REDIS_PASSWORD"]
        assert pw["valueFrom"]["secretKeyRef"] == {"name": "pw", "key": "redis-password"}


def test_production_gets_redis_and_postgresql_from_existing_secrets() -> None:
    objs = helm_template("-f", PRODUCTION)
    assert not [s for s in by_kind(objs, "Secret") if s["metadata"]["name"].startswith("llmserve")]
    for env in _ray_envs(objs):
        seen = _expand(env, {("llmserve-redis", "redis-password"): "pw",
                             ("llmserve-postgresql", "url"): "postgresql://u:p@h/db"})
        assert seen[REDIS_URL] == "redis://:pw@llm-llmserve-redis:6379/0"
        assert seen[DATABASE_URL] == "postgresql://u:p@h/db"


def _refused(*args: str) -> str:
    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0, "rendered, but should have been refused"
    return proc.stderr


QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert m, quantity
    return int(m.group(1)) * QUANTITY.get(m.group(2) or "", 1)


@pytest.mark.parametrize("case", ["default", "cpu-dev", "production"])
def test_redis_is_bounded_below_its_memory_limit(case: str) -> None:
    """A Redis without maxmemory grows until the kubelet OOM-kills it, in a loop, and takes every
    tenant's cache, rate buckets, responses and adapters with it (issue 26). Bounded at most 3/4 of
    the limit (an AOF rewrite forks it), evicting only keys that have a TTL."""
    [c] = one(helm_template(*CASES[case]), "StatefulSet")["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    maxmemory = int(args[args.index("--maxmemory") + 1])
    assert 0 < maxmemory * 4 <= _bytes(c["resources"]["limits"]["memory"]) * 3
    assert maxmemory >= 256 * 2**20, "room for the cache"
    assert args[args.index("--maxmemory-policy") + 1].startswith("volatile-")


def test_redis_bounds_that_cannot_hold_are_refused() -> None:
    err = _refused("-f", CPU_DEV, "--set", "redis.maxmemory=900Mi")
    assert "redis.maxmemory (900Mi) must be at most 75% of redis.resources.limits.memory (1Gi)" in err
    assert "maxmemoryPolicy" in _refused("-f", CPU_DEV, "--set", "redis.maxmemoryPolicy=allkeys-lru")
    assert "missing property 'limits'" in _refused("-f", CPU_DEV, "--set", "redis.resources.limits=null")


def test_a_redis_url_in_values_is_refused() -> None:
    err = _refused("-f", CPU_DEV, "--set", "serve.cache.redis_url=redis://:secret@r:6379/0")
    assert "serve.cache.redis_url must stay null" in err and "redis.external.existingSecret" in err


def test_several_gateways_need_postgresql_for_batches() -> None:
    two = ("-f", PRODUCTION, "--set", "batchStore.postgresql.existingSecret=")
    err = _refused(*two)
    assert "gateway.replicas is 2" in err and "batchStore.postgresql.existingSecret" in err
    # One gateway, or the Batch API off: SQLite is fine.
    helm_template("-f", PRODUCTION, "--set", "batchStore.postgresql.existingSecret=,gateway.replicas=1")
    objs = helm_template(*two, "--set", "serve.batch.enabled=false")
    apps = yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])["applications"]
    [gateway] = [a for a in apps if a["name"] == "gateway"]
    # Serve refuses an override of a deployment the app lacks: no batch-worker without batches.
    assert [d["name"] for d in gateway["deployments"]] == ["gateway"]


def test_several_gateways_need_batch_files_on_a_shared_volume() -> None:
    """An upload lands on the pod of the gateway that took it; the batch worker and the other
    gateways read it there, so with several gateways the files must be on a volume all mount."""
    err = _refused("-f", PRODUCTION, "--set", "modelCache.type=emptyDir")
    assert "gateway.replicas is 2" in err and "modelCache.type: pvc" in err
    helm_template("-f", PRODUCTION, "--set", "modelCache.type=emptyDir,serve.batch.storage_dir=/shared/batch")
    helm_template("-f", PRODUCTION, "--set", "modelCache.type=emptyDir,serve.batch.enabled=false")


def test_engines_get_the_adapter_roots() -> None:
    """A replica started after a promotion loads the promoted adapter only from these roots."""
    objs = helm_template("-f", CPU_DEV, "--set", "serve.gateway.adapter_roots[0]=/model-cache/adapters")
    apps = yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])["applications"]
    engines = [a for a in apps if a["import_path"] == "serve.launch.engine_replica:build"]
    assert len(engines) == 2 and all(a["args"]["adapter_roots"] == ["/model-cache/adapters"] for a in engines)


@pytest.mark.parametrize("case", ["default", "cpu-dev", "production", "production-batch"])
def test_the_serving_cluster_survives_a_lost_head_on_the_charts_redis(case: str) -> None:
    """GCS fault tolerance (issue 28): without it a lost head restarts every worker and reloads every
    model. KubeRay's gcsFaultToleranceOptions point at the chart's Redis, with the password from the
    Secret the Redis server itself reads (never inline); the batch RayJob's cluster has none."""
    objs = helm_template(*CASES[case])
    service = one(objs, "RayService")
    validate(service)
    cluster = service["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    [redis] = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    server_secret = next(e for e in redis["env"] if e["name"] == "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    redis_svc = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-redis"))
    assert ft == {"redisAddress": f"{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}",
                  "redisPassword": {"valueFrom": {"secretKeyRef": server_secret}}}
    # KubeRay refuses the options beside a redis-password of the head's own.
    assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]
    for job in by_kind(objs, "RayJob"):
        assert "gcsFaultToleranceOptions" not in job["spec"]["rayClusterSpec"]


def test_gcs_fault_tolerance_on_an_external_redis_or_none() -> None:
    external = "gcsFaultTolerance.external.address=r.example:6379,gcsFaultTolerance.external.passwordSecret=gcs-redis"
    objs = helm_template("-f", CPU_DEV, "--set", "redis.enabled=false," + external)
    ft = one(objs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft == {"redisAddress": "r.example:6379",
                  "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "gcs-redis", "key": "redis-password"}}}}
    objs = helm_template("-f", CPU_DEV, "--set", "redis.enabled=false")
    assert "gcsFaultToleranceOptions" not in one(objs, "RayService")["spec"]["rayClusterConfig"]
