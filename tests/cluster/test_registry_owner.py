"""The endpoint registry is created by a task on the head, whoever first asks for it.

Ray restarts a detached actor through the node of the worker that created it while that node
lives. Created by an engine or gateway replica on a worker pod, a registry lost with the head was
restarted through that worker, whose raylet still took the lost head for alive and sent the lease
straight back to it: 20,311 leases in 18 s on 2 cores after a lost head in tests/cluster/
test_chart_cluster.py (test_a_lost_head_with_gcs_fault_tolerance), and 20 leases in all once the
registry's creator was on the head. Here, on a real two-node Ray cluster (a head and a worker, as
Ray's own multi-node tests build one), a replica's stand-in on the worker asks for the registry,
and the actor table (the GCS's own record) names its owner's node."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cluster

SCRIPT = textwrap.dedent("""
    import json, ray
    from ray.cluster_utils import Cluster
    from serve.contract.registry import REGISTRY_NAME, get_registry

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"worker_pod": 1})
    ray.init(address=cluster.address)
    try:
        @ray.remote(num_cpus=0, resources={"worker_pod": 0.01})
        def replica_on_worker():
            registry = get_registry("registry-owner-test")
            ray.get(registry.register.remote("m", "r", "http://r", 30))
            return ray.get_runtime_context().get_node_id()

        worker = ray.get(replica_on_worker.remote())
        head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
        (entry,) = [a for a in ray._private.state.actors().values() if a.get("Name") == REGISTRY_NAME]
        print(json.dumps({"head": head, "worker": worker, "owner_node": entry["OwnerAddress"]["NodeID"],
                          "actor_node": entry["Address"]["NodeID"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_the_registry_asked_for_on_a_worker_is_created_and_owned_on_the_head() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["head"] != seen["worker"], seen  # the stand-in really ran on the worker
    assert seen["actor_node"] == seen["head"], seen  # the pin (an autoscaled worker stays removable)
    assert seen["owner_node"] == seen["head"], seen  # what a restart after a lost head goes through
