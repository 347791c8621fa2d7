"""Can KubeRay's autoscaler add a pod for every model the chart deploys?

Ray's own code answers it, offline: the RayCluster spec the chart renders goes through the function
KubeRay's autoscaler sidecar runs on it (`_derive_autoscaling_config_from_ray_cr`, which turns worker
groups into node types), and each model's replica bundles (Ray Serve LLM's own: the engine config's
placement bundles merged with the replica actor's CPUs, as `LLMServer.get_deployment_options` does)
go to the autoscaler's scheduler (`ResourceDemandScheduler.get_nodes_to_launch`), which says which
groups it would add and what no group can hold.

This is how issue 15's hypothesis was checked: with the production values as they were (no
`acceleratorType`), both GPU models came back unfulfilled, e.g. `[{'GPU': 1, 'accelerator_type:L4':
0.001, 'CPU': 4.0}]`, because Ray Serve LLM asks for `accelerator_type:<X>` on every bundle of a
model with accelerator_type and a group only has what it declares.
"""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.k8s.support import CHART, helm_template, run, tool

PRODUCTION = str(CHART / "values-production.yaml")


def _ray_cluster(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    return {"metadata": {"name": svc["metadata"]["name"], "namespace": "llm"},
            "spec": copy.deepcopy(svc["spec"]["rayClusterConfig"])}


def _node_types(ray_cr: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(ray_cr)


def _replica_bundles(values_file: str) -> dict[str, list[dict[str, float]]]:
    from ray.llm._internal.serve.core.server.llm_server import _merge_replica_actor_and_child_actor_bundles

    from serve.config import Config
    from serve.engine.deployments import llm_config_for

    with open(values_file) as f:
        cfg = Config.model_validate(yaml.safe_load(f)["serve"])
    out = {}
    for m in cfg.models:
        engine = llm_config_for(m, cfg.ray.namespace).get_engine_config()
        out[m.name] = _merge_replica_actor_and_child_actor_bundles(
            engine.placement_bundles, {"CPU": m.deployment.num_cpus})
    return out


def _groups_added(config: dict[str, Any], bundles: list[dict[str, float]]) -> tuple[dict[str, int], list[Any]]:
    """What the autoscaler adds to an empty cluster for these bundles, beyond each group's minimum,
    and what it could not place."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    types = copy.deepcopy(config["available_node_types"])
    for t in types.values():  # count only what the demand adds
        t["min_workers"] = 0
    sched = ResourceDemandScheduler(None, types, config["max_workers"], config["head_node_type"],
                                    config["upscaling_speed"])
    launch, residual = sched.get_nodes_to_launch(
        [], {}, bundles, {}, [], {}, [], NodeAvailabilitySummary(node_availabilities={}))
    # The head is not a worker group; with no nodes given, the scheduler counts it as missing.
    return {k: v for k, v in launch.items() if v and k != config["head_node_type"]}, residual


def test_production_gpu_groups_declare_the_accelerator_their_models_ask_for() -> None:
    config = _node_types(_ray_cluster(helm_template("-f", PRODUCTION)))
    types = config["available_node_types"]
    assert types["l4"]["resources"]["accelerator_type:L4"] == 1
    assert types["a100x2"]["resources"]["accelerator_type:A100"] == 1
    assert (types["l4"]["min_workers"], types["l4"]["max_workers"]) == (1, 8)


@pytest.mark.parametrize(("model", "group", "pods"), [
    ("llama-3.1-8b-instruct", "l4", 1),
    # Tensor-parallel over two GPUs, PACK: both bundles on one two-GPU pod.
    ("qwen2.5-32b-instruct-awq", "a100x2", 1),
])
def test_the_autoscaler_adds_a_pod_of_the_models_group_for_a_new_replica(model: str, group: str, pods: int) -> None:
    config = _node_types(_ray_cluster(helm_template("-f", PRODUCTION)))
    bundles = _replica_bundles(PRODUCTION)[model]
    assert any(k.startswith("accelerator_type:") for b in bundles for k in b), bundles
    added, residual = _groups_added(config, bundles)
    assert residual == []
    assert added == {group: pods}


def test_without_the_accelerator_type_no_group_fits_and_the_chart_refuses(tmp_path: Any) -> None:
    """The hypothesis, kept as a regression: the same groups without acceleratorType leave every
    bundle unplaced, and the chart now fails at render time instead."""
    with open(PRODUCTION) as f:
        values = yaml.safe_load(f)
    for g in values["workerGroups"]:
        g.pop("acceleratorType", None)
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(values))
    # The RayService as it rendered before the check (the check is off with the autoscaler off;
    # the node types are what KubeRay's autoscaler would build with it on).
    config = _node_types(_ray_cluster(helm_template("-f", str(bare), "--set", "autoscaler.enabled=false")))
    bundles = _replica_bundles(PRODUCTION)["llama-3.1-8b-instruct"]
    added, residual = _groups_added(config, bundles)
    assert (added, residual) == ({}, bundles)

    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), "-f", str(bare)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no worker group declares acceleratorType: L4" in proc.stderr


def test_accelerator_type_is_a_ray_resource_as_kuberay_and_rays_autoscaler_read_it() -> None:
    """The rendered rayStartParams.resources is what KubeRay itself writes (single-quoted JSON), which
    `ray start --resources` takes after the shell and Ray's KubeRay config parser reads as is."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    spec = _ray_cluster(helm_template("-f", PRODUCTION))["spec"]
    (l4,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "l4"]
    raw = l4["rayStartParams"]["resources"]
    assert raw == "'{\"accelerator_type:L4\":1}'"
    assert _get_custom_resources({}, l4["rayStartParams"], "l4") == {"accelerator_type:L4": 1}
    # What bash hands `ray start` for --resources=<raw>.
    echoed = run(["bash", "-c", f"printf %s {raw}"])
    assert json.loads(echoed) == {"accelerator_type:L4": 1}


def test_a_pending_gateway_replica_makes_the_autoscaler_add_a_gateway_pod() -> None:
    """Ray 2.60's default autoscaler ignores label selectors: a gateway replica (0 CPUs, label
    selector only) would be a demand no node type answers for. Gateway pods declare
    llmserve_gateway: 1 and each gateway replica asks for it, so the scheduler adds a gateway pod
    for one, and nothing else fits on a gateway pod twice."""
    objs = helm_template("-f", PRODUCTION)
    config = _node_types(_ray_cluster(objs))
    assert config["available_node_types"]["gateway"]["resources"]["llmserve_gateway"] == 1
    assert "llmserve_gateway" not in config["available_node_types"]["l4"]["resources"]
    (svc,) = [o for o in objs if o["kind"] == "RayService"]
    (gw,) = [a for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"] if a["name"] == "gateway"]
    (opts,) = [d["ray_actor_options"] for d in gw["deployments"] if d["name"] == "gateway"]
    demand = {"CPU": float(opts["num_cpus"]), **opts["resources"]}
    added, residual = _groups_added(config, [demand, demand])
    assert residual == []
    assert added == {"gateway": 2}


def test_accelerator_type_and_ray_start_resources_together_are_refused(tmp_path: Any) -> None:
    with open(PRODUCTION) as f:
        values = yaml.safe_load(f)
    (l4,) = [g for g in values["workerGroups"] if g["name"] == "l4"]
    l4["rayStartParams"] = {"resources": "'{\"ssd\": 1}'"}
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump(values))
    proc = subprocess.run([tool("helm"), "template", "llm", str(CHART), "-f", str(both)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rayStartParams.resources cannot be combined" in proc.stderr
