"""The chart with gateway autoscaling (serve.gateway.autoscaling): the gateway application's config
carries it to build(), which hands Serve the autoscaling_config; the chart refuses a max_replicas
above the pods that may host a gateway (the head with head.gateway, plus each gateway group's
maxReplicas), a min_replicas of 0, and several gateways sharing SQLite."""

from __future__ import annotations

import subprocess

import pytest

from tests.k8s.support import CHART, check_gateway_wiring, check_serve_config_v2, helm_template, one, tool

CPU_DEV = str(CHART / "values-cpu-dev.yaml")
PRODUCTION = str(CHART / "values-production.yaml")  # head.gateway false, a gateway group of maxReplicas 2


def gateway_app(*args: str) -> tuple[dict, object]:
    objs = helm_template(*args)
    raw, config = check_serve_config_v2(one(objs, "RayService")["spec"]["serveConfigV2"])
    check_gateway_wiring(objs, raw, config)
    return next(a for a in raw["applications"] if a["name"] == "gateway"), config


def refusal(*args: str) -> str:
    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stderr


def test_the_gateway_app_carries_autoscaling_to_build_and_build_to_serve():
    from serve.launch.gateway_replica import build

    app, config = gateway_app("-f", PRODUCTION, "--set", "serve.gateway.autoscaling.min_replicas=1",
                              "--set", "serve.gateway.autoscaling.max_replicas=2",
                              "--set", "serve.gateway.autoscaling.target_ongoing_requests=128")
    assert app["args"]["config"]["gateway"]["autoscaling"] == {"min_replicas": 1, "max_replicas": 2,
                                                               "target_ongoing_requests": 128}
    assert config.gateway.autoscaling is not None and config.gateway.autoscaling.replica_start_s == 60
    deployment = build(app["args"])._bound_deployment._deployment_config
    scaling = deployment.autoscaling_config
    assert "num_replicas" not in deployment.user_configured_option_names
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 2, 128)
    assert scaling.policy.policy_function == "serve.policies.autoscaling:SLOPolicy"


def test_by_default_the_gateways_are_the_fixed_count():
    app, config = gateway_app("-f", PRODUCTION)
    assert config.gateway.autoscaling is None
    from serve.launch.gateway_replica import build

    assert build(app["args"])._bound_deployment.num_replicas == app["args"]["replicas"] == 2


@pytest.mark.parametrize("args, hosts", [
    (("-f", PRODUCTION), 2),  # one gateway group of maxReplicas 2, none on the head
    (("-f", PRODUCTION, "--set", "workerGroups[0].maxReplicas=4"), 4),
    (("-f", PRODUCTION, "--set", "workerGroups[0].maxReplicas=4", "--set", "head.gateway=true"), 5),
    (("-f", CPU_DEV), 1),  # the head only
])
def test_max_replicas_up_to_the_pods_that_may_host_a_gateway(args: tuple[str, ...], hosts: int):
    # With a PostgreSQL batch store and shared files, as several gateways need (checked below).
    shared = ("--set", "batchStore.postgresql.existingSecret=pg",
              "--set", "modelCache.type=pvc,modelCache.storageClassName=nfs-rwx")
    app, _ = gateway_app(*args, *shared, "--set", f"serve.gateway.autoscaling.max_replicas={hosts}")
    assert app["args"]["config"]["gateway"]["autoscaling"]["max_replicas"] == hosts
    err = refusal(*args, *shared, "--set", f"serve.gateway.autoscaling.max_replicas={hosts + 1}")
    assert f"serve.gateway.autoscaling.max_replicas ({hosts + 1}) exceeds the pods that may host a gateway " \
           f"replica ({hosts}:" in err


def test_at_least_one_gateway():
    err = refusal("-f", PRODUCTION, "--set", "serve.gateway.autoscaling.min_replicas=0")
    assert "/serve/gateway/autoscaling/min_replicas" in err and "minimum" in err


def test_several_autoscaled_gateways_need_the_shared_batch_store():
    args = ("-f", CPU_DEV, "--set", "workerGroups[0].gateway=true", "--set", "serve.gateway.autoscaling.max_replicas=2")
    err = refusal(*args)
    assert "serve.gateway.autoscaling.max_replicas is 2" in err and "batchStore.postgresql.existingSecret" in err
    err = refusal(*args, "--set", "batchStore.postgresql.existingSecret=pg")
    assert "serve.gateway.autoscaling.max_replicas is 2" in err and "modelCache.type: pvc" in err
    # One at most needs neither.
    app, _ = gateway_app("-f", CPU_DEV, "--set", "serve.gateway.autoscaling.max_replicas=1")
    assert app["args"]["config"]["gateway"]["autoscaling"]["max_replicas"] == 1
